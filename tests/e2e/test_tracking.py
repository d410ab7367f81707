"""MLflow in the job's process (the only path): what each kind of write records, with MLflow's
asynchronous logging and without; failed writes fail their run; jobs of one process share a tracker."""

import os
import subprocess
import sys

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
from runner.tracking import MlflowTracker, make_tracker
from runner.tracking.mlflow_tracker import TrackingError


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


def test_async_logging_writes_what_synchronous_logging_writes(tmp_path):
    sync = MlflowTracker(*settings(tmp_path, "a"))
    queued = MlflowTracker(*settings(tmp_path, "b"), async_logging=True)
    expected = snapshot(sync.uri, record(sync))
    got = snapshot(queued.uri, record(queued))
    assert queued.find_runs({"role": "job"}, "FINISHED")[0].metrics["objective/val_acc"] == 0.75
    assert got == expected
    assert got["status"] == "FINISHED" and got["history"] == [(0, 2.0), (1, 1.0), (2, 0.0)]
    assert got["params"] == {"model.lr": "0.01", "eval.metrics": "['acc', 'nll']"}
    assert got["tags"] == {"role": "job", "extra": "yes"}
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


@pytest.mark.parametrize("async_logging", [False, True])
def test_a_failed_write_fails_its_run_and_the_job(tmp_path, async_logging):
    """A write the store refuses (params are immutable) fails the member's run and the job's run with an
    error naming tracking.uri, whether it failed at once or in MLflow's logging thread (raised at the run's end)."""
    tracker = MlflowTracker(*settings(tmp_path), async_logging=async_logging)
    with pytest.raises(TrackingError, match="param") as e:
        with tracker.run("job") as run_id:
            with tracker.run("member/good", {"a": 1}, parent_id=run_id, wait=False) as good:
                tracker.log_metrics(good, {"test/acc": 0.5})
            with tracker.run("member/bad", {"a": 1}, parent_id=run_id, wait=False) as bad:
                tracker.log_params(bad, {"a": 2})
    assert str(e.value).startswith(f"tracking.uri={tracker.uri!r}: ")  # which store, at once or queued
    assert isinstance(e.value.__cause__, MlflowException)
    client = MlflowClient(tracker.uri)
    assert [client.get_run(r).info.status for r in (good, bad, run_id)] == ["FINISHED", "FAILED", "FAILED"]


@pytest.mark.parametrize("error,status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_pipeline_marks_an_interrupted_or_failed_run(error, status, tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise error

    monkeypatch.setattr(runner.members, "train_classifier", explode)
    cfg = compose_config([], tmp_path)
    tracker = build(cfg.tracking, "tracking")
    with pytest.raises(type(error)):
        runner.pipeline.run(cfg, tracker=tracker)
    [run] = [r for r in tracker.find_runs({"role": "job"})]
    assert run.status == status


def test_default_config_tracks_in_process_and_jobs_of_one_process_share_the_tracker(tmp_path):
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        tracking = compose("config").tracking
    assert "background" not in tracking and tracking.log_models is True and tracking.async_logging is False
    first = make_tracker(*settings(tmp_path))
    assert isinstance(first, MlflowTracker) and first.log_models and not first.async_logging
    assert make_tracker(*settings(tmp_path), log_models=False) is first  # the jobs of a basic-launcher multirun
    assert not first.log_models  # each job's own setting
    assert make_tracker(*settings(tmp_path, "other")) is not first
    assert make_tracker(*settings(tmp_path), async_logging=True) is not first


def test_the_mlflow_import_counts_as_the_jobs_wait_for_mlflow():
    """Building the tracker imports no mlflow (so the command line can check its config first); the first
    call that opens the store does, and that time is in setup_s (logged as timing/mlflow_setup_s)."""
    import subprocess
    import sys

    code = (
        "import sys; from runner.tracking import make_tracker; "
        "t = make_tracker('sqlite:///x.db', 'e'); print('mlflow' in sys.modules, t.setup_s)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["False", "0.0"]


@pytest.mark.parametrize("inherited", [True, False])
def test_http_bounds_a_user_set_are_kept_and_those_the_runner_set_are_not(inherited):
    """tracking.timeout_s sets MLflow's HTTP timeout unless the user set it. A value inherited from a
    runner process (a test run, a launcher) is the runner's, not the user's: a child's own timeout wins."""
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    env.pop("RUNNER_SET_HTTP_BOUNDS", None)
    if inherited:
        env["RUNNER_SET_HTTP_BOUNDS"] = "MLFLOW_HTTP_REQUEST_MAX_RETRIES,MLFLOW_HTTP_REQUEST_TIMEOUT"
    code = "import os; from runner.tracking.retry import bound_http_retries as b; b(5); print(os.environ['MLFLOW_HTTP_REQUEST_TIMEOUT'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("5" if inherited else "30")
