"""MLflow in a worker process (the default): same records as in-process, errors and ends not lost."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import CONF_DIR, compose_config
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import runner.members
import runner.pipeline
from runner.config import build
from runner.evaluate.plots import confusion_matrix_figure
from runner.tracking import BackgroundTracker, MlflowTracker, make_tracker
from runner.tracking.background import TrackingWriteError, WorkerError


def settings(tmp_path, name="store"):
    return f"sqlite:///{tmp_path}/{name}.db", "e", str(tmp_path / f"{name}-art")


def record(tracker) -> str:
    """The pipeline's kinds of writes, through `tracker`; returns the parent run's id."""
    with tracker.run("job", {"model.lr": 0.01, "eval.metrics": ["acc", "nll"]}, {"role": "job"}) as run_id:
        tracker.log_text(run_id, "seed: 0\n", "config.yaml")
        tracker.log_metric_steps(run_id, [({"member/a/train/loss": 2.0 - e}, e) for e in range(3)])
        tracker.log_child(
            run_id,
            "member/a",
            {"model.lr": 0.01},
            {"role": "member"},
            {"test/acc": 0.5},
            {"probs": torch.full((4, 2), 0.5).numpy(), "targets": torch.zeros(4).numpy()},
        )
        # a member's own run, open while it trains, its evaluation logged into it; its end is queued
        with tracker.run("member/b", {"model.lr": 0.01}, {"role": "member"}, parent_id=run_id, wait=False) as member_id:
            tracker.log_metric_steps(member_id, [({"train/loss": 1.0 - e / 4}, e) for e in range(2)])
            tracker.log_evaluation(
                member_id,
                {"cache": "hit"},
                {"test/acc": 0.25},
                {"probs": torch.full((4, 2), 0.5).numpy(), "targets": torch.ones(4).numpy()},
            )
        tracker.log_figure(run_id, confusion_matrix_figure(torch.eye(2)), "confusion/member.png")
        tracker.log_metrics(run_id, {"objective/val_acc": 0.75})
        tracker.set_tags(run_id, {"extra": "yes"})
    return run_id


def snapshot(uri: str, run_id: str) -> dict:
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    children = sorted(
        client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'"),
        key=lambda r: r.info.run_name,
    )
    return {
        "status": run.info.status,
        "params": run.data.params,
        "metrics": run.data.metrics,
        "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
        "history": [(m.step, m.value) for m in client.get_metric_history(run_id, "member/a/train/loss")],
        "artifacts": sorted(f.path for f in client.list_artifacts(run_id) + client.list_artifacts(run_id, "confusion")),
        "children": [
            (
                c.info.run_name,
                c.info.status,
                c.data.metrics,
                c.data.tags.get("cache"),
                [(m.step, m.value) for m in client.get_metric_history(c.info.run_id, "train/loss")],
                [f.path for f in client.list_artifacts(c.info.run_id, "predictions")],
            )
            for c in children
        ],
    }


def test_background_writes_what_in_process_writes(tmp_path):
    in_process = MlflowTracker(*settings(tmp_path, "a"))
    background = BackgroundTracker(*settings(tmp_path, "b"))
    try:
        expected = snapshot(in_process.uri, record(in_process))
        got = snapshot(background.uri, record(background))
        assert background.find_runs({"role": "job"}, "FINISHED")[0].metrics["objective/val_acc"] == 0.75
        assert background.time_spent()[0] > 0  # the worker did the writing
    finally:
        background.close()
    assert got == expected
    assert got["status"] == "FINISHED" and got["history"] == [(0, 2.0), (1, 1.0), (2, 0.0)]
    assert got["artifacts"] == ["config.yaml", "confusion", "confusion/member.png"]
    assert got["children"] == [
        ("member/a", "FINISHED", {"test/acc": 0.5}, None, [], ["predictions/test.npz"]),
        (
            "member/b",
            "FINISHED",
            {"train/loss": 0.75, "test/acc": 0.25},
            "hit",
            [(0, 1.0), (1, 0.75)],
            ["predictions/test.npz"],
        ),
    ]


def test_a_failed_queued_write_fails_the_run(tmp_path):
    tracker = BackgroundTracker(*settings(tmp_path))
    try:
        with pytest.raises(TrackingWriteError, match="tracking.uri=.*a write to the MLflow store failed.*param") as e:
            with tracker.run("job", {"a": 1}) as run_id:
                tracker.log_params(run_id, {"a": 2})  # params are immutable: the worker's write fails
        assert isinstance(e.value.__cause__, MlflowException)
        assert MlflowClient(tracker.uri).get_run(run_id).info.status == "FAILED"
    finally:
        tracker.close()


def test_a_child_run_ended_without_waiting_fails_if_one_of_its_writes_failed(tmp_path):
    """wait=False (the members' runs): the job goes on at once; the worker turns the queued FINISHED
    into FAILED when a write of that run failed, and the job's next call that waits (here the next
    member's start) raises the failure, so the job ends FAILED too."""
    tracker = BackgroundTracker(*settings(tmp_path))
    try:
        with pytest.raises(TrackingWriteError, match="param"):
            with tracker.run("job") as run_id:
                with tracker.run("member/good", {"a": 1}, parent_id=run_id, wait=False) as good:
                    tracker.log_metrics(good, {"test/acc": 0.5})
                with tracker.run("member/bad", {"a": 1}, parent_id=run_id, wait=False) as bad:
                    tracker.log_params(bad, {"a": 2})  # refused by the store, in the worker
                tracker.start_run("member/next", parent_id=run_id)
        client = MlflowClient(tracker.uri)
        assert [client.get_run(r).info.status for r in (good, bad, run_id)] == ["FINISHED", "FAILED", "FAILED"]
    finally:
        tracker.close()


@pytest.mark.parametrize("error,status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_pipeline_marks_an_interrupted_or_failed_run_through_the_worker(error, status, tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise error

    monkeypatch.setattr(runner.members, "train_classifier", explode)
    cfg = compose_config(["tracking.background=true"], tmp_path)
    tracker = build(cfg.tracking, "tracking")
    assert isinstance(tracker, BackgroundTracker)
    with pytest.raises(type(error)):
        runner.pipeline.run(cfg, tracker=tracker)
    [run] = [r for r in tracker.find_runs({"role": "job"})]
    assert run.status == status


def test_worker_errors_and_exit_are_reported(tmp_path):
    tracker = BackgroundTracker(*settings(tmp_path))
    with pytest.raises(AttributeError) as error:
        tracker._wait("no_such_method")
    assert "in the MLflow worker" in str(error.value.__cause__)  # with the worker's traceback
    tracker._process.kill()
    with pytest.raises(WorkerError, match="exited"):
        tracker.find_runs({})
    assert tracker.broken
    tracker.close()


UNGUARDED_SCRIPT = """
import sys
from runner.tracking import make_tracker
tracker = make_tracker(sys.argv[1], "e")
with tracker.run("from a script") as run_id:
    tracker.log_metrics(run_id, {"m": 1.0})
print(tracker.find_runs({}, "FINISHED")[0].metrics)
"""


def test_works_from_a_script_without_a_main_guard(tmp_path):
    script = tmp_path / "script.py"  # multiprocessing's spawn would run it again in the worker
    script.write_text(UNGUARDED_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), settings(tmp_path)[0]], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "{'m': 1.0}"


@pytest.mark.parametrize("cores, at_once", [(2, False), (8, True)])
def test_model_logging_imports_start_at_once_only_with_spare_cores(tmp_path, monkeypatch, cores, at_once):
    """With 4+ cores the worker imports torch and mlflow.pytorch (Lightning) at once, beside the job;
    with fewer, when the first model comes, so the job's imports and training steps keep the CPU."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    calls = []
    submit = BackgroundTracker._submit
    monkeypatch.setattr(
        BackgroundTracker,
        "_submit",
        lambda self, method, *a, **k: (calls.append(method), submit(self, method, *a, **k))[1],
    )
    tracker = make_tracker(*settings(tmp_path), log_models=True)
    try:
        assert ("prepare_model_logging" in calls) is at_once
        with tracker.run("job") as run_id:  # the worker goes on answering meanwhile
            tracker.log_metrics(run_id, {"m": 1.0})
        assert tracker.find_runs({}, "FINISHED")[0].metrics == {"m": 1.0}
    finally:
        tracker.close()


def test_default_config_tracks_in_the_background_and_jobs_share_the_worker(tmp_path):
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        assert compose("config").tracking.background is True
    first = make_tracker(*settings(tmp_path))
    assert make_tracker(*settings(tmp_path)) is first  # e.g. the jobs of a basic-launcher multirun
    other = make_tracker(*settings(tmp_path, "other"))
    assert other is not first and first.closed  # the previous worker was stopped
    assert isinstance(make_tracker(*settings(tmp_path), background=False), MlflowTracker)
    other.close()


WORKER_OF_A_KILLED_PARENT = """
import sys, time
from runner.tracking import BackgroundTracker
tracker = BackgroundTracker(sys.argv[1], "e")
tracker.find_runs({})
print(tracker._process.pid, flush=True)
time.sleep(600)
"""


def test_worker_does_not_outlive_a_killed_main_process(tmp_path):
    main = subprocess.Popen(
        [sys.executable, "-c", WORKER_OF_A_KILLED_PARENT, settings(tmp_path)[0]], stdout=subprocess.PIPE, text=True
    )
    [worker] = [int(pid) for pid in main.stdout.readline().split()]
    os.kill(main.pid, signal.SIGKILL)
    main.wait(timeout=30)
    deadline = time.time() + 30
    while alive(worker):
        assert time.time() < deadline, "the MLflow worker outlived its main process"
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        return "zombie" not in open(f"/proc/{pid}/status").read()
    except FileNotFoundError:
        return False
