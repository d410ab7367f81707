"""`python -m runner.report sweep=<id>`: a report for any sweep without a preset, plots in the tables'
units, one self-contained HTML page rendered by headless Chromium."""

from __future__ import annotations

import html.parser
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config
from helpers import ROOT
from mlflow import MlflowClient
from omegaconf import OmegaConf

import runner.pipeline
from runner.report import make_report, plots
from runner.report.html import PLOT_TITLES

SWEEP = "s-auto"
GRID = [("mlp", 0), ("mlp", 1), ("cnn1d", 0), ("cnn1d", 1)]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory) -> Path:
    """Four jobs of one sweep (model x seed, two members each, mean fusion, pruning), and one job of another."""
    tmp = tmp_path_factory.mktemp("auto")
    for model, seed in GRID:
        overrides = [
            f"model={model}",
            f"seed={seed}",
            "ensemble=seeds5",
            f"ensemble.seeds=[{seed},{seed + 10}]",
            "fuse=mean",
            "compress=prune_global",
        ]
        runner.pipeline.run(compose_config(overrides, tmp), overrides=overrides, tags={"sweep_id": SWEEP})
    other = ["model=mlp", "seed=5", "tracking.experiment=elsewhere"]  # another sweep, in another experiment
    runner.pipeline.run(compose_config(other, tmp), overrides=other, tags={"sweep_id": "another"})
    return tmp


def report_config(tmp: Path, **keys) -> dict:
    base = OmegaConf.load(ROOT / "conf" / "report" / "config.yaml")
    base.pop("defaults"), base.pop("hydra")
    return OmegaConf.merge(
        base,
        {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "out_dir": str(tmp / "report"), "log_to_mlflow": False, **keys},
    )


def jobs(tmp: Path) -> dict:
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("runner").experiment_id
    return {
        (r.data.tags["overrides"].split("model=")[1].split()[0], int(r.data.params["seed"])): r
        for r in client.search_runs([exp], f"tags.role = 'job' and tags.sweep_id = '{SWEEP}'")
    }


