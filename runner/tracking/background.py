"""MLflow in a worker process: the main process never imports mlflow and never waits for a write.

Importing mlflow and opening a SQLite store (SQLAlchemy models, the schema check) is about two
seconds of Python. BackgroundTracker starts that in a worker process (runner/tracking/worker.py)
the moment it is built (the command line builds it right after checking the config), so it
overlaps with importing torch and Lightning instead of delaying the first training step. After
that every write is queued to the worker, in order, and the main process goes on training. Calls
that return something (`find_runs`, `start_run`) and `end_run` wait for the worker; `run()` waits
for all of a run's writes before it marks the run FINISHED, and an error in a queued write is
raised by the next call that waits. Arguments are pickled when the call is made, so the caller may
change them afterwards.

The worker is a plain `python -m runner.tracking.worker` talking over its stdin and stdout: unlike
multiprocessing it never re-imports the caller's main script, works the same under every launcher
(joblib's loky workers, SLURM tasks), and ends when its stdin closes, i.e. when this process ends.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from runner.errors import ConfigError
from runner.timing import timed
from runner.tracking.base import FoundRun, Tracker
from runner.tracking.retry import LOCK_WAIT_S, MLFLOW_BUSY_WAIT_S, StoreLocked, cpu_seconds, opening_holder, sqlite_path
from runner.tracking.worker import bound_http_retries, receive, send

log = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """The MLflow worker process stopped; or, as a cause, the worker-side traceback of an error."""


class TrackingWriteError(RuntimeError):
    """A queued write failed in the tracking store (its cause is the store's own error)."""


class TrackingTimeout(RuntimeError):
    """The tracking store did not answer in time (an unreachable or dead server, a stuck store)."""


class BackgroundTracker(Tracker):
    """MlflowTracker's interface, with the MlflowTracker itself in a worker process."""

    def __init__(
        self, uri: str, experiment: str, artifact_location: str | None = None, timeout_s: float = 30.0
    ) -> None:
        self.uri, self.experiment, self.artifact_location = uri, experiment, artifact_location
        self.timeout_s = timeout_s  # the longest a call waits while the worker makes no progress
        # a SQLite store shared with other jobs: the worker waits (without CPU) for their locks, a bounded
        # time after which it answers with an error of its own (runner/tracking/retry.py); that is not a hang
        self._lock_wait_s = LOCK_WAIT_S + MLFLOW_BUSY_WAIT_S + 10 if sqlite_path(uri) else 0.0
        self.busy_s = 0.0  # time this process spent queuing calls and waiting for answers
        self.setup_s = 0.0  # of which: waiting for the worker to open the store
        self.broken = self.closed = False
        root = str(Path(__file__).resolve().parents[2])  # so the worker imports this same `runner`
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "runner.tracking.worker"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._answers: collections.deque[Future] = collections.deque()  # in the order of the calls
        self._pending: list[Future] = []
        self._progress_at = time.monotonic()  # the worker's last answer
        self._cpu_seen: tuple[tuple, float] | None = None  # ((pid, its CPU seconds), ...), when read
        threading.Thread(target=self._send_calls, daemon=True, name="mlflow-calls").start()
        threading.Thread(target=self._read_answers, daemon=True, name="mlflow-answers").start()
        self._opening = self._submit("start", uri, experiment, artifact_location)
        atexit.register(self.close)

    def _send_calls(self) -> None:
        try:
            while (payload := self._outbox.get()) is not None:
                send(self._process.stdin, payload)
            self._process.stdin.close()
        except OSError:  # the worker is gone; _read_answers reports it
            pass

    def _read_answers(self) -> None:
        while True:
            try:
                message = receive(self._process.stdout)
            except (EOFError, OSError):
                break
            future = self._answers.popleft()
            self._progress_at = time.monotonic()
            try:
                ok, value, *details = pickle.loads(message)
            except Exception as e:  # noqa: BLE001 - never let one bad answer stop every later one
                ok, value, details = False, RuntimeError(f"an unreadable answer from the MLflow worker: {e}"), [""]
            if ok:
                future.set_result(value)
            else:
                value.__cause__ = WorkerError(f"in the MLflow worker:\n{details[0]}")
                future.set_exception(value)
        with self._lock:  # the worker ended: every call still waiting fails with that
            self.broken = True
            while self._answers:
                self._answers.popleft().set_exception(
                    WorkerError(f"the MLflow worker exited (code {self._process.wait()}); its stderr says why")
                )

    def _submit(self, method: str, *args: Any, **kwargs: Any) -> Future:
        payload = pickle.dumps((method, args, kwargs))
        future: Future = Future()
        with self._lock:
            if self.broken:
                future.set_exception(WorkerError("the MLflow worker exited; its stderr says why"))
            else:
                self._answers.append(future)
                self._outbox.put(payload)
        self._pending = [f for f in self._pending if not (f.done() and f.exception() is None)] + [future]
        return future

    def _wait(self, method: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> Any:
        future = self._submit(method, *args, **kwargs)
        self._pending.remove(future)  # its own error is raised as it is, below
        self.flush(timeout_s)  # the worker goes in order: everything queued before has landed too
        return self._result(future, method, timeout_s)

    def _result(self, future: Future, what: str, timeout_s: float | None = None) -> Any:
        """The answer to one call. `timeout_s` bounds how long the worker may make no progress (no answer,
        no CPU time used), not how long the answer takes: on a machine busy with other work, a queue of
        model logging ahead of this call is slow, not stuck; a server that does not answer is stuck. On a
        SQLite store the limit is at least the worker's own wait for other processes' locks."""
        if timeout_s is None:
            timeout_s = max(self.timeout_s, self._lock_wait_s)
        hint = (
            "is the server running and reachable? (tracking.timeout_s sets the limit)"
            if not self._lock_wait_s
            else "is the file on a disk that answers?"
        )
        started = time.monotonic()
        while True:
            try:
                return future.result(timeout=min(1.0, timeout_s))
            except FutureTimeout:
                if time.monotonic() - max(started, self._progress_at, self._working_at()) > timeout_s:
                    raise TrackingTimeout(
                        f"tracking.uri={self.uri!r}: no answer from the MLflow store within "
                        f"{timeout_s:g} s ({what}); {hint}"
                    ) from None

    def _working_at(self) -> float:
        """When the worker was last seen using the CPU (Linux: /proc/<pid>/stat; elsewhere never); while it
        waits to open a SQLite store, also the process opening it first (a fresh store: a minute under load)."""
        pids = [self._process.pid]
        if self._lock_wait_s and not self._opening.done() and (holder := opening_holder(self.uri)):
            pids.append(holder)
        cpu = tuple((pid, cpu_seconds(pid)) for pid in pids)
        if cpu[0][1] is None:
            return 0.0
        now = time.monotonic()
        if self._cpu_seen is None or cpu != self._cpu_seen[0]:
            self._cpu_seen = (cpu, now)
        return self._cpu_seen[1]

    @timed
    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every queued write has landed; raise the first one that failed."""
        start = time.perf_counter()
        try:
            self._result(self._opening, "opening the store", timeout_s)
        except (TrackingTimeout, StoreLocked):
            raise
        except Exception as e:  # a store that cannot be reached, created or written
            raise ConfigError(
                "tracking.uri",
                self.uri,
                f"a tracking store this job can reach and write ({type(e).__name__}: {str(e)[:400]})",
            ) from e
        finally:
            self.setup_s += time.perf_counter() - start
        pending, self._pending = self._pending, []
        for future in pending:
            try:
                self._result(future, "a queued write", timeout_s)
            except (TrackingTimeout, StoreLocked):  # each names tracking.uri and says what to check
                raise
            except Exception as e:  # the store refused or lost a write: say which store
                raise TrackingWriteError(
                    f"tracking.uri={self.uri!r}: a write to the MLflow store failed: {type(e).__name__}: {str(e)[:400]}"
                ) from e

    def time_spent(self) -> tuple[float, float]:
        """(busy, setup) seconds of the worker's own MLflow calls so far."""
        return self._wait("time_spent")  # MlflowTracker.time_spent, in the worker

    def close(self) -> None:
        """Wait for the queued writes, then stop the worker (it ends when its stdin closes)."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        try:
            # a store never opened holds nothing to wait for; one that failed to open was reported (a second
            # report from the atexit hook would be a second traceback after the job's one-line error)
            if not self.broken and self._opening.done() and self._opening.exception() is None:
                self.flush(min(self.timeout_s, 5.0))
        finally:
            self._outbox.put(None)
            try:
                self._process.wait(timeout=3)
            except subprocess.TimeoutExpired:  # stuck in a store that does not answer: do not hang on it
                self._process.kill()

    @timed
    def start_run(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        parent_id: str | None = None,
    ) -> str:
        return self._wait("start_run", name, params, tags, parent_id)

    @timed
    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        # after an interrupt or a failure the status write gets a few seconds, not the full timeout
        self._wait("end_run", run_id, status, timeout_s=None if status == "FINISHED" else min(self.timeout_s, 5.0))

    @timed
    def end_run_later(self, run_id: str) -> None:
        self._submit("end_run", run_id, "FINISHED")  # the worker makes it FAILED if a write of the run failed

    @timed
    def reopen_run(self, run_id: str) -> None:
        self._wait("reopen_run", run_id)

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
    def log_child(
        self,
        parent_id: str,
        name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        metrics: Mapping[str, float],
        arrays: Mapping[str, Any] | None = None,
        model: Any = None,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        self._submit("log_child", parent_id, name, params, tags, metrics, arrays, model, files)  # all bytes already

    @timed
    def log_evaluation(
        self,
        run_id: str,
        tags: Mapping[str, str],
        metrics: Mapping[str, float],
        arrays: Mapping[str, Any] | None = None,
        model: Any = None,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        self._submit("log_evaluation", run_id, tags, metrics, arrays, model, files)


_shared: BackgroundTracker | None = None
# model logging needs torch and mlflow.pytorch in the worker (which imports Lightning: ~3 s of CPU);
# with this many cores or more it imports them at once, on a spare core
SPARE_CORES = 4


def make_tracker(
    uri: str,
    experiment: str,
    artifact_location: str | None = None,
    background: bool = True,
    timeout_s: float = 30.0,
    log_models: bool = False,
) -> Tracker:
    """The `tracking` config group's target: an MLflow tracker, in a worker process by default.

    Jobs of one process with the same settings (a multirun with the basic launcher) share one worker.
    `log_models`: every evaluated model is logged as an MLflow LoggedModel of its child run.
    """
    global _shared
    if not background:
        bound_http_retries()
        from runner.tracking.mlflow_tracker import MlflowTracker

        tracker = MlflowTracker(uri, experiment, artifact_location)
        tracker.log_models = log_models
        return tracker
    if (
        _shared is None
        or _shared.broken
        or _shared.closed
        or (_shared.uri, _shared.experiment, _shared.artifact_location, _shared.timeout_s)
        != (uri, experiment, artifact_location, timeout_s)
    ):
        if _shared is not None:
            try:
                _shared.close()
            except Exception as e:  # noqa: BLE001 (its own runs already reported this)
                log.warning("closing the previous MLflow worker: %s", e)
        _shared = BackgroundTracker(uri, experiment, artifact_location, timeout_s)
    if log_models and not _shared.log_models and len(os.sched_getaffinity(0)) >= SPARE_CORES:
        _shared._submit("prepare_model_logging")  # imports in a worker thread, alongside the job
    # otherwise the worker imports them when the first model comes (seconds of CPU: with fewer cores,
    # earlier would slow the job's own imports or its training steps)
    _shared.log_models = log_models
    return _shared
