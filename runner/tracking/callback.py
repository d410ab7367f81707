"""A Lightning logger that sends metrics to MLflow in one batched call per epoch."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.utilities import rank_zero_only

from runner.tracking.base import Tracker


class EpochMetricsLogger(Logger):
    """Buffers the epoch metrics Lightning logs and writes them to MLflow in batches.

    Each write is one `log_batch` holding every epoch since the last one (the step is the epoch
    number); writes happen at most every `flush_every_s` seconds and when training ends, so a
    run costs MLflow a handful of writes instead of one per epoch (~5-10 ms each with SQLite)
    while the UI still shows live curves.
    """

    def __init__(self, tracker: Tracker, run_id: str, flush_every_s: float = 10.0) -> None:
        super().__init__()
        self.tracker, self.run_id, self.flush_every_s = tracker, run_id, flush_every_s
        self._buffer: list[tuple[dict[str, float], int]] = []
        self.history: list[tuple[dict[str, float], int]] = []  # every epoch, for the member cache to replay
        self._history_file: str | None = None
        self._last_flush = time.monotonic()

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
        entry = ({k: float(v) for k, v in metrics.items()}, epoch)
        self._buffer.append(entry)
        self.history.append(entry)
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self.tracker.log_metric_steps(self.run_id, self._buffer)
        self._buffer = []
        self._last_flush = time.monotonic()

    # DDP (trainer.strategy=ddp runs as ddp_spawn): the logger is pickled into each training process.
    # The tracker stays here; rank 0 there opens its own MLflow client on the same store and run, and
    # writes the epochs it logged to `_history_file` for this process to read back.
    def __getstate__(self) -> dict:
        import tempfile

        if self._history_file is None:
            self._history_file = tempfile.mkstemp(prefix="epochs-", suffix=".json")[1]
        state = dict(self.__dict__)
        state["tracker"] = ("mlflow", self.tracker.uri, self.tracker.experiment, self.tracker.artifact_location)
        return state

    def __setstate__(self, state: dict) -> None:
        from runner.tracking.mlflow_tracker import MlflowTracker

        self.__dict__.update(state)
        if isinstance(self.tracker, tuple):
            self.tracker = MlflowTracker(*self.tracker[1:])

    def read_back(self) -> None:
        """After a spawned fit: the epochs rank 0 logged, into this process's `history`."""
        import json
        import os

        path, self._history_file = self._history_file, None
        if path and os.path.exists(path):
            with open(path) as f:
                text = f.read()
            os.unlink(path)
            if text:
                self.history = [(dict(m), int(e)) for m, e in json.loads(text)]

    def replay(self, history: list) -> None:
        """Log a member's learning curves from the cache as if it had just trained (same epochs)."""
        entries = [({k: float(v) for k, v in metrics.items()}, int(epoch)) for metrics, epoch in history]
        if entries:
            self.tracker.log_metric_steps(self.run_id, entries)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._flush()
        if self._history_file:  # a spawned training process: hand the epochs back
            import json

            with open(self._history_file, "w") as f:
                json.dump(self.history, f)
