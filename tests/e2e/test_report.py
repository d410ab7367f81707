"""The report tool: a temporary SQLite store filled by the real MlflowTracker with fake runs,
plus the CLI (error paths and one end-to-end run of `python -m runner` -> `python -m runner.report`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import ROOT
from hydra import compose, initialize_config_dir
from torchmetrics.functional.classification import multiclass_calibration_error

from runner.report import ReportError, aggregate, make_report, select_runs, to_latex, to_markdown
from runner.report.plots import pareto_front, reliability_curve
from runner.report.table import Style, pool_runs
from runner.tracking import MlflowTracker, download_artifact, search_runs

CONF_DIR = str(ROOT / "conf" / "report")
LOGREG, CNN = "runner.models.LogReg", "runner.models.CNN1D"
# model -> per-seed (acc, nll, ece): means 0.32 / 0.92, std 0.02 each
FAKE = {
    LOGREG: [(0.30, 1.6, 0.04), (0.32, 1.7, 0.05), (0.34, 1.8, 0.06)],
    CNN: [(0.90, 0.3, 0.09), (0.92, 0.4, 0.10), (0.94, 0.5, 0.11)],
}


def _probs(acc: float, n: int = 200, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, classes, n)
    preds = np.where(rng.random(n) < acc, targets, (targets + 1) % classes)
    probs = np.full((n, classes), 0.1 / (classes - 1))
    probs[np.arange(n), preds] = 0.9
    return probs, targets


def _fill(uri: str, root: Path, experiment: str = "fake") -> None:
    tracker = MlflowTracker(uri, experiment, str(root / "artifacts"))
    for model, per_seed in FAKE.items():
        for seed, (acc, nll, ece) in enumerate(per_seed):
            params = {
                "model._target_": model,
                "seed": seed,
                "data._target_": "runner.data.MNIST1D",
                "fuse._target_": "runner.fuse.Mean" if model == CNN else None,
            }
            with tracker.run(f"model={model} seed={seed}", params, {"overrides": f"seed={seed}"}) as run_id:
                name = f"{model.rsplit('.', 1)[1].lower()}-s{seed}"
                size = 1640.0 if model == LOGREG else 20840.0
                probs, targets = _probs(acc, seed=seed)
                tracker.log_child(
                    run_id,
                    f"member/{name}",
                    {**params, "role": "member", "member": name},
                    {"role": "member", "member": name},
                    {
                        "test/acc": acc,
                        "test/f1": acc - 0.01,
                        "test/nll": nll,
                        "test/ece": ece,
                        "params": size / 4,
                        "size_bytes": size,
                        "latency_ms": size / 1e4,
                    },
                    {"probs": probs, "targets": targets},
                )
                if model == CNN:
                    probs, targets = _probs(acc + 0.03, seed=seed)
                    tracker.log_child(
                        run_id,
                        "fused",
                        {**params, "role": "fused", "member": ""},
                        {"role": "fused", "member": "fused"},
                        {
                            "test/acc": acc + 0.03,
                            "test/f1": acc + 0.02,
                            "test/nll": nll - 0.2,
                            "test/ece": ece - 0.05,
                            "size_bytes": 5 * size,
                            "latency_ms": size / 2e3,
                            "gain/acc": 0.03,
                            "gain/f1": 0.03,
                            "gain/nll": 0.2,
                            "gain/ece": 0.05 + seed / 100,
                        },
                        {"probs": probs, "targets": targets},
                    )


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/mlflow.db"
    _fill(uri, root)
    return uri


def report_cfg(store: str, out: Path, *overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return compose(
            "config",
            overrides=[f"tracking_uri={store}", "experiment=fake", f"out_dir={out}", "log_to_mlflow=false", *overrides],
        )


# ---- selection and aggregation --------------------------------------------------------------


def test_select_children_by_role_and_parents(store):
    members = select_runs(store, ["fake"], roles=["member"])
    assert len(members) == 6 and set(members["tags.role"]) == {"member"}
    assert len(select_runs(store, ["fake"], roles=["member", "fused"])) == 9
    parents = select_runs(store, ["fake"])
    assert len(parents) == 6 and "tags.role" not in parents or parents["tags.role"].isna().all()
    assert len(select_runs(store, ["fake"], "params.seed = '1'", roles=["member"])) == 2
    by_parent_tag = select_runs(store, ["fake"], "tags.overrides = 'seed=1'", roles=["member", "fused"])
    assert len(by_parent_tag) == 3 and set(by_parent_tag["tags.overrides"]) == {"seed=1"}


def test_mean_std_over_seeds_and_best_per_column(store):
    df = select_runs(store, ["fake"], roles=["member"])
    table = aggregate(df, ["model._target_"], [], ["test/acc", "test/nll", "test/ece"], lower=["test/nll", "test/ece"])
    assert table.row_values == [(CNN,), (LOGREG,)]  # natural order of the raw values
    cnn, logreg = table.cells[(CNN,)], table.cells[(LOGREG,)]
    assert cnn[((), "test/acc")].mean == pytest.approx(0.92)
    assert cnn[((), "test/acc")].std == pytest.approx(0.02)  # sample std (n - 1)
    assert logreg[((), "test/acc")].mean == pytest.approx(0.32) and logreg[((), "test/acc")].n == 3
    assert cnn[((), "test/acc")].best and not logreg[((), "test/acc")].best  # higher is better
    assert cnn[((), "test/nll")].best and not logreg[((), "test/nll")].best  # lower is better
    assert logreg[((), "test/ece")].best and not cnn[((), "test/ece")].best
    assert not table.mixed


def test_lower_is_better_matches_whole_names_and_suffixes():
    from runner.report.table import lower_is_better

    names = ["test/nll", "size_bytes"]
    assert lower_is_better("test/nll", names) and lower_is_better("member/cnn1d-s0/test/nll", names)
    assert lower_is_better("size_bytes", names) and not lower_is_better("gain/nll", names)
    assert not lower_is_better("test/acc", names) and not lower_is_better("compression_ratio", names)


def test_markdown_and_latex_bold_the_best(store):
    df = select_runs(store, ["fake"], roles=["member"])
    style = Style(
        labels={LOGREG: "LogReg", CNN: "CNN", "test/acc": "acc (%)"},
        scale={"test/acc": 100},
        digits={"test/acc": 1, "test/nll": 2},
    )
    table = aggregate(df, ["model._target_"], [], ["test/acc", "test/nll"], lower=["test/nll"], labels=style.labels)
    md = to_markdown(table, style)
    assert md.splitlines()[0] == "| model._target_ | acc (%) | test/nll | n |"
    assert md.splitlines()[2] == "| LogReg | 32.0 ± 2.0 | 1.70 ± 0.10 | 3 |"  # the order of `labels`
    assert md.splitlines()[3] == "| CNN | **92.0 ± 2.0** | **0.40 ± 0.10** | 3 |"
    tex = to_latex(table, style, "A caption", "tab:x")
    assert r"CNN & \textbf{92.0 $\pm$ 2.0} & \textbf{0.40 $\pm$ 0.10} & 3 \\" in tex
    assert r"model.\_target\_ & acc (\%)" in tex and r"\toprule" in tex


def test_override_keys_come_from_the_overrides_tag(store):
    df = select_runs(store, ["fake"], roles=["member"])
    table = aggregate(df, ["override.seed"], [], ["test/acc"])
    assert table.row_values == [("0",), ("1",), ("2",)]
    assert table.cells[("1",)][((), "test/acc")].mean == pytest.approx((0.32 + 0.92) / 2)
    assert aggregate(df, ["override.compress"], [], ["test/acc"]).row_values == [("default",)]


def test_rows_by_role_cols_by_model(store):
    df = select_runs(store, ["fake"], roles=["member", "fused"])
    table = aggregate(df, ["role"], ["model._target_"], ["test/acc"])
    assert table.row_values == [("fused",), ("member",)] and table.col_values == [(CNN,), (LOGREG,)]
    assert table.cells[("fused",)][((CNN,), "test/acc")].mean == pytest.approx(0.95)
    assert ((LOGREG,), "test/acc") not in table.cells[("fused",)]
    md = to_markdown(table, Style())
    assert "| fused | **0.950 ± 0.020** | - |" in md and "CNN1D test/acc" in md


def test_reruns_count_once_and_mixed_groups_are_flagged(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    tracker = MlflowTracker(uri, "e", str(tmp_path / "a"))
    for acc, lr in [(0.5, "0.1"), (0.7, "0.1"), (0.9, "0.01")]:  # a re-run of lr=0.1, then another lr
        with tracker.run("job", {"seed": 0, "optim.lr": lr}) as run_id:
            tracker.log_metrics(run_id, {"acc": acc})
    latest = select_runs(uri, ["e"], roles=[])
    assert sorted(latest["metrics.acc"]) == [0.7, 0.9]
    assert len(select_runs(uri, ["e"], roles=[], keep="all")) == 3
    table = aggregate(latest, [], [], ["acc"])
    assert table.cells[("all",)][((), "acc")].mean == pytest.approx(0.8)
    assert table.mixed == {("all",): ["optim.lr"]}


def test_replicates_that_are_copies_are_flagged(tmp_path):
    """Two seeds that trained the same members (seed beside ensemble.seeds) log the same numbers: flagged."""
    uri = f"sqlite:///{tmp_path}/m.db"
    tracker = MlflowTracker(uri, "e", str(tmp_path / "a"))
    for model, seed, acc, nll in [
        ("copy", 0, 0.8, 0.5),
        ("copy", 1, 0.8, 0.5),
        ("real", 0, 0.7, 0.6),
        ("real", 1, 0.8, 0.5),
    ]:
        with tracker.run("job", {"seed": seed, "model": model}) as run_id:
            tracker.log_metrics(run_id, {"acc": acc, "nll": nll})
    table = aggregate(select_runs(uri, ["e"], roles=[]), ["model"], [], ["acc", "nll"])
    assert table.identical == [("copy",)]
    assert table.cells[("real",)][((), "acc")].mean == pytest.approx(0.75)


def test_an_unknown_aggregate_over_key_is_refused(store):
    df = select_runs(store, ["fake"], roles=["member"])
    with pytest.raises(ReportError, match=r"Unknown key 'nope' in `aggregate_over`: neither a param nor a tag"):
        aggregate(df, ["model._target_"], [], ["test/acc"], aggregate_over=["seed", "nope"])


# ---- files, plots, MLflow ------------------------------------------------------------------------


def test_make_report_writes_markdown_latex_csv(store, tmp_path):
    cfg = report_cfg(
        store,
        tmp_path,
        "name=t",
        "metrics=[test/acc,test/nll,size_bytes]",
        "scale={test/acc:100}",
        "digits={test/acc:1,test/nll:2,size_bytes:0}",
        "reference={title:published,values:{CNN1D:94,LogReg:32}}",
    )
    written = make_report(cfg, command="python -m runner.report name=t")
    assert set(written) == {"md", "tex", "csv", "html"}
    md = (tmp_path / "t.md").read_text()
    assert "| CNN1D | **92.0 ± 2.0** | **0.40 ± 0.10** | 20840 | 94 | 3 |" in md
    assert "| LogReg | 32.0 ± 2.0 | 1.70 ± 0.10 | **1640** | 32 | 3 |" in md
    assert "Produced by `python -m runner.report name=t`" in md
    assert r"\textbf{92.0 $\pm$ 2.0}" in (tmp_path / "t.tex").read_text()
    csv = pd.read_csv(tmp_path / "t.csv")
    row = csv[(csv["model._target_"] == "CNN1D") & (csv.metric == "test/acc")].iloc[0]
    assert row["mean"] == pytest.approx(0.92) and row["std"] == pytest.approx(0.02) and row["n"] == 3 and row["best"]


@pytest.mark.parametrize(
    "overrides, plots",
    [
        (["role=member"], ["pareto_size", "pareto_latency"]),
        (["role=[member,fused]", "rows=[role]"], ["reliability"]),
        (["role=fused", "rows=[fuse._target_]"], ["fusion_gain"]),
    ],
)
def test_plots_are_png_and_logged_to_mlflow(store, tmp_path, overrides, plots):
    cfg = report_cfg(
        store,
        tmp_path,
        "name=p",
        "log_to_mlflow=true",
        "mlflow_experiment=reports_test",
        f"artifact_location={tmp_path}/artifacts",
        f"plots=[{','.join(plots)}]",
        *overrides,
    )
    written = make_report(cfg)
    for name in plots:
        assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report_run = max(search_runs(store, ["reports_test"]), key=lambda r: r["start_time"])
    assert report_run["tags"]["report"] == "p" and report_run["params"]["experiment"] == "fake"
    for path in written.values():
        assert download_artifact(store, report_run["run_id"], f"report/{path.name}", tmp_path / "dl").exists()


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(CONF_DIR) / "preset").glob("*.yaml")))
def test_every_preset_composes_with_valid_options(preset):
    from runner.report.make import FORMATS, PLOTS

    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose("config", overrides=[f"preset={preset}"])
    assert cfg.name == preset and cfg.rows and cfg.metrics
    assert set(cfg.plots) <= set(PLOTS) and set(cfg.formats) <= set(FORMATS)


def test_pareto_front():
    size = [10, 20, 30, 40, 5]
    acc = [0.8, 0.7, 0.9, 0.85, 0.5]
    assert pareto_front(size, acc) == [4, 0, 2]


def test_reliability_ece_matches_torchmetrics():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 5)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    targets = rng.integers(0, 5, 500)
    *_, ece = reliability_curve(probs, targets, 15)
    expected = multiclass_calibration_error(torch.tensor(probs), torch.tensor(targets), 5, n_bins=15, norm="l1")
    assert ece == pytest.approx(float(expected), abs=1e-6)


# ---- clear messages ------------------------------------------------------------------------------


def test_missing_metric_and_experiment_are_named(store, tmp_path):
    with pytest.raises(ReportError, match=r"(?s)'test/bogus'.*Available metrics: .*test/acc"):
        make_report(report_cfg(store, tmp_path, "metrics=[test/bogus]"))
    with pytest.raises(ReportError, match=r"No experiment named \['nope'\].*available: .*'fake'"):
        make_report(report_cfg(store, tmp_path, "experiment=nope"))
    with pytest.raises(ReportError, match="plots='bar' is not one of"):
        make_report(report_cfg(store, tmp_path, "plots=[bar]"))


@pytest.mark.parametrize(
    "override, match",
    [
        ("digits=-1", r"digits=-1: allowed: an integer >= 0"),
        ("digits=two", r"digits='two'"),
        ("scale={test/acc: big}", r"scale=.*allowed: null or \{metric: number\}"),
        ("aggregate_over=[1]", r"aggregate_over=.*allowed: a key or a list of keys"),
        ("status=DONE", r"status='DONE' is not one of \[None, 'FINISHED'"),
    ],
)
def test_bad_style_options_are_named_before_any_run_is_read(override, match, store, tmp_path):
    with pytest.raises(ReportError, match=match):
        make_report(report_cfg(store, tmp_path, override, "experiment=nope"))  # not read: options fail first


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_empty_selection_is_a_message_not_a_traceback(store, tmp_path):
    result = _cli(
        "-m",
        "runner.report",
        f"tracking_uri={store}",
        "experiment=fake",
        f"out_dir={tmp_path}",
        "filter=\"params.seed = '99'\"",
    )
    assert result.returncode == 2
    assert "No runs selected" in result.stderr and "params.seed = '99'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_missing_key_names_it_and_the_available_keys(store, tmp_path):
    result = _cli(
        "-m", "runner.report", f"tracking_uri={store}", "experiment=fake", f"out_dir={tmp_path}", "rows=[model.nope]"
    )
    assert result.returncode == 2
    assert "Unknown key 'model.nope' in `rows`" in result.stderr
    assert "Available params:" in result.stderr and "'model._target_'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_end_to_end_real_runs_to_report(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = _cli(
        "-m",
        "runner",
        "-m",
        "trainer=fast",
        "model=logreg",
        "seed=0,1",
        "data.num_samples=600",
        "eval.latency_repeats=2",
        f"tracking.uri={uri}",
        f"tracking.artifact_location={tmp_path}/art",
        f"data.cache_dir={tmp_path}/data",
        f"cache.dir={tmp_path}/cache",
        f"hydra.sweep.dir={tmp_path}/multirun",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = _cli(
        "-m",
        "runner.report",
        f"tracking_uri={uri}",
        "experiment=runner",
        f"out_dir={tmp_path}/rep",
        "name=e2e",
        "plots=[pareto_size,reliability]",
        "mlflow_experiment=reports",
        f"artifact_location={tmp_path}/report-art",
    )
    assert report.returncode == 0, report.stderr[-2000:]
    md = (tmp_path / "rep" / "e2e.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| LogReg |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[-1] == "2"  # two seeds aggregated
    mean, _, std = cells[1].replace("*", "").partition(" ± ")
    accs = [r["metrics"]["test/acc"] for r in search_runs(uri, ["runner"]) if r["tags"].get("role") == "member"]
    assert len(accs) == 2 and float(mean) == pytest.approx(np.mean(accs), abs=5e-4)  # the table: mean ± std
    assert float(std or 0) == pytest.approx(np.std(accs, ddof=1), abs=5e-4)
    assert (tmp_path / "rep" / "e2e_reliability.png").exists() and (tmp_path / "rep" / "e2e.tex").exists()
    assert len(search_runs(uri, ["reports"])) == 1


def test_pooled_rows_show_identical_member_runs_once(store):
    df = select_runs(store, ["fake"], roles=["member", "fused"])
    copy = df[df["tags.role"] == "member"].copy()  # the same members logged again by a second job
    copy["params.fuse._target_"] = "runner.fuse.Stacking"
    both = pd.concat([df, copy], ignore_index=True)
    table = aggregate(
        pool_runs(both, ["role", "fuse._target_"], ["test/acc"], {"role": "member"}),
        ["role", "fuse._target_"],
        [],
        ["test/acc"],
        aggregate_over=["seed", "model._target_"],
    )
    members = table.cells[("member", "all")][((), "test/acc")]
    assert members.n == 6 and members.mean == pytest.approx(0.62)  # 3 LogReg + 3 CNN runs, not 12
    assert ("member", "runner.fuse.Mean") not in table.cells and not table.mixed
    assert table.cells[("fused", "runner.fuse.Mean")][((), "test/acc")].n == 3
    both_roles = aggregate(
        pool_runs(both, ["role", "fuse._target_"], ["test/acc"], {"role": ["member", "fused"]}),
        ["role", "fuse._target_"],
        [],
        ["test/acc"],
        aggregate_over=["seed", "model._target_"],
    )
    assert set(both_roles.row_values) == {("fused", "all"), ("member", "all")}
    assert both_roles.cells[("fused", "all")][((), "test/acc")].n == 3


def test_pool_by_keeps_a_row_key_that_varies_among_the_pooled_runs(store):
    df = select_runs(store, ["fake"], roles=["member", "fused"])
    probes = df[df["tags.role"] == "member"].copy()  # members of another training mode, other numbers
    probes["params.optim.finetune"] = "linear_probe"
    probes["metrics.test/acc"] = probes["metrics.test/acc"] - 0.1
    df["params.optim.finetune"] = "full"
    both = pd.concat([df, probes], ignore_index=True)
    rows = ["optim.finetune", "role", "fuse._target_"]
    table = aggregate(
        pool_runs(both, rows, ["test/acc"], {"role": "member"}, keep=["optim.finetune"]),
        rows,
        [],
        ["test/acc"],
        aggregate_over=["seed", "model._target_"],
    )
    full, probe = table.cells[("full", "member", "all")], table.cells[("linear_probe", "member", "all")]
    assert full[((), "test/acc")].n == 6 and full[((), "test/acc")].mean == pytest.approx(0.62)
    assert probe[((), "test/acc")].n == 6 and probe[((), "test/acc")].mean == pytest.approx(0.52)
