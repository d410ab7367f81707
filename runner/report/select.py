"""Runs from MLflow -> one pandas row per run; config keys resolved against params and tags."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pandas as pd

from runner.report.errors import ReportError
from runner.tracking import RunQueryError, search_runs

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
SOURCES = ("params", "tags", "metrics")


def as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def select_runs(
    uri: str,
    experiments: Sequence[str],
    filter_string: str | Sequence[str] = "",
    roles: Sequence[str] = (),
    status: str | None = "FINISHED",
    keep: str = "latest",
) -> pd.DataFrame:
    """One row per selected run: columns run_id, run_name, experiment, start_time and
    `params.<key>`, `tags.<key>`, `metrics.<key>`.

    With `roles`, only child runs whose tag `role` is one of them; without, only job runs.
    A child run also carries its parent's tags (e.g. `overrides`, `sweep_id`) where it has none of
    its own, and the filter selects a child run when it matches either the child or its parent.
    A list of filters selects the runs that match any of them (MLflow's search syntax has no OR).
    With keep="latest", runs with identical params (a re-run of the same config) count once: the newest.
    """
    check_choice("keep", keep, ("latest", "all"))
    filters = [f for f in as_list(filter_string) if f]
    try:
        runs = search_runs(uri, list(experiments))
        matched = (
            {r["run_id"] for f in filters for r in search_runs(uri, list(experiments), f)}
            if filters
            else {r["run_id"] for r in runs}
        )
    except RunQueryError as e:
        raise ReportError(str(e)) from None
    total, by_id = len(runs), {r["run_id"]: r for r in runs}
    if roles:
        runs = [
            r
            for r in runs
            if PARENT_TAG in r["tags"]
            and r["tags"].get("role") in roles
            and (r["run_id"] in matched or r["tags"][PARENT_TAG] in matched)
        ]
        for r in runs:
            parent = by_id.get(r["tags"][PARENT_TAG], {"tags": {}})
            r["tags"] = {**{k: v for k, v in parent["tags"].items() if not k.startswith("mlflow.")}, **r["tags"]}
    else:
        # job runs: tagged role=job (they may sit under a sweep's run); older runs: no parent, no role
        runs = [
            r
            for r in runs
            if r["run_id"] in matched
            and (r["tags"].get("role") == "job" or ("role" not in r["tags"] and PARENT_TAG not in r["tags"]))
        ]
    if status:
        runs = [r for r in runs if r["status"] == status]
    if keep == "latest":
        newest: dict[tuple, dict] = {}
        for r in sorted(runs, key=lambda r: r["start_time"]):
            newest[(r["experiment"], tuple(sorted(r["params"].items())))] = r
        if len(newest) < len(runs):
            log.info("report: %d re-runs left out (keep=latest)", len(runs) - len(newest))
        runs = list(newest.values())
    if not runs:
        what = f"child runs with role in {list(roles)}" if roles else "parent runs"
        raise ReportError(
            f"No runs selected: experiment(s) {list(experiments)} in {uri} hold {total} run(s), "
            f"none of them {status or 'any status'} {what} matching filter {filters or '(none)'!r}. "
            "Check `experiment`, `filter`, `role` and `status`."
        )
    rows = [
        {
            "run_id": r["run_id"],
            "run_name": r["run_name"],
            "experiment": r["experiment"],
            "start_time": r["start_time"],
            **{f"{src}.{k}": v for src in SOURCES for k, v in r[src].items()},
        }
        for r in runs
    ]
    return pd.DataFrame(rows).sort_values("start_time", ignore_index=True)


def check_choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ReportError(f"{key}={value!r} is not one of {list(allowed)}")


def available(df: pd.DataFrame, sources: Sequence[str]) -> dict[str, list[str]]:
    return {src: sorted(c.removeprefix(f"{src}.") for c in df.columns if c.startswith(f"{src}.")) for src in sources}


def override_value(overrides: Any, name: str) -> str:
    """The value of `name=...` in a job's override string ("compress=prune_global seed=1"), or "default"."""
    for item in str(overrides or "").split():
        key, _, value = item.lstrip("+~").partition("=")
        if key == name:
            return value
    return "default"


def resolve_key(df: pd.DataFrame, key: str, option: str) -> str:
    """The column of a grouping key: `params.x`/`tags.x` as written, else param x, else tag x.

    `override.<group>` is the option picked on the command line (e.g. override.compress ->
    prune_global), read from the run's `overrides` tag; "default" where it was not overridden.
    """
    if key.startswith("override."):
        if "tags.overrides" not in df.columns:
            raise ReportError(f"Key {key!r} in `{option}` needs the `overrides` tag, which the selected runs lack")
        if key not in df.columns:  # computed once (pool_runs may have set pooled rows to "all")
            df[key] = [override_value(o, key.removeprefix("override.")) for o in df["tags.overrides"]]
        return key
    candidates = (
        [key]
        if key.startswith(("params.", "tags.")) or key in ("run_name", "experiment")
        else [f"params.{key}", f"tags.{key}"]
    )
    for column in candidates:
        if column in df.columns:
            return column
    found = available(df, ("params", "tags"))
    raise ReportError(
        f"Unknown key {key!r} in `{option}`: neither a param nor a tag of the selected runs.\n"
        f"Available params: {found['params']}\nAvailable tags: {found['tags']}\n"
        "(or override.<group>: the option each job picked on its command line)"
    )


def resolve_metric(df: pd.DataFrame, metric: str, option: str) -> str:
    column = metric if metric.startswith("metrics.") else f"metrics.{metric}"
    if column not in df.columns or df[column].isna().all():
        names = [m for m in available(df, ("metrics",))["metrics"] if not df[f"metrics.{m}"].isna().all()]
        raise ReportError(
            f"Unknown metric {metric!r} in `{option}`: no selected run logged it.\nAvailable metrics: {names}"
        )
    return column
