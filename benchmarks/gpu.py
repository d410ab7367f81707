"""Training throughput on a GPU: the runner against a hand-written PyTorch loop, side by side in one run.

For ResNet-20 and vit_tiny (conf/model/) on CIFAR-shaped synthetic data (3x32x32, 10 classes,
random labels: throughput does not care), both with the same:
  - model (built from the same conf/model YAML, same initial weights), in channels_last for the CNN
    (the runner's default for CNNs on a GPU; the hand loop does the same);
  - data: in-memory tensors on the GPU, the same shuffled order of batches of `--batch`;
  - optimizer (SGD, lr 0.05, momentum 0.9) and number of optimizer steps, bf16 autocast;
  - no validation in either (trainer.limit_val_batches=0).
(1) the hand loop: slices the device tensors, autocast forward, backward, step;
(2) the runner: `runner.train.fit` (Lightning, precision=bf16-mixed) on an in-memory source whose
    splits `runner.device.data_on_device` put on the GPU, as a `trainer=gpu` job does.
Each is timed from its first to its last step, with torch.cuda.synchronize, after a warm-up run of
each (cuDNN autotuning, allocator); runs alternate so drifting clocks hit both alike. Prints
samples/s of each, the ratio (runner / hand: 1.00 = no overhead; the target is >= 0.95) and the spread.

    python benchmarks/gpu.py [--epochs 3] [--repeats 3] [--samples 50000] [--batch 256]
    python benchmarks/gpu.py --device cpu --samples 512 --epochs 1 --repeats 1   # a smoke run, no GPU
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from runner.data.base import ArrayDataModule
from runner.device import data_on_device
from runner.models import LitClassifier
from runner.models.adapter import build_model as build_net
from runner.train import channels_last, fit

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("resnet20", "vit_tiny")
LR, MOMENTUM = 0.05, 0.9


class Synthetic(ArrayDataModule):
    """CIFAR-shaped random images and labels, generated once (seed 0)."""

    name = "synthetic"

    def __init__(self, samples: int, batch: int) -> None:
        super().__init__(num_classes=10, batch_size=batch, eval_batch_size=batch)
        self.samples = samples

    def load(self) -> dict:
        rng = np.random.default_rng(0)
        split = lambda n: (rng.standard_normal((n, 3, 32, 32), dtype=np.float32), rng.integers(0, 10, n))  # noqa: E731
        return {"train": split(self.samples), "val": split(self.batch_size), "test": split(self.batch_size)}


def build_model(name: str) -> torch.nn.Module:
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("config", overrides=[f"model={name}", "data=cifar10"])  # composed only: nothing downloads
    pl.seed_everything(0, verbose=False)
    return build_net(cfg.model, "model")


def accelerator(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else "cpu"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hand_loop(net: torch.nn.Module, dm: Synthetic, epochs: int, device: torch.device) -> tuple[float, int]:
    """(seconds, samples) of plain PyTorch training on the device tensors."""
    x, y = dm.splits["train"]
    nhwc = channels_last({"accelerator": accelerator(device)}, net)
    net = net.to(device).train()
    if nhwc:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    generator = torch.Generator().manual_seed(0)
    batch = dm.batch_size
    sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator).to(device)
        for i in range(0, len(y), batch):
            index = order[i : i + batch]
            xb, yb = x[index], y[index]
            if nhwc:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(net(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    sync(device)
    return time.perf_counter() - start, epochs * len(y)


class StepClock(pl.Callback):
    """Time from the first training step to the end of the last, synchronized on the GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.start, self.end = device, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.start is None:
            sync(self.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, module) -> None:
        sync(self.device)
        self.end = time.perf_counter()


def runner_fit(net: torch.nn.Module, dm: Synthetic, epochs: int, device: torch.device) -> tuple[float, int]:
    """(seconds, samples) of the runner's training: Lightning through runner.train.fit, bf16-mixed."""
    trainer = {
        "max_epochs": epochs,
        "accelerator": accelerator(device),
        "devices": 1,
        "precision": "bf16-mixed",
        "limit_val_batches": 0,
        "enable_progress_bar": False,
        "steps_per_call": 0,
    }  # the trainer group's default: a whole epoch per Lightning step
    clock = StepClock(device)
    fit(LitClassifier(net, "sgd", lr=LR, momentum=MOMENTUM), dm, trainer, callbacks=[clock])
    return clock.end - clock.start, epochs * len(dm.splits["train"][1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dm = Synthetic(args.samples, args.batch)
    dm.setup()
    data_on_device(dm, device, {"accelerator": accelerator(device), "devices": 1})

    rows = []
    for name in args.models:
        model = build_model(name)
        hand_loop(copy.deepcopy(model), dm, 1, device)  # warm-up of each (not timed)
        runner_fit(copy.deepcopy(model), dm, 1, device)
        hand, ours = [], []
        for _ in range(args.repeats):
            seconds, samples = hand_loop(copy.deepcopy(model), dm, args.epochs, device)
            hand.append(samples / seconds)
            seconds, samples = runner_fit(copy.deepcopy(model), dm, args.epochs, device)
            ours.append(samples / seconds)
        ratios = [o / h for o, h in zip(ours, hand)]
        rows.append(
            {
                "model": name,
                "params": sum(p.numel() for p in model.parameters()),
                "hand samples/s": statistics.median(hand),
                "runner samples/s": statistics.median(ours),
                "ratio": statistics.median(ratios),
                "ratio min-max": f"{min(ratios):.3f}-{max(ratios):.3f}",
            }
        )
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print(
            "| "
            + " | ".join(
                f"{v:.3f}"
                if isinstance(v, float) and v < 10
                else f"{v:,.0f}"
                if isinstance(v, (int, float))
                else str(v)
                for v in r.values()
            )
            + " |"
        )
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"\n{where}; {args.samples} samples 3x32x32, batch {args.batch}, {args.epochs} epochs, SGD lr {LR} momentum "
        f"{MOMENTUM}, bf16 autocast; median of {args.repeats} alternating runs (ratio = runner / hand, per pair)."
    )


if __name__ == "__main__":
    main()
