"""Mutation testing of the modules whose bugs would publish wrong numbers without an error: fusion,
compression, the member cache, member planning and the pipeline's stage wiring.

mutmut 3 changes one small thing at a time in a module (a `<` for a `<=`, a constant, a dropped
argument) and runs the tests that execute the changed function; a mutant the tests do not notice
"survives". Each group below is mutated in its own copy of the repository under
outputs/mutation/<group>/ and runs only the test files listed for it (not the whole suite, so it fits
2 cores). A rerun picks up where it stopped: mutmut keeps every mutant's verdict in the copy's
mutants/ folder. mutmut re-checks a mutant when its function's source changes, but not when the tests
do, so a change to any file of the copy (the tests included) starts the group afresh: a verdict made
by other tests is never reused.

    pip install -e '.[mutation]'
    .venv/bin/python benchmarks/mutation.py [--group cache members] [--jobs 2] [--write results/mutation.md]
    .venv/bin/python benchmarks/mutation.py --group fuse --sample 25 --seed 0   # 25 mutants per module

A full group takes hours on 2 cores; --sample checks a seeded random sample of each module's mutants
and reports the kill rate with its 95% (Wilson) interval, an estimate of the full run's.

Kill rate = killed / (killed + survived + not covered); a timeout counts as killed (the mutant made
the tests hang or crawl, which they noticed). The survivors are listed by function so each can be
killed by a new test or explained as equivalent.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from scipy.stats import binomtest

ROOT = Path(__file__).resolve().parents[1]

# group -> (the files mutmut changes, the test files that cover them)
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "cache": (
        ["runner/cache.py"],
        ["tests/unit/test_cache.py", "tests/contract/test_guard_cache_key.py", "tests/e2e/test_trust.py"],
    ),
    "members": (
        ["runner/members.py"],
        [
            "tests/contract/test_guard_cache_key.py",
            "tests/contract/test_guard_splits.py",
            "tests/unit/test_config.py",
            "tests/unit/test_finetune.py",
            "tests/unit/test_members.py",
            "tests/e2e/test_ensemble_size.py",
            "tests/e2e/test_trust.py",
        ],
    ),
    "fuse": (
        ["runner/fuse/*"],
        [
            "tests/unit/test_fuse.py",
            "tests/unit/test_merge.py",
            "tests/unit/test_slerp.py",
            "tests/unit/test_multitask_merge.py",
            "tests/contract/test_guard_splits.py",
        ],
    ),
    "compress": (
        ["runner/compress/*"],
        [
            "tests/unit/test_compress.py",
            "tests/unit/test_quantize.py",
            "tests/unit/test_distill.py",
            "tests/unit/test_structured_prune.py",
            "tests/unit/test_guard_selection.py",
            "tests/unit/test_wanda_weight_only.py",
            "tests/unit/test_distill_lm.py",
        ],
    ),
    "pipeline": (
        ["runner/pipeline.py"],
        [
            "tests/e2e/test_pipeline.py",
            "tests/contract/test_guard_splits.py",
            "tests/contract/test_guard_cache_key.py",
            "tests/contract/test_logged_model_names.py",
        ],
    ),
}
# end-to-end tests left out of a group's mutant runs: each spends minutes on what its group's unit tests
# also reach (a benchmark's smoke run, a whole job), and mutmut runs every test that reaches a mutated
# function, so with them a sample of the group takes hours; a mutant only they reach counts as not covered
SLOW: dict[str, list[str]] = {
    "compress": [
        "tests/unit/test_quantize.py::test_the_benchmark_runs",
        "tests/unit/test_quantize.py::test_the_pipeline_logs_the_int8_cnn",
        "tests/unit/test_compress.py::test_every_recipe_checks_the_gru_clearly",
    ],
}
# what the copies need besides runner/ and tests/ (mutmut copies those and pyproject.toml itself)
ALSO_COPY = ["conf", "examples", "benchmarks", "results", "README.md", "Makefile", "docs", "mkdocs.yml"]
# mutmut forks each mutant's pytest from a server that imported the tests; where that server had started
# an OpenMP thread pool (torch's, 2 threads on 2 cores), a forked child could block forever on the pool's
# lock and end as a "timeout" once its wall-time limit ran out. One thread per process starts no pool
# (and --jobs mutants run side by side anyway).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
DETECTED = {"killed", "timeout"}
STATUSES = ("killed", "timeout", "survived", "no tests", "suspicious", "skipped", "caught by type check")


def mutmut_config(group: str) -> str:
    mutate, tests = GROUPS[group]

    def quoted(items: list[str]) -> str:
        return "[" + ", ".join(f'"{i}"' for i in items) + "]"

    # xdist off: mutmut runs one pytest per mutant in its own forked worker
    args = ["-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-m", "not gpu"]
    args += [a for test in SLOW.get(group, []) for a in ("--deselect", test)]
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["runner"]\n'
        f"only_mutate = {quoted(mutate)}\n"
        f"pytest_add_cli_args_test_selection = {quoted(tests)}\n"
        f"pytest_add_cli_args = {quoted(args)}\n"
        "mutate_only_covered_lines = true\n"
        'process_isolation = "forkserver"\n'  # torch is not fork-safe after it started its threads
        # mutmut's limits are 30 x (a mutant's tests' own time + this) CPU seconds and half that in wall
        # time; a child imports torch, Lightning and transformers and builds its module-scoped fixtures
        # before its first test, which the tests' own times leave out: with 10 s, mutants that only
        # changed a progress bar's label still timed out on a busy machine
        "timeout_constant = 30\n"
        f"also_copy = {quoted(ALSO_COPY)}\n"
    )


def prepare(group: str, work: Path) -> None:
    """The repository's tracked and unignored files copied into `work`; its mutants/ folder (mutmut's
    verdicts) is kept only if no file changed since they were made."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    changed = False
    for rel in filter(None, files):
        src, dst = ROOT / rel, work / rel
        if src.is_file() and rel.split("/")[0] != "outputs" and rel != "pyproject.toml":  # written below
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists() or dst.read_bytes() != src.read_bytes():
                shutil.copy2(src, dst)
                changed = True
    config = (ROOT / "pyproject.toml").read_text() + mutmut_config(group)
    before = work / "pyproject.toml"
    if changed or not before.exists() or before.read_text() != config:
        shutil.rmtree(work / "mutants", ignore_errors=True)
    (work / "pyproject.toml").write_text(config)


