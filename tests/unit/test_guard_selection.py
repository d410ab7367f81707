"""Guard: every compression step selects what it says, on weights planted by hand and checked against a
computation done here (numpy or plain torch), not against the step's own helpers.

- unstructured magnitude pruning (one-shot, gradual) zeroes exactly the smallest |w|, ranked within
  each layer (scope=layer) or across layers (scope=global), and nothing else; FineTune keeps exactly
  the zeros it was given;
- structured pruning removes the channels its importance ranks lowest (planted with tiny weights),
  per layer (scope=uniform) or across layers (scope=global), and keeps the others' weights as they were;
- Wanda zeroes, in each output row, exactly the weights with the smallest |w| * ||x|| (x: the layer's
  inputs on the calibration batches, after the layers before it are pruned), floor(sparsity * inputs)
  of them, or all but the 2 highest of every 4 consecutive inputs (2:4), and never the head;
- int8 quantization uses the scales torch.ao's observers are documented to compute (symmetric int8:
  max|w| / 127.5 per tensor for dynamic quantization, per output channel for static / QAT / PT2E),
  and rounds each weight to the nearest step; weight-only int8 (torchao) the same per output channel
  or group; weight-only int4 (torchao, CPU) (max - min) / 15 per group of inputs with min as its zero
  (in bfloat16, as that layer computes);
- distillation trains with alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE; a causal
  LM's (DistillLM) the same per position where a real token predicts a real token.

A swapped scope, a step that removes the largest weights or the wrong channels, a Wanda score that
forgets the input norm or compares across rows, an observer changed to an asymmetric one, a
temperature or alpha passed the wrong way round fails here.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch
from torch import nn

import runner.compress
import runner.compress.distill
import runner.compress.prune
import runner.compress.quantize
from runner.compress import (
    CompressContext,
    Distill,
    DistillLM,
    DynamicQuantize,
    FineTune,
    GradualPrune,
    MagnitudePrune,
    QATQuantize,
    StaticQuantize,
    Step,
    StructuredPrune,
    Wanda,
    WeightOnlyQuantize,
)
from runner.compress.distill import DistillModule, distillation_loss
from runner.compress.distill_lm import lm_distillation_loss
from runner.models import CNN1D, MLP

# Every step class runner.compress exports has a selection check in this file.
CHECKED = {
    MagnitudePrune,
    GradualPrune,
    FineTune,
    StructuredPrune,
    DynamicQuantize,
    StaticQuantize,
    QATQuantize,
    Distill,
    DistillLM,
    Wanda,
    WeightOnlyQuantize,
}


class Data:
    """The data source a step reads inputs from (trace, calibration, agreement stats): a few rows."""

    def __init__(self, x: torch.Tensor, num_classes: int = 3) -> None:
        self.x, self.y, self.num_classes = x, torch.arange(len(x)) % num_classes, num_classes

    def train_dataloader(self):
        return [(self.x, self.y)]

    def val_dataloader(self):
        return [(self.x, self.y)]


def context(features: int = 6, n: int = 16) -> CompressContext:
    return CompressContext(Data(torch.randn(n, features, generator=torch.Generator().manual_seed(1))), {}, {})


def planted_mlp(seed: int = 0, features: int = 6) -> MLP:
    """An MLP (features -> 8 -> 8 -> 3) whose layers have distinct |w| on different scales, so a ranking
    within layers and one across layers pick different weights."""
    g = torch.Generator().manual_seed(seed)
    net = MLP(features, 3, hidden=8, depth=2).eval()
    with torch.no_grad():
        for layer, scale in zip((net.body[0], net.body[2], net.head), (0.3, 1.0, 3.0)):
            n = layer.weight.numel()
            magnitudes = torch.randperm(n, generator=g).double() + 1 + torch.rand(n, generator=g, dtype=torch.double)
            signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
            layer.weight.copy_((signs * magnitudes * scale / n).reshape(layer.weight.shape).float())
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    return net


def layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def expected_masks(weights: list[np.ndarray], sparsity: float, scope: str) -> list[np.ndarray]:
    """True where a weight survives: the round(sparsity * n) smallest |w| go, over all layers together
    (global) or in each layer (layer); already-zero weights have |w| = 0 and go first."""
    if scope == "layer":
        return [expected_masks([w], sparsity, "global")[0] for w in weights]
    flat = np.concatenate([np.abs(w).ravel() for w in weights])
    k = int(round(sparsity * flat.size))
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(flat, kind="stable")[:k]] = False
    out, start = [], 0
    for w in weights:
        out.append(keep[start : start + w.size].reshape(w.shape))
        start += w.size
    return out


def test_every_step_has_a_selection_check():
    exported = {getattr(runner.compress, n) for n in runner.compress.__all__}
    steps = {c for c in exported if inspect.isclass(c) and issubclass(c, Step) and c is not Step}
    assert steps == CHECKED, f"steps without a selection check here: {steps - CHECKED}"


# --- unstructured pruning ------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("min_params", [0, 30])
def test_magnitude_prune_removes_exactly_the_smallest_weights(scope, min_params):
    net = planted_mlp()
    before = [m.weight.detach().numpy().copy() for m in layers(net)]
    biases = [m.bias.detach().clone() for m in layers(net)]
    out = MagnitudePrune(sparsity=0.6, scope=scope, min_params=min_params).apply(net, context())
    pruned = [i for i, w in enumerate(before) if w.size >= min_params]
    masks = expected_masks([before[i] for i in pruned], 0.6, scope)
    after = [m.weight.detach().numpy() for m in layers(out)]
    for i, w in enumerate(after):
        keep = masks[pruned.index(i)] if i in pruned else np.ones(w.shape, dtype=bool)
        assert np.array_equal(w != 0, keep), f"layer {i} ({scope}): zeros are not the smallest |w|"
        assert np.array_equal(w[keep], before[i][keep]), f"layer {i}: a surviving weight changed"
        if scope == "layer" and i in pruned:
            assert (w == 0).sum() == round(0.6 * w.size), f"layer {i}: sparsity is not the layer's own"
    for m, b in zip(layers(out), biases):
        assert torch.equal(m.bias, b)
    if min_params:  # the small head stays dense and out of the ranking
        assert (after[2] != 0).all()
    # the two scopes select differently on these weights, so the check above tells them apart
    other = expected_masks([before[i] for i in pruned], 0.6, "global" if scope == "layer" else "layer")
    assert any(not np.array_equal(a, b) for a, b in zip(masks, other))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gradual_prune_extends_its_mask_by_magnitude_each_round(scope, monkeypatch):
    """Between rounds the weights move (a stand-in for fine-tuning scales each one by a random factor);
    each round's mask zeroes the smallest |w| of the weights as they are then, pruned ones first, and
    the last round ends at the target sparsity."""
    net = planted_mlp()
    step = GradualPrune(sparsity=0.8, rounds=3, epochs_per_round=1, scope=scope)
    g = torch.Generator().manual_seed(2)
    rounds = []

    def moved(model, ctx, epochs, lr, *args, **kwargs):
        if epochs <= 0:
            return model
        current = [m.weight_orig.detach().numpy().copy() for m in layers(model)]  # what the round ranked
        masks = [m.weight_mask.detach().numpy().astype(bool) for m in layers(model)]
        rounds.append((current, masks))
        with torch.no_grad():
            for m in layers(model):
                m.weight_orig.mul_(0.5 + 1.5 * torch.rand(m.weight_orig.shape, generator=g))
        return model

    monkeypatch.setattr(runner.compress.prune, "finetune", moved)
    out = step.apply(net, context())
    assert len(rounds) == 3
    previous = None
    for target, (current, masks) in zip(step.schedule_values(), rounds):
        expected = expected_masks(current, target, scope)
        for i, (mask, keep) in enumerate(zip(masks, expected)):
            assert np.array_equal(mask, keep), f"round at sparsity {target:.3f}, layer {i}: wrong weights masked"
            if previous is not None:
                assert not (~previous[i] & mask).any(), f"layer {i}: a weight pruned in an earlier round came back"
        previous = masks
    final = [m.weight.detach().numpy() for m in layers(out)]
    zeros = sum(int((w == 0).sum()) for w in final)
    assert zeros == (
        round(0.8 * sum(w.size for w in final)) if scope == "global" else sum(round(0.8 * w.size) for w in final)
    ), "the last round is not at the target sparsity"
    for w, keep in zip(final, previous):
        assert np.array_equal(w != 0, keep)


@pytest.mark.parametrize("keep_sparsity", [True, False])
def test_finetune_masks_exactly_the_zeros_it_was_given(keep_sparsity, monkeypatch):
    net = planted_mlp()
    with torch.no_grad():
        for m in layers(net):
            m.weight[m.weight.abs() < m.weight.abs().median()] = 0
    zeros = [(m.weight == 0).clone() for m in layers(net)]
    masks = []

    def trained(model, ctx, epochs, lr, *args, **kwargs):  # every weight the optimizer can reach moves
        masks.extend(getattr(m, "weight_mask", None) for m in layers(model))
        with torch.no_grad():
            for m in layers(model):
                (m.weight_orig if hasattr(m, "weight_orig") else m.weight).add_(1.0)
        return model

    monkeypatch.setattr(runner.compress.prune, "finetune", trained)
    out = FineTune(epochs=1, keep_sparsity=keep_sparsity).apply(net, context())
    for m, z, mask in zip(layers(out), zeros, masks):
        if keep_sparsity:
            assert torch.equal(mask, (~z).float()), "the mask is not exactly the nonzero weights"
            assert torch.equal(m.weight == 0, z), "zeros moved"
        else:
            assert mask is None and not (m.weight == 0).any()


# --- Wanda ---------------------------------------------------------------------------------------

# the calibration inputs' feature scales: their L2 norms differ by up to 200x, so |w| alone ranks otherwise
FEATURE_SCALES = [0.05, 4.0, 0.3, 2.0, 1.0, 0.02, 3.0, 0.5]


def calibration_rows(n: int = 24, seed: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, len(FEATURE_SCALES), generator=g) * torch.tensor(FEATURE_SCALES)


def hand_wanda_keep(w: np.ndarray, x: np.ndarray | None, sparsity: float, nm: tuple[int, int] | None) -> np.ndarray:
    """True where a weight survives: scores |w_ij| * ||x_j||_2 (x None: |w| alone); in each row the
    floor(sparsity * inputs) lowest go, or (N:M) the M - N lowest of every M consecutive inputs."""
    norms = np.ones(w.shape[1]) if x is None else np.sqrt((x.astype(np.float64) ** 2).sum(0))
    score = np.abs(w.astype(np.float64)) * norms[None, :]
    keep = np.ones(w.shape, dtype=bool)
    for r, row in enumerate(score):
        if nm is None:
            keep[r, np.argsort(row, kind="stable")[: int(np.floor(sparsity * w.shape[1] + 1e-9))]] = False
        else:
            n, m = nm
            for start in range(0, w.shape[1], m):
                keep[r, start + np.argsort(row[start : start + m], kind="stable")[: m - n]] = False
    return keep


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_removes_the_smallest_w_times_input_norm_in_each_row(pattern, sequential):
    """Layer 0 is scored on the calibration rows; layer 1 on ReLU(layer 0) of them, with layer 0 already
    pruned (sequential, the paper's procedure) or dense; the head is never pruned."""
    net = planted_mlp(seed=3, features=8)  # kept and pruned scores differ by > 0.3% in every row: no near ties
    nm = None if pattern == "unstructured" else (2, 4)
    x = calibration_rows()
    w0, b0 = net.body[0].weight.detach().double().numpy(), net.body[0].bias.detach().double().numpy()
    w1 = net.body[2].weight.detach().numpy().copy()
    head = copy.deepcopy(net.head)
    xs = x.double().numpy()
    keep0 = hand_wanda_keep(w0, xs, 0.5, nm)
    inputs1 = {s: np.maximum(xs @ (w0 * keep0 if s else w0).T + b0, 0) for s in (True, False)}
    keep1 = hand_wanda_keep(w1, inputs1[sequential], 0.5, nm)
    before = [w0.astype(np.float32), w1]
    out = Wanda(sparsity=0.5, pattern=pattern, sequential=sequential).apply(net, CompressContext(Data(x), {}, {}))
    for w, keep, b in zip((out.body[0].weight, out.body[2].weight), (keep0, keep1), before):
        w = w.detach().numpy()
        assert np.array_equal(w != 0, keep), "the zeros are not the lowest |w| * ||x|| of each row"
        assert np.array_equal(w[keep], b[keep]), "a surviving weight changed"
        if nm is None:
            assert ((w == 0).sum(1) == 4).all(), "not half of every row"
        else:
            assert ((w != 0).reshape(8, 2, 4).sum(-1) == 2).all(), "not 2 of every 4 consecutive inputs"
    assert torch.equal(out.head.weight, head.weight) and torch.equal(out.head.bias, head.bias)
    # what the check above tells apart on these weights: |w| alone, and the other procedure's inputs
    assert not np.array_equal(keep0, hand_wanda_keep(w0, None, 0.5, nm)), "magnitude pruning would pick the same"
    assert not np.array_equal(keep1, hand_wanda_keep(w1, inputs1[not sequential], 0.5, nm))
    assert Wanda().sparsity == 0.5 and out is net


# --- structured pruning --------------------------------------------------------------------------

TINY_0 = {1: 1e-3, 3: 2e-3, 5: 3e-3, 6: 4e-3}  # hidden layer 0: four channels with tiny weights
WEAK_1 = {2: 0.1, 7: 0.2}  # hidden layer 1: two weak channels


def planted_channels() -> MLP:
    """Each planted channel is small in every weight coupled to it: its row (and bias) in its own
    layer and its column in the next."""
    g = torch.Generator().manual_seed(0)
    net = MLP(6, 3, hidden=8, depth=2).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        for layer, nxt, planted in ((net.body[0], net.body[2], TINY_0), (net.body[2], net.head, WEAK_1)):
            for c, s in planted.items():
                layer.weight[c] *= s
                layer.bias[c] *= s
                nxt.weight[:, c] *= s
    return net


def kept_channels(before: MLP, after: MLP) -> tuple[list[int], list[int]]:
    """Which hidden channels of each layer survive, found by their (unchanged) weights."""

    def find(rows_before: torch.Tensor, rows_after: torch.Tensor) -> list[int]:
        found = [i for i in range(len(rows_before)) if any(torch.equal(rows_before[i], r) for r in rows_after)]
        assert len(found) == len(rows_after), "a surviving channel's weights changed"
        return found

    kept0 = find(before.body[0].weight, after.body[0].weight)
    kept1 = find(before.head.weight.T, after.head.weight.T)  # layer 1's channels are the head's inputs
    assert torch.equal(after.body[2].weight, before.body[2].weight[kept1][:, kept0]), "layer 1's kept weights changed"
    assert torch.equal(after.body[0].bias, before.body[0].bias[kept0])
    return kept0, kept1


@pytest.mark.parametrize("importance", ["l1", "l2"])
def test_structured_prune_uniform_removes_each_layers_lowest_channels(importance):
    net = planted_channels()
    out = StructuredPrune(amount=0.25, importance=importance, scope="uniform").apply(copy.deepcopy(net), context())
    kept0, kept1 = kept_channels(net, out)
    tiniest_two = sorted(TINY_0, key=TINY_0.get)[:2]
    assert sorted(set(range(8)) - set(kept0)) == sorted(tiniest_two), f"layer 0 lost {set(range(8)) - set(kept0)}"
    assert sorted(set(range(8)) - set(kept1)) == sorted(WEAK_1), f"layer 1 lost {set(range(8)) - set(kept1)}"


@pytest.mark.parametrize("importance", ["l1", "l2"])
def test_structured_prune_global_ranks_channels_across_layers(importance):
    net = planted_channels()
    out = StructuredPrune(amount=0.25, importance=importance, scope="global").apply(copy.deepcopy(net), context())
    kept0, kept1 = kept_channels(net, out)
    assert sorted(set(range(8)) - set(kept0)) == sorted(TINY_0), "global: the 4 tiny channels of layer 0 go"
    assert kept1 == list(range(8)), "global: layer 1 (no channel near as small) stays whole"
    assert torch.equal(out.head.weight, net.head.weight), "the classifier head keeps its outputs"


def test_structured_prune_removes_one_planted_channel():
    net = planted_channels()
    with torch.no_grad():  # only one tiny channel left in layer 0, the rest of layer 1 is even
        for c in (3, 5, 6):
            net.body[0].weight[c] /= TINY_0[c]
            net.body[2].weight[:, c] /= TINY_0[c]
    out = StructuredPrune(amount=0.125, importance="l2", scope="uniform").apply(copy.deepcopy(net), context())
    kept0, _ = kept_channels(net, out)
    assert set(range(8)) - set(kept0) == {1}


# --- quantization --------------------------------------------------------------------------------

QMIN, QMAX = -128, 127  # torch.ao's qint8 weights: symmetric, zero point 0


def symmetric(w: torch.Tensor, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale, int8 values): scale = max|w| / ((QMAX - QMIN) / 2), per tensor or per output channel, as
    torch.ao's MinMaxObserver / PerChannelMinMaxObserver compute it for qint8 per_*_symmetric;
    values = clamp(round half to even(w / scale)). The largest |w| sits at w / scale = +-127.5 exactly,
    a tie that float rounding settles either way: marked NaN (either neighbour is right)."""
    w = w.detach().double().numpy()
    flat = w.reshape(len(w), -1)
    top = np.abs(flat).max(1) if per_channel else np.array(np.abs(flat).max())
    scale = (top / ((QMAX - QMIN) / 2)).astype(np.float32)
    s = scale.reshape(-1, *[1] * (w.ndim - 1)) if per_channel else scale
    ratio = w / s.astype(np.float64)
    values = np.clip(np.rint(ratio), QMIN, QMAX)
    values[np.isclose(np.abs(ratio), (QMAX - QMIN) / 2, rtol=0, atol=1e-4)] = np.nan
    return scale, values


def same_steps(got: np.ndarray, expected: np.ndarray) -> bool:
    """int8 weights equal to the hand computation; at a tie (NaN) either neighbour, sign kept."""
    got = got.astype(np.float64).reshape(expected.shape)
    ties = np.isnan(expected)
    return bool(np.array_equal(got[~ties], expected[~ties]) and (np.abs(got[ties]) >= 127).all())


def quantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: m.weight()
        for name, m in model.named_modules()
        if callable(getattr(m, "weight", None)) and m.weight().is_quantized
    }


def test_dynamic_int8_scales_are_max_abs_over_127_5_per_tensor():
    net = planted_mlp()
    before = {n: m.weight.detach().clone() for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    out = DynamicQuantize().apply(copy.deepcopy(net), context())
    found = quantized_weights(out)
    assert set(found) == set(before)
    for name, q in found.items():
        scale, values = symmetric(before[name], per_channel=False)
        assert q.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric) and q.q_zero_point() == 0
        assert q.q_scale() == pytest.approx(float(scale), rel=1e-6), name
        assert same_steps(q.int_repr().numpy(), values), f"{name}: weights not rounded to the nearest step"


def test_dynamic_float16_rounds_each_weight_to_half_precision():
    net = planted_mlp()
    out = DynamicQuantize(dtype="float16").apply(copy.deepcopy(net), context())
    for name, m in out.named_modules():
        if callable(getattr(m, "weight", None)):
            assert torch.equal(m.weight().float(), dict(net.named_modules())[name].weight.detach().half().float())


def test_static_int8_fx_scales_are_per_output_channel():
    net = planted_mlp()
    step = StaticQuantize()
    assert step.engine_for(net) == "torch_ao"
    out = step.apply(copy.deepcopy(net), context())
    found = quantized_weights(out)
    assert set(found) == {"body.0", "body.2", "head"}
    for name, q in found.items():
        scale, values = symmetric(dict(net.named_modules())[name].weight, per_channel=True)
        assert q.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        assert (q.q_per_channel_zero_points() == 0).all()
        assert np.allclose(q.q_per_channel_scales().numpy(), scale, rtol=1e-6), name
        assert same_steps(q.int_repr().numpy(), values), name


def test_static_int8_pt2e_scales_are_per_output_channel():
    torch.manual_seed(0)
    net = CNN1D(40, 3).eval()
    step = StaticQuantize()
    assert step.engine_for(net) == "pt2e"
    out = step.apply(copy.deepcopy(net), context(features=40))
    params = dict(out.reference.named_parameters())
    buffers = dict(out.reference.named_buffers())
    weights = [params[f"_frozen_param{i}"] for i in range(len(layers(net)))]
    for i, (layer, q) in enumerate(zip(layers(net), weights)):  # the int8 weights, in layer order
        scale, values = symmetric(layer.weight, per_channel=True)
        assert q.dtype == torch.int8 and q.shape == layer.weight.shape
        assert (buffers[f"_zero_point_{i}"] == 0).all()
        assert np.allclose(buffers[f"_scale_{i}"].numpy(), scale, rtol=1e-6), f"layer {i}"
        assert same_steps(q.numpy(), values), f"layer {i}"


def test_weight_only_int8_scales_are_max_abs_over_127_5_per_output_channel_or_group():
    """torchao's Int8Tensor: symmetric (zero point 0), max|w| / 127.5 over each output channel (group_size
    null) or each group of inputs; the dequantized weight is values * scale; the head stays float."""
    net = planted_mlp()
    for group_size in (None, 2):
        out = WeightOnlyQuantize(bits=8, group_size=group_size).apply(copy.deepcopy(net), context())
        for name in ("body.0", "body.2"):
            w, q = net.get_submodule(name).weight, out.get_submodule(name).weight
            groups = w.detach().reshape(-1, group_size or w.shape[1])  # one row per scale
            scale, values = symmetric(groups, per_channel=True)
            assert type(q).__name__ == "Int8Tensor" and q.qdata.dtype == torch.int8
            assert (q.zero_point == 0).all()
            assert np.allclose(q.scale.numpy().ravel(), scale, rtol=1e-6), f"{name} (group {group_size})"
            assert same_steps(q.qdata.numpy(), values), f"{name}: weights not rounded to the nearest step"
            expected = q.qdata.double().reshape(groups.shape) * torch.from_numpy(scale).double()[:, None]
            assert torch.allclose(q.dequantize().double(), expected.reshape(w.shape), rtol=1e-6, atol=0)
        assert type(out.head.weight) is nn.Parameter and torch.equal(out.head.weight, net.head.weight)


@pytest.mark.parametrize("group_size", [32, 64])
def test_weight_only_int4_group_scales_are_range_over_15_with_the_minimum_as_zero(group_size):
    """torchao's CPU int4 (tinygemm's scheme), on the bfloat16 weight, in bfloat16 arithmetic: per group
    of inputs, scale = (max - min) / 15, stored zero = min + 8 * scale, q = round((w - (zero - 8 * scale))
    / scale) in 0..15; the weight the kernel multiplies by (read through the layer on identity inputs) is
    (q - 8) * scale + zero. A layer whose input width the group does not divide stays float."""
    g = torch.Generator().manual_seed(5)
    net = MLP(64, 3, hidden=32, depth=2).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    out = WeightOnlyQuantize(bits=4, group_size=group_size).apply(copy.deepcopy(net), context(features=64))
    for name, width in (("body.0", 64), ("body.2", 32)):
        layer = out.get_submodule(name)
        if width % group_size:
            assert torch.equal(layer.weight, net.get_submodule(name).weight), f"{name} is not left float"
            continue
        w = net.get_submodule(name).weight.detach().to(torch.bfloat16)
        groups = w.reshape(w.shape[0], width // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-6)
        zero = low + scale * 8
        packed = layer.weight.scale_and_zero  # (groups, rows, [scale, zero])
        assert torch.equal(packed[..., 0].T, scale) and torch.equal(packed[..., 1].T, zero), name
        q = torch.clamp(torch.round((groups - (zero - scale * 8)[..., None]) / scale[..., None]), 0, 15)
        assert (q == 0).any() and (q == 15).any() and len(q.unique()) == 16  # the whole grid is used
        with torch.no_grad():
            used = nn.functional.linear(torch.eye(width, dtype=torch.bfloat16), layer.weight).T.reshape(groups.shape)
        expected = ((q.float() - 8) * scale.float()[..., None] + zero.float()[..., None]).to(torch.bfloat16)
        assert torch.equal(used, expected), f"{name}: the kernel's weights are not the rounded ones"
    assert type(out.head.weight) is nn.Parameter


@pytest.mark.parametrize("epochs", [0, 1])
def test_qat_scales_come_from_the_calibrated_weights_and_freeze_for_the_last_epoch(epochs, monkeypatch):
    """Calibration sets each channel's scale to max|w| / 127.5 of the float weights; the observers are
    off for the last epoch, so its weight updates are rounded on those scales."""
    net = planted_mlp()
    g = torch.Generator().manual_seed(3)
    trained_weights = {}

    def trained(model, ctx, epochs, lr, *args, **kwargs):
        if epochs > 0:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.mul_(0.9 + 0.05 * torch.rand(p.shape, generator=g))  # |w| only shrinks: no clamping
                    trained_weights[name.removesuffix(".weight")] = p.detach().clone()
        return model

    monkeypatch.setattr(runner.compress.quantize, "finetune", trained)
    out = QATQuantize(finetune_epochs=epochs).apply(copy.deepcopy(net), context())
    found = quantized_weights(out)
    assert set(found) == {"body.0", "body.2", "head"}
    for name, q in found.items():
        scale, values = symmetric(dict(net.named_modules())[name].weight, per_channel=True)
        assert np.allclose(q.q_per_channel_scales().numpy(), scale, rtol=1e-6), (
            f"{name}: the scales are not the calibrated max|w| / 127.5 (did they move in the last epoch?)"
        )
        if epochs == 0:
            assert same_steps(q.int_repr().numpy(), values), name
        else:  # the trained weights, rounded on the calibrated (float weights') scales
            steps = np.rint(trained_weights[name].double().numpy() / scale.astype(np.float64)[:, None])
            assert not same_steps(q.int_repr().numpy(), values)
            assert np.array_equal(q.int_repr().numpy(), np.clip(steps, QMIN, QMAX)), name


# --- distillation --------------------------------------------------------------------------------


def hand_loss(
    student: np.ndarray,
    teachers: list[np.ndarray],
    weights: list[float],
    y: np.ndarray,
    temperature: float,
    alpha: float,
) -> float:
    """alpha * sum_k w_k * T^2 * KL(softmax(t_k/T) || softmax(s/T)) + (1 - alpha) * CE(s, y), by hand."""

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    log_q = log_softmax(student / temperature)
    soft = 0.0
    for t, w in zip(teachers, weights):
        log_p = log_softmax(t / temperature)
        soft += w * temperature**2 * (np.exp(log_p) * (log_p - log_q)).sum(1).mean()
    ce = -log_softmax(student)[np.arange(len(y)), y].mean()
    return alpha * soft + (1 - alpha) * ce


class Fixed(nn.Module):
    """A teacher that answers every batch with given logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


