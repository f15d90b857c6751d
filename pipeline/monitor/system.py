"""GPU readings that MLflow's system metrics do not take: temperature, SM clock and the
clock-event (throttle) reasons, through NVML (``nvidia-ml-py``, the ``pynvml`` module).

MLflow's ``SystemMetricsMonitor`` already logs GPU utilisation, memory and power
(``system/gpu_<i>_power_usage_watts``); this adds, per GPU ``i`` (NVML's index, as MLflow's):
``system/gpu_<i>_temperature_c``, ``system/gpu_<i>_sm_clock_mhz`` and
``system/gpu_<i>_throttle_reasons`` (NVML's bitmask of ``nvmlClocksEventReason*``: 0 = none,
1 = idle; thermal or power slowdowns explain a throughput drop that is not the data). The
tracker's worker thread calls :meth:`GpuSampler.sample` every ``tracking.system_interval_s``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class GpuSampler:
    """Reads every GPU's temperature, SM clock and throttle reasons. Build it with
    :meth:`start`; a reading a GPU does not support is left out (said once per GPU)."""

    def __init__(self, nvml: Any, handles: list[Any]):
        self.nvml = nvml
        self.handles = handles
        self._unsupported: set[tuple[int, str]] = set()
        # Newer NVML names throttling "clock events"; the older name is a deprecated alias.
        reasons = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nvml, "nvmlDeviceGetCurrentClocksThrottleReasons"
        )
        self._readings: dict[str, Callable[[Any], float]] = {
            "temperature_c": lambda h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
            "sm_clock_mhz": lambda h: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
            "throttle_reasons": reasons,
        }

    @classmethod
    def start(cls, nvml: Any = None) -> GpuSampler | None:
        """Initialise NVML; ``None`` (and one INFO line) when there is no NVML or no GPU.
        ``nvml`` defaults to the ``pynvml`` module (tests pass a stand-in)."""
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                log.info("system: nvidia-ml-py is not installed: no system/gpu_* temperature, "
                         "clock or throttle metrics")
                return None
        try:
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except nvml.NVMLError as exc:
            log.info("system: NVML unavailable (%s): no system/gpu_* temperature, clock or "
                     "throttle metrics", exc)
            return None
        if not handles:
            nvml.nvmlShutdown()
            log.info("system: NVML sees no GPU: no system/gpu_* temperature, clock or throttle "
                     "metrics")
            return None
        return cls(nvml, handles)

    def sample(self) -> dict[str, float]:
        """``system/gpu_<i>_<reading>`` of every GPU now."""
        out: dict[str, float] = {}
        for i, handle in enumerate(self.handles):
            for name, read in self._readings.items():
                if (i, name) in self._unsupported:
                    continue
                try:
                    out[f"system/gpu_{i}_{name}"] = float(read(handle))
                except self.nvml.NVMLError as exc:
                    self._unsupported.add((i, name))
                    log.info("system: GPU %d: no %s reading (%s); not sampled again", i, name, exc)
        return out

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError as exc:
            log.debug("system: NVML shutdown: %s", exc)
