"""Our torchmetrics-based metrics against scikit-learn on the same predictions."""

import time

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

import runner.measure
from runner.evaluate import classification_metrics, confusion_matrix, latency_ms, size_metrics
from runner.heap import kept_heap, kept_heap_enabled
from runner.measure import PeakMemory
from runner.models import MLP


@pytest.fixture
def predictions():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (400,), generator=g)
    logits = torch.randn(400, 5, generator=g) + 2.0 * torch.nn.functional.one_hot(target, 5)
    return torch.softmax(logits, 1), target


def test_against_sklearn(predictions):
    probs, target = predictions
    ours = classification_metrics(probs, target, 5)
    y, p, pred = target.numpy(), probs.numpy(), probs.argmax(1).numpy()
    assert ours["acc"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-6)
    assert ours["precision"] == pytest.approx(skm.precision_score(y, pred, average="macro"), abs=1e-6)
    assert ours["recall"] == pytest.approx(skm.recall_score(y, pred, average="macro"), abs=1e-6)
    assert ours["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-6)
    assert ours["nll"] == pytest.approx(skm.log_loss(y, p, labels=range(5)), abs=1e-5)
    assert np.array_equal(confusion_matrix(probs, target, 5).numpy(), skm.confusion_matrix(y, pred))


def test_ece_matches_its_definition(predictions):
    probs, target = predictions
    conf, pred = probs.max(1)
    edges = torch.linspace(0, 1, 16)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.float().mean() * abs((pred[inside] == target[inside]).float().mean() - conf[inside].mean())
    assert classification_metrics(probs, target, 5, ["ece"], ece_bins=15)["ece"] == pytest.approx(float(ece), abs=1e-5)


def test_size_and_latency():
    net = MLP(40, 10, hidden=16)
    sizes = size_metrics(net)
    assert sizes["params"] == sum(p.numel() for p in net.parameters())
    assert sizes["nonzero_params"] == sizes["params"]
    assert sizes["size_bytes"] > 4 * sizes["params"]
    assert latency_ms(net, torch.randn(32, 40), repeats=3) > 0


def test_macs_are_counted_per_sample_for_any_architecture():
    from runner.evaluate import count_macs
    from runner.models.reference import LeNet5, LeNet300

    assert count_macs(LeNet300(784, 10), torch.randn(3, 1, 28, 28)) == 784 * 300 + 300 * 100 + 100 * 10
    # conv1 20x24x24 outputs of 25 MACs, conv2 50x8x8 of 500, fc 800->500, 500->10
    assert (
        count_macs(LeNet5((1, 28, 28), 10), torch.randn(1, 1, 28, 28))
        == 20 * 24 * 24 * 25 + 50 * 8 * 8 * 500 + 800 * 500 + 500 * 10
    )
    from torch.ao.quantization import quantize_dynamic

    assert count_macs(quantize_dynamic(LeNet300(784, 10), {torch.nn.Linear}), torch.randn(1, 1, 28, 28)) is None


def test_zip_bytes_is_the_deflated_serialized_state_and_rewards_zeros():
    import io
    import zlib

    net = MLP(40, 10, hidden=64)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    dense = size_metrics(net)
    assert dense["zip_bytes"] == len(zlib.compress(buffer.getvalue(), 6))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(torch.rand_like(p) < 0.1)  # ~90% zeros
    sparse = size_metrics(net)
    assert sparse["size_bytes"] == dense["size_bytes"]  # zeros cost as much as any float ...
    assert dense["zip_bytes"] / sparse["zip_bytes"] > 3  # ... until entropy-coded


class _Clock:
    """A fake perf_counter: time moves only when a _Timed model runs."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Timed(torch.nn.Module):
    """Each call takes the next of `durations` seconds on `clock` (then `rest`), recording the torch
    thread count it ran with."""

    def __init__(self, clock: _Clock, durations=(), rest: float = 1 / 256) -> None:
        super().__init__()
        self.clock, self.durations, self.rest, self.threads = clock, list(durations), rest, []

    def forward(self, x):
        self.clock.now += self.durations.pop(0) if self.durations else self.rest
        self.threads.append(torch.get_num_threads())
        return x


def _stats(model, clock, **kw):
    from runner.evaluate import latency_stats

    return latency_stats(model, torch.zeros(2, 3), **{"warmup_s": 0.0, "min_time_s": 0.0, "clock": clock, **kw})


def test_latency_median_and_quartiles_are_the_timed_calls_without_warmup():
    clock = _Clock()
    # three slow first calls (lazy kernels), then 4, 1, 3, 2, 5 units of 1/256 s (exact in binary)
    model = _Timed(clock, [1.0, 1.0, 1.0] + [k / 256 for k in (4, 1, 3, 2, 5)])
    stats = _stats(model, clock, repeats=5, warmup=3)
    assert (stats.median_ms, stats.q25_ms, stats.q75_ms) == (3000 / 256, 2000 / 256, 4000 / 256)
    assert stats.iqr_ms == 2000 / 256 and stats.repeats == 5 and len(model.threads) == 8
    assert stats.metrics() == {
        "latency_ms": 3000 / 256,
        "latency_q25_ms": 2000 / 256,
        "latency_q75_ms": 4000 / 256,
        "latency_iqr_ms": 2000 / 256,
        "latency_repeats": 5.0,
        "latency_threads": float(torch.get_num_threads()),
    }


def test_latency_warmup_lasts_its_time_budget():
    clock = _Clock()
    # one warm-up call is asked for, but 0.5 s of warm-up: both 0.25 s calls stay untimed
    model = _Timed(clock, [0.25, 0.25, 2 / 256, 1 / 256, 3 / 256])
    stats = _stats(model, clock, repeats=3, warmup=1, warmup_s=0.5)
    assert (stats.median_ms, stats.q25_ms, stats.q75_ms, stats.repeats) == (2000 / 256, 1500 / 256, 2500 / 256, 3)
    assert len(model.threads) == 5


@pytest.mark.parametrize(
    "repeats, min_time_s, max_repeats, expected",
    [
        (3, 0.0, 100, 3),  # no time floor: exactly `repeats`
        (3, 1.0, 100, 8),  # 8 calls of 0.125 s reach 1 s
        (3, 1.0, 5, 5),  # capped
        (12, 1.0, 5, 12),  # the cap never cuts below `repeats`
    ],
)
def test_latency_repeats_extend_to_the_minimum_time(repeats, min_time_s, max_repeats, expected):
    clock = _Clock()
    model = _Timed(clock, rest=0.125)
    stats = _stats(model, clock, repeats=repeats, warmup=2, min_time_s=min_time_s, max_repeats=max_repeats)
    assert stats.repeats == expected and len(model.threads) == 2 + expected
    assert stats.median_ms == stats.q25_ms == stats.q75_ms == 125.0


def test_latency_threads_are_fixed_recorded_and_restored():
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    clock = _Clock()
    model = _Timed(clock)
    stats = _stats(model, clock, repeats=4, warmup=1, threads=wanted)
    assert stats.threads == wanted and model.threads == [wanted] * 5
    assert torch.get_num_threads() == before
    assert _stats(_Timed(clock), clock, repeats=2, warmup=1).threads == before  # default: the current count

    class Failing(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("broken kernel")

    with pytest.raises(RuntimeError, match="broken kernel"):
        _stats(Failing(), clock, repeats=2, warmup=1, threads=wanted)
    assert torch.get_num_threads() == before


def test_evaluate_model_logs_latency_spread_repeats_and_threads():
    from runner.evaluate import evaluate_model

    net = MLP(40, 10, hidden=16)
    x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))
    metrics, _, _, _ = evaluate_model(
        net,
        [(x, y)],
        10,
        ["acc"],
        latency_batch=x,
        latency_repeats=7,
        latency_warmup_s=0.0,
        latency_min_time_s=0.0,
        latency_threads=1,
    )
    assert metrics["latency_repeats"] == 7.0 and metrics["latency_threads"] == 1.0
    assert metrics["latency_iqr_ms"] == metrics["latency_q75_ms"] - metrics["latency_q25_ms"]
    assert metrics["latency_q25_ms"] <= metrics["latency_ms"] <= metrics["latency_q75_ms"]


@pytest.mark.parametrize(
    "quartiles, low, high, meaningful",
    [
        ((8.0, 12.0, 2.0, 4.0), 2.0, 6.0, 1.0),  # apart: a real speedup
        ((8.0, 12.0, 3.0, 10.0), 0.8, 4.0, 0.0),  # overlapping IQRs: noise can explain it
        ((8.0, 12.0, 4.0, 8.0), 1.0, 3.0, 0.0),  # touching counts as overlap
        ((2.0, 4.0, 8.0, 16.0), 0.125, 0.5, 1.0),  # apart the other way: a real slowdown
    ],
)
def test_latency_speedup_interval_from_quartiles(quartiles, low, high, meaningful):
    from runner.compress.base import speedup_interval

    assert speedup_interval(*quartiles) == {"speedup_low": low, "speedup_high": high, "speedup_meaningful": meaningful}


@pytest.mark.parametrize(
    "override, key",
    [
        ("eval.latency_min_time_s=-1", "eval.latency_min_time_s"),
        ("eval.latency_warmup_s=-0.5", "eval.latency_warmup_s"),
        ("eval.latency_max_repeats=1", "eval.latency_max_repeats"),  # below latency_repeats
        ("eval.latency_threads=0", "eval.latency_threads"),
    ],
)
def test_latency_config_errors_name_the_key(override, key):
    from conftest import compose_config

    from runner.config import validate
    from runner.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        validate(compose_config([override]))
    assert info.value.key == key


MB = 2**20


def _touch(mb: int) -> torch.Tensor:
    return torch.ones(mb * MB // 4)  # written, so resident


@pytest.mark.parametrize("reset", [True, False], ids=["peak reset", "sampled"])
def test_peak_memory_is_what_the_block_added(reset, monkeypatch):
    """The block's own peak: not what the process held before it (32 MB), not an earlier, higher peak
    (256 MB), but the 128 MB the block held, on Linux's reset peak and on the sampling fallback."""
    if not reset:  # /proc/self/clear_refs not writable: a thread samples the resident size
        real_open = open

        def no_clear_refs(path, *args, **kwargs):
            if str(path).endswith("clear_refs"):
                raise PermissionError(path)
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(runner.measure, "open", no_clear_refs, raising=False)
    held = _touch(32)
    earlier = _touch(256)
    del earlier
    with PeakMemory() as peak:
        block = _touch(128)
        time.sleep(0.05)  # longer than the sampling interval
        del block
    assert peak.mb == pytest.approx(128, abs=8)
    assert held.numel() == 32 * MB // 4


@pytest.mark.skipif(not kept_heap_enabled(), reason="glibc's malloc settings (Linux) only")
def test_peak_memory_counts_the_block_even_where_the_process_kept_freed_memory():
    """Memory freed earlier and kept by the process (here: during training, runner/heap.py) would be
    reused by the block without raising the resident size; it is given back first, so the block's
    128 MB still count."""
    with kept_heap():
        earlier = [_touch(8) for _ in range(40)]  # 320 MB from the heap, freed and kept
        del earlier
        with PeakMemory() as peak:
            block = [_touch(8) for _ in range(16)]
            del block
    assert peak.mb == pytest.approx(128, abs=8)
