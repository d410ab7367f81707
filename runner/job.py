"""What every kind of job does around its own stages: skip a config that already finished, time the
job, log its metrics and summary table, print it. Used by runner.pipeline (one task) and runner.pool
(a pool of tasks merged into one model).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from runner.evaluate.summary import format_table
from runner.models import lit
from runner.recorder import Recorder
from runner.timing import process_start_time
from runner.tracking import RunQueryError, Tracker, download_artifact, flatten, source_tags

log = logging.getLogger(__name__)
_jobs_in_process = 0  # a multirun with the basic launcher runs several jobs in one process

SUMMARY = "summary.txt"


def start_job() -> float:
    """Count a job of this process; returns when it started (the first job: when the process did)."""
    global _jobs_in_process
    _jobs_in_process += 1
    return process_start_time() if _jobs_in_process == 1 else time.time()  # later jobs of a multirun


@dataclass
class JobSummary:
    timing: dict[str, float]  # timing/* metrics, logged with the job's
    table: str  # the summary table, printed and logged as summary.txt


def stored_summary(uri: str, run_id: str) -> str:
    """The summary table a finished job logged (jobs before it was logged: a line saying so)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return download_artifact(uri, run_id, SUMMARY, tmp).read_text().rstrip("\n")
        except RunQueryError:
            return f"(run {run_id} has no {SUMMARY}: its metrics are in MLflow)"


def finished(skip_finished: bool, job_tags: dict[str, str], tracker: Tracker) -> dict[str, float] | None:
    """A job whose exact config already finished is not run again: what its run logged (its summary
    printed), else None. Runs of this config left RUNNING (killed by SIGKILL) are marked FAILED."""
    if skip_finished and (done := tracker.find_runs(job_tags, "FINISHED")):
        log.info("skipping: this config already finished as MLflow run %s; its summary:", done[0].run_id)
        print(stored_summary(tracker.uri, done[0].run_id))
        return dict(done[0].metrics)
    for stale in tracker.find_runs(job_tags, "RUNNING"):  # a job killed by SIGKILL never said goodbye
        tracker.end_run(stale.run_id, "FAILED")
    return None


@contextmanager
def job_run(
    tracker: Tracker,
    resolved: Mapping[str, Any],
    code: Mapping[str, str],
    job_tags: Mapping[str, str],
    overrides: Sequence[str] = (),
    parent_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    choices: Mapping[str, str] | None = None,
) -> Iterator[tuple[str, dict[str, Any], dict[str, str]]]:
    """The job's MLflow run, named by its overrides: params are the `resolved` config and the options
    picked (`choices`), tags its source, `job_tags` and the sweep's `tags`; the config and the `code` the
    job hash covers are logged first. Yields (run_id, params, run tags)."""
    params = {**flatten(dict(resolved)), **(choices or {})}
    run_tags = {**source_tags(overrides), **job_tags, **(tags or {})}
    name = " ".join(o for o in overrides if not o.startswith(("tracking.", "cache.", "hydra"))) or "default"
    with tracker.run(name, params, run_tags, parent_id) as run_id:
        tracker.log_text(run_id, OmegaConf.to_yaml(dict(resolved)), "config.yaml")
        tracker.log_text(run_id, json.dumps(dict(code), indent=1), "code.json")  # what the job hash covered
        yield run_id, params, run_tags


def job_timing(tracker: Tracker, started: float, busy_before: float, setup_before: float) -> dict[str, float]:
    """timing/*: the job's wall time and what it waited for MLflow (and, for the first job of a
    process, the time from the command to the first training step)."""
    setup_s = tracker.setup_s - setup_before  # what this process waited for MLflow, in seconds
    timing = {
        "timing/total_s": time.time() - started,
        "timing/mlflow_setup_s": setup_s,
        "timing/mlflow_log_s": tracker.busy_s - busy_before - setup_s,
    }
    if lit.first_step_at and _jobs_in_process == 1:  # command -> first training step
        timing["timing/startup_s"] = lit.first_step_at - started
    return timing


def log_job(
    recorder: Recorder, metrics: dict[str, float], timing: dict[str, float], table: dict[str, Any] | None = None
) -> JobSummary:
    """The job run's metrics (`metrics` and timing) and its summary table (`table`: the recorder's)."""
    tracker, run_id = recorder.tracker, recorder.run_id
    tracker.log_metrics(run_id, {**metrics, **timing})
    text = format_table(recorder.table if table is None else table)
    tracker.log_text(run_id, text + "\n", SUMMARY)  # what the console showed; printed again on a skip
    return JobSummary(timing, text)


def report(summary: JobSummary) -> None:
    """The summary table on the console, and where the wall time went in the log."""
    print(summary.table)
    timing = summary.timing
    first_step = (
        f"; first training step after {timing['timing/startup_s']:.1f} s" if "timing/startup_s" in timing else ""
    )
    log.info(
        "wall time %.1f s; waited for MLflow: %.2f s opening the store, %.2f s logging%s",
        timing["timing/total_s"],
        timing["timing/mlflow_setup_s"],
        timing["timing/mlflow_log_s"],
        first_step,
    )
