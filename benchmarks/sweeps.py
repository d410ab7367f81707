"""Sweep wall time: member cache on vs off, and the basic vs the joblib launcher (2 workers).

    python benchmarks/sweeps.py [--epochs 20]

(1) A compression sweep over 3 recipes of the same MNIST-1D CNN member: with the cache the member
    is trained once and loaded twice; without it (cache.dir=null) it is trained three times.
(2) Four seeds of the CNN: one after another (basic launcher) vs two at a time (joblib, n_jobs=2).
Each figure is the wall time of the whole `python -m runner -m ...` command, fresh MLflow store.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sweep(tmp: Path, name: str, *overrides: str) -> float:
    folder = tmp / name
    args = [
        f"tracking.uri=sqlite:///{folder}/mlflow.db",
        f"tracking.artifact_location={folder}/art",
        f"hydra.sweep.dir={folder}/sweep",
        "model=cnn1d",
        *overrides,
    ]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "runner", "-m", *args], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    epochs = f"trainer.max_epochs={args.epochs}"
    recipes = "compress=prune_global,quant_static,prune_structured"
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        sweep(tmp, "warmup", epochs, "seed=9", "cache.dir=null")  # imports warm in the page cache
        cached = sweep(tmp, "cache", epochs, recipes, f"cache.dir={tmp}/cache")
        uncached = sweep(tmp, "nocache", epochs, recipes, "cache.dir=null")
        seeds = "seed=0,1,2,3"
        basic = sweep(tmp, "basic", epochs, seeds, "cache.dir=null")
        joblib = sweep(
            tmp, "joblib", epochs, seeds, "cache.dir=null", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"
        )
        joblib1 = sweep(
            tmp,
            "joblib1",
            epochs,
            seeds,
            "cache.dir=null",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "threads=1",
        )
    print("| sweep | jobs | wall s | ratio |")
    print("|---|---|---|---|")
    print(f"| 3 recipes x 1 CNN member, no cache | 3 | {uncached:.1f} | 1.00 |")
    print(f"| 3 recipes x 1 CNN member, member cache | 3 | {cached:.1f} | {uncached / cached:.2f}x faster |")
    print(f"| 4 seeds, basic launcher (sequential) | 4 | {basic:.1f} | 1.00 |")
    print(f"| 4 seeds, joblib launcher, n_jobs=2 | 4 | {joblib:.1f} | {basic / joblib:.2f}x faster |")
    print(f"| 4 seeds, joblib launcher, n_jobs=2, threads=1 | 4 | {joblib1:.1f} | {basic / joblib1:.2f}x faster |")
    print(f"\nMNIST-1D CNN, {args.epochs} epochs per member, fresh SQLite MLflow store per sweep, 2 cores.")


if __name__ == "__main__":
    main()
