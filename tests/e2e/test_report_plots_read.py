"""Report plots and pages a reviewer can read: one quantity and its unit per axis (accuracy gains in
points and NLL gains in nats on separate axes), every Pareto series visible where points coincide,
captions in words, and wide tables that fit (or scroll in their box) in headless Chromium."""

from __future__ import annotations

import html.parser
import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from helpers import ROOT
from matplotlib.backends.backend_agg import FigureCanvasAgg
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from omegaconf import OmegaConf

from runner.report import make_report, plots
from runner.report.auto import HEADLINE
from runner.report.html import PLOT_TITLES, html_page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SWEEP = "s-read"
SEEDS = (0, 1)
COMPRESS = ("prune_global", "quant_dynamic")


def job_metrics(seed: int) -> dict[str, float]:
    """What a job of the synthetic sweep logged: both compression methods give the same numbers, so
    their points (and their uncompressed members' points) coincide on the Pareto plot."""
    return {
        "members/mean/test/acc": 0.92 + 0.01 * seed,
        "members/best/test/acc": 0.93 + 0.01 * seed,
        "members/mean/size_bytes": 80_000.0,
        "fused/test/acc": 0.935 + 0.01 * seed,
        "fused/gain/acc": 0.005 + 0.002 * seed,
        "fused/gain/nll": 0.04 + 0.01 * seed,
        "compressed/mean/test/acc": 0.915 + 0.01 * seed,
        "compressed/mean/size_bytes": 20_000.0,
        "compressed/mean/delta/acc": -0.005,
    }


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    """A sweep's job runs written straight into MLflow (no training): compress x seed."""
    tmp = tmp_path_factory.mktemp("read")
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    experiment = client.create_experiment("runner", (tmp / "art").as_uri())
    for compress in COMPRESS:
        for seed in SEEDS:
            run = client.create_run(
                experiment,
                run_name=f"compress={compress} seed={seed}",
                tags={"role": "job", "sweep_id": SWEEP, "overrides": f"compress={compress} seed={seed}"},
            ).info.run_id
            client.log_batch(
                run,
                metrics=[Metric(k, v, 0, 0) for k, v in job_metrics(seed).items()],
                params=[Param("seed", str(seed)), Param("compress", compress)],
            )
            client.set_terminated(run)
    return tmp


def report_config(tmp, **keys):
    base = OmegaConf.load(ROOT / "conf" / "report" / "config.yaml")
    base.pop("defaults"), base.pop("hydra")
    return OmegaConf.merge(
        base,
        {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "out_dir": str(tmp / "report"), "log_to_mlflow": False, **keys},
    )


def own_pixels(fig, container) -> int:
    """Pixels of the rendered figure that change clearly (> 80 of 255 in a channel) when this one series
    is hidden: 0 for a series drawn under another one's marker. The legend is hidden meanwhile (it
    shows every series' marker whether the series is visible or not)."""
    canvas = FigureCanvasAgg(fig)  # a closed figure (make_report closes its figures) has no canvas of its own
    legend = fig.axes[0].get_legend()
    legend.set_visible(False)

    def rendered():
        canvas.draw()
        return np.asarray(canvas.buffer_rgba())[..., :3].astype(int)

    full = rendered()
    for artist in container.get_children():
        artist.set_visible(False)
    without = rendered()
    for artist in container.get_children():
        artist.set_visible(True)
    legend.set_visible(True)
    return int((np.abs(full - without).max(axis=2) > 80).sum())


@pytest.mark.parametrize(
    "metric, scale, label",
    [
        ("fused/gain/acc", 100, "fused accuracy gain (points)"),
        ("gain/acc", 1, "accuracy gain (fraction)"),
        ("fused/gain/nll", 1, "fused NLL gain (nats)"),
        ("test/acc", 100, "test accuracy (%)"),
        ("members/best/test/acc", 100, "best member test accuracy (%)"),
        ("compressed/mean/delta/acc", 100, "compressed accuracy change (points)"),
        ("members/mean/size_bytes", 1, "members model size (bytes)"),
        ("latency_ms", 1, "latency (ms per batch)"),
        ("test/ece", 1, "test ECE (fraction)"),
    ],
)
def test_an_axis_label_is_one_quantity_and_its_unit(metric, scale, label):
    assert plots.axis_label(metric, {}, {metric: scale}) == label


