"""A thin wrapper over MlflowClient: explicit run ids, batched logging, a status on every exit."""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException

from runner.timing import timed
from runner.tracking.base import PARENT_RUN_ID, RUN_NAME, FoundRun, Tracker
from runner.tracking.models import MODEL_URI_TAG, PackedModel, log_packed_model
from runner.tracking.models import prepare as prepare_model_logging

MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000
# MLflow's UI opens an experiment with this tag in its model-training view (not the GenAI one)
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
log = logging.getLogger(__name__)


class MlflowTracker(Tracker):
    """Logs to one MLflow experiment.

    `uri` is any MLflow tracking URI: the default local SQLite store, or `http://host:port` of a
    tracking server. For a local SQLite store the artifacts go to `artifact_location` (created
    with the experiment); with a server a local folder is ignored and the server's own artifact
    store takes them (`mlflow server` proxies `mlflow-artifacts:` uploads), unless it is a URI
    (s3://...) every client can reach.
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
                if location and "://" not in location and self.uri.startswith(("http://", "https://")):
                    # a folder on this machine: every client (SLURM node) would keep its own artifacts;
                    # the server's default location (mlflow-artifacts:, proxied) keeps them in one place
                    log.info("tracking.artifact_location=%s ignored: the server %s stores artifacts", location, self.uri)
                    location = None
                if location and "://" not in location:
                    location = Path(location).resolve().as_uri()
                try:
                    self._experiment_id = self.client.create_experiment(self.experiment, location, tags=EXPERIMENT_TAGS)
                except MlflowException:  # another job created it first
                    self._experiment_id = self.client.get_experiment_by_name(self.experiment).experiment_id
            else:
                self._experiment_id = found.experiment_id
            self.setup_s += time.perf_counter() - start
        return self._experiment_id

    @timed
    def start_run(self, name: str, params: Mapping[str, Any] | None = None,
                  tags: Mapping[str, str] | None = None, parent_id: str | None = None) -> str:
        all_tags = {RUN_NAME: name, **(tags or {})}
        if parent_id:
            all_tags[PARENT_RUN_ID] = parent_id
        run_id = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id
        if params:
            self.log_params(run_id, params)
        return run_id

    @timed
    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.from_string(status)))

    @timed
    def reopen_run(self, run_id: str) -> None:
        """Mark an ended run RUNNING again (a relaunched sweep continues under its parent run)."""
        self.client.update_run(run_id, status="RUNNING")

    @timed
    def find_runs(self, tags: Mapping[str, str], status: str | None = None) -> list[FoundRun]:
        """Runs of this experiment whose tags all match (and whose status is `status`, if given)."""
        clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        if status:
            clauses.append(f"attributes.status = '{status}'")
        runs = self.client.search_runs([self.experiment_id], " and ".join(clauses), max_results=1000)
        return [FoundRun(r.info.run_id, r.info.status, dict(r.data.metrics), dict(r.data.tags)) for r in runs]

    @timed
    def open(self) -> None:
        """Open the store and find (or create) the experiment now rather than at the first write."""
        self.experiment_id  # noqa: B018 (the property does the work)

    def flush(self) -> None:
        """Writes are synchronous here: nothing is queued."""

    def time_spent(self) -> tuple[float, float]:
        """(busy, setup) seconds of this tracker's MLflow calls so far."""
        return self.busy_s, self.setup_s

    @timed
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])

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
                  metrics: Mapping[str, float], arrays: Mapping[str, Any] | None = None,
                  model: PackedModel | None = None, files: Mapping[str, bytes] | None = None) -> str:
        """A finished nested run for one evaluated model (a compressed member, the fused model): a new
        run holding what log_evaluation logs."""
        with self.run(name, params, tags, parent_id=parent_id) as run_id:
            self.log_evaluation(run_id, {}, metrics, arrays, model, files)
        return run_id

    @timed
    def log_evaluation(self, run_id: str, tags: Mapping[str, str], metrics: Mapping[str, float],
                       arrays: Mapping[str, Any] | None = None, model: PackedModel | None = None,
                       files: Mapping[str, bytes] | None = None) -> None:
        """One evaluated model's results into its (open) run: tags, metrics, the test predictions
        (`arrays` -> predictions/test.npz), `files` (artifact path -> bytes, e.g. export/model.onnx) and,
        with `model` (runner.tracking.models.pack_model), the model itself as the run's LoggedModel,
        after the metrics so MLflow links them to it, tagged `model_uri`."""
        if tags:
            self.set_tags(run_id, tags)
        self.log_metrics(run_id, metrics)
        if arrays:
            self.log_arrays(run_id, "predictions/test.npz", **arrays)
        for path, data in (files or {}).items():
            self.log_bytes(run_id, data, path)
        if model is not None:
            self.log_model(run_id, model)

    def prepare_model_logging(self) -> None:
        """Start the imports model logging needs in a thread: the worker answers other calls meanwhile,
        and the first model logged waits for them (Python's import lock)."""
        threading.Thread(target=prepare_model_logging, daemon=True, name="prepare-model-logging").start()

    @timed
    def log_model(self, run_id: str, model: PackedModel) -> str:
        """Log a packed model as run `run_id`'s LoggedModel; tag the run with its models:/ URI.

        A model MLflow cannot log (one that does not unpickle here, an output it cannot describe)
        costs the job its model, not its results: a warning and a `model_log_error` tag say why.
        """
        self.experiment_id  # noqa: B018 (the experiment exists before MLflow's fluent API looks for it)
        try:
            uri = log_packed_model(self.uri, run_id, model)
        except Exception as e:  # noqa: BLE001
            log.warning("run %s: the model was not logged: %s: %s", run_id, type(e).__name__, e)
            self.client.set_tag(run_id, "model_log_error", f"{type(e).__name__}: {str(e)[:400]}")
            return ""
        self.client.set_tag(run_id, MODEL_URI_TAG, uri)
        return uri

    def log_bytes(self, run_id: str, data: bytes, path: str) -> None:
        """`data` as the artifact file `path` (folder/name) of run `run_id`."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(path).name
            local.write_bytes(data)
            self.client.log_artifact(run_id, str(local), str(Path(path).parent) if "/" in path else None)

    @timed
    def log_artifact(self, run_id: str, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(local_path), artifact_path)
