"""MLflow in a worker process: the main process never imports mlflow and never waits for a write.

Importing mlflow and opening a SQLite store (SQLAlchemy models, the schema check) is about two
seconds of Python. BackgroundTracker starts that in a spawned worker process the moment it is
built (the command line builds it right after checking the config), so it overlaps with importing
torch and Lightning instead of delaying the first training step. After that every write is queued
to the worker, in order, and the main process goes on training. Calls that return something
(`find_runs`, `start_run`) and `end_run` wait for the worker; `run()` waits for all of a run's
writes before it marks the run FINISHED, and an error in a queued write is raised by the next call
that waits. Arguments are pickled when the call is made, so the caller may change them afterwards.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Mapping
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from runner.timing import timed
from runner.tracking.base import FoundRun, Tracker

log = logging.getLogger(__name__)
_tracker: Any = None  # in the worker: the MlflowTracker doing the writes


def _start_worker(settings: dict[str, Any]) -> None:
    # Ctrl+C and SIGTERM reach the whole process group; the main process decides how its runs end
    # (KILLED) and needs the worker alive to record that.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:  # a main process killed outright must not leave its worker behind
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()
    global _tracker
    from runner.tracking.mlflow_tracker import MlflowTracker
    _tracker = MlflowTracker(**settings)


def _call(payload: bytes) -> Any:
    method, args, kwargs = pickle.loads(payload)
    if method == "time_spent":
        return _tracker.busy_s, _tracker.setup_s
    return getattr(_tracker, method)(*args, **kwargs)


class BackgroundTracker(Tracker):
    """MlflowTracker's interface, with the MlflowTracker itself in a worker process."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None) -> None:
        self.uri, self.experiment, self.artifact_location = uri, experiment, artifact_location
        self.settings = {"uri": uri, "experiment": experiment, "artifact_location": artifact_location}
        self.busy_s = 0.0   # time this process spent queuing calls and waiting for answers
        self.setup_s = 0.0  # of which: waiting for the worker to open the store
        self.broken = self.closed = False
        self._pending: list[Future] = []
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start_worker, initargs=(self.settings,))
        self._opening = self._submit("open")

    def _submit(self, method: str, *args: Any, **kwargs: Any) -> Future:
        self._pending = [f for f in self._pending if not (f.done() and f.exception() is None)]
        future = self._pool.submit(_call, pickle.dumps((method, args, kwargs)))
        self._pending.append(future)
        return future

    def _wait(self, method: str, *args: Any, **kwargs: Any) -> Any:
        future = self._submit(method, *args, **kwargs)
        self.flush()  # the worker goes in order: everything queued before has landed too
        return future.result()

    @timed
    def flush(self) -> None:
        """Wait until every queued write has landed; raise the first one that failed."""
        if not self._opening.done():
            start = time.perf_counter()
            wait([self._opening])
            self.setup_s += time.perf_counter() - start
        pending, self._pending = self._pending, []
        try:
            for future in pending:
                future.result()
        except BrokenExecutor:
            self.broken = True
            raise

    def time_spent(self) -> tuple[float, float]:
        """(busy, setup) seconds of the worker's own MLflow calls so far."""
        return self._wait("time_spent")

    def close(self) -> None:
        """Wait for the queued writes, then stop the worker."""
        self.closed = True
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)

    @timed
    def start_run(self, name: str, params: Mapping[str, Any] | None = None,
                  tags: Mapping[str, str] | None = None, parent_id: str | None = None) -> str:
        return self._wait("start_run", name, params, tags, parent_id)

    @timed
    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._wait("end_run", run_id, status)

    @timed
    def find_runs(self, tags: Mapping[str, str], status: str | None = None) -> list[FoundRun]:
        return self._wait("find_runs", tags, status)

    @timed
    def log_artifact(self, run_id: str, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._wait("log_artifact", run_id, str(Path(local_path).resolve()), artifact_path)  # the file may go after

    @timed
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        self._submit("log_params", run_id, params)

    @timed
    def log_metric_steps(self, run_id: str, entries: list[tuple[Mapping[str, float], int]]) -> None:
        self._submit("log_metric_steps", run_id, entries)

    @timed
    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self._submit("set_tags", run_id, tags)

    @timed
    def log_text(self, run_id: str, text: str, path: str) -> None:
        self._submit("log_text", run_id, text, path)

    @timed
    def log_figure(self, run_id: str, figure: Any, path: str) -> None:
        self._submit("log_figure", run_id, figure, path)

    @timed
    def log_arrays(self, run_id: str, path: str, **arrays: Any) -> None:
        self._submit("log_arrays", run_id, path, **arrays)

    @timed
    def log_child(self, parent_id: str, name: str, params: Mapping[str, Any], tags: Mapping[str, str],
                  metrics: Mapping[str, float], arrays: Mapping[str, Any] | None = None) -> None:
        self._submit("log_child", parent_id, name, params, tags, metrics, arrays)


_shared: BackgroundTracker | None = None


def make_tracker(uri: str, experiment: str, artifact_location: str | None = None,
                 background: bool = True) -> Tracker:
    """The `tracking` config group's target: an MLflow tracker, in a worker process by default.

    Jobs of one process with the same settings (a multirun with the basic launcher) share one
    worker. Tracking stays in-process where no worker can start: in a daemonic process, and in a
    joblib (loky) worker, whose own start method a spawned child cannot set up.
    """
    global _shared
    method = multiprocessing.get_start_method(allow_none=True)
    if not background or multiprocessing.current_process().daemon or \
            method not in (None, *multiprocessing.get_all_start_methods()):
        from runner.tracking.mlflow_tracker import MlflowTracker
        return MlflowTracker(uri, experiment, artifact_location)
    if _shared is None or _shared.broken or _shared.closed or _shared.settings != {
            "uri": uri, "experiment": experiment, "artifact_location": artifact_location}:
        if _shared is not None:
            try:
                _shared.close()
            except Exception as e:  # noqa: BLE001 (its own runs already reported this)
                log.warning("closing the previous MLflow worker: %s", e)
        _shared = BackgroundTracker(uri, experiment, artifact_location)
    return _shared
