"""What the runner costs over a hand-written PyTorch loop, measured side by side in one run.

For the MNIST-1D MLP and CNN, with the same data split, initial weights, batch order, optimizer
and number of steps:
  (1) a hand-written loop that slices in-memory tensors per batch (and evaluates val each epoch,
      as the runner does), run as its own process;
  (2) `python -m runner model=<m>` with the default tracking (a local SQLite MLflow store).
Prints training-time ratio, per-step overhead, whole-process wall-time ratio, MLflow's share of
the run (the time the job waited for MLflow), time from command to first training step (and the hand-written script's,
whose imports of torch and Lightning are the floor), and both final test accuracies.

    python benchmarks/overhead.py [--epochs 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"mlp": "MLP", "cnn1d": "CNN1D"}


def hand_loop(model: str, epochs: int, seed: int) -> None:
    """The baseline; prints a JSON line. Mirrors the runner's seeding so both see the same batches."""
    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F

    import runner.models as models
    from runner.data import MNIST1D
    from runner.timing import process_start_time

    dm = MNIST1D()
    dm.setup()
    (x, y), (xv, yv), (xt, yt) = (dm.splits[s] for s in ("train", "val", "test"))
    pl.seed_everything(seed, verbose=False)
    net = getattr(models, MODELS[model])(40, 10)
    pl.seed_everything(seed, verbose=False)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    start, first_step = time.perf_counter(), time.time() - process_start_time()
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(y), generator=generator)
        xs, ys = x[order], y[order]
        for i in range(0, len(ys), 100):
            loss = F.cross_entropy(net(xs[i : i + 100]), ys[i : i + 100])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            F.cross_entropy(net(xv), yv)
    train_s = time.perf_counter() - start
    with torch.no_grad():
        acc = float((net(xt).argmax(1) == yt).float().mean())
    print(
        json.dumps({"train_s": train_s, "acc": acc, "steps": epochs * ((len(y) + 99) // 100), "startup_s": first_step})
    )


def run_hand(model: str, epochs: int) -> dict:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--hand", model, "--epochs", str(epochs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - start}


def run_runner(model: str, epochs: int, store: Path) -> dict:
    from mlflow import MlflowClient

    args = [
        f"model={model}",
        f"trainer.max_epochs={epochs}",
        f"tracking.uri=sqlite:///{store}/mlflow.db",
        f"tracking.artifact_location={store}/art",
        "cache.dir=null",
        "cache.skip_finished=false",
    ]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "runner", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    [run] = client.search_runs(
        [client.get_experiment_by_name("runner").experiment_id],
        "tags.role = 'job'",
        order_by=["start_time DESC"],
        max_results=1,
    )
    m = run.data.metrics
    return {
        "train_s": m["members/mean/train_s"],
        "acc": m["members/mean/test/acc"],
        "wall_s": wall,  # one member
        "mlflow_wait_s": m["timing/mlflow_setup_s"] + m["timing/mlflow_log_s"],
        **{k.removeprefix("timing/"): v for k, v in m.items() if k.startswith("timing/")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument(
        "--repeats", type=int, default=5, help="alternating runs of each; the best time of each kind is reported"
    )
    parser.add_argument("--hand", choices=sorted(MODELS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hand:
        return hand_loop(args.hand, args.epochs, seed=0)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run_runner("mlp", 1, Path(tmp))  # creates the MLflow store once, as any first run would
        for model in MODELS:
            hand, ours = [], []
            for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
                hand.append(run_hand(model, args.epochs))
                ours.append(run_runner(model, args.epochs, Path(tmp)))
            # best of the repeats: on a shared machine, the run least disturbed by other load
            best = lambda runs, key: min(r[key] for r in runs)  # noqa: E731
            steps = hand[0]["steps"]
            rows.append(
                {
                    "model": model,
                    "steps": steps,
                    "hand train s": best(hand, "train_s"),
                    "runner train s": best(ours, "train_s"),
                    "train ratio": best(ours, "train_s") / best(hand, "train_s"),
                    "median ratio": statistics.median(r["train_s"] for r in ours)
                    / statistics.median(r["train_s"] for r in hand),
                    "overhead ms/step": 1000 * (best(ours, "train_s") - best(hand, "train_s")) / steps,
                    "wall ratio": best(ours, "wall_s") / best(hand, "wall_s"),
                    "MLflow wait %": 100 * best(ours, "mlflow_wait_s") / best(ours, "total_s"),
                    "first step s": best(ours, "startup_s"),
                    "hand first step s": best(hand, "startup_s"),
                    "acc hand": hand[0]["acc"],
                    "acc runner": ours[0]["acc"],
                }
            )
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print(
            "| "
            + " | ".join(
                f"{v:.3f}" if isinstance(v, float) and v < 1 else f"{v:.2f}" if isinstance(v, float) else str(v)
                for v in r.values()
            )
            + " |"
        )
    print(
        f"\n{args.epochs} epochs, batch 100, Adam lr 1e-2, seed 0; best of {args.repeats} interleaved runs; "
        "train s = fit time inside each process (validation each epoch in both); wall = whole process; "
        "first step s = process start to first optimizer step; median ratio = the train ratio of the medians."
    )


if __name__ == "__main__":
    main()
