"""A thin wrapper over MlflowClient: explicit run ids, batched logging, a status on every exit.

mlflow itself is imported when the store is first opened (about a second), so that time counts as
the job's wait for MLflow (`setup_s`, logged as timing/mlflow_setup_s)."""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runner.errors import ConfigError
from runner.timing import timed
from runner.tracking.base import PARENT_RUN_ID, RUN_NAME, FoundRun, Tracker
from runner.tracking.models import CACHE_ENTRY_TAG, MODEL_URI_TAG, PackedModel, find_cached_model, log_packed_model
from runner.tracking.retry import (
    LOCK_WAIT_S,
    LOCKED,
    RetryingClient,
    StoreLocked,
    bound_http_retries,
    opening_lock,
    retry_locked,
    sqlite_path,
)

MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000
# The job-level metrics a researcher compares first (runner.report.auto.HEADLINE names them in words)
HEADLINE_METRICS = (
    "members/mean/test/acc",
    "members/best/test/acc",
    "members/mean/test/nll",
    "members/mean/test/ece",
    "fused/test/acc",
    "fused/gain/acc",
    "fused/test/nll",
    "fused/test/ece",
    "compressed/mean/test/acc",
    "compressed/mean/delta/acc",
    "compressed/mean/compression_ratio",
    "compressed/mean/speedup",
    "fused_compressed/test/acc",
)
# MLflow's UI (3.15-3.18 at least) takes the GenAI/Model training switch from the URL's `workflowType`, else
# the browser's localStorage (GenAI by default), never from the experimentKind tag (mlflow#24498): the
# training view is a URL, ui_url(). Its runs table opens with a view kept in an experiment tag
# (`mlflow.sharedViewState.<key>`, what the UI's Share button writes): one row per job, headline columns.
TRAINING_VIEW = "runner-headline"
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",  # the experiments list under "Model training"
    f"mlflow.sharedViewState.{TRAINING_VIEW}": json.dumps(
        {
            "searchFilter": "tags.role = 'job'",
            "orderByKey": "attributes.start_time",
            "orderByAsc": False,
            "selectedColumns": [f"metrics.`{m}`" for m in HEADLINE_METRICS],
        }
    ),
}