def logits(seed: int, n: int = 5, c: int = 4) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (4.0, 0.9), (2.5, 0.0), (3.0, 1.0)])
def test_distillation_loss_is_the_formula(temperature, alpha):
    s, t = logits(0), logits(1)
    y = torch.tensor([0, 3, 1, 2, 3])
    expected = hand_loss(s.numpy(), [t.numpy()], [1.0], y.numpy(), temperature, alpha)
    assert float(distillation_loss(s, t, y, temperature, alpha)) == pytest.approx(expected, rel=1e-9)
    # the teacher's log-probabilities (an ensemble's output) give the same loss as its logits
    log_probs = torch.log_softmax(t, 1)
    assert float(distillation_loss(s, log_probs, y, temperature, alpha)) == pytest.approx(expected, rel=1e-9)


def test_the_loss_distill_trains_with_is_the_formula(monkeypatch):
    """What Distill.apply hands to training (module class, temperature, alpha, teachers and their
    weights) gives the hand formula's loss, one teacher or several."""
    captured = {}

    def capture(net, ctx, epochs, lr, module_cls, **kwargs):
        captured.update(module_cls=module_cls, net=net, **kwargs)
        return net

    monkeypatch.setattr(runner.compress.distill, "finetune", capture)
    # distinct rows: the memo of a teacher's outputs (TeacherMemo) answers equal rows alike, as a real teacher
    # would; Fixed gives each row its own logits whatever the row
    x, y = torch.arange(30.0).reshape(5, 6), torch.tensor([0, 3, 1, 2, 3])
    t1, t2 = Fixed(logits(1).float()), Fixed(logits(2).float())
    student = nn.Linear(6, 4)
    for teacher, weights, teachers, ctx_members in (
        ("member", None, [t1], None),
        ("members", [1.0, 3.0], [t1, t2], [t1, t2]),
    ):
        step = Distill(student=student, teacher=teacher, temperature=3.0, alpha=0.7, epochs=1, teacher_weights=weights)
        step.apply(t1, CompressContext(None, {}, {}, teacher=t1, members=ctx_members))
        kwargs = {k: v for k, v in captured.items() if k not in ("module_cls", "net")}
        module = captured["module_cls"](captured["net"], optimizer="adam", lr=0.01, **kwargs)
        s = module.net(x)
        got = float(module.loss(s, y, x).detach())
        share = [1.0] if weights is None else [w / sum(weights) for w in weights]
        expected = hand_loss(
            s.detach().double().numpy(), [t.logits.double().numpy() for t in teachers], share, y.numpy(), 3.0, 0.7
        )
        assert got == pytest.approx(expected, rel=1e-5), (
            f"teacher={teacher}: the loss it trains with is not the formula"
        )
        assert captured["module_cls"] is DistillModule or issubclass(captured["module_cls"], DistillModule)


