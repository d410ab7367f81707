"""MLflow logging paths side by side in one run: the in-process tracker (synchronous writes, the
default), the same with MLflow's own asynchronous logging (tracking.async_logging=true), and the MLflow
worker process that was the default before issue #24 (run from a checkout that still has it).

For each mode, interleaved (A B C A B C ...) so that drifting machine load hits every mode alike:
  (a) the default experiment, `python -m runner` (one job: the MNIST-1D CNN, 40 epochs, models logged);
  (b) a sweep of `--jobs` small jobs in one process, `python -m runner -m seed=range(N) trainer.max_epochs=3`.
Every run gets a fresh temporary SQLite store, artifact folder and member cache (never outputs/).
Measured: wall time of the command; time to the first training step (timing/startup_s; in a sweep
only the first job has one); the job's wait for MLflow (timing/mlflow_setup_s + timing/mlflow_log_s,
summed over the sweep's jobs), read back from the runs. The medians of the repeats are printed, then
each mode's difference per job from the in-process default (positive: slower).

    python benchmarks/mlflow_logging.py [--repeats 3] [--jobs 20] [--modes sync,async]
    git worktree add /tmp/before <a commit before #24>   # for the worker
    python benchmarks/mlflow_logging.py --modes sync,async,worker --worker-checkout /tmp/before
"""

from __future__ import annotations

import os
import sys

# this file is named like the standard library's `logging`: keep its folder off the import path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "sync": [],  # the default: in the job's process, synchronous writes
    "async": ["tracking.async_logging=true"],  # MLflow's own asynchronous logging, in the job's process
    "worker": [],  # the default of a checkout before #24: a worker process (tracking.background=true)
}
SWEEP = ["trainer.max_epochs=3"]


def launch(mode: str, args: list[str], tmp: Path, checkout: Path = ROOT) -> dict:
    """Run one command in a fresh store; its wall time and the timing metrics of its job runs."""
    from mlflow import MlflowClient

    store = [
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        f"tracking.artifact_location={tmp}/art",
        f"cache.dir={tmp}/cache",
        f"hydra.run.dir={tmp}/run",
        f"hydra.sweep.dir={tmp}/sweep",
    ]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "runner", *args, *MODES[mode], *store], cwd=checkout, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{mode} {args} failed:\n{done.stderr[-3000:]}")
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("runner").experiment_id
    runs = client.search_runs([experiment], "tags.role = 'job'", max_results=1000)
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    metrics = [r.data.metrics for r in runs]
    return {
        "jobs": len(runs),
        "wall_s": wall,
        "startup_s": min(m.get("timing/startup_s", float("inf")) for m in metrics),
        "wait_s": sum(m["timing/mlflow_setup_s"] + m["timing/mlflow_log_s"] for m in metrics),
        "acc": statistics.mean(m["members/mean/test/acc"] for m in metrics),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--modes", default="sync,async", help="comma-separated: " + ",".join(MODES))
    parser.add_argument("--worker-checkout", type=Path, help="a checkout with the worker (before #24)")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if "worker" in modes and not args.worker_checkout:
        parser.error("the worker mode runs from --worker-checkout (a checkout before #24)")
    checkouts = {mode: args.worker_checkout if mode == "worker" else ROOT for mode in modes}
    cases = {"default run": [], f"{args.jobs}-job sweep": ["-m", f"seed=range({args.jobs})", *SWEEP]}
    results: dict[tuple[str, str], list[dict]] = {(c, m): [] for c in cases for m in modes}
    with tempfile.TemporaryDirectory() as tmp_dir:
        for mode in modes:  # files into the page cache
            launch(mode, ["trainer.max_epochs=1"], Path(tmp_dir) / f"warm-up-{mode}", checkouts[mode])
        for repeat in range(args.repeats):
            for case, case_args in cases.items():
                for mode in modes:  # interleaved: A B C A B C ...
                    got = launch(mode, case_args, Path(tmp_dir) / f"{repeat}-{len(case_args)}-{mode}", checkouts[mode])
                    results[case, mode].append(got)
                    print(
                        f"# {case:14s} {mode:6s} wall {got['wall_s']:6.1f} s  first step {got['startup_s']:5.2f} s"
                        f"  MLflow wait {got['wait_s']:5.2f} s  ({got['jobs']} jobs)",
                        file=sys.stderr,
                        flush=True,
                    )

    med = lambda case, mode, key: statistics.median(r[key] for r in results[case, mode])  # noqa: E731
    print("| case | mode | jobs | wall s | wall s/job | first step s | MLflow wait s/job | acc |")
    print("|---|---|---|---|---|---|---|---|")
    for case in cases:
        for mode in modes:
            jobs = results[case, mode][0]["jobs"]
            print(
                f"| {case} | {mode} | {jobs} | {med(case, mode, 'wall_s'):.1f} | {med(case, mode, 'wall_s') / jobs:.2f}"
                f" | {med(case, mode, 'startup_s'):.2f} | {med(case, mode, 'wait_s') / jobs:.3f}"
                f" | {med(case, mode, 'acc'):.3f} |"
            )
    base = modes[0]
    print(f"\nPer job, each mode minus {base} (median of the repeats; negative: faster than {base}):\n")
    print("| case | mode | wall s/job | first step s | MLflow wait s/job |")
    print("|---|---|---|---|---|")
    for case in cases:
        jobs = results[case, base][0]["jobs"]
        for mode in modes[1:]:
            pairs = list(zip(results[case, mode], results[case, base], strict=True))  # repeat by repeat
            wall, first, wait = (
                statistics.median((a[key] - b[key]) / per for a, b in pairs)
                for key, per in (("wall_s", jobs), ("startup_s", 1), ("wait_s", jobs))
            )
            print(f"| {case} | {mode} | {wall:+.2f} | {first:+.2f} | {wait:+.3f} |")
    load = os.getloadavg()
    print(
        f"\n{args.repeats} interleaved repeats, medians; {os.cpu_count()} cores; load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (other work on the machine slows every mode alike).\n"
        "MLflow wait: timing/mlflow_setup_s + timing/mlflow_log_s as each job logged them, i.e. up to its last "
        "metrics; a worker's queued writes (the models) that the job waits for when its run ends are in the "
        "wall time only."
    )


if __name__ == "__main__":
    main()