def ui_url(ui: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's jobs in the model-training view with the headline columns
    (`ui`: where `mlflow ui` / `mlflow server` serves, e.g. http://127.0.0.1:5000)."""
    return (
        f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs"
        f"?workflowType=machine_learning&viewStateShareKey={TRAINING_VIEW}"
    )


def print_ui_urls(uri: str, ui: str = "http://127.0.0.1:5000") -> None:
    """One line per experiment of the store at `uri`: its name and ui_url() (`make ui` prints them)."""
    from mlflow import MlflowClient

    for experiment in MlflowClient(uri).search_experiments():
        if experiment.name != "Default":
            print(f"{experiment.name:24s} {ui_url(ui, experiment.experiment_id)}")


log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """A call to the MLflow store failed (a server gone, a write refused); the message names tracking.uri
    and the cause is MLflow's own error. (A SQLite store locked too long raises retry.StoreLocked.)"""


class NamingClient:
    """An MlflowClient whose failing calls raise TrackingError, naming the store."""

    def __init__(self, client: Any, uri: str) -> None:
        self._client, self._uri = client, uri

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._client, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return value(*args, **kwargs)
            except (StoreLocked, TrackingError):
                raise
            except Exception as e:  # noqa: BLE001 (MlflowException, requests' and SQLAlchemy's errors)
                raise TrackingError(
                    f"tracking.uri={self._uri!r}: the MLflow store failed ({name}): {type(e).__name__}: {str(e)[:400]}"
                ) from e

        return call


class MlflowTracker(Tracker):
    """Logs to one MLflow experiment.

    `uri` is any MLflow tracking URI: the default local SQLite store, or `http://host:port` of a
    tracking server. For a local SQLite store the artifacts go to `artifact_location` (created
    with the experiment); with a server a local folder is ignored and the server's own artifact
    store takes them (`mlflow server` proxies `mlflow-artifacts:` uploads), unless it is a URI
    (s3://...) every client can reach.

    A SQLite store is shared with other processes (runner/tracking/retry.py): one at a time opens
    it, and a call that finds it locked is retried for up to `lock_wait_s` seconds.

    `async_logging`: metrics, params and tags go through MLflow's own asynchronous logging
    (`log_batch(..., synchronous=False)`, written by MLflow's threads in this process); `flush()`
    waits for them and raises the first failure, and a run ends only after its writes have landed
    (Tracker.run). Runs, artifacts and models are written at once either way.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        artifact_location: str | None = None,
        lock_wait_s: float = LOCK_WAIT_S,
        async_logging: bool = False,
    ) -> None:
        self.uri, self.experiment, self.artifact_location = uri, experiment, artifact_location
        self.lock_wait_s = lock_wait_s
        self.async_logging = async_logging
        self._pending: list[tuple[Any, str, dict]] = []  # (RunOperations, run_id, the batch), in order
        self._client: Any = None
        self.busy_s = 0.0  # wall time spent in tracking calls, setup included
        self.setup_s = 0.0  # of which: opening the store and finding the experiment
        self._experiment_id: str | None = None

    @property
    def client(self) -> Any:
        """The MlflowClient (retrying while a SQLite store is locked)."""
        if self._client is None:
            # Importing mlflow and opening the store (SQLAlchemy engine, schema check): once per process.
            start = time.perf_counter()
            from mlflow import MlflowClient

            if path := sqlite_path(self.uri):
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                with opening_lock(self.uri, self.lock_wait_s):  # a fresh file is created by one process
                    client = retry_locked(MlflowClient, self.uri, self.lock_wait_s)(tracking_uri=self.uri)
                self._client = NamingClient(RetryingClient(client, self.uri, self.lock_wait_s), self.uri)
            else:
                self._client = NamingClient(MlflowClient(tracking_uri=self.uri), self.uri)
            self.setup_s += time.perf_counter() - start
        return self._client

    @property
    def experiment_id(self) -> str:
        """The experiment's id; the first call opens the store (and creates the experiment if needed). A
        store that cannot be reached, created or written fails here with one error naming tracking.uri."""
        if self._experiment_id is None:
            try:
                self._find_experiment()
            except (StoreLocked, ConfigError):
                raise
            except Exception as e:  # noqa: BLE001 (MlflowException, OSError, SQLAlchemy's errors: say which store)
                e = e.__cause__ if isinstance(e, TrackingError) and e.__cause__ else e
                timeout = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")
                allowed = (
                    f"a tracking store that answers: no answer from the MLflow store within {timeout} s "
                    "(tracking.timeout_s sets it); is the server running and reachable?"
                    if "timed out" in str(e).lower() and timeout
                    else f"a tracking store this job can reach and write ({type(e).__name__}: {str(e)[:400]})"
                )
                raise ConfigError("tracking.uri", self.uri, allowed) from e
        return self._experiment_id

    def _find_experiment(self) -> None:
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
            except Exception:  # noqa: BLE001 (MlflowException: another job created it first)
                if (again := self.client.get_experiment_by_name(self.experiment)) is None:
                    raise
                self._experiment_id = again.experiment_id
        else:
            self._experiment_id = found.experiment_id
            for key, value in EXPERIMENT_TAGS.items():  # made before a tag was added, or the view changed
                if found.tags.get(key) != value:
                    self.client.set_experiment_tag(found.experiment_id, key, value)
        self.setup_s += time.perf_counter() - start

    @timed
    def start_run(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        parent_id: str | None = None,
    ) -> str:
        all_tags = {RUN_NAME: name, **(tags or {})}
        if parent_id:
            all_tags[PARENT_RUN_ID] = parent_id
        run_id = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id
        if params:
            self.log_params(run_id, params)
        return run_id

    @timed
    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        from mlflow.entities import RunStatus

        if status != "FINISHED" and self._pending:  # an interrupt or a failure: what was queued lands first
            try:
                self.flush()
            except Exception as e:  # noqa: BLE001 (the run is ending with an error of its own)
                log.warning("run %s: %s", run_id, e)
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

    @timed
    def flush(self) -> None:
        """Wait for the writes queued with MLflow's asynchronous logging (none without async_logging); a
        batch that met a locked SQLite store is written again, waiting for the lock (retry.py); the first
        other failure is raised, naming tracking.uri."""
        pending, self._pending = self._pending, []
        failure = None
        for operations, run_id, batch in pending:
            try:
                operations.wait()
            except Exception as e:  # noqa: BLE001 (MLflow wraps the store's error in a message)
                if any(text in str(e) for text in LOCKED):
                    self.client.log_batch(run_id, **batch)  # one rolled-back transaction: safe to redo
                elif failure is None:
                    failure = TrackingError(
                        f"tracking.uri={self.uri!r}: a write to the MLflow store failed: {str(e)[:400]}"
                    )
                    failure.__cause__ = e
        if failure is not None:
            raise failure

    def _log_batch(self, run_id: str, **batch: Any) -> None:
        """One log_batch: at once, or queued (async_logging) for flush() to wait for."""
        if self.async_logging:
            self._pending.append((self.client.log_batch(run_id, **batch, synchronous=False), run_id, batch))
        else:
            self.client.log_batch(run_id, **batch)

    @timed
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._log_batch(run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])

    @timed
    def log_metric_steps(
        self, run_id: str, entries: list[tuple[Mapping[str, float], int]], model_id: str | None = None
    ) -> None:
        """Metrics of several steps in as few `log_batch` calls as possible: [(metrics, step), ...];
        with `model_id`, they are that LoggedModel's metrics too."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step, model_id=model_id) for metrics, step in entries for k, v in metrics.items()
        ]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self._log_batch(run_id, metrics=items[i : i + MAX_METRICS_PER_BATCH])

    @timed
    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):  # MLflow takes 100 tags per batch too
            self._log_batch(run_id, tags=items[i : i + MAX_PARAMS_PER_BATCH])

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
    def log_child(
        self,
        parent_id: str,
        name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        metrics: Mapping[str, float],
        arrays: Mapping[str, Any] | None = None,
        model: PackedModel | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> str:
        """A finished nested run for one evaluated model (a compressed member, the fused model): a new
        run holding what log_evaluation logs."""
        with self.run(name, params, tags, parent_id=parent_id) as run_id:
            self.log_evaluation(run_id, {}, metrics, arrays, model, files)
        return run_id

    @timed
    def log_evaluation(
        self,
        run_id: str,
        tags: Mapping[str, str],
        metrics: Mapping[str, float],
        arrays: Mapping[str, Any] | None = None,
        model: PackedModel | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        """One evaluated model's results into its (open) run: tags, metrics, the test predictions
        (`arrays` -> predictions/test.npz), `files` (artifact path -> bytes, e.g. export/model.onnx) and,
        with `model` (runner.tracking.models.pack_model), the model itself as the run's LoggedModel,
        tagged `model_uri`: logged before the metrics, which are then logged as its metrics too."""
        if tags:
            self.set_tags(run_id, tags)
        if arrays:
            self.log_arrays(run_id, "predictions/test.npz", **arrays)
        for path, data in (files or {}).items():
            self.log_bytes(run_id, data, path)
        model_id = self.log_model(run_id, model) if model is not None else None
        self.log_metric_steps(run_id, [(metrics, 0)], model_id=model_id)

    @timed
    def log_model(self, run_id: str, model: PackedModel) -> str | None:
        """Log a packed model as run `run_id`'s LoggedModel and tag the run with its models:/ URI; the
        new model's id, for the run's metrics to be linked to.

        A member loaded from the member cache is logged by the first run that evaluates it: a later run
        of the same cache entry (CACHE_ENTRY_TAG) is tagged with that model's URI and returns None (the
        model keeps the metrics of the run that logged it). A model MLflow cannot log (one that does not
        unpickle here, an output it cannot describe) costs the job its model, not its results: a warning
        and a `model_log_error` tag say why; None.
        """
        self.experiment_id  # noqa: B018 (the experiment exists before MLflow's fluent API looks for it)
        try:
            cached = find_cached_model(self.client, self.experiment_id, model.tags.get(CACHE_ENTRY_TAG))
            model_id = None if cached else log_packed_model(self.uri, run_id, model, self.client)
        except Exception as e:  # noqa: BLE001
            log.warning("run %s: the model was not logged: %s: %s", run_id, type(e).__name__, e)
            self.client.set_tag(run_id, "model_log_error", f"{type(e).__name__}: {str(e)[:400]}")
            return None
        self.client.set_tag(run_id, MODEL_URI_TAG, f"models:/{cached or model_id}")
        return model_id

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


_open: dict[tuple, MlflowTracker] = {}  # this process's trackers: jobs of one process share the open store


def make_tracker(
    uri: str,
    experiment: str,
    artifact_location: str | None = None,
    timeout_s: float = 30.0,
    log_models: bool = True,
    async_logging: bool = False,
) -> MlflowTracker:
    """The `tracking` config group's target: an MlflowTracker in the job's process, shared by the jobs of
    one process with the same settings (a multirun with the basic launcher opens the store once).

    `timeout_s`: the longest one request to a tracking server may go unanswered (a SQLite store that
    another process holds locked is waited for as retry.py says). `log_models`: every evaluated model is
    logged as an MLflow LoggedModel of its child run. `async_logging`: see MlflowTracker.
    """
    bound_http_retries(timeout_s)
    key = (uri, experiment, artifact_location, async_logging)
    if key not in _open:
        _open[key] = MlflowTracker(uri, experiment, artifact_location, async_logging=async_logging)
    tracker = _open[key]
    tracker.log_models = log_models
    return tracker
