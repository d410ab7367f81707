"""benchmarks/mutation.py --sample: which mutants a sampled run checks and the interval it reports."""

from __future__ import annotations

import importlib.util
import random

import pytest
from helpers import ROOT
from scipy.stats import binomtest

spec = importlib.util.spec_from_file_location("mutation_benchmark", ROOT / "benchmarks" / "mutation.py")
mutation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutation)

NAMES = [f"runner.fuse.stacking.x_fit__mutmut_{i}" for i in range(1, 41)] + [
    f"runner.fuse.merge.xǁTiesǁcombine__mutmut_{i}" for i in range(1, 8)
]


def test_a_mutant_belongs_to_the_module_of_its_function_or_method():
    assert mutation.module_of("runner.fuse.stacking.x_fit__mutmut_3") == "runner.fuse.stacking"
    assert mutation.module_of("runner.fuse.merge.xǁTiesǁcombine__mutmut_1") == "runner.fuse.merge"


def test_the_sample_takes_up_to_n_per_module_and_depends_on_the_seed_not_the_order():
    picked = mutation.sample(NAMES, 10, seed=0)
    stacking = [n for n in picked if n.startswith("runner.fuse.stacking.")]
    merge = [n for n in picked if n.startswith("runner.fuse.merge.")]
    assert len(stacking) == 10 and len(set(stacking)) == 10
    assert sorted(merge) == sorted(NAMES[40:])  # a module with fewer mutants is checked whole
    shuffled = NAMES[:]
    random.Random(5).shuffle(shuffled)
    assert mutation.sample(shuffled, 10, seed=0) == picked
    assert mutation.sample(NAMES, 10, seed=1) != picked


@pytest.mark.parametrize(("k", "n"), [(23, 25), (25, 25), (0, 7), (13, 40)])
def test_the_interval_is_scipys_wilson_interval(k, n):
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = mutation.wilson(k, n)
    assert low == pytest.approx(expected.low, abs=2e-4) and high == pytest.approx(expected.high, abs=2e-4)
