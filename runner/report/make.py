"""make_report(cfg): select runs -> aggregate -> write tables and plots -> log them to MLflow."""

from __future__ import annotations

import logging
import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from runner.report import auto, plots
from runner.report.errors import ReportError
from runner.report.html import html_page
from runner.report.select import as_list, check_choice, resolve_key, select_runs
from runner.report.table import Style, Table, aggregate, grid, pool_runs, to_frame, to_latex, to_markdown, value_label

log = logging.getLogger(__name__)

FORMATS = ("md", "tex", "csv", "html")
PLOTS = ("pareto_size", "pareto_latency", "reliability", "fusion_gain")


STATUSES = (None, "FINISHED", "FAILED", "KILLED", "RUNNING", "SCHEDULED")


def check_style_options(cfg: DictConfig) -> None:
    """digits, scale, aggregate_over and status, before any run is read."""
    digits = cfg.digits
    ok = (
        isinstance(digits, int)
        and not isinstance(digits, bool)
        and digits >= 0
        or (isinstance(digits, DictConfig) and all(isinstance(v, int) and v >= 0 for v in digits.values()))
    )
    if not ok:
        raise ReportError(f"digits={digits!r}: allowed: an integer >= 0, or {{metric: integer >= 0}}")
    if cfg.scale is not None and not (
        isinstance(cfg.scale, DictConfig)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in cfg.scale.values())
    ):
        raise ReportError(f"scale={cfg.scale!r}: allowed: null or {{metric: number}}, e.g. {{test/acc: 100}}")
    over = as_list(cfg.aggregate_over)
    if not all(isinstance(k, str) and k for k in over):
        raise ReportError(f"aggregate_over={cfg.aggregate_over!r}: allowed: a key or a list of keys (e.g. [seed])")
    check_choice("status", cfg.status, STATUSES)


def sweep_experiments(uri: str, sweep: str) -> list[str]:
    """The experiments that hold the parent run of sweep `sweep` (the tag sweep_id), or its jobs."""
    from runner.tracking.query import RunQueryError, list_experiments, search_runs  # here: imports mlflow

    try:
        names = list_experiments(uri)
        return sorted({r["experiment"] for r in search_runs(uri, names, f"tags.sweep_id = '{sweep}'")}) if names else []
    except RunQueryError as e:
        raise ReportError(str(e)) from None