def test_gains_in_points_and_in_nats_get_an_axis_each():
    stats = pd.DataFrame(
        {
            "label": ["mean", "vote"],
            "gain/acc_mean": [1.2, -0.4],
            "gain/acc_std": [0.3, np.nan],
            "gain/nll_mean": [0.045, 0.012],
            "gain/nll_std": [np.nan, np.nan],
        }
    )
    names = {
        "gain/acc": plots.axis_label("gain/acc", {}, {"gain/acc": 100}),
        "gain/nll": plots.axis_label("gain/nll", {}, {}),
    }
    figure = plots.gain_figure(stats, ["gain/acc", "gain/nll"], "fusion", names)
    acc, nll = figure.axes
    assert [acc.get_ylabel(), nll.get_ylabel()] == ["accuracy gain (points)", "NLL gain (nats)"]
    assert [p.get_height() for p in acc.patches] == [1.2, -0.4]
    assert [p.get_height() for p in nll.patches] == [0.045, 0.012]
    # each axis is scaled to its own bars (and whiskers): the NLL gains fill their axis, not 3% of an
    # accuracy axis
    for ax, (top, bottom) in ((acc, (1.2 + 0.3, -0.4)), (nll, (0.045, 0))):
        low, high = ax.get_ylim()
        assert low <= bottom and high >= top and (top - bottom) / (high - low) > 0.8
    assert [t.get_text() for t in nll.get_xticklabels()] == ["mean", "vote"]
    plots.plt.close(figure)


def test_pareto_series_that_coincide_are_all_drawn_and_in_the_legend():
    """Two compression methods with the same numbers, and their (same) uncompressed members: four
    series at two points. Each one still shows (> 50 pixels of its own)."""
    nan = [np.nan, np.nan]
    groups = pd.DataFrame(
        {"label": list(COMPRESS), "x_mean": [20_000.0] * 2, "x_std": nan, "y_mean": [91.5] * 2, "y_std": nan}
    )
    members = pd.DataFrame(
        {
            "label": [f"{c} uncompressed members" for c in COMPRESS],
            "x_mean": [80_000.0] * 2,
            "x_std": nan,
            "y_mean": [92.0] * 2,
            "y_std": nan,
        }
    )
    figure = plots.pareto_figure(groups, "x", "y", "model size (bytes)", "test accuracy (%)", "t", members)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [*groups.label, *members.label, "Pareto front"]
    drawn = [c.lines[0] for c in ax.containers]
    assert [tuple(zip(*line.get_data())) for line in drawn] == [((20_000.0, 91.5),)] * 2 + [((80_000.0, 92.0),)] * 2
    assert len({(line.get_marker(), line.get_markersize()) for line in drawn}) == 4
    assert [own_pixels(figure, c) > 50 for c in ax.containers] == [True] * 4
    plots.plt.close(figure)


class Page(html.parser.HTMLParser):
    """Figures of a page: id, img alt, caption text."""

    def __init__(self) -> None:
        super().__init__()
        self.figures, self._caption = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "figure":
            self.figures.append({"id": dict(attrs).get("id"), "caption": ""})
        elif tag == "img" and self.figures:
            self.figures[-1]["alt"] = dict(attrs)["alt"]
        elif tag == "figcaption":
            self._caption = self.figures[-1]

    def handle_endtag(self, tag):
        if tag == "figcaption":
            self._caption = None

    def handle_data(self, data):
        if self._caption is not None:
            self._caption["caption"] += data


