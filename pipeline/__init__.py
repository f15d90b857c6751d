"""Diffold training pipeline: configs, data, model, trainer, tracking, evaluation, tuning."""

__version__ = "0.1.0"
