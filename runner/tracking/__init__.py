"""MLflow tracking. The only package that imports mlflow."""
from runner.tracking.mlflow_tracker import MlflowTracker, flatten, source_tags
from runner.tracking.query import RunQueryError, download_artifact, list_experiments, search_runs

__all__ = ["EpochMetricsLogger", "MlflowTracker", "RunQueryError", "download_artifact", "flatten",
           "list_experiments", "search_runs", "source_tags"]


def __getattr__(name: str):
    # Lazy: the Lightning logger pulls in pytorch_lightning (seconds), which `runner.report` never needs.
    if name == "EpochMetricsLogger":
        from runner.tracking.callback import EpochMetricsLogger
        return EpochMetricsLogger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
