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


def select_runs(uri: str, experiments: Sequence[str], filter_string: str = "", roles: Sequence[str] = (),
                status: str | None = "FINISHED", keep: str = "latest") -> pd.DataFrame:
    """One row per selected run: columns run_id, run_name, experiment, start_time and
    `params.<key>`, `tags.<key>`, `metrics.<key>`.

    With `roles`, only child runs whose tag `role` is one of them; without, only parent runs.
    With keep="latest", runs that repeat another's params and name (a re-run) count once: the newest.
    """
    check_choice("keep", keep, ("latest", "all"))
    try:
        runs = search_runs(uri, list(experiments), filter_string)
    except RunQueryError as e:
        raise ReportError(str(e)) from None
    total = len(runs)
    if status:
        runs = [r for r in runs if r["status"] == status]
    if roles:
        runs = [r for r in runs if PARENT_TAG in r["tags"] and r["tags"].get("role") in roles]
    else:
        runs = [r for r in runs if PARENT_TAG not in r["tags"]]
    if keep == "latest":
        newest: dict[tuple, dict] = {}
        for r in sorted(runs, key=lambda r: r["start_time"]):
            newest[(r["experiment"], r["run_name"], tuple(sorted(r["params"].items())))] = r
        if len(newest) < len(runs):
            log.info("report: %d re-runs left out (keep=latest)", len(runs) - len(newest))
        runs = list(newest.values())
    if not runs:
        what = f"child runs with role in {list(roles)}" if roles else "parent runs"
        raise ReportError(
            f"No runs selected: experiment(s) {list(experiments)} in {uri} hold {total} run(s), "
            f"none of them {status or 'any status'} {what} matching filter {filter_string or '(none)'!r}. "
            "Check `experiment`, `filter`, `role` and `status`.")
    rows = [{"run_id": r["run_id"], "run_name": r["run_name"], "experiment": r["experiment"],
             "start_time": r["start_time"],
             **{f"{src}.{k}": v for src in SOURCES for k, v in r[src].items()}} for r in runs]
    return pd.DataFrame(rows).sort_values("start_time", ignore_index=True)


def check_choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ReportError(f"{key}={value!r} is not one of {list(allowed)}")


def available(df: pd.DataFrame, sources: Sequence[str]) -> dict[str, list[str]]:
    return {src: sorted(c.removeprefix(f"{src}.") for c in df.columns if c.startswith(f"{src}."))
            for src in sources}


def resolve_key(df: pd.DataFrame, key: str, option: str) -> str:
    """The column of a grouping key: `params.x`/`tags.x` as written, else param x, else tag x."""
    candidates = [key] if key.startswith(("params.", "tags.")) or key in ("run_name", "experiment") \
        else [f"params.{key}", f"tags.{key}"]
    for column in candidates:
        if column in df.columns:
            return column
    found = available(df, ("params", "tags"))
    raise ReportError(f"Unknown key {key!r} in `{option}`: neither a param nor a tag of the selected runs.\n"
                      f"Available params: {found['params']}\nAvailable tags: {found['tags']}")


def resolve_metric(df: pd.DataFrame, metric: str, option: str) -> str:
    column = metric if metric.startswith("metrics.") else f"metrics.{metric}"
    if column not in df.columns or df[column].isna().all():
        names = [m for m in available(df, ("metrics",))["metrics"]
                 if not df[f"metrics.{m}"].isna().all()]
        raise ReportError(f"Unknown metric {metric!r} in `{option}`: no selected run logged it.\n"
                          f"Available metrics: {names}")
    return column
