"""MLflow tracking. The only package that imports mlflow."""
from runner.tracking.callback import EpochMetricsLogger
from runner.tracking.mlflow_tracker import MlflowTracker, flatten, source_tags

__all__ = ["EpochMetricsLogger", "MlflowTracker", "flatten", "source_tags"]
