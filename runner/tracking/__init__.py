"""Experiment tracking with MLflow. The only package that imports mlflow, and only when needed.

Names resolve lazily: `make_tracker` (the `tracking` config group's target) imports no mlflow (the
first MLflow call does, counted as the job's wait for MLflow); the report tool never needs Lightning.
"""

import importlib

_WHERE = {
    "FoundRun": "base",
    "Tracker": "base",
    "flatten": "base",
    "source_tags": "base",
    "make_tracker": "mlflow_tracker",
    "MlflowTracker": "mlflow_tracker",
    "EpochMetricsLogger": "callback",
    "PackedModel": "models",
    "LoadedModel": "models",
    "load_logged_model": "models",
    "pack_model": "models",
    "RunQueryError": "query",
    "download_artifact": "query",
    "list_experiments": "query",
    "search_runs": "query",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"runner.tracking.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
