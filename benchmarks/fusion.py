"""Every conf/fuse strategy on 5 MNIST-1D CNN seeds: test acc / F1 / NLL / ECE and the gain over
the best single member (per metric: highest acc and F1, lowest NLL and ECE among the members).

Output-level strategies, stacking, Caruana and feature fusion fuse independently seeded members;
the soups fuse a second set trained from one shared initialisation (as `ensemble.shared_init: true`
does in the pipeline), since averaging independently initialised weights collapses.

    .venv/bin/python benchmarks/fusion.py [--epochs 40] [--seeds 5]
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

from runner.config import build
from runner.data import MNIST1D
from runner.evaluate import classification_metrics
from runner.fuse import member_probs
from runner.models import CNN1D
from runner.models.facts import set_init_id
from runner.train import train_classifier

CONF = Path(__file__).resolve().parents[1] / "conf"
METRICS = ("acc", "f1", "nll", "ece")
LOWER_IS_BETTER = {"nll", "ece"}


def train_members(dm: MNIST1D, seeds: list[int], epochs: int, shared_init: bool) -> list[CNN1D]:
    trainer = {"max_epochs": epochs, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False}
    nets, first_init = [], None
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        net = CNN1D(40, 10)
        if shared_init and nets:
            net.load_state_dict(first_init)
        if not nets:
            first_init = copy.deepcopy(net.state_dict())
        set_init_id(net, "shared" if shared_init else f"seed{seed}")
        nets.append(train_classifier(net, dm, trainer, {"name": "adam", "lr": 1e-2}))
    return nets


def metrics(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return classification_metrics(probs, y, 10, METRICS)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # small convs: threads only add contention on a shared CPU

    dm = MNIST1D(cache_dir="outputs/data")
    dm.setup()
    (xt, yt), seeds = dm.splits["test"], list(range(args.seeds))
    start = time.time()
    independent = train_members(dm, seeds, args.epochs, shared_init=False)
    shared = train_members(dm, seeds, args.epochs, shared_init=True)
    print(f"trained {2 * len(seeds)} CNNs x {args.epochs} epochs in {time.time() - start:.0f} s")

    rows: dict[str, dict[str, float]] = {}
    for label, nets in (("", independent), ("shared-init ", shared)):
        probs = member_probs(nets, xt)
        single = [metrics(p, yt) for p in probs]
        rows[f"{label}members (mean)"] = {k: sum(s[k] for s in single) / len(single) for k in METRICS}
        best = {k: (min if k in LOWER_IS_BETTER else max)(s[k] for s in single) for k in METRICS}
        rows[f"{label}members (best)"] = best
        if not label:
            best_independent, probs_independent = best, probs
        else:
            best_shared, probs_shared = best, probs

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        for path in sorted((CONF / "fuse").glob("*.yaml")):
            strategy = build(compose("config", overrides=[f"fuse={path.stem}"]).fuse, "fuse")
            soup = "shared_start" in strategy.requires
            nets, probs, best = (
                (shared, probs_shared, best_shared) if soup else (independent, probs_independent, best_independent)
            )
            t = time.time()
            strategy.fit(nets, dm.val_dataloader())
            fused = strategy.fused_test_probs(probs)
            fused = strategy.predict_proba(xt) if fused is None else fused
            m = metrics(fused, yt)
            m.update({f"gain_{k}": m[k] - best[k] for k in METRICS}, fit_s=time.time() - t)
            rows[path.stem + (" (shared init)" if soup else "")] = m

    columns = [*METRICS, *(f"gain_{k}" for k in METRICS), "fit_s"]
    print("| strategy | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, m in rows.items():
        print(f"| {name} | " + " | ".join(f"{m[c]:.4f}" if c in m else "" for c in columns) + " |")


if __name__ == "__main__":
    main()
