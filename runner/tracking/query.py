"""Reading runs back out of MLflow (for the report): plain dicts in, no mlflow types out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

from runner.tracking.retry import bound_http_retries

PAGE_SIZE = 1000


class RunQueryError(LookupError):
    """The store, an experiment or a filter could not be read; the message says which and why."""


def _client(uri: str) -> MlflowClient:
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise RunQueryError(f"No MLflow store at {uri} (the file does not exist).")
    bound_http_retries()  # an unreachable server fails in seconds, not minutes
    return MlflowClient(tracking_uri=uri)


def list_experiments(uri: str) -> list[str]:
    return sorted(e.name for e in _client(uri).search_experiments(view_type=ViewType.ACTIVE_ONLY))


def search_runs(uri: str, experiments: list[str], filter_string: str = "") -> list[dict[str, Any]]:
    """Every active run of `experiments` matching `filter_string` (MLflow's search syntax).

    Each run is a dict: run_id, run_name, experiment, status, start_time, params, tags, metrics
    (the latest value of each metric).
    """
    client = _client(uri)
    try:
        found = {name: client.get_experiment_by_name(name) for name in experiments}
    except MlflowException as e:  # an unreachable or broken store: say which
        raise RunQueryError(f"tracking_uri={uri!r}: the MLflow store cannot be read ({str(e)[:300]})") from None
    missing = [name for name, exp in found.items() if exp is None]
    if missing:
        raise RunQueryError(f"No experiment named {missing} in {uri}; available: {list_experiments(uri)}")
    names = {exp.experiment_id: name for name, exp in found.items()}
    runs, token = [], None
    while True:
        try:
            page = client.search_runs(
                list(names), filter_string or "", ViewType.ACTIVE_ONLY, max_results=PAGE_SIZE, page_token=token
            )
        except MlflowException as e:
            raise RunQueryError(f"Bad filter {filter_string!r}: {e.message}") from None
        runs += [
            {
                "run_id": r.info.run_id,
                "run_name": r.info.run_name,
                "status": r.info.status,
                "experiment": names[r.info.experiment_id],
                "start_time": r.info.start_time,
                "params": dict(r.data.params),
                "tags": dict(r.data.tags),
                "metrics": dict(r.data.metrics),
            }
            for r in page
        ]
        token = page.token
        if not token:
            return runs


def download_artifact(uri: str, run_id: str, path: str, dst_dir: str | Path) -> Path:
    """Copy one artifact of a run to `dst_dir` and return its local path."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return Path(_client(uri).download_artifacts(run_id, path, str(dst_dir)))
    except (MlflowException, OSError) as e:
        raise RunQueryError(f"Run {run_id} has no artifact {path!r} ({e})") from None
