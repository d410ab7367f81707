"""MLflow tracking. The only package that imports mlflow."""
from runner.tracking.callback import EpochMetricsLogger
from runner.tracking.mlflow_tracker import MlflowTracker, flatten, source_tags
from runner.tracking.query import RunQueryError, download_artifact, list_experiments, search_runs

__all__ = ["EpochMetricsLogger", "MlflowTracker", "RunQueryError", "download_artifact", "flatten",
           "list_experiments", "search_runs", "source_tags"]
