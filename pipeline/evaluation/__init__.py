"""Evaluation: a trained model's sampled structures, or external prediction files."""

from pipeline.evaluation.external import evaluate_external
from pipeline.evaluation.model_eval import evaluate_model, predict

__all__ = ["evaluate_external", "evaluate_model", "predict"]
