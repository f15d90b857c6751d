"""The root config: one typed section per component, each defined next to its component."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config.fields import spec
from pipeline.data.config import DataConfig, LoaderConfig
from pipeline.model.config import ModelConfig
from pipeline.monitor.health import HealthConfig
from pipeline.monitor.perf import MonitorConfig
from pipeline.tracking import TrackingConfig
from pipeline.train.config import TrainerConfig
from pipeline.train.faults import FaultsConfig
from pipeline.train.optim import OptimConfig
from pipeline.train.recovery import RecoveryConfig
from pipeline.train.schedule import SchedulerConfig


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    output_dir: str = spec("outputs", help="where runs write checkpoints, reports and caches")
    seed: int = spec(0, ge=0, help="seed of every RNG (data, model init, noise)")
    scenario: str | None = spec(None, help="set by --scenario (recorded, not for editing)")
    preset: str | None = spec(None, help="set by --preset (recorded, not for editing)")