def results(work: Path) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work, capture_output=True, text=True
    ).stdout
    return dict(m.groups() for m in re.finditer(r"^\s*(\S+): (.+?)\s*$", out, re.M))


def checked(counts: Counter) -> int:
    return sum(counts[s] for s in ("killed", "timeout", "survived", "no tests"))


def kill_rate(counts: Counter) -> float:
    n = checked(counts)
    return sum(counts[s] for s in DETECTED) / n if n else float("nan")


def module_of(mutant: str) -> str:
    """`runner.fuse.stacking.x_fit__mutmut_3` -> `runner.fuse.stacking` (a function's or a method's
    mangled name holds no dot)."""
    return mutant.rsplit(".", 1)[0]


def sample(names: list[str], per_module: int, seed: int) -> list[str]:
    """Up to `per_module` mutants of each module, drawn without replacement by a seeded generator from
    the sorted names, so the same code and seed always pick the same mutants."""
    rng, by_module = random.Random(seed), {}
    for name in sorted(names):
        by_module.setdefault(module_of(name), []).append(name)
    return [n for mod in sorted(by_module) for n in rng.sample(by_module[mod], min(per_module, len(by_module[mod])))]


def wilson(detected: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a kill rate estimated from a sample of n mutants (scipy's)."""
    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(detected, n).proportion_ci(confidence_level=0.95, method="wilson")
    return ci.low, ci.high


def run_group(
    group: str, jobs: int, per_module: int | None, seed: int, run: bool = True
) -> tuple[dict[str, str], float]:
    """The verdict of every mutant checked (all of the group's, or a seeded sample per module); with
    run=False, the verdicts the group's copy holds from its last run, as they stand."""
    work = ROOT / "outputs" / "mutation" / group
    start = time.time()
    if not run:
        verdicts = results(work)
        return ({n: verdicts[n] for n in sample(list(verdicts), per_module, seed)} if per_module else verdicts), 0.0
    prepare(group, work)

    def mutmut(*names: str, **kwargs) -> None:
        command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *names]
        subprocess.run(command, cwd=work, env=ONE_THREAD, check=False, **kwargs)

    picked: list[str] = []
    if per_module is not None:
        verdicts = results(work)
        if not verdicts:  # generate the mutants and the test-coverage stats, then stop: no name matches
            mutmut("__generate_only__", capture_output=True)
            verdicts = results(work)
        picked = sample(list(verdicts), per_module, seed)
        # a named mutant is rerun even if it has a verdict, so name only the unchecked ones
        todo = [n for n in picked if verdicts[n] == "not checked"]
        if todo:
            mutmut(*todo, stdout=subprocess.DEVNULL)
    else:
        mutmut(stdout=subprocess.DEVNULL)
    verdicts = results(work)
    if picked:
        verdicts = {n: verdicts[n] for n in picked}
    return verdicts, time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", nargs="*", choices=sorted(GROUPS), default=list(GROUPS))
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once")
    parser.add_argument("--sample", type=int, help="check only this many mutants per module, drawn by --seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", help="also write the table and the survivors to this Markdown file")
    parser.add_argument("--report", action="store_true", help="only report the verdicts of the last run")
    args = parser.parse_args()
    header = "| module | mutants checked | killed | timeout | survived | not covered | kill rate | 95% interval |"
    table, lines = [header, "|" + "---|" * 8], []
    for group in args.group:
        verdicts, seconds = run_group(group, args.jobs, args.sample, args.seed, run=not args.report)
        print(f"{group}: {kill_rate(Counter(verdicts.values())):.1%} of {len(verdicts)} in {seconds:.0f} s", flush=True)
        for module in sorted({module_of(n) for n in verdicts}):
            c = Counter(s for n, s in verdicts.items() if module_of(n) == module)
            low, high = wilson(sum(c[s] for s in DETECTED), checked(c))
            table.append(
                f"| {module} | {sum(c.values())} | {c['killed']} | {c['timeout']} | {c['survived']} | "
                f"{c['no tests']} | {kill_rate(c):.1%} | {low:.0%} to {high:.0%} |"
            )
        lines += [f"- `{n}`: {s}" for n, s in sorted(verdicts.items()) if s in ("survived", "no tests")]
    print("\n".join(table))
    if args.write:
        Path(args.write).write_text("\n".join(table + ["", "Survivors:", ""] + lines) + "\n")


if __name__ == "__main__":
    main()
