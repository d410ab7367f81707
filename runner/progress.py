"""Progress while a job trains: a bar per member (epoch, train loss, val accuracy) on a terminal,
plain log lines otherwise (files, pipes, SLURM logs), at most one every `interval_s` seconds plus the
first and the last epoch. The sweep's own progress (job k of n, elapsed, ETA) is
runner/tracking/sweep.py's."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

import pytorch_lightning as pl

log = logging.getLogger("runner.progress")

INTERVAL_S = 10.0


def _fmt(value: Any) -> str:
    return f"{float(value):.4f}" if value is not None else "-"


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 12s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class MemberProgress(pl.Callback):
    """Epochs of one member's training. The metrics of an epoch are read when the next one starts
    (Lightning runs callbacks' epoch-end hooks before the module logs the epoch) and at the end."""

    def __init__(
        self,
        name: str,
        stream: TextIO | None = None,
        interval_s: float = INTERVAL_S,
        clock: Any = time.monotonic,
        what: str = "member",
    ) -> None:
        self.name, self.stream, self.interval_s, self.clock = name, stream or sys.stderr, interval_s, clock
        self.what = what  # "member", or a compression step's fine-tuning / distillation
        self.bar: Any = None
        self.lines: list[str] = []  # what was logged (tests)

    def __getstate__(self) -> dict:  # DDP: pickled into each training process, without the stream
        return {**self.__dict__, "stream": None, "bar": None, "clock": time.monotonic}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.stream = self.stream or sys.stderr

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.total, self.started, self.last = trainer.max_epochs, self.clock(), None
        self.first_epoch = trainer.current_epoch  # > 0 when resumed from a checkpoint
        if self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.total,
                initial=self.first_epoch,
                desc=f"{self.what} {self.name}",
                unit="epoch",
                file=self.stream,
                leave=True,
                dynamic_ncols=True,
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch > self.first_epoch:
            self._report(trainer, trainer.current_epoch - 1, final=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, trainer.current_epoch - 1, final=True)
        if self.bar is not None:
            self.bar.close()

    def _report(self, trainer: pl.Trainer, epoch: int, final: bool) -> None:
        if trainer.global_rank != 0:  # one report per member, not one per DDP rank
            return
        metrics = trainer.callback_metrics
        loss, acc = metrics.get("train/loss"), metrics.get("val/acc")
        if self.bar is not None:
            self.bar.n = epoch + 1
            self.bar.set_postfix_str(f"train/loss {_fmt(loss)} val/acc {_fmt(acc)}")
            return
        now = self.clock()
        if final or epoch == self.first_epoch or self.last is None or now - self.last >= self.interval_s:
            self.last = now
            line = (
                f"{self.what} {self.name}: epoch {epoch + 1}/{self.total} train/loss {_fmt(loss)} "
                f"val/acc {_fmt(acc)} ({duration(now - self.started)})"
            )
            self.lines.append(line)
            log.info(line)
