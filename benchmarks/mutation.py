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

Kill rate = killed / (killed + survived + not covered); a timeout counts as killed (the mutant made
the tests hang or crawl, which they noticed). The survivors are listed by function so each can be
killed by a new test or explained as equivalent.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# group -> (the files mutmut changes, the test files that cover them)
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "cache": (
        ["runner/cache.py"],
        ["tests/unit/test_cache.py", "tests/contract/test_guard_cache_key.py", "tests/e2e/test_trust.py"],
    ),
    "members": (["runner/members.py"], ["tests/contract/test_guard_cache_key.py", "tests/e2e/test_ensemble_size.py"]),
    "fuse": (
        ["runner/fuse/*"],
        ["tests/unit/test_fuse.py", "tests/unit/test_merge.py", "tests/contract/test_guard_splits.py"],
    ),
    "compress": (
        ["runner/compress/*"],
        [
            "tests/unit/test_compress.py",
            "tests/unit/test_quantize.py",
            "tests/unit/test_distill.py",
            "tests/unit/test_structured_prune.py",
            "tests/unit/test_guard_selection.py",
        ],
    ),
    "pipeline": (["runner/pipeline.py"], ["tests/e2e/test_pipeline.py", "tests/contract/test_guard_splits.py"]),
}
# what the copies need besides runner/ and tests/ (mutmut copies those and pyproject.toml itself)
ALSO_COPY = ["conf", "examples", "benchmarks", "results", "README.md", "Makefile", "docs", "mkdocs.yml"]
DETECTED = {"killed", "timeout"}
STATUSES = ("killed", "timeout", "survived", "no tests", "suspicious", "skipped", "caught by type check")


def mutmut_config(group: str) -> str:
    mutate, tests = GROUPS[group]

    def quoted(items: list[str]) -> str:
        return "[" + ", ".join(f'"{i}"' for i in items) + "]"

    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["runner"]\n'
        f"only_mutate = {quoted(mutate)}\n"
        f"pytest_add_cli_args_test_selection = {quoted(tests)}\n"
        # xdist off: mutmut runs one pytest per mutant in its own forked worker
        'pytest_add_cli_args = ["-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-m", "not gpu"]\n'
        "mutate_only_covered_lines = true\n"
        'process_isolation = "forkserver"\n'  # torch is not fork-safe after it started its threads
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


def run_group(group: str, jobs: int) -> tuple[Counter, list[str], float]:
    work = ROOT / "outputs" / "mutation" / group
    prepare(group, work)
    start = time.time()
    subprocess.run(
        [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs)],
        cwd=work,
        stdout=subprocess.DEVNULL,
        check=False,
    )
    verdicts = results(work)
    counts = Counter(verdicts.values())
    survivors = sorted(name for name, status in verdicts.items() if status in ("survived", "no tests"))
    return counts, survivors, time.time() - start


def kill_rate(counts: Counter) -> float:
    checked = sum(counts[s] for s in ("killed", "timeout", "survived", "no tests"))
    return sum(counts[s] for s in DETECTED) / checked if checked else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", nargs="*", choices=sorted(GROUPS), default=list(GROUPS))
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once")
    parser.add_argument("--write", help="also write the table and the survivors to this Markdown file")
    args = parser.parse_args()
    rows, lines = [], []
    for group in args.group:
        counts, survivors, seconds = run_group(group, args.jobs)
        rows.append((group, counts, seconds))
        print(f"{group}: {kill_rate(counts):.1%} killed {dict(counts)} in {seconds:.0f} s", flush=True)
        lines += [f"- `{name}`" for name in survivors]
    header = "| group | mutants | killed | timeout | survived | not covered | kill rate | seconds |"
    table = [header, "|" + "---|" * 8]
    for group, c, seconds in rows:
        total = sum(c.values())
        table.append(
            f"| {group} | {total} | {c['killed']} | {c['timeout']} | {c['survived']} | {c['no tests']} "
            f"| {kill_rate(c):.1%} | {seconds:.0f} |"
        )
    print("\n".join(table))
    if args.write:
        Path(args.write).write_text("\n".join(table + ["", "Survivors:", ""] + lines) + "\n")


if __name__ == "__main__":
    main()
