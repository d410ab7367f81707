"""A busy machine: jobs share one SQLite store with other jobs while other processes take every core.
A locked store is waited for (a bounded time, then an error naming tracking.uri), never a lost run."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import ROOT
from helpers.mlflow_cli import cli, client_for
from mlflow import MlflowClient

from runner.tracking.mlflow_tracker import MlflowTracker
from runner.tracking.retry import MLFLOW_BUSY_WAIT_S, StoreLocked, retry_locked

HOLD = """import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


def hold_lock(db: Path, seconds: float) -> subprocess.Popen:
    """Another process that holds an exclusive lock on `db` (no reads, no writes) for `seconds`."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A SQLite store with its tables (creating them is seconds of CPU: once for these tests)."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowTracker(f"sqlite:///{db}", "runner", str(db.parent / "artifacts")).open()
    return db


def open_run(db: Path, **kwargs) -> tuple[MlflowTracker, str]:
    tracker = MlflowTracker(f"sqlite:///{db}", "runner", str(db.parent / "artifacts"), **kwargs)
    return tracker, tracker.start_run("job")


def mlflow_locked_error() -> Exception:
    """What MLflow raises for a locked store: its own error, from SQLAlchemy's, from the driver's."""
    try:
        try:
            raise sqlite3.OperationalError("database is locked")
        except sqlite3.OperationalError as e:
            raise RuntimeError("(sqlite3.OperationalError) database is locked") from e
    except RuntimeError as e:
        return e


def test_a_locked_store_is_retried_with_backoff_and_nothing_else_is():
    calls = []

    def busy_twice():
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise mlflow_locked_error()
        return "landed"

    assert retry_locked(busy_twice, "sqlite:///x.db", wait_s=5)() == "landed" and len(calls) == 3

    def refused():
        calls.append(0)
        raise ValueError("a bad value")

    calls.clear()
    with pytest.raises(ValueError):
        retry_locked(refused, "sqlite:///x.db", wait_s=5)()
    assert len(calls) == 1

    def always_locked():
        raise mlflow_locked_error()

    started = time.monotonic()
    with pytest.raises(StoreLocked, match=r"^tracking.uri='sqlite:///x.db': the SQLite store stayed locked"):
        retry_locked(always_locked, "sqlite:///x.db", wait_s=0.5)()
    assert time.monotonic() - started < 3


def test_mlflow_waits_for_a_lock_as_long_as_the_bounds_here_assume():
    """The bound of a call counts on MLflow's own wait per try."""
    import inspect

    import mlflow.store.db.utils

    source = inspect.getsource(mlflow.store.db.utils._get_managed_session_maker)
    assert f"PRAGMA busy_timeout = {MLFLOW_BUSY_WAIT_S * 1000:.0f};" in source


def test_a_write_waits_for_a_lock_another_process_holds(store):
    tracker, run_id = open_run(store)
    holder = hold_lock(store, 2.0)
    try:
        started = time.monotonic()
        tracker.log_metrics(run_id, {"test/acc": 0.75})
        assert time.monotonic() - started > 1.5  # it waited for the lock rather than failing
    finally:
        holder.kill()
    assert MlflowClient(tracker.uri).get_run(run_id).data.metrics["test/acc"] == 0.75


def test_an_asynchronous_write_waits_for_a_lock_another_process_holds(store):
    """tracking.async_logging: the write returns at once, MLflow's logging thread waits for the lock, and
    the run's end (flush) waits for that write to land."""
    tracker, run_id = open_run(store, async_logging=True)
    holder = hold_lock(store, 3.0)
    try:
        started = time.monotonic()
        tracker.log_metrics(run_id, {"test/acc": 0.5})
        assert time.monotonic() - started < 1
        tracker.flush()
        assert time.monotonic() - started > 2
    finally:
        holder.kill()
    assert MlflowClient(tracker.uri).get_run(run_id).data.metrics["test/acc"] == 0.5


@pytest.mark.slow
def test_a_lock_never_released_fails_naming_tracking_uri_within_the_bound(store):
    tracker, run_id = open_run(store, lock_wait_s=1.0)
    holder = hold_lock(store, 600)
    try:
        started = time.monotonic()
        with pytest.raises(StoreLocked) as error:
            tracker.log_metrics(run_id, {"test/acc": 0.75})
        # the bound, plus the one try under way when it passed (MLflow itself waits that long in a try)
        assert time.monotonic() - started < 1.0 + MLFLOW_BUSY_WAIT_S + 10
    finally:
        holder.kill()
    message = str(error.value)
    assert message.startswith(f"tracking.uri='{tracker.uri}': the SQLite store stayed locked") and "\n" not in message