def test_lm_distillation_loss_is_the_formula_per_predicting_position():
    """DistillLM: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE of the next token, averaged
    over the positions where a real token predicts a real token (numpy here); teacher and student, T and
    alpha swapped give other values."""
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g) * 2
    ids = torch.randint(0, 6, (2, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    temperature, alpha = 3.0, 0.7

    def log_softmax(v):
        v = v - v.max()
        return v - np.log(np.exp(v).sum())

    kl, ce = [], []
    for b, t in [(0, 0), (0, 1), (0, 2), (1, 0)]:  # predicting positions: both tokens real
        lt = log_softmax(teacher[b, t].double().numpy() / temperature)
        ls = log_softmax(student[b, t].double().numpy() / temperature)
        kl.append((np.exp(lt) * (lt - ls)).sum())
        ce.append(-log_softmax(student[b, t].double().numpy())[int(ids[b, t + 1])])
    expected = alpha * temperature**2 * np.mean(kl) + (1 - alpha) * np.mean(ce)
    got = float(lm_distillation_loss(student, teacher, ids, mask, temperature, alpha))
    assert got == pytest.approx(expected, abs=1e-5)
    for swapped in (
        lm_distillation_loss(teacher, student, ids, mask, temperature, alpha),
        lm_distillation_loss(student, teacher, ids, mask, alpha, temperature),
    ):
        assert abs(float(swapped) - expected) > 1e-3
