"""A thin wrapper over MlflowClient: explicit run ids, batched logging, a status on every exit."""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from runner.timing import timed

MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000


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


class MlflowTracker:
    """Logs to one MLflow experiment.

    `uri` is any MLflow tracking URI: the default local SQLite store, or `http://host:port` of a
    tracking server. For a local SQLite store the artifacts go to `artifact_location` (created
    with the experiment; a server decides for itself when it is None).
    """

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None) -> None:
        self.uri, self.experiment, self.artifact_location = uri, experiment, artifact_location
        self._client: MlflowClient | None = None
        self.busy_s = 0.0   # wall time spent in tracking calls, setup included
        self.setup_s = 0.0  # of which: opening the store and finding the experiment
        self._experiment_id: str | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            if self.uri.startswith("sqlite:///"):
                Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            # Opening the store (SQLAlchemy engine, schema check) is a one-off cost per process.
            start = time.perf_counter()
            self._client = MlflowClient(tracking_uri=self.uri)
            self.setup_s += time.perf_counter() - start
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            client = self.client
            start = time.perf_counter()
            found = client.get_experiment_by_name(self.experiment)
            if found is None:
                location = self.artifact_location
                if location and "://" not in location:
                    location = Path(location).resolve().as_uri()
                try:
                    self._experiment_id = self.client.create_experiment(self.experiment, location)
                except MlflowException:  # another job created it first
                    self._experiment_id = self.client.get_experiment_by_name(self.experiment).experiment_id
            else:
                self._experiment_id = found.experiment_id
            self.setup_s += time.perf_counter() - start
        return self._experiment_id

    @timed
    def start_run(self, name: str, params: Mapping[str, Any] | None = None,
                  tags: Mapping[str, str] | None = None, parent_id: str | None = None) -> str:
        all_tags = {MLFLOW_RUN_NAME: name, **(tags or {})}
        if parent_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_id
        run_id = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id
        if params:
            self.log_params(run_id, params)
        return run_id

    @contextlib.contextmanager
    def run(self, name: str, params: Mapping[str, Any] | None = None,
            tags: Mapping[str, str] | None = None, parent_id: str | None = None) -> Iterator[str]:
        """A run that always ends with a status: FINISHED, KILLED (interrupt, SIGTERM) or FAILED."""
        run_id = self.start_run(name, params, tags, parent_id)
        try:
            yield run_id
        except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl+C and SIGTERM into SystemExit
            self.end_run(run_id, "KILLED")
            raise
        except BaseException:
            self.end_run(run_id, "FAILED")
            raise
        self.end_run(run_id, "FINISHED")

    @timed
    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.from_string(status)))

    @timed
    def find_runs(self, tags: Mapping[str, str], status: str | None = None) -> list[Any]:
        """Runs of this experiment whose tags all match (and whose status is `status`, if given)."""
        clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        if status:
            clauses.append(f"attributes.status = '{status}'")
        return list(self.client.search_runs([self.experiment_id], " and ".join(clauses), max_results=1000))

    @timed
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_metric_steps(run_id, [(metrics, step)])

    @timed
    def log_metric_steps(self, run_id: str, entries: list[tuple[Mapping[str, float], int]]) -> None:
        """Metrics of several steps in as few `log_batch` calls as possible: [(metrics, step), ...]."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for metrics, step in entries for k, v in metrics.items()]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=items[i:i + MAX_METRICS_PER_BATCH])

    @timed
    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    @timed
    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    @timed
    def log_figure(self, run_id: str, figure: Any, path: str) -> None:
        self.client.log_figure(run_id, figure, path)

    @timed
    def log_arrays(self, run_id: str, path: str, **arrays: Any) -> None:
        """Numpy arrays as one .npz artifact at `path` (e.g. predictions/test.npz)."""
        import tempfile

        import numpy as np

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(path).name
            np.savez_compressed(local, **{k: np.asarray(v) for k, v in arrays.items()})
            self.client.log_artifact(run_id, str(local), str(Path(path).parent) if "/" in path else None)

    @timed
    def log_child(self, parent_id: str, name: str, params: Mapping[str, Any], tags: Mapping[str, str],
                  metrics: Mapping[str, float], arrays: Mapping[str, Any] | None = None) -> str:
        """A finished nested run for one evaluated model (a member, a compressed member, the fused model)."""
        with self.run(name, params, tags, parent_id=parent_id) as run_id:
            self.log_metrics(run_id, metrics)
            if arrays:
                self.log_arrays(run_id, "predictions/test.npz", **arrays)
        return run_id

    @timed
    def log_artifact(self, run_id: str, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(local_path), artifact_path)




def source_tags(overrides: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """Provenance tags: the git commit of the code (when in a git checkout) and the override string."""
    import subprocess
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME

    tags = {"overrides": " ".join(overrides) or "(none)", MLFLOW_SOURCE_NAME: "python -m runner"}
    try:
        root = Path(__file__).resolve().parents[2]
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    if commit:
        tags.update({MLFLOW_GIT_COMMIT: commit, "git_commit": commit, "git_dirty": str(bool(dirty)).lower()})
    return tags
