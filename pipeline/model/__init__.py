"""The Diffold model: config, builder and the training/prediction interface.

>>> from pipeline.model import ModelConfig, build_model
>>> model = build_model(ModelConfig())
>>> # out = model(batch); out["loss"].backward()          # training
>>> # pred = model.sample(features_only(batch), n_samples=5)  # prediction
"""

from pipeline.model.config import LossConfig, ModelConfig
from pipeline.model.diffold import Diffold, build_model, count_parameters, flops_per_step

__all__ = [
    "Diffold",
    "LossConfig",
    "ModelConfig",
    "build_model",
    "count_parameters",
    "flops_per_step",
]
