"""A Lightning logger that sends metrics to MLflow in one batched call per epoch."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.utilities import rank_zero_only

from runner.tracking.mlflow_tracker import MlflowTracker


class EpochMetricsLogger(Logger):
    """Buffers what Lightning logs and flushes it when the epoch changes and at the end.

    Train and val epoch means arrive in separate calls; batching them into one `log_batch` per
    epoch keeps MLflow's cost per run to a handful of writes. The step is the epoch number.
    """

    def __init__(self, tracker: MlflowTracker, run_id: str, prefix: str = "") -> None:
        super().__init__()
        self.tracker, self.run_id, self.prefix = tracker, run_id, prefix
        self._buffer: dict[str, float] = {}
        self._epoch: int | None = None

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self.run_id

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the pipeline logs the whole resolved config as params

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        metrics = dict(metrics)
        epoch = int(metrics.pop("epoch", step or 0))
        if self._epoch is not None and epoch != self._epoch:
            self._flush()
        self._epoch = epoch
        self._buffer.update({f"{self.prefix}{k}": float(v) for k, v in metrics.items()})

    def _flush(self) -> None:
        if self._buffer:
            self.tracker.log_metrics(self.run_id, self._buffer, step=self._epoch or 0)
        self._buffer = {}

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._flush()
