"""Our torchmetrics-based metrics against scikit-learn on the same predictions."""
import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from runner.evaluate import classification_metrics, confusion_matrix, latency_ms, size_metrics
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
    from runner.models.reference import LeNet300, LeNet5

    assert count_macs(LeNet300(784, 10), torch.randn(3, 1, 28, 28)) == 784 * 300 + 300 * 100 + 100 * 10
    # conv1 20x24x24 outputs of 25 MACs, conv2 50x8x8 of 500, fc 800->500, 500->10
    assert count_macs(LeNet5((1, 28, 28), 10), torch.randn(1, 1, 28, 28)) == \
        20 * 24 * 24 * 25 + 50 * 8 * 8 * 500 + 800 * 500 + 500 * 10
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
