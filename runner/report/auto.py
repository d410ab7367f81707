"""A report for any sweep or experiment without a hand-written preset (`sweep=<id>` or `auto=true`).

What is compared comes from the runs themselves: the job runs' command-line overrides (the `overrides`
tag) whose value differs between jobs become the rows, seeds the runs a mean ± std is taken over;
the columns are the job-level headline metrics the jobs logged (runner.recorder's
`members/...`, `fused/...`, `compressed/...`), accuracies in percent and gains in points, labelled
in words. Plots follow from what is there: the fusion gain when a fused model was evaluated, accuracy
against size (with the uncompressed members as the baseline) when members were compressed.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from runner.report.select import override_value

IGNORED_KEYS = ("tracking.", "cache.", "hydra.", "eval.latency")  # where results go and how time is measured
SEED_KEYS = ("seed", "ensemble.seeds")

# job-level headline metrics, in table order, and how they read
HEADLINE = {
    "members/mean/test/acc": "members acc (%)",
    "members/best/test/acc": "best member acc (%)",
    "members/mean/test/nll": "members NLL",
    "members/mean/test/ece": "members ECE (%)",
    "fused/test/acc": "fused acc (%)",
    "fused/gain/acc": "fusion gain acc (pp)",
    "fused/test/nll": "fused NLL",
    "fused/test/ece": "fused ECE (%)",
    "compressed/mean/test/acc": "compressed acc (%)",
    "compressed/mean/delta/acc": "compression Δacc (pp)",
    "compressed/mean/compression_ratio": "size ratio (x)",
    "compressed/mean/speedup": "speedup (x)",
    "fused_compressed/test/acc": "fused compressed acc (%)",
}
PERCENT = ("acc", "ece", "gain/acc", "delta/acc")  # shown x100: percent, or points for differences
LOWER_IS_BETTER = ["members/mean/test/nll", "members/mean/test/ece", "fused/test/nll", "fused/test/ece"]
# words for the metrics' own names on plot axes (anything else is shown as its key)
AXES = {
    "test/acc": "test accuracy",
    "size_bytes": "model size (bytes)",
    "latency_ms": "latency (ms per batch)",
    "gain/acc": "accuracy gain",
    "gain/nll": "NLL gain",
    "gain/f1": "F1 gain",
    "gain/ece": "ECE gain",
}


def _overrides(value: Any) -> dict[str, str]:
    found = {}
    for item in str(value or "").split():
        key, sep, _ = item.lstrip("+~").partition("=")
        if sep and not key.startswith(IGNORED_KEYS):
            found[key] = override_value(value, key)
    return found


def varying_keys(df: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(row keys, seed keys): the override keys whose value differs between the selected jobs, as
    `override.<key>` report keys; seeds are what the mean runs over."""
    if "tags.overrides" not in df.columns:
        return [], []
    per_job = [_overrides(o) for o in df["tags.overrides"]]
    keys = sorted({k for job in per_job for k in job})
    varying = [k for k in keys if len({job.get(k, "default") for job in per_job}) > 1]
    rows = [f"override.{k}" for k in varying if k not in SEED_KEYS]
    seeds = [f"override.{k}" for k in varying if k in SEED_KEYS]
    return rows, seeds


def settings(df: pd.DataFrame, sweep: str | None, experiments: list[str]) -> dict[str, Any]:
    """The report keys auto mode sets: rows, aggregate_over, metrics, labels, scale, digits, title,
    lower_is_better, plots and their metrics."""
    rows, seeds = varying_keys(df)
    metrics = [m for m in HEADLINE if f"metrics.{m}" in df.columns and df[f"metrics.{m}"].notna().any()]
    scale = {m: 100 for m in metrics if m.endswith(PERCENT)}
    labels = {**{m: HEADLINE[m] for m in metrics}, **{k: k.removeprefix("override.") for k in rows}}
    plots, plot = [], {}
    gains = [m for m in ("fused/gain/acc", "fused/gain/nll") if m in metrics or f"metrics.{m}" in df.columns]
    if "fused/gain/acc" in metrics:
        plots.append("fusion_gain")
        plot["gains"] = gains
    if {"compressed/mean/test/acc"} <= set(metrics) and "metrics.compressed/mean/size_bytes" in df.columns:
        plots.append("pareto_size")
        plot.update(
            accuracy="compressed/mean/test/acc",
            size="compressed/mean/size_bytes",
            baseline={
                "accuracy": "members/mean/test/acc",
                "size": "members/mean/size_bytes",
                "latency": "members/mean/latency_ms",
                "label": "uncompressed members",
            },
        )
    what = f"sweep {sweep}" if sweep else f"experiment {', '.join(experiments)}"
    compared = ", ".join(k.removeprefix("override.") for k in rows) or "one configuration"
    over = ", ".join(k.removeprefix("override.") for k in seeds)
    return {
        "rows": rows,
        "cols": [],
        "aggregate_over": [k.removeprefix("override.") for k in seeds] or ["seed"],
        "metrics": metrics,
        "labels": labels,
        "scale": scale,
        "digits": {m: 2 if m in scale else 3 for m in metrics},
        "lower_is_better": LOWER_IS_BETTER,
        "plots": plots,
        "plot": plot,
        "title": f"{what}: {compared}" + (f" (mean ± std over {over})" if over else ""),
    }
