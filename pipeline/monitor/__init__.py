"""Monitoring: step timing, device memory, health checks with reports and plots.

For a training loop of your own, :func:`generate_health_report` runs the trainer's checks over
a history; :class:`HealthMonitor` does it step by step.
"""

from pipeline.monitor.health import HealthConfig, HealthMonitor, report_markdown
from pipeline.monitor.report import generate_health_report

__all__ = ["HealthConfig", "HealthMonitor", "generate_health_report", "report_markdown"]
