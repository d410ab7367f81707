"""What every tracker shares, without importing mlflow: the run context, flat params, provenance tags."""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# MLflow's reserved tag names (mlflow.utils.mlflow_tags), spelled out so this module stays light.
RUN_NAME, PARENT_RUN_ID = "mlflow.runName", "mlflow.parentRunId"
SOURCE_NAME, GIT_COMMIT = "mlflow.source.name", "mlflow.source.git.commit"


log = logging.getLogger(__name__)


@dataclass
class FoundRun:
    """A run returned by `find_runs`: plain data, without mlflow's classes."""

    run_id: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


class Tracker:
    """The run context of MlflowTracker (and of any tracker a test or a user plugs in).

    Subclasses provide start_run, end_run, log_metric_steps and flush (wait for queued writes and
    raise the first error; a no-op when writes are synchronous).
    """

    log_models = False  # log every evaluated model as an MLflow LoggedModel (tracking.log_models)
    busy_s = 0.0  # wall time this process spent in tracking calls, setup included
    setup_s = 0.0  # of which: opening the store and finding the experiment

    @contextlib.contextmanager
    def run(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        parent_id: str | None = None,
        wait: bool = True,
    ) -> Iterator[str]:
        """A run that always ends with a status: FINISHED, KILLED (interrupt, SIGTERM) or FAILED.

        FINISHED only once every write of the run has landed (a failed write fails the run). `wait`
        is accepted for callers written for a queued end (a child run inside a job's run); every run
        ends here, at the end of its block.
        """
        run_id = self.start_run(name, params, tags, parent_id)
        try:
            yield run_id
            self.flush()
        except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl+C and SIGTERM into SystemExit
            self._end_quietly(run_id, "KILLED")
            raise
        except BaseException:
            self._end_quietly(run_id, "FAILED")
            raise
        self.end_run(run_id, "FINISHED")

    def _end_quietly(self, run_id: str, status: str) -> None:
        """Record how a run ended without hiding why it ended (the store may be what failed)."""
        try:
            self.end_run(run_id, status)
        except Exception as e:  # noqa: BLE001
            log.warning("could not mark MLflow run %s %s: %s", run_id, status, e)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_metric_steps(run_id, [(metrics, step)])


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists are kept whole (one param)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def source_tags(overrides: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """Provenance tags: the git commit of the code (when in a git checkout) and the override string."""
    tags = {"overrides": " ".join(overrides) or "(none)", SOURCE_NAME: "python -m runner"}
    try:
        root = Path(__file__).resolve().parents[2]
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    if commit:
        tags.update({GIT_COMMIT: commit, "git_commit": commit, "git_dirty": str(bool(dirty)).lower()})
    return tags
