"""The import contract: runner is layered ([tool.importlinter] in pyproject.toml) and no module imports
itself through others. grimp's graph holds every import, those inside functions too, so an import moved
into a function to dodge a cycle is a cycle here as well. What a lower layer needs to know of a higher
one's classes is declared on those classes instead (runner.device reads `cpu_only_reason`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import torch
from helpers import ROOT
from torch import nn

import runner.compress
from runner.compress.base import Step
from runner.compress.requirements import REQUIREMENTS, check_requirements
from runner.device import cpu_only, placement
from runner.errors import ConfigError


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The import cycles of `graph`: its strongly connected components of two or more modules (Tarjan)."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & graph.modules) for m in sorted(graph.modules)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in edges:
        if module not in index:
            visit(module)
    return found


def test_the_import_contract_is_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_no_module_of_runner_imports_itself_through_others():
    graph = grimp.build_graph("runner", cache_dir=None)
    found = cycles(graph)
    chains = [graph.find_shortest_chain(c[0], c[1]) for c in found]
    assert not found, f"import cycles: {found}; e.g. {chains}"


def test_the_cycle_finder_finds_one():
    graph = grimp.ImportGraph()
    for importer, imported in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=importer, imported=imported)
    assert cycles(graph) == [["p.a", "p.b", "p.c"]]


class _Int8Box(nn.Linear):
    cpu_only_reason = "int8: a test's kernels"


def test_a_module_that_declares_it_runs_on_the_cpu_only_stays_there():
    """runner.device knows no class of runner.compress: any module may declare `cpu_only_reason`."""
    model = nn.Sequential(nn.Linear(3, 3), _Int8Box(3, 2))
    assert cpu_only(model) == "Sequential is int8: a test's kernels"
    assert placement(model, torch.device("cuda", 0)) == (torch.device("cpu"), cpu_only(model))
    assert cpu_only(nn.Sequential(nn.Linear(3, 2))) == ""


STEPS = [getattr(runner.compress, name) for name in runner.compress.__all__]
STEPS = [s for s in STEPS if isinstance(s, type) and issubclass(s, Step) and s is not Step]


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.__name__)
def test_what_a_step_requires_is_declared_by_known_names(step):
    assert set(step.requires) <= set(REQUIREMENTS), step.requires
    if "float" in step.requires:
        assert step.float_note, "the refusal of a quantized model says why"


def test_a_declared_requirement_is_what_check_enforces():
    class NeedsLinearLayers(Step):
        requires = frozenset({"dense_layers"})

    step = NeedsLinearLayers()
    step.check(nn.Sequential(nn.Linear(3, 2)), spec=None)
    with pytest.raises(ConfigError, match="models with Linear, GRU or LSTM layers"):
        step.check(nn.Sequential(nn.Conv1d(1, 2, 3)), spec=None)
    with pytest.raises(ValueError, match="unknown"):
        check_requirements(step, nn.Linear(3, 2), {"a_head_of_gold"})