@pytest.mark.slow
def test_a_sweep_report_plots_one_unit_per_axis_and_captions_in_words(sweep_store, monkeypatch):
    drawn = {}
    for name in ("gain_figure", "pareto_figure"):
        original = getattr(plots, name)
        monkeypatch.setattr(plots, name, lambda *a, _f=original, _n=name, **k: drawn.setdefault(_n, _f(*a, **k)))
    written = make_report(report_config(sweep_store, sweep=SWEEP, name="read"))
    assert set(written) == {"md", "tex", "csv", "html", "fusion_gain", "pareto_size"}

    acc, nll = drawn["gain_figure"].axes  # one panel each, in the table's units
    assert [acc.get_ylabel(), nll.get_ylabel()] == ["accuracy gain (points)", "NLL gain (nats)"]
    mean = lambda key: np.mean([job_metrics(s)[key] for s in SEEDS])  # noqa: E731
    assert [p.get_height() for p in acc.patches] == pytest.approx([100 * mean("fused/gain/acc")] * 2)
    assert [p.get_height() for p in nll.patches] == pytest.approx([mean("fused/gain/nll")] * 2)
    pareto = drawn["pareto_figure"].axes[0]
    assert (pareto.get_xlabel(), pareto.get_ylabel()) == ("model size (bytes)", "test accuracy (%)")
    assert [t.get_text() for t in pareto.get_legend().get_texts()] == [
        *COMPRESS,
        *(f"{c} uncompressed members" for c in COMPRESS),
        "Pareto front",
    ]
    assert [own_pixels(drawn["pareto_figure"], c) > 50 for c in pareto.containers] == [True] * 4

    page = Page()
    page.feed(written["html"].read_text())
    assert [(f["id"], f["alt"]) for f in page.figures] == [(p, PLOT_TITLES[p]) for p in ("fusion_gain", "pareto_size")]
    gain, size = (" ".join(f["caption"].split()) for f in page.figures)
    assert gain == (
        "Fusion gain over the best member. Gain of the fused model over the best single member of its "
        "ensemble on the test set (one per compress): accuracy gain (points), NLL gain (nats), each in its "
        "own panel and unit. Bars: the mean over seed, with ± one standard deviation where the runs "
        "differ; above 0 is better."
    )
    assert size == (
        "Accuracy against model size. Test accuracy (%) against model size (bytes): a point per group (one "
        "per compress), the mean over seed, with ± one standard deviation where the runs differ; hollow "
        "squares: uncompressed members. The dashed line is the Pareto front: no other model is "
        "both smaller and more accurate. Points that coincide are drawn one inside the other."
    )


WIDE = ["model", *HEADLINE.values()]
MEASURE = """<script>addEventListener('load', () => {
  const table = document.getElementById('results'), box = table.parentElement, lines = [];
  for (const cell of document.querySelectorAll('td.num')) {
    const range = document.createRange(); range.selectNodeContents(cell);
    const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
    lines.push([cell.textContent, tops.size]);
  }
  document.body.setAttribute('data-measured', JSON.stringify({table: table.scrollWidth, box: box.clientWidth,
    boxScroll: box.scrollWidth, overflow: getComputedStyle(box).overflowX, page: document.documentElement.scrollWidth,
    window: innerWidth, sticky: getComputedStyle(document.querySelector('td')).position, lines}));
});</script>"""


def measure(page_file, width: int, profile) -> dict:
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-sync",
            "--disable-background-networking",
            "--disable-component-update",
            f"--user-data-dir={profile}",
            f"--window-size={width},900",
            "--dump-dom",
            page_file.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'data-measured="([^"]*)"', done.stdout)
    assert found, done.stdout[-2000:]
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it where apt-get can)"
)
def test_a_wide_table_fits_the_page_or_scrolls_in_its_box(tmp_path):
    """Every headline column of an auto report (14 numbers a row): at 1400 px the table fits its box; at
    700 px its box scrolls (the page itself does not), the row labels stay in view, and a number breaks
    at most once, before its ±."""
    body = [
        [(f"model_{i}", False), *((f"{90 + i}.47 ± 0.52", j == i) for j in range(len(WIDE) - 1)), ("5", False)]
        for i in range(4)
    ]
    page = tmp_path / "wide.html"
    page.write_text(html_page("wide", "", [*WIDE, "n"], body, 1, {}, ["note"]).replace("</body>", MEASURE + "</body>"))
    wide = measure(page, 1400, tmp_path / "profile")
    assert wide["table"] <= wide["box"] and wide["page"] == wide["window"]
    narrow = measure(page, 700, tmp_path / "profile")
    assert narrow["overflow"] == "auto" and narrow["boxScroll"] > narrow["box"] and narrow["page"] == narrow["window"]
    assert narrow["sticky"] == "sticky"
    for found in (wide, narrow):
        assert len(found["lines"]) == 4 * len(WIDE)
        assert all(n <= 2 for _, n in found["lines"]), found["lines"]