def make_report(cfg: DictConfig | Mapping[str, Any], command: str | None = None) -> dict[str, Path]:
    """Write the report's files under cfg.out_dir; returns {kind: path}. Raises ReportError."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)) if not isinstance(cfg, DictConfig) else cfg
    formats, plot_names = as_list(cfg.formats), as_list(cfg.plots)
    for f in formats:
        check_choice("formats", f, FORMATS)
    for p in plot_names:
        check_choice("plots", p, PLOTS)
    check_style_options(cfg)
    experiments, roles = as_list(cfg.experiment), as_list(cfg.role)
    if not experiments:
        raise ReportError("`experiment` is empty: name one MLflow experiment or a list of them")
    sweep = cfg.get("sweep")
    automatic = bool(cfg.get("auto")) or bool(sweep)
    filters = [f for f in as_list(cfg.filter) if f]  # a list: runs matching any of them
    if sweep:  # that sweep's job runs, in whichever experiment they are (sweep ids are unique)
        clause = f"tags.sweep_id = '{sweep}'"
        filters = [f"{f} and {clause}" for f in filters] or [clause]
        experiments = sweep_experiments(cfg.tracking_uri, str(sweep)) or experiments
    filter_string = filters if len(filters) > 1 else (filters[0] if filters else "")
    if automatic:
        roles = []

    df = select_runs(cfg.tracking_uri, experiments, filter_string, roles, cfg.status, cfg.keep)
    log.info("report %s: %d runs from %s", cfg.name, len(df), experiments)
    if automatic:  # rows, metrics, labels and plots from the runs (runner/report/auto.py)
        chosen = auto.settings(df, sweep, experiments)
        with open_dict(cfg):
            for key, value in chosen.items():
                cfg[key] = OmegaConf.merge(cfg[key], value) if key == "plot" else value
        plot_names = as_list(cfg.plots)
        log.info(
            "report %s: rows %s, metrics %s, plots %s", cfg.name, as_list(cfg.rows), as_list(cfg.metrics), plot_names
        )
    rows, cols = as_list(cfg.rows), as_list(cfg.cols)
    style = Style(
        labels=dict(cfg.labels or {}),
        scale=dict(cfg.scale or {}),
        digits=cfg.digits if isinstance(cfg.digits, int) else dict(cfg.digits),
        reference=OmegaConf.to_container(cfg.reference) if cfg.reference else None,
    )
    if cfg.get("pool"):
        df = pool_runs(df, rows, as_list(cfg.metrics), OmegaConf.to_container(cfg.pool), as_list(cfg.get("pool_by")))
    table = aggregate(
        df, rows, cols, as_list(cfg.metrics), as_list(cfg.aggregate_over), as_list(cfg.lower_is_better), style.labels
    )

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = command or "python -m runner.report " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    written: dict[str, Path] = {}
    markdown = to_markdown(table, style)
    print(markdown)
    if "md" in formats:
        written["md"] = _write(out / f"{cfg.name}.md", _markdown_page(cfg, table, markdown, df, command))
    if "tex" in formats:
        written["tex"] = _write(
            out / f"{cfg.name}.tex", to_latex(table, style, cfg.title or "", f"tab:{cfg.name}") + "\n"
        )
    if "csv" in formats:
        written["csv"] = out / f"{cfg.name}.csv"
        to_frame(table, style).to_csv(written["csv"], index=False)

    groups = [resolve_key(df, k, "rows") for k in rows + cols]
    label = lambda value: " ".join(value_label(k, v, style) for k, v in zip(rows + cols, value)) or "all"  # noqa: E731
    captions = {}
    for name in plot_names:
        written[name] = out / f"{cfg.name}_{name}.png"
        figure, captions[name] = _plot(name, cfg, df, groups, label, style)
        figure.savefig(written[name])
        plots.plt.close(figure)
    if "html" in formats:  # one self-contained page: the table, the plots inlined, the notes
        header, body = grid(table, style)
        images = {name: written[name] for name in plot_names}
        written["html"] = _write(
            out / f"{cfg.name}.html",
            html_page(
                cfg.title or cfg.name,
                str(cfg.description or "").strip(),
                header,
                body,
                max(1, len(table.row_keys)),
                images,
                _notes(cfg, table, df, command),
                captions,
            ),
        )
    for kind, path in written.items():
        log.info("report: wrote %s (%s)", path, kind)
    if cfg.log_to_mlflow:
        _log_run(cfg, written, len(df))
    return written


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _notes(cfg: DictConfig, table: Table, df, command: str) -> list[str]:
    """What the table is and where it came from: aggregation, runs, commits, the command."""
    over = ", ".join(as_list(cfg.aggregate_over)) or "runs"
    commits = sorted(
        {
            c[:7]
            for column in ("tags.git_commit", "tags.mlflow.source.git.commit")
            for c in df.get(column, [])
            if isinstance(c, str)
        }
    )
    notes = [
        f"Mean ± std over {over} (n = runs per row; no ± where n = 1 or all runs agree); "
        "bold: the best mean per column.",
        f"Runs: {len(df)} from MLflow experiment(s) {', '.join(as_list(cfg.experiment))}"
        + (f", sweep {cfg.sweep}" if cfg.get("sweep") else "")
        + (f", filter {' or '.join(f'`{f}`' for f in as_list(cfg.filter))}" if cfg.filter else "")
        + (
            f", role {', '.join(as_list(cfg.role))}"
            if cfg.role and not cfg.get("sweep") and not cfg.get("auto")
            else ", job runs"
        )
        + (f"; code commit(s) {', '.join(commits)}" if commits else "")
        + ".",
        f"Produced by `{command}`.",
    ]
    for group, keys in table.mixed.items():
        notes.append(f"Note: group {' '.join(group)} mixes runs that differ in {', '.join(keys)}.")
    for group in table.identical:
        notes.append(
            f"Warning: the runs of group {' '.join(group)} logged identical numbers: copies of one "
            "result, not independent replicates (its ± is not a spread)."
        )
    return notes


def _markdown_page(cfg: DictConfig, table: Table, markdown: str, df, command: str) -> str:
    lines = [f"## {cfg.title or cfg.name}", ""]
    if cfg.description:
        lines += [str(cfg.description).strip(), ""]
    notes = _notes(cfg, table, df, command)
    lines += [markdown, "", *(f"{n}  " if i < 2 else n for i, n in enumerate(notes))]
    return "\n".join(lines) + "\n"


def _baseline(cfg: DictConfig, df, base: DictConfig, name: str, x: str, label, style: Style) -> Any:
    """The uncompressed models as Pareto points: `plot.baseline` = {label, accuracy, size, latency
    (metrics; default the plot's own), role (child runs of that role from the same selection, e.g.
    member: each distinct member run once), rows (their grouping; default the report's first row key)}."""
    p, scale = cfg.plot, style.scale
    x_metric = base.get("size", p.size) if name == "pareto_size" else base.get("latency", p.latency)
    y_metric = base.get("accuracy", p.accuracy)
    units = {x_metric: scale.get(x, 1.0), y_metric: scale.get(p.accuracy, 1.0)}
    text = str(base.get("label", "uncompressed"))
    if not base.get("role"):  # metrics of the same runs (auto mode: members/mean/... of each job)
        groups = [resolve_key(df, k, "rows") for k in as_list(cfg.rows) + as_list(cfg.cols)]
        return plots.group_stats(
            df,
            groups,
            lambda v: f"{label(v)} {text}".removeprefix("all "),
            {"x": x_metric, "y": y_metric},
            f"plots: {name}",
            style.labels,
            units,
        )
    keys = as_list(base.get("rows")) or as_list(cfg.rows)[:1]
    runs = select_runs(
        cfg.tracking_uri, as_list(cfg.experiment), cfg.filter or "", as_list(base.role), cfg.status, cfg.keep
    )
    same = [c for c in ("tags.member", f"metrics.{x_metric}", f"metrics.{y_metric}") if c in runs]
    runs = runs.drop_duplicates(subset=same)  # a cached member is the same run's numbers in every job
    columns = [resolve_key(runs, k, "plot.baseline.rows") for k in keys]
    name_of = lambda v: " ".join(value_label(k, x, style) for k, x in zip(keys, v)) or "all"  # noqa: E731
    return plots.group_stats(
        runs,
        columns,
        lambda v: f"{name_of(v)} {text}".removeprefix("all "),
        {"x": x_metric, "y": y_metric},
        f"plots: {name}",
        style.labels,
        units,
    )


def _plot(name: str, cfg: DictConfig, df, groups: list[str], label, style: Style) -> tuple[Any, str]:
    """The figure and its caption: what is drawn, in words and units."""
    p, labels, scale = cfg.plot, style.labels, style.scale
    title = cfg.title or cfg.name
    per = ", ".join(labels.get(k, k.removeprefix("override.")) for k in as_list(cfg.rows) + as_list(cfg.cols))
    per = f"one per {per}" if per else "all runs together"
    over = ", ".join(as_list(cfg.aggregate_over)) or "runs"
    spread = f"the mean over {over}, with ± one standard deviation where the runs differ"
    if name in ("pareto_size", "pareto_latency"):
        x = p.size if name == "pareto_size" else p.latency
        stats = plots.group_stats(df, groups, label, {"x": x, "y": p.accuracy}, f"plots: {name}", labels, scale)
        base = p.get("baseline")
        baseline = _baseline(cfg, df, base, name, x, label, style) if base else None
        # with a baseline both kinds of model share the axes: name them without the role
        plain = (
            (lambda m: m.split("/", 2)[-1] if m.startswith(("members/", "compressed/")) else m)
            if base
            else (lambda m: m)
        )
        xlabel = plots.axis_label(plain(x), {}, {plain(x): scale.get(x, 1.0)})
        ylabel = plots.axis_label(plain(p.accuracy), {}, {plain(p.accuracy): scale.get(p.accuracy, 1.0)})
        caption = (
            f"{ylabel[0].upper()}{ylabel[1:]} against {xlabel}: a point per group ({per}), {spread}"
            + (f"; hollow squares: {base.get('label', 'uncompressed')}" if base else "")
            + f". The dashed line is the Pareto front: no other model is both {'smaller' if name == 'pareto_size' else 'faster'}"
            " and more accurate. Points that coincide are drawn one inside the other."
        )
        return plots.pareto_figure(stats, "x", "y", xlabel, ylabel, title, baseline), caption
    if name == "fusion_gain":
        gains = as_list(p.gains)
        stats = plots.group_stats(df, groups, label, {g: g for g in gains}, "plots: fusion_gain", labels, scale)
        names = {
            g: plots.axis_label(g.removeprefix("fused/"), {}, {g.removeprefix("fused/"): scale.get(g, 1.0)})
            for g in gains
        }
        caption = (
            f"Gain of the fused model over the best single member of its ensemble on the test set ({per}): "
            f"{', '.join(names.values())}, each in its own panel and unit. Bars: {spread}; above 0 is better."
        )
        return plots.gain_figure(stats, gains, title, names), caption
    if not as_list(cfg.role):
        raise ReportError("plots: reliability needs child runs: set `role` (e.g. role=[member,fused])")
    curves = {}
    for value, part in plots.groups_of(df, groups, labels):
        curves[label(value)] = plots.load_predictions(cfg.tracking_uri, list(part.run_id))
    caption = (
        f"Reliability diagram: accuracy against confidence (the largest predicted probability) in {int(p.bins)} "
        f"equal-width bins, a curve per group ({per}) pooling its runs' test predictions. The dotted diagonal is "
        "perfect calibration; the legend gives each group's ECE, the mean over its runs as in the table."
    )
    return plots.reliability_figure(curves, int(p.bins), title), caption


def _log_run(cfg: DictConfig, written: dict[str, Path], n_runs: int) -> None:
    from runner.tracking import MlflowTracker, flatten, source_tags  # here: imports mlflow

    tracker = MlflowTracker(cfg.tracking_uri, cfg.mlflow_experiment, cfg.artifact_location)
    # MLflow param names allow only alphanumerics and _-. :/ (a label like "ResNet-20 (dense)" is a key here)
    params = {re.sub(r"[^\w\-. :/]", "_", k): v for k, v in flatten(OmegaConf.to_container(cfg, resolve=True)).items()}
    tags = {
        **source_tags(),
        "mlflow.source.name": "python -m runner.report",
        "report": cfg.name,
        "selected_runs": str(n_runs),
    }
    with tracker.run(f"report/{cfg.name}", params, tags) as run_id:
        for path in written.values():
            tracker.log_artifact(run_id, path, "report")
    log.info("report: logged to MLflow experiment %r, run %s", cfg.mlflow_experiment, run_id)
