"""Progress: a line (or a terminal bar) per member's epochs, a line per sweep job with its ETA."""

from __future__ import annotations

import io

from conftest import FAST_TRAINER
from omegaconf import OmegaConf

from runner.models import MLP
from runner.progress import MemberProgress, duration
from runner.tracking.sweep import progress_line, sweep_size
from runner.train import train_classifier


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """Each call is `step` seconds after the previous one."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def train(progress: MemberProgress, mnist1d_small, epochs: int = 4) -> dict:
    from pytorch_lightning.callbacks import Callback

    seen = {}

    class Keep(Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch:
                seen[trainer.current_epoch - 1] = (
                    float(trainer.callback_metrics["train/loss"]),
                    float(trainer.callback_metrics["val/acc"]),
                )

        def on_train_end(self, trainer, module):
            seen[trainer.current_epoch - 1] = (
                float(trainer.callback_metrics["train/loss"]),
                float(trainer.callback_metrics["val/acc"]),
            )

    train_classifier(
        MLP(40, 10, hidden=16),
        mnist1d_small,
        {**FAST_TRAINER, "max_epochs": epochs},
        {"name": "adam", "lr": 1e-2},
        callbacks=[progress, Keep()],
    )
    return seen


def test_member_progress_lines_when_not_a_terminal(mnist1d_small):
    every = MemberProgress("mlp-s0", stream=io.StringIO(), interval_s=0.0)
    seen = train(every, mnist1d_small)
    assert [line.split(" (")[0] for line in every.lines] == [
        f"member mlp-s0: epoch {e + 1}/4 train/loss {loss:.4f} val/acc {acc:.4f}"
        for e, (loss, acc) in sorted(seen.items())
    ]
    # a long interval: the first and the last epoch only
    sparse = MemberProgress("mlp-s0", stream=io.StringIO(), interval_s=3600.0, clock=Clock(1.0))
    train(sparse, mnist1d_small)
    assert [line.split(":")[1].split(" train")[0] for line in sparse.lines] == [" epoch 1/4", " epoch 4/4"]


def test_member_progress_bar_on_a_terminal(mnist1d_small):
    screen = Terminal()
    bar = MemberProgress("mlp-s1", stream=screen)
    seen = train(bar, mnist1d_small, epochs=3)
    loss, acc = seen[2]
    out = screen.getvalue()
    assert "member mlp-s1" in out and "3/3" in out and f"train/loss {loss:.4f} val/acc {acc:.4f}" in out
    assert bar.lines == []  # a bar, not log lines


def sweep_config(task: list[str], params: dict | None = None, n_trials: int | None = None):
    sweeper = {"params": params} if params else {}
    if n_trials:
        sweeper["n_trials"] = n_trials
    return OmegaConf.create({"hydra": {"sweeper": sweeper, "overrides": {"task": task}}})


def test_sweep_size_and_progress_line():
    assert sweep_size(sweep_config(["seed=0,1", "trainer=fast"])) == 2
    assert sweep_size(sweep_config(["seed=0,1"], {"model": "mlp,cnn1d,gru"})) == 6
    assert sweep_size(sweep_config(["model=mlp"], {"model": "mlp,cnn1d,gru", "seed": "range(0,4)"})) == 4
    assert sweep_size(sweep_config(["seed=0,1"], n_trials=30)) == 30
    assert sweep_size(sweep_config(["optim.lr=interval(0.001,0.1)"])) is None
    assert progress_line(0, 20, 3.0) == "sweep [--------------------] job 1 of 20, 3s elapsed"
    assert progress_line(5, 20, 100.0) == "sweep [#####---------------] job 6 of 20, 1m40s elapsed, ETA 5m00s"
    assert progress_line(3, None, 7200.0) == "sweep: job 4, 2h00m elapsed"
    # parallel launchers: two jobs start before any ends, each says its own number
    assert progress_line(0, 2, 1.0, job=2) == "sweep [--------------------] job 2 of 2, 1s elapsed"
    assert duration(59.6) == "1m00s"


def test_compression_fine_tuning_says_how_far_it_is(caplog):
    """A compression step's fine-tuning and a distillation report their epochs as members do."""
    import logging

    from runner.compress.base import CompressContext, finetune
    from runner.data import SklearnDataset
    from runner.models import MLP

    dm = SklearnDataset("wine", num_features=13, num_classes=3)
    ctx = CompressContext(
        dm,
        {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        {"name": "adam", "lr": 1e-2},
    )
    with caplog.at_level(logging.INFO, logger="runner.progress"):
        finetune(MLP(13, 3, hidden=8), ctx, epochs=2, lr=None)
    lines = [r.getMessage() for r in caplog.records if r.name == "runner.progress"]
    assert [line.split(" train/loss")[0] for line in lines] == [
        "fine-tuning MLP: epoch 1/2",
        "fine-tuning MLP: epoch 2/2",
    ]
