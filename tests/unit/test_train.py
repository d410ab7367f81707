"""Training through Lightning: the fast step path trains exactly like Lightning's wrappers, and the
logged epoch means are the real ones."""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from runner.data import SklearnDataset
from runner.models import MLP, LitClassifier
from runner.models.lit import REDUCE_EVERY
from runner.train import build_trainer, fit

TRAINER = {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


@pytest.fixture(scope="module")
def wine_batches_of_one():
    dm = SklearnDataset("wine", num_features=13, num_classes=3, batch_size=1)  # > REDUCE_EVERY batches per epoch
    dm.setup()
    assert len(dm.splits["train"][1]) > REDUCE_EVERY
    return dm


class CountBackward(pl.Callback):
    """Overrides a hook that only Lightning's step wrappers call: forces them."""

    def __init__(self) -> None:
        self.calls = 0

    def on_after_backward(self, trainer, module) -> None:
        self.calls += 1


def train(dm, callbacks=(), lr=0.05, **trainer):
    pl.seed_everything(0, verbose=False)
    module = LitClassifier(MLP(13, 3, hidden=8), "sgd", lr=lr, momentum=0.9)
    fit(module, dm, {**TRAINER, **trainer}, callbacks=list(callbacks))
    return module


def test_fast_steps_train_exactly_like_lightnings_wrappers(wine_batches_of_one):
    dm = wine_batches_of_one
    steps = 2 * len(dm.splits["train"][1])
    counter = CountBackward()
    whole_epochs = train(dm)  # one Lightning step per epoch, plain PyTorch steps
    single = train(dm, steps_per_call=1)  # one Lightning step per optimizer step
    wrapped = train(dm, callbacks=[counter])  # a hook to call: Lightning's manual_backward/step
    assert whole_epochs._raw_steps and single._raw_steps and not wrapped._raw_steps
    assert counter.calls == steps
    for module in (whole_epochs, single, wrapped):
        assert module.trainer.global_step == steps
    for a, b, c in zip(whole_epochs.parameters(), single.parameters(), wrapped.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_bf16_mixed_steps_are_fast_too_and_train_like_the_wrappers(wine_batches_of_one):
    """bf16-mixed has no grad scaler: Lightning's autocast wraps the whole step, and the fast path trains
    to the same weights as the wrappers do (fp16's scaler keeps them)."""
    fast = train(wine_batches_of_one, precision="bf16-mixed")
    wrapped = train(wine_batches_of_one, callbacks=[CountBackward()], precision="bf16-mixed")
    assert fast._raw_steps and not wrapped._raw_steps
    assert torch.is_autocast_enabled("cpu") is False  # only inside the steps
    for a, b in zip(fast.parameters(), wrapped.parameters()):
        assert torch.equal(a, b)
    full = train(wine_batches_of_one)
    assert any(not torch.equal(a, b) for a, b in zip(fast.parameters(), full.parameters()))  # bf16 did run


def test_max_steps_stops_mid_epoch(wine_batches_of_one):
    assert train(wine_batches_of_one, max_steps=7).trainer.global_step == 7


def test_logged_epoch_means_are_exact(wine_batches_of_one):
    """With a learning rate too small to move the weights, the epoch means of train/loss and
    train/acc (summed over > REDUCE_EVERY batches) are the final model's figures on train."""
    dm = wine_batches_of_one
    module = train(dm, max_epochs=1, lr=1e-12)
    metrics = module.trainer.callback_metrics
    for split in ("train", "val"):
        x, y = dm.splits[split]
        with torch.no_grad():
            logits = module.net.eval()(x)
        assert float(metrics[f"{split}/acc"]) == pytest.approx(float((logits.argmax(1) == y).float().mean()))
        assert float(metrics[f"{split}/loss"]) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-4)
    assert not module._batches and not module._sums  # nothing carried into the next epoch


def test_trainer_without_our_settings():
    trainer = build_trainer({**TRAINER, "steps_per_call": 3})
    assert trainer.max_epochs == 2 and not trainer.checkpoint_callbacks


@pytest.mark.slow
def test_compile_trains_through_torch_compile_and_leaves_the_net_eager(wine_batches_of_one):
    """trainer.compile=true: training steps run the compiled forward (dynamo captures a graph) to the
    same weights as eager training, and the net stays a plain module (same state_dict keys)."""
    import torch._dynamo

    eager = train(wine_batches_of_one, max_epochs=1)
    torch._dynamo.reset()
    compiled = train(wine_batches_of_one, max_epochs=1, compile=True)
    assert compiled._train_forward is not None and eager._train_forward is None
    assert list(compiled.net.state_dict()) == list(eager.net.state_dict())
    for a, b in zip(compiled.net.parameters(), eager.net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the compiled forward really is compiled: calling it again hits the cache, no new graph
    x = wine_batches_of_one.splits["train"][0][:1]  # the training batch shape
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled._train_forward(x)
    assert before >= 1 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == before
