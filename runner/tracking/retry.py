"""A SQLite tracking store shared by several processes (parallel jobs, a sweep, DDP ranks): wait for it.

SQLite lets one writer in at a time. MLflow waits 20 s for a lock inside its sessions (PRAGMA
busy_timeout), 5 s while it opens a store (the sqlite3 default), and then fails: "database is
locked". On a busy machine a writer can hold the lock longer than that. And MLflow creates and
migrates a fresh file without any lock between processes, so two that open it at once both run the
migrations and one fails ("table ... already exists", "duplicate column name").

Here: opening a store is serialised between processes (a file lock, waited for while its holder
works), and a call that finds the database locked is retried with backoff until `wait_s` has passed
since its first try (the try then under way may take MLflow's 20 s more); then one error naming
tracking.uri. Light: no mlflow import.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

LOCK_WAIT_S = 60.0  # the longest a call keeps retrying a store that another process holds locked
MLFLOW_BUSY_WAIT_S = 20.0  # what MLflow itself waits inside one try (PRAGMA busy_timeout = 20000)
LOCKED = ("database is locked", "database table is locked", "database schema is locked")
log = logging.getLogger(__name__)


class StoreLocked(RuntimeError):
    """Another process kept the SQLite tracking store locked for longer than the wait allows."""


def sqlite_path(uri: str) -> str | None:
    """The database file of a `sqlite:///` URI (None for another store or an in-memory database)."""
    match = re.fullmatch(r"sqlite(\+\w+)?:///([^?]+)(\?.*)?", uri)
    return match[2] if match and match[2] != ":memory:" else None


def is_locked(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, is SQLite's "database is locked"."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        driver = getattr(error, "orig", error)  # SQLAlchemy wraps the driver's error
        if isinstance(driver, sqlite3.OperationalError) and str(driver).startswith(LOCKED):
            return True
        error = error.__cause__ or error.__context__
    return False


def locked_error(uri: str, what: str, waited_s: float) -> StoreLocked:
    return StoreLocked(
        f"tracking.uri={uri!r}: the SQLite store stayed locked by another process for "
        f"{waited_s:.0f} s ({what}): is a job stuck, or a tool holding it open?"
    )


def retry_locked(call: Callable[..., Any], uri: str, wait_s: float = LOCK_WAIT_S) -> Callable[..., Any]:
    """`call`, retried with backoff while the store is locked (each try is one transaction of MLflow's,
    rolled back when it fails, so trying again is safe)."""

    @functools.wraps(call)
    def retrying(*args: Any, **kwargs: Any) -> Any:
        started, pause = time.monotonic(), 0.05
        while True:
            try:
                return call(*args, **kwargs)
            except Exception as e:
                waited = time.monotonic() - started
                if not is_locked(e):
                    raise
                if waited >= wait_s:
                    raise locked_error(uri, getattr(call, "__name__", "a call"), waited) from e
                log.info(
                    "tracking.uri=%s is locked by another process: %s again in %.2f s",
                    uri,
                    getattr(call, "__name__", "a call"),
                    pause,
                )
                time.sleep(min(pause, wait_s - waited))
                pause = min(pause * 2, 2.0)

    return retrying


class RetryingClient:
    """An MlflowClient (or any object) whose method calls retry while the SQLite store is locked."""

    def __init__(self, client: Any, uri: str, wait_s: float = LOCK_WAIT_S) -> None:
        self._client, self._uri, self._wait_s = client, uri, wait_s

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._client, name)
        return retry_locked(value, self._uri, self._wait_s) if callable(value) else value


HTTP_BOUNDS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")
_SET_BY_US = "RUNNER_SET_HTTP_BOUNDS"  # the values the runner set: a child process (a test, a launcher's
# job) inherits them with the environment, and they are not the user's
_USER_SET = {name for name in HTTP_BOUNDS if name in os.environ} - set(os.environ.get(_SET_BY_US, "").split(","))


def bound_http_retries(timeout_s: float = 10.0) -> None:
    """MLflow retries an unreachable server for minutes and waits 120 s for an answer by default: a few
    seconds of retries here and `timeout_s` per request (tracking.timeout_s), unless the user set them."""
    values = dict(zip(HTTP_BOUNDS, ("2", "1", f"{max(1, round(timeout_s))}")))
    ours = {name: value for name, value in values.items() if name not in _USER_SET}
    os.environ.update({**ours, _SET_BY_US: ",".join(ours)})


def cpu_seconds(pid: int) -> float | None:
    """The CPU time process `pid` has used (Linux: /proc/<pid>/stat; elsewhere, or gone: None)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


def _lock_file(uri: str) -> Path | None:
    path = sqlite_path(uri)
    if path is None or os.name == "nt":  # no flock on Windows
        return None
    return Path(f"{path}.open-lock")  # beside the database (its folder is writable: the config checks it)


def opening_holder(uri: str) -> int | None:
    """The process that holds (or last held) the lock on opening the store at `uri`."""
    try:
        return int(_lock_file(uri).read_text())
    except (AttributeError, OSError, ValueError):
        return None


@contextlib.contextmanager
def opening_lock(uri: str, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold an exclusive lock, between processes, on opening the store at `uri` (a file lock beside the
    database, `<file>.open-lock`, holding the holder's pid).

    Creating a fresh store (MLflow's migrations) takes a minute on a loaded machine, so this waits while
    the holder makes progress (uses CPU) and fails once it made none for `wait_s`."""
    lock, fd = _lock_file(uri), None
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):  # read-only: another user's lock file locks too
        try:
            fd = os.open(lock, flags, 0o666) if lock else None
            break
        except OSError:
            pass
    if fd is None:  # Windows, or a folder this process cannot write (it cannot create the store either)
        yield
        return
    import fcntl

    try:
        progress_at, seen = time.monotonic(), None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = opening_holder(uri)
                cpu = cpu_seconds(holder) if holder else None
                if cpu is not None and (holder, cpu) != seen:
                    progress_at, seen = time.monotonic(), (holder, cpu)
                if time.monotonic() - progress_at >= wait_s:
                    raise locked_error(uri, "opening the store", time.monotonic() - progress_at) from None
                time.sleep(0.1)
        with contextlib.suppress(OSError):  # (a read-only lock file)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