class Dom(html.parser.HTMLParser):
    """Tables' cells and images of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.rows, self.images, self._row = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self._row = []
        elif tag == "img":
            self.images.append(dict(attrs))

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._row is not None and data.strip():
            self._row.append(data.strip())


@pytest.mark.slow
def test_a_sweep_reports_itself_without_a_preset(sweep_store):
    written = make_report(
        report_config(sweep_store, sweep=SWEEP, name="auto"), command="python -m runner.report sweep=s-auto"
    )
    assert set(written) == {"md", "tex", "csv", "html", "fusion_gain", "pareto_size"}
    found = jobs(sweep_store)
    assert len(found) == 4  # the other sweep's job is not in it
    csv = __import__("pandas").read_csv(written["csv"])
    # rows: the override that differs between the jobs (model); seed is what the mean runs over
    assert sorted(csv["override.model"].unique()) == ["cnn1d", "mlp"]
    assert set(csv["metric"]) >= {
        "members/mean/test/acc",
        "members/best/test/acc",
        "fused/test/acc",
        "fused/gain/acc",
        "compressed/mean/test/acc",
        "compressed/mean/delta/acc",
    }
    for model in ("mlp", "cnn1d"):
        for metric in ("members/mean/test/acc", "fused/gain/acc", "compressed/mean/delta/acc"):
            values = [found[(model, s)].data.metrics[metric] for s in (0, 1)]
            [row] = csv[(csv["override.model"] == model) & (csv.metric == metric)].itertuples()
            assert (row.mean, row.std, row.n) == (
                pytest.approx(np.mean(values)),
                pytest.approx(np.std(values, ddof=1)),
                2,
            )
    page = written["md"].read_text()
    assert "| model | members acc (%) | best member acc (%) |" in page
    mlp = [found[("mlp", s)].data.metrics["members/mean/test/acc"] * 100 for s in (0, 1)]
    assert f"{np.mean(mlp):.2f} ± {np.std(mlp, ddof=1):.2f}" in page  # percent, as labelled
    assert (
        "sweep s-auto: model (mean ± std over ensemble.seeds, seed)" in page
        and "Produced by `python -m runner.report sweep=s-auto`" in page
    )


def test_a_sweep_is_found_in_its_own_experiment(sweep_store):
    """sweep=<id> needs no experiment=: the sweep "another" ran in experiment "elsewhere"."""
    written = make_report(report_config(sweep_store, sweep="another", name="another", formats=["csv"], plots=[]))
    csv = __import__("pandas").read_csv(written["csv"])
    assert set(csv["n"]) == {1} and "members/mean/test/acc" in set(csv["metric"])


@pytest.mark.slow
def test_plots_use_the_tables_units_and_show_no_spread_for_one_run(sweep_store):
    df = __import__("runner.report.select", fromlist=["select_runs"]).select_runs(
        f"sqlite:///{sweep_store}/mlflow.db", ["runner"], f"tags.sweep_id = '{SWEEP}'", []
    )
    df["override.model"] = [o.split("model=")[1].split()[0] for o in df["tags.overrides"]]
    stats = plots.group_stats(
        df, ["override.model"], lambda v: v[0], {"g": "fused/gain/acc"}, "t", {}, {"fused/gain/acc": 100}
    )
    found = jobs(sweep_store)
    for _, row in stats.iterrows():  # points, as in the table
        assert row.g_mean == pytest.approx(
            100 * np.mean([found[(row.label, s)].data.metrics["fused/gain/acc"] for s in (0, 1)])
        )
    one = plots.group_stats(
        df[df["override.model"] == "mlp"].head(1), [], lambda v: "all", {"g": "fused/gain/acc"}, "t", {}
    )
    assert np.isnan(one.g_std[0]) and plots._err(one.g_std[0]) is None and plots._err(0.0) is None


@pytest.mark.slow
def test_reliability_legend_is_the_tables_mean_ece(sweep_store):
    """One ECE definition: the legend shows the mean of the runs' own ECEs, which is the table's."""
    client = MlflowClient(f"sqlite:///{sweep_store}/mlflow.db")
    members = [
        r
        for r in client.search_runs([client.get_experiment_by_name("runner").experiment_id], "tags.role = 'member'")
        if r.data.tags.get("sweep_id") == SWEEP and "mlp" in r.info.run_name
    ]
    runs = plots.load_predictions(f"sqlite:///{sweep_store}/mlflow.db", [r.info.run_id for r in members])
    figure = plots.reliability_figure({"mlp": runs}, 15, "t")
    legend = [t.get_text() for t in figure.axes[0].get_legend().get_texts()][1]
    eces = [r.data.metrics["test/ece"] for r in members]
    assert legend.startswith(f"mlp (ECE {np.mean(eces):.3f} ± {np.std(eces, ddof=1):.3f}, {len(eces)} runs")


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it where apt-get can)"
)
def test_the_html_page_renders_in_headless_chromium(sweep_store, tmp_path):
    written = make_report(
        report_config(sweep_store, sweep=SWEEP, name="page"), command="python -m runner.report sweep=s-auto"
    )
    page = written["html"]
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = Dom()
    parsed.feed(dom.stdout)
    header, *rows = parsed.rows
    assert header[:3] == ["model", "members acc (%)", "best member acc (%)"]
    assert sorted(r[0] for r in rows) == ["cnn1d", "mlp"]
    assert [i["alt"] for i in parsed.images] == [PLOT_TITLES["fusion_gain"], PLOT_TITLES["pareto_size"]]  # words
    assert all(i["src"].startswith("data:image/png;base64,") for i in parsed.images)  # self-contained
    assert "Produced by python -m runner.report sweep=s-auto" in dom.stdout
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1400,2200", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    from PIL import Image

    with Image.open(shot) as image:  # the plots were drawn: many colours, not a blank or broken page
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 200


def test_a_sweep_report_is_named_after_its_sweep(sweep_store, tmp_path):
    """python -m runner.report sweep=<id> writes outputs/reports/<id>/<id>.* (another sweep's report
    does not overwrite it); name= still wins."""
    from runner.report.__main__ import default_name

    assert default_name(["sweep=s1"]) == ["sweep=s1", "name=s1"]
    assert default_name(["sweep=s1", "name=mine"]) == ["sweep=s1", "name=mine"]
    assert default_name(["preset=fusion"]) == ["preset=fusion"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner.report",
            f"sweep={SWEEP}",
            "log_to_mlflow=false",
            f"tracking_uri=sqlite:///{sweep_store}/mlflow.db",
            "formats=[csv]",
            "plots=[]",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "outputs" / "reports" / SWEEP / f"{SWEEP}.csv").exists()


def test_the_command_line_takes_sweep(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner.report",
            "sweep=nope",
            f"tracking_uri=sqlite:///{tmp_path}/none.db",
            "log_to_mlflow=false",
            f"out_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "No MLflow store" in done.stderr