OPENING = """import sys, time
from runner.tracking.retry import opening_lock
with opening_lock(sys.argv[1]):
    print("locked", flush=True)
    until = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < until:
        if sys.argv[3] == "sleeps":
            time.sleep(0.1)
"""


def opening(uri: str, seconds: float, how: str) -> subprocess.Popen:
    """Another process that holds the lock on opening `uri` for `seconds`, working ("works") or hung ("sleeps")."""
    holder = subprocess.Popen(
        [sys.executable, "-c", OPENING, uri, str(seconds), how], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_one_process_at_a_time_opens_a_store_waiting_while_the_other_works(store):
    """MLflow creates a fresh file's tables without a lock between processes: two that opened it at once
    both ran the migrations and one failed ("table ... already exists"). Opening now waits for the other
    process as long as it works (a minute of CPU on a loaded machine), and fails once it stops working."""
    uri = f"sqlite:///{store}"
    holder = opening(uri, 600, "sleeps")
    try:
        started = time.monotonic()
        with pytest.raises(StoreLocked, match=re.escape(f"tracking.uri='{uri}'")):
            MlflowTracker(uri, "runner", lock_wait_s=1.0).open()
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()
    holder = opening(uri, 3.0, "works")
    started = time.monotonic()
    MlflowTracker(uri, "runner", lock_wait_s=1.0).open()
    assert time.monotonic() - started > 2  # it waited for the other, longer than lock_wait_s
    holder.wait()


def printed_acc(output: str) -> dict[str, float]:
    """The acc column of every member row of the summary tables in a command's output."""
    return {m[1]: float(m[2]) for m in re.finditer(r"^member/(\S+)\s+([0-9.]+)\s", output, re.MULTILINE)}


def jobs_ended(tmp_path: Path) -> bool:
    """The job and both jobs of the sweep have ended their runs (what is left: the sweep's run, exiting)."""
    job_log = tmp_path / "run" / "__main__.log"
    return (
        job_log.exists()
        and "wall time" in job_log.read_text()
        and len(list((tmp_path / "sweep" / "done").glob("*"))) == 2
    )


@pytest.mark.slow
def test_a_job_and_a_parallel_sweep_on_a_saturated_cpu_lose_nothing(tmp_path):
    """A job and a 2-job joblib sweep start at once on a fresh SQLite store (four processes open it,
    three jobs write to it) while twice as many other processes as cores keep every core busy.

    The burners stop once every job has ended its run: exiting is then all that is left, and a process
    that imported torch spends seconds of CPU in torch's C++ destructors at exit (minutes at that load)."""
    tiny = (
        "model=mlp",
        "trainer=fast",
        "data.num_samples=600",
        "eval.latency_repeats=2",
        "eval.latency_min_time_s=0",
        "eval.latency_warmup_s=0",
    )  # the default tracking: in the job's process, every model logged
    cores = len(os.sched_getaffinity(0))
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * cores)]
    commands = []
    try:
        commands.append(cli(tmp_path, *tiny, "seed=2", background=True))
        commands.append(
            cli(tmp_path, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *tiny, "seed=0,1", background=True)
        )
        with ThreadPoolExecutor(len(commands)) as pool:  # reading their output as it comes
            answers = [pool.submit(command.communicate, timeout=900) for command in commands]
            while not jobs_ended(tmp_path) and not all(answer.done() for answer in answers):
                time.sleep(1)
            for burner in burners:
                burner.kill()
            outputs = [answer.result()[0] for answer in answers]
    finally:
        for process in burners + commands:
            process.kill()
            process.wait()
    for command, output in zip(commands, outputs):
        assert command.returncode == 0, output[-3000:]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client, experiment = client_for(uri)
    runs = client.search_runs([experiment])
    assert {r.info.status for r in runs} == {"FINISHED"}
    by_role = {role: [r for r in runs if r.data.tags.get("role") == role] for role in ("sweep", "job", "member")}
    assert [len(by_role[role]) for role in ("sweep", "job", "member")] == [1, 3, 3]
    assert sorted(r.data.params["seed"] for r in by_role["job"]) == ["0", "1", "2"]
    printed = printed_acc(outputs[0]) | printed_acc(outputs[1])
    members = {r.data.tags["mlflow.parentRunId"]: r for r in by_role["member"]}
    for job in by_role["job"]:
        member = members[job.info.run_id]
        name = member.data.tags["mlflow.runName"].removeprefix("member/")
        acc = member.data.metrics["test/acc"]
        assert job.data.metrics["members/mean/test/acc"] == acc
        assert printed[name] == pytest.approx(acc, abs=5e-5)  # the table shows 4 decimals
        logged = Path(client.download_artifacts(job.info.run_id, "summary.txt", str(tmp_path))).read_text()
        assert printed_acc(logged) == {name: printed[name]}
