"""The MLflow UI shows the runner's experiment in its model-training view, the runs table one job per
row with the headline metrics first: a real run, a real `mlflow server`, headless Chromium.

MLflow's UI (3.15 to 3.18) picks GenAI or Model training from the URL's `workflowType`, else from the
browser's localStorage (GenAI in a fresh browser), not from the `mlflow.experimentKind` tag
(mlflow#24498; its fix, mlflow#24493, was closed unmerged): opened bare, the experiment shows the GenAI
"Overview" with its "Detect Issues in Your Traces" popup, and GenAI calls the runs page "Training runs"
(beside "Agent versions"). The model-training page is titled "Runs". README gives the URL tested here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import compose_config
from helpers import ROOT
from helpers.mlflow_cli import running_mlflow_server
from mlflow import MlflowClient

import runner.pipeline
from runner.report.auto import HEADLINE
from runner.tracking.mlflow_tracker import EXPERIMENT_TAGS, HEADLINE_METRICS, MlflowTracker, print_ui_urls, ui_url

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OVERRIDES = ["model=mlp", "data=wine", "ensemble=seeds5", "ensemble.seeds=[0,1]", "fuse=mean"]


def test_the_view_shows_the_reports_headline_metrics():
    assert HEADLINE_METRICS == tuple(HEADLINE)


def test_an_experiment_made_before_the_view_gets_its_tags(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    old = client.create_experiment("runner", tags={"mlflow.experimentKind": "custom_model_development"})
    assert MlflowTracker(uri, "runner").experiment_id == old
    tags = client.get_experiment(old).tags
    assert {k: tags.get(k) for k in EXPERIMENT_TAGS} == EXPERIMENT_TAGS


def test_make_ui_prints_each_experiments_training_view_url(tmp_path, capsys):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    ids = [client.create_experiment(name) for name in ("first", "second")]
    print_ui_urls(f"sqlite:///{tmp_path}/mlflow.db")
    lines = capsys.readouterr().out.splitlines()
    view = "runs?workflowType=machine_learning&viewStateShareKey=runner-headline"
    assert sorted(line.split() for line in lines) == [
        ["first", f"http://127.0.0.1:5000/#/experiments/{ids[0]}/{view}"],
        ["second", f"http://127.0.0.1:5000/#/experiments/{ids[1]}/{view}"],
    ]
    assert "print_ui_urls" in (ROOT / "Makefile").read_text()


def test_readme_gives_the_training_view_url():
    assert ui_url("http://127.0.0.1:5000", "<id>") in (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A fusion job (two members) in a SQLite store, served by `mlflow server`: (UI address, experiment id,
    the job's run)."""
    tmp = tmp_path_factory.mktemp("ui")
    runner.pipeline.run(compose_config(OVERRIDES, tmp), overrides=OVERRIDES)
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("runner").experiment_id
    [job] = client.search_runs([experiment], "tags.role = 'job'")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes
    with running_mlflow_server(tmp / "mlflow.db", env=env, start_s=180) as base:
        yield base, experiment, job, tmp


def browse(url: str, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    """Chromium with a fresh profile (empty localStorage: a link opened in a new browser)."""
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=2400,1000",
            "--virtual-time-budget=30000",
            *flags,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it where apt-get can)"
)
def test_the_ui_opens_the_training_view_with_the_headline_columns(ui, tmp_path):
    base, experiment, job, _ = ui
    page = browse(ui_url(base, experiment), tmp_path / "profile", "--dump-dom")
    assert page.returncode == 0, page.stderr[-2000:]
    dom = page.stdout
    assert re.search(r"<title>(.*?)</title>", dom).group(1) == f"Runs - Experiment {experiment} - MLflow"
    assert re.findall(r"<h2[^>]*>(.*?)</h2>", dom) == ["Runs"]
    for genai in ("Training runs", "Agent versions", "Overview", "Detect Issues"):
        assert genai not in dom
    assert job.info.run_name in dom and "member/mlp-s0" not in dom  # one row per job, no member rows
    shown = {m.group(1) for m in re.finditer(r'col-id="metrics\.`([^`]+)`"', dom)}
    logged = [m for m in HEADLINE_METRICS if m in job.data.metrics]
    assert shown == set(logged) and {"members/mean/test/acc", "fused/test/acc", "fused/gain/acc"} <= shown
    for metric in logged:  # the job's own numbers, as MLflow holds them
        assert str(job.data.metrics[metric]) in dom
