"""The MLflow model registry: the best logged model of an experiment (or sweep) becomes a version under
an alias. The command is runner/register.py; this module holds its MLflow calls."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from runner.errors import ConfigError, check
from runner.tracking.models import MODEL_URI_TAG, using_tracking_uri

ROLES = ("member", "fused", "compressed", "fused_compressed")  # runner/recorder.py's child roles
MODES = ("max", "min")


@dataclass
class Candidate:
    """A child run that logged a model, with the value of the chosen metric."""

    run_id: str
    model_uri: str
    value: float
    start_time: int
    tags: dict[str, str]


DATA_PARAMS = ("choice/data", "data._target_", "data.path", "data.name", "data.task", "data.label")  # which data


def register_best(
    tracking_uri: str,
    experiment: str,
    metric: str,
    name: str,
    alias: str = "champion",
    sweep: str | None = None,
    role: str | None = None,
    mode: str = "max",
    where: dict[str, str] | None = None,
    mix_data: bool = False,
) -> tuple[Any, str, float]:
    """Register the best logged model by `metric` as a new version of `name` and point `alias` at it.

    The candidates are the experiment's active runs tagged `model_uri`, narrowed to `sweep`
    (tag `sweep_id`), `role` and the params in `where` (e.g. {"choice/data": "wine"}) when given.
    Candidates made on different data (DATA_PARAMS differ) are refused unless `mix_data`: a model
    of one dataset cannot serve another's inputs. `mode="max"` keeps the highest value, `"min"` the
    lowest (nll, ece); ties go to the earliest run. Returns (ModelVersion, run id, metric value).
    Raises ConfigError naming the key for an unknown experiment, an empty selection, a metric
    none of the candidates has, or a bad mode/role.
    """
    check(mode in MODES, "mode", mode, list(MODES))
    check(role is None or role in ROLES, "role", role, [*ROLES, None])
    check(bool(name), "name", name, "a registered model name")
    check(bool(alias), "alias", alias, "an alias such as champion")
    path = tracking_uri.removeprefix("sqlite:///")
    check(path == tracking_uri or os.path.exists(path), "tracking_uri", tracking_uri, "an existing MLflow store")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        from mlflow.entities import ViewType

        known = sorted(e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY))
        raise ConfigError("experiment", experiment, f"an experiment of {tracking_uri}: {known}")
    runs = _runs_with_models(client, found.experiment_id)
    chosen = _where(_select(runs, experiment, sweep, role), where or {})
    if not mix_data:
        datasets = sorted({tuple((k, r.data.params.get(k)) for k in DATA_PARAMS if k in r.data.params) for r in chosen})
        check(
            len(datasets) <= 1,
            "data",
            None,
            "one dataset per registered model: the selection holds models of "
            f"{len(datasets)} ({', '.join(str(dict(d).get('choice/data') or dict(d)) for d in datasets)}); pick one "
            "with data=<option> or param.<key>=<value>, or pass mix_data=true",
        )
    best = _best(chosen, metric, mode)
    version = _register(client, best, name, metric, mode)
    client.set_registered_model_alias(name, alias, version.version)
    return version, best.run_id, best.value


def _runs_with_models(client: Any, experiment_id: str) -> list[Any]:
    """Every active run of the experiment tagged with a logged model's URI (all pages)."""
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id],
            f"tags.`{MODEL_URI_TAG}` LIKE 'models:/%'",
            ViewType.ACTIVE_ONLY,
            max_results=1000,
            page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _select(runs: list[Any], experiment: str, sweep: str | None, role: str | None) -> list[Any]:
    """Narrow to one sweep and one role; an empty result names the key and what there is instead."""
    check(
        bool(runs),
        "experiment",
        experiment,
        "an experiment whose runs logged models (none has a model_uri tag: was tracking.log_models false?)",
    )
    if sweep is not None:
        sweeps = sorted({r.data.tags["sweep_id"] for r in runs if "sweep_id" in r.data.tags})
        runs = [r for r in runs if r.data.tags.get("sweep_id") == sweep]
        check(bool(runs), "sweep", sweep, f"a sweep of {experiment!r} with logged models: {sweeps}")
    if role is not None:
        roles = sorted({r.data.tags.get("role", "") for r in runs})
        runs = [r for r in runs if r.data.tags.get("role") == role]
        check(bool(runs), "role", role, f"a role with logged models in this selection: {roles}")
    return runs


def _where(runs: list[Any], where: dict[str, str]) -> list[Any]:
    """The runs whose params equal every `where` item; an empty result names the key and the values there are."""
    for key, value in where.items():
        values = sorted({str(r.data.params.get(key)) for r in runs})
        runs = [r for r in runs if str(r.data.params.get(key)) == str(value)]
        check(
            bool(runs),
            f"param.{key}" if key != "choice/data" else "data",
            value,
            f"a value the selected runs have: {values}",
        )
    return runs


def _best(runs: list[Any], metric: str, mode: str) -> Candidate:
    """The best candidate by `metric`; runs without it (or with NaN) cannot win; ties: the earliest."""
    have = [
        Candidate(
            r.info.run_id, r.data.tags[MODEL_URI_TAG], r.data.metrics[metric], r.info.start_time, dict(r.data.tags)
        )
        for r in runs
        if metric in r.data.metrics and not math.isnan(r.data.metrics[metric])
    ]
    available = sorted({k for r in runs for k in r.data.metrics})
    check(bool(have), "metric", metric, f"a metric of the selected runs: {available}")
    have.sort(key=lambda c: (c.start_time, c.run_id))
    sign = 1.0 if mode == "max" else -1.0
    return max(have, key=lambda c: sign * c.value)  # max keeps the first of equal values: the earliest run


def _register(client: Any, best: Candidate, name: str, metric: str, mode: str) -> Any:
    """A new version of `name` from the candidate's LoggedModel, linked to its source run."""
    import json

    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    model_id = best.model_uri.removeprefix("models:/")
    logged = client.get_logged_model(model_id)
    tags = {
        "run_id": best.run_id,
        "metric": metric,
        "metric_value": repr(best.value),
        "mode": mode,
        **{k: best.tags[k] for k in ("role", "member", "sweep_id") if k in best.tags},
    }
    # a SQL registry resolves a models:/ source through the process-wide tracking URI (MLflow's own
    # TODO), not `client`'s: point it at this store for the one call
    with using_tracking_uri(client.tracking_uri):
        version = client.create_model_version(
            name, source=best.model_uri, run_id=best.run_id, tags=tags, model_id=model_id
        )
    # as mlflow.register_model does: the LoggedModel lists its registered versions (the UI links them)
    listed = json.loads(logged.tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    client.set_logged_model_tags(
        model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*listed, {"name": name, "version": version.version}])}
    )
    return version
