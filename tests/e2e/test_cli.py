"""End to end: the real CLI (single run and multirun) on tiny settings, checked in MLflow."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sklearn.metrics as skm
from conftest import compose_config
from helpers import ROOT
from mlflow import MlflowClient

import runner.members
import runner.pipeline


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    store = [
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.artifact_location={tmp_path}/art",
        f"data.cache_dir={tmp_path}/data",
        f"cache.dir={tmp_path}/cache",
        f"hydra.run.dir={tmp_path}/run",
        f"hydra.sweep.dir={tmp_path}/multirun",
    ]
    return subprocess.run(
        [sys.executable, "-m", "runner", *args, *store], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def runs(tmp_path: Path, parents_only: bool = True):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    found = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    return client, [r for r in found if not parents_only or r.data.tags.get("role") == "job"]


@pytest.mark.slow
def test_single_run_logs_everything(tmp_path):
    done = cli(tmp_path, "trainer=fast", "trainer.max_epochs=2", "data.num_samples=600")
    assert done.returncode == 0, done.stderr
    assert "member/cnn1d-s0" in done.stdout and "acc" in done.stdout  # the summary table
    client, [run] = runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.params["model._target_"] == "runner.models.CNN1D"
    assert run.data.params["trainer.max_epochs"] == "2"
    # the option of every config group, and the UI's model-training view for the experiment
    assert {k: run.data.params[k] for k in ("choice/model", "choice/data", "choice/trainer", "choice/fuse")} == {
        "choice/model": "cnn1d",
        "choice/data": "mnist1d",
        "choice/trainer": "fast",
        "choice/fuse": "None",
    }
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.tags["overrides"].startswith("trainer=fast trainer.max_epochs=2")
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    child = client.search_runs([run.info.experiment_id], "tags.role = 'member'")[0]
    with np.load(client.download_artifacts(child.info.run_id, "predictions/test.npz", str(tmp_path))) as f:
        probs, targets = f["probs"], f["targets"]
    expected = {
        "acc": skm.accuracy_score(targets, probs.argmax(1)),
        "f1": skm.f1_score(targets, probs.argmax(1), average="macro"),
        "nll": skm.log_loss(targets, probs, labels=range(10)),
    }
    for key, value in expected.items():  # the job's metrics are those of the member's logged predictions
        assert child.data.metrics[f"test/{key}"] == pytest.approx(value, rel=1e-5)
        # the job's keys do not name the member: one member, so mean = best = its value
        assert run.data.metrics[f"members/mean/test/{key}"] == pytest.approx(value, rel=1e-5)
        assert run.data.metrics[f"members/best/test/{key}"] == pytest.approx(value, rel=1e-5)
    assert child.data.metrics["params"] == 5210 and run.data.metrics["members/mean/params"] == 5210
    assert not [k for k in run.data.metrics if "cnn1d" in k]
    # the learning curves are in the member's run, one point per epoch
    history = client.get_metric_history(child.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [0, 1]
    assert len(client.get_metric_history(child.info.run_id, "val/acc")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "confusion"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "confusion/member")] == [
        "confusion/member/cnn1d-s0.png"
    ]
    [child] = [r for r in runs(tmp_path, parents_only=False)[1] if r.data.tags.get("role") == "member"]
    assert child.data.tags["mlflow.parentRunId"] == run.info.run_id
    assert child.data.metrics["test/acc"] == run.data.metrics["members/mean/test/acc"]


@pytest.mark.slow
def test_multirun_two_jobs(tmp_path):
    done = cli(tmp_path, "-m", "trainer=fast", "data.num_samples=600", "seed=0,1")
    assert done.returncode == 0, done.stderr
    # progress: a line per job of the sweep (with an ETA once one ended), per member's first and last epoch
    out = done.stdout + done.stderr
    assert "job 1 of 2, " in out and "job 2 of 2, " in out and ", ETA " in out
    assert "member cnn1d-s1: epoch 1/1 train/loss " in out
    _, jobs = runs(tmp_path)
    assert sorted(r.data.params["seed"] for r in jobs) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in jobs)
    [sweep_id] = {r.data.tags["sweep_id"] for r in jobs}
    # the log names the sweep and the command for its report
    assert (
        f"sweep {sweep_id} (MLflow run " in out and f"python -m runner.report sweep={sweep_id} experiment=runner" in out
    )


@pytest.mark.slow
def test_bad_config_on_the_command_line_fails_before_training(tmp_path):
    done = cli(tmp_path, "trainer.max_epochs=-3")
    assert done.returncode == 2  # one line, as README shows it, no traceback
    assert (
        done.stderr.strip().splitlines()[-1]
        == "runner.errors.ConfigError: Invalid config: trainer.max_epochs=-3; allowed: an integer >= 1"
    )
    assert "Traceback" not in done.stderr
    assert "member" not in done.stdout
    done = cli(tmp_path, "model=transformer")
    assert done.returncode != 0 and "Available options in 'model'" in done.stderr


@pytest.mark.slow
def test_a_divergence_ends_in_one_line_naming_the_learning_rate(tmp_path):
    done = cli(tmp_path, "optim.lr=1e9", "trainer.max_epochs=2", "data.num_samples=600")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert re.fullmatch(
        r"runner.errors.TrainingDiverged: optim.lr=1000000000.0: training diverged, the mean "
        r"(train|val) loss of epoch 0 is nan \(optim.name=adam\); allowed: a smaller optim.lr",
        done.stderr.strip().splitlines()[-1],
    )


@pytest.mark.parametrize("error,status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_interrupted_or_failed_run_is_marked(error, status, tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise error

    monkeypatch.setattr(runner.members, "train_classifier", explode)
    with pytest.raises(type(error)):
        runner.pipeline.run(compose_config([], tmp_path))
    _, [run] = runs(tmp_path)
    assert run.info.status == status
