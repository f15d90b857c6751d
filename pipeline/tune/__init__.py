"""Hyperparameter search with Optuna; each trial is ``train(config)`` as a child MLflow run."""

from pipeline.tune.study import SearchParam, TuneConfig, load_tune_config, run_study

__all__ = ["SearchParam", "TuneConfig", "load_tune_config", "run_study"]
