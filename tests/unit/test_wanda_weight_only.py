"""Wanda (runner.compress.wanda) and weight-only int8 / int4 (runner.compress.weight_only): what they read,
what they refuse, what they report, sizes, outputs and round trips. Which weights they pick or how
they round is checked in tests/unit/test_guard_selection.py."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from conftest import SPEC, compose_config
from torch import nn

import runner.compress.wanda
from runner.batches import DataSpec
from runner.compress import (
    CompressContext,
    MagnitudePrune,
    Recipe,
    Wanda,
    WeightOnlyQuantize,
    build_recipe,
    is_quantized,
)
from runner.compress.quantize import shippable
from runner.compress.weight_only import dequantized
from runner.device import cpu_only
from runner.errors import ConfigError
from runner.measure import size_metrics, weight_bytes
from runner.models import CNN1D, GRU, MLP
from runner.tracking.models import pack_model, unpack_model


class Splits:
    """A data source whose val and test loaders must not be read (calibration reads train only)."""

    def __init__(self, batches: list, val: list | None = None) -> None:
        self.batches, self.val = batches, val
        self.train_reads = 0

    def train_dataloader(self):
        self.train_reads += 1
        return iter(self.batches)

    def val_dataloader(self):
        if self.val is None:
            raise AssertionError("val was read")
        return iter(self.val)

    def test_dataloader(self):
        raise AssertionError("test was read")


def seeded_mlp(features: int = 8, hidden: int = 8, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(features, 3, hidden=hidden, depth=2).eval()


def rows(n: int, features: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed)) * scale


def norms_seen(step: Wanda, model: nn.Module, data) -> dict[str, np.ndarray]:
    """The input norms Wanda scored each layer with, caught from its `wanda_keep` calls."""
    seen = {}
    names = {id(m): n for n, m in model.named_modules()}
    keep = runner.compress.wanda.wanda_keep

    def spy(weight, norms, sparsity, nm):
        layer = next(m for m in model.modules() if getattr(m, "weight", None) is weight)
        seen[names[id(layer)]] = norms.double().numpy()
        return keep(weight, norms, sparsity, nm)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner.compress.wanda, "wanda_keep", spy)
        step.apply(model, CompressContext(data, {}, {}))
    return seen


# --- Wanda: what it reads ------------------------------------------------------------------------


def test_wanda_calibrates_on_the_first_training_batches_only():
    """calibration_batches=2 of 3: layer 0's norms are those of the first two batches' rows (the third,
    planted 1000x larger, is not read); val and test are never read."""
    batches = [(rows(4, 8, seed), torch.zeros(4, dtype=torch.long)) for seed in (1, 2)]
    batches.append((rows(4, 8, 3, scale=1000.0), torch.zeros(4, dtype=torch.long)))
    data = Splits(batches)
    seen = norms_seen(Wanda(calibration_batches=2), seeded_mlp(), data)
    first_two = torch.cat([x for x, _ in batches[:2]]).double().numpy()
    assert np.allclose(seen["body.0"], np.sqrt((first_two**2).sum(0)), rtol=1e-12)
    assert set(seen) == {"body.0", "body.2"} and data.train_reads == 1


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.5), ("2:4", 0.5)])
def test_magnitude_score_prunes_the_same_layers_by_weight_alone_reading_no_data(pattern, sparsity):
    """score=magnitude: in every Linear but the head, the smallest |W| of each row (or of each group of 4)
    go, by hand; the heads stay; no split is read (a planted 1000x input would change Wanda's choice)."""
    model = seeded_mlp()
    before = copy.deepcopy(model)
    data = Splits([])  # reading train would count; val and test raise
    out = Wanda(sparsity=sparsity, pattern=pattern, score="magnitude").apply(model, CompressContext(data, {}, {}))
    assert data.train_reads == 0
    for (name, new), old in zip(out.named_modules(), before.modules()):
        if not isinstance(new, nn.Linear):
            continue
        w = old.weight.detach().abs()
        if name == "head":
            assert torch.equal(new.weight, old.weight)
            continue
        groups = w.reshape(w.shape[0], -1, 4 if pattern == "2:4" else w.shape[1])
        k = groups.shape[-1] // 2
        # the k smallest |w| of each group go (no ties in random weights)
        cut = groups.sort(dim=-1).values[..., k - 1 : k]
        expected = (groups > cut).reshape(w.shape)
        assert torch.equal(new.weight != 0, expected), name
        assert torch.equal(new.weight[expected], old.weight[expected])


def test_bad_score_names_its_key():
    with pytest.raises(ConfigError) as err:
        Wanda(score="taylor")
    assert err.value.key == "compress.steps[].score" and "magnitude" in str(err.value)


class TokenNet(nn.Module):
    """A token model: a Linear on every token's features (B, T, 8), mean-pooled over the real tokens
    (attention_mask), and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: dict) -> torch.Tensor:
        mask = x["attention_mask"].unsqueeze(-1).float()
        h = torch.relu(self.body(x["tokens"]))
        return self.head((h * mask).sum(1) / mask.sum(1))


def test_wanda_counts_only_the_real_tokens():
    """Padding positions (attention_mask 0) hold planted huge values in the features that are small in
    the real tokens: counted, they would flip the ranking; Wanda's norms are the real tokens' only."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 5, 8, generator=g) * torch.tensor([0.1, 3, 0.2, 2, 0.1, 1, 0.3, 2])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    tokens[mask == 0] = torch.tensor([50.0, 0, 50, 0, 50, 0, 50, 0])
    x = {"tokens": tokens, "attention_mask": mask}
    net = TokenNet().eval()
    w = net.body.weight.detach().double().numpy().copy()
    seen = norms_seen(Wanda(), net, Splits([(x, torch.zeros(3, dtype=torch.long))]))
    real = tokens[mask.bool()].double().numpy()  # (10 real tokens, 8)
    assert np.allclose(seen["body"], np.sqrt((real**2).sum(0)), rtol=1e-12)
    every = tokens.reshape(-1, 8).double().numpy()
    assert not np.allclose(seen["body"], np.sqrt((every**2).sum(0)))
    pruned = net.body.weight.detach().numpy()
    by_real = np.abs(w) * np.sqrt((real**2).sum(0))
    assert np.array_equal(pruned != 0, by_real >= np.sort(by_real, 1)[:, [4]]), "the real tokens' ranking"
    assert set(seen) == {"body"}, "the head is not pruned"


def test_wanda_sequential_prunes_group_by_group_and_stops_each_pass_early():
    """Two passes for a 2-layer body (one per layer); the first calibration row count is the samples'."""
    data = Splits([(rows(6, 8, 1), torch.zeros(6, dtype=torch.long))])
    step = Wanda()
    calls = []
    net = seeded_mlp()
    net.head.register_forward_pre_hook(lambda m, a: calls.append("head"))
    step.apply(net, CompressContext(data, {}, {}))
    assert step.stats_["wanda/passes"] == 2 and step.stats_["wanda/calibration_rows"] == 6
    # the first pass stops at body.2 (its input depends on body.0, not yet pruned); the last one, with
    # no layer left to stop at, reaches the head
    assert calls == ["head"], "a pass ran past the layer it scored"
    one = Wanda(sequential=False)
    one.apply(seeded_mlp(), CompressContext(data, {}, {}))
    assert one.stats_["wanda/passes"] == 1


def test_layers_sharing_one_input_are_scored_in_one_pass():
    """Q, K and V of attention read one tensor: scored and pruned together, from one pass."""

    class ThreeHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.out(self.q(x) * self.k(x) + self.v(x)))

    torch.manual_seed(0)
    step = Wanda()
    step.apply(ThreeHeads().eval(), CompressContext(Splits([(rows(6, 8, 1), torch.zeros(6))]), {}, {}))
    assert step.stats_["wanda/passes"] == 2 and step.stats_["wanda/layers"] == 4


# --- Wanda: settings, refusals, stats ------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"pattern": "structured"}, "pattern"),
        ({"pattern": "4:2"}, "pattern"),
        ({"pattern": "0:4"}, "pattern"),
        ({"pattern": "2:4", "sparsity": 0.7}, "sparsity"),
        ({"pattern": "1:4", "sparsity": 0.5}, "sparsity"),
        ({"calibration_batches": 0}, "calibration_batches"),
        ({"min_params": -1}, "min_params"),
        ({"sequential": "yes"}, "sequential"),
        ({"finetune_epochs": -1}, "finetune_epochs"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_wanda_bad_settings_name_their_key(kwargs, key):
    with pytest.raises(ConfigError) as e:
        Wanda(**kwargs)
    assert e.value.key == f"compress.steps[].{key}"


def test_wanda_settings_fail_when_the_recipe_is_built():
    cfg = compose_config(["compress=prune_wanda_2_4", "compress.steps.0.pattern=4:8"]).compress
    assert build_recipe(cfg).steps[0].pattern == "4:8"  # 4:8 is 0.5 too
    with pytest.raises(ConfigError) as e:
        build_recipe(compose_config(["compress=prune_wanda_2_4", "compress.steps.0.pattern=1:4"]).compress)
    assert e.value.key == "compress.steps[0].sparsity"


@pytest.mark.parametrize(
    "model,step,key",
    [
        (CNN1D(40, 10), Wanda(), "compress.steps[0]"),  # convs and a head: no Linear to prune
        (GRU(40, 10), Wanda(), "compress.steps[0]"),
        (MLP(40, 10, hidden=64), Wanda(min_params=5000), "compress.steps[0].min_params"),
        (MLP(40, 10, hidden=64), Wanda(pattern="3:7", sparsity=4 / 7), "compress.steps[0].pattern"),
    ],
)
def test_wanda_refuses_what_it_cannot_prune_before_training(model, step, key):
    with pytest.raises(ConfigError) as e:
        Recipe([step]).check(model, SPEC)
    assert e.value.key == key


def test_wanda_refuses_a_quantized_model():
    with pytest.raises(ConfigError, match="prune before quantizing"):
        Recipe([WeightOnlyQuantize(), Wanda()]).check(MLP(40, 10, hidden=64), SPEC)


def test_wanda_stats_and_layers_left_dense():
    """4:8 on an MLP of input width 12: body.0 (12 inputs) stays dense, body.2 is 4 of every 8."""
    net = seeded_mlp(features=12, hidden=16)
    step = Wanda(sparsity=0.5, pattern="4:8")
    before = net.body[0].weight.detach().clone()
    step.apply(net, CompressContext(Splits([(rows(10, 12, 1), torch.zeros(10))]), {}, {}))
    assert torch.equal(net.body[0].weight, before)
    w = net.body[2].weight.detach()
    assert ((w != 0).reshape(16, 2, 8).sum(-1) == 4).all()
    total = sum(m.weight.numel() for m in (net.body[0], net.body[2], net.head))
    assert step.stats_ == {
        "wanda/passes": 1.0,
        "wanda/calibration_rows": 10.0,
        "wanda/sparsity": 0.5,
        "wanda/model_sparsity": 128 / total,
        "wanda/layers": 1.0,
        "wanda/dense_layers": 1.0,
        "wanda/nm_groups_ok": 1.0,
    }


def test_wanda_fine_tunes_with_its_masks_kept(monkeypatch):
    """finetune_epochs > 0: the pruned weights stay zero whatever training does; the masks are dropped after."""
    moved = []

    def trained(model, ctx, epochs, lr, *args, **kwargs):
        with torch.no_grad():
            for m in (model.body[0], model.body[2]):
                m.weight_orig.add_(1.0)
        moved.append(epochs)
        return model

    monkeypatch.setattr(runner.compress.wanda, "finetune", trained)
    net = seeded_mlp()
    Wanda(finetune_epochs=2).apply(net, CompressContext(Splits([(rows(6, 8, 1), torch.zeros(6))]), {}, {}))
    assert moved == [2]
    for m in (net.body[0], net.body[2]):
        assert (m.weight == 0).sum() == 32 and not hasattr(m, "weight_orig")


def test_wanda_differs_from_magnitude_pruning_on_planted_inputs():
    """The same MLP, one feature 100x larger in the calibration rows: its weights survive Wanda, not |w|."""
    net = seeded_mlp()
    x = rows(16, 8, 2)
    x[:, 3] *= 100
    wanda = Wanda().apply(copy.deepcopy(net), CompressContext(Splits([(x, torch.zeros(16))]), {}, {}))
    magnitude = MagnitudePrune(sparsity=0.5, scope="layer").apply(copy.deepcopy(net), CompressContext(None, {}, {}))
    assert (wanda.body[0].weight[:, 3] != 0).all()
    assert (magnitude.body[0].weight[:, 3] == 0).any()


# --- weight-only int8 / int4 ---------------------------------------------------------------------


def quantize(bits: int, group_size: int | None, net: nn.Module, features: int) -> tuple[nn.Module, WeightOnlyQuantize]:
    step = WeightOnlyQuantize(bits=bits, group_size=group_size)
    val = [(rows(32, features, 9), torch.zeros(32, dtype=torch.long))]
    return step.apply(copy.deepcopy(net), CompressContext(Splits([], val=val), {}, {})), step


def linear_bytes(out: int, inp: int, bits: int, group_size: int | None) -> int:
    """Bytes of a quantized Linear's weight by hand, plus its float32 bias."""
    if bits == 8:
        scales = out * (inp // group_size if group_size else 1)
        return out * inp + scales * (4 + 1) + 4 * out  # int8 values, float32 scale and int8 zero point each
    return out * inp // 2 + (inp // group_size) * out * 2 * 2 + 4 * out  # two values a byte, (scale, zero) bf16


@pytest.mark.parametrize(
    "bits,group_size,tolerance",
    [(8, None, 4e-3), (8, 32, 4e-3), (4, 32, 4e-2), (4, 64, 4e-2)],
)
def test_weight_only_sizes_outputs_and_round_trips(bits, group_size, tolerance):
    """weight_bytes counts the real bytes (computed by hand), logits stay within a measured tolerance of
    fp32 (measured on these weights, logits up to 0.34: int8 1.8e-3 per channel, 1.3e-3 per group of 32;
    int4, bfloat16 products, 1.7e-2 at group 32, 2.2e-2 at 64; the tolerances are about twice that), the model pickles
    (torch.save, and what MLflow logs: shippable -> pack_model -> unpack_model) and computes the same after."""
    net = seeded_mlp(features=64, hidden=64)
    out, step = quantize(bits, group_size, net, 64)
    x = rows(16, 64, 4)
    with torch.no_grad():
        err = float((out(x) - net(x)).abs().max())
    assert 0 < err < tolerance, err
    expected = 2 * linear_bytes(64, 64, bits, group_size) + 4 * (3 * 64 + 3)  # body.0, body.2, the float head
    assert weight_bytes(out) == expected
    fp32 = weight_bytes(net)
    assert fp32 == 4 * sum(p.numel() for p in net.parameters())
    metrics = size_metrics(out)
    assert metrics["weight_bytes"] == expected and metrics["params"] == size_metrics(net)["params"]
    assert metrics["size_bytes"] < size_metrics(net)["size_bytes"]
    assert is_quantized(out) and out.head.weight.dtype == torch.float32
    assert step.stats_["quant/weight_bits"] == bits and step.stats_["quant/quantized_layers"] == 2
    assert step.stats_["quant/float_layers"] == 0 and step.stats_["quant/fp32_agreement"] > 0.9
    buffer = io.BytesIO()
    torch.save(out, buffer)
    back = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert shippable(out) is out
    logged = unpack_model(pack_model(shippable(out), x))
    with torch.no_grad():
        assert torch.equal(back(x), out(x)) and torch.equal(logged(x), out(x))
    assert type(back.body[0].weight) is type(out.body[0].weight)  # noqa: E721


def test_int8_weights_are_about_a_quarter_of_fp32():
    net = seeded_mlp(features=64, hidden=64)
    out, _ = quantize(8, None, net, 64)
    body = ("body.0", "body.2")
    fp32 = sum(4 * net.get_submodule(n).weight.numel() for n in body)
    int8 = sum(weight_bytes(out.get_submodule(n)) - 4 * 64 for n in body)  # less the float32 biases
    assert int8 == 2 * (64 * 64 + 64 * 5) and int8 / fp32 == pytest.approx(0.2695, abs=1e-4)


def test_int4_is_cpu_only_and_int8_is_not():
    net = seeded_mlp(features=64, hidden=64)
    int8, _ = quantize(8, None, net, 64)
    int4, _ = quantize(4, 32, net, 64)
    assert cpu_only(int8) == "" and "int4" in cpu_only(int4)
    assert type(int4.body[0]).__name__ == "Int4CPULinear" and type(int8.body[0]) is nn.Linear


def test_layers_the_format_cannot_hold_stay_float():
    """MNIST-1D's MLP: body.0 has 40 inputs (no group of 32 divides them): float; body.2 (64) is int4."""
    net = seeded_mlp(features=40, hidden=64)
    out, step = quantize(4, 32, net, 40)
    assert type(out.body[0].weight) is nn.Parameter and type(out.body[2].weight).__name__ == "Int4OpaqueTensor"
    assert step.stats_["quant/quantized_layers"] == 1 and step.stats_["quant/float_layers"] == 1


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"bits": 2}, "bits"),
        ({"bits": "8"}, "bits"),
        ({"bits": 4}, "group_size"),  # int4 on the CPU is grouped
        ({"bits": 4, "group_size": 48}, "group_size"),
        ({"bits": 8, "group_size": 0}, "group_size"),
    ],
)
def test_weight_only_bad_settings_name_their_key(kwargs, key):
    with pytest.raises(ConfigError) as e:
        WeightOnlyQuantize(**kwargs)
    assert e.value.key == f"compress.steps[].{key}"


@pytest.mark.parametrize(
    "model,step,key",
    [
        (MLP(40, 10, hidden=100), WeightOnlyQuantize(bits=4, group_size=32), "compress.steps[0].group_size"),
        (MLP(40, 10, hidden=64), WeightOnlyQuantize(bits=8, group_size=128), "compress.steps[0].group_size"),
        (CNN1D(40, 10), WeightOnlyQuantize(), "compress.steps[0]"),  # conv-heavy
        (GRU(40, 10), WeightOnlyQuantize(), "compress.steps[0]"),  # no Linear but the head
    ],
)
def test_weight_only_refuses_what_it_cannot_quantize_before_training(model, step, key):
    with pytest.raises(ConfigError) as e:
        Recipe([step]).check(model, SPEC)
    assert e.value.key == key


def test_weight_only_recipes_check_a_token_model():
    """The YAML recipes pass the check of a Linear model of the widths a transformer has."""
    spec = DataSpec(3, torch.randn(4, 64), {"shape": [64], "dtype": "float32"})
    for name in ("quant_int8_weight", "quant_int4_weight", "prune_wanda", "prune_wanda_2_4"):
        build_recipe(compose_config([f"compress={name}"]).compress).check(MLP(64, 3, hidden=64), spec)


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
def test_dequantized_weights_are_what_the_layer_multiplies_by(bits, group_size):
    """dequantized(): a plain float tensor within half a quantization step of the float weight (a clamped
    int8 maximum: one step), and the layer's output is linear() with it; a float weight comes back as it is."""
    net = seeded_mlp(features=64, hidden=64)
    out, _ = quantize(bits, group_size, net, 64)
    w, layer = net.body[0].weight.detach(), out.body[0]
    d = dequantized(layer.weight)
    assert type(d) is torch.Tensor and d.shape == w.shape and d.dtype == torch.float32
    if bits == 8:  # a positive maximum sits at +127.5 steps and is clamped to 127: a whole step off
        step = (w.abs().amax(1, keepdim=True) / 127.5).expand_as(w)
        half_step = torch.where(w / step > 127, step, step / 2)
    else:  # int4 rounds the bfloat16 weight on bfloat16 scales and zeros: within one step, not half
        groups = w.reshape(64, -1, group_size)
        half_step = ((groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15).expand_as(groups)
        half_step = half_step.reshape(w.shape)
    assert ((d - w).abs() <= half_step * (1 + 1e-5)).all() and not torch.equal(d, w)
    x = rows(5, 64, 6)
    with torch.no_grad():  # int4: bfloat16 inputs, and its bfloat16 output rounded (measured 4.7e-3 at |y| 1.6)
        xs = x if bits == 8 else x.to(torch.bfloat16).float()
        assert torch.allclose(layer(x), nn.functional.linear(xs, d, layer.bias), atol=1e-5 if bits == 8 else 1e-2)
    assert dequantized(net.head.weight) is net.head.weight


class Block(nn.Module):
    """fc1 -> ReLU -> fc2, added to its input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class TwoBlocks(nn.Module):
    """An nn.ModuleList of two like blocks (a transformer's layer list, in small), then a head."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks, self.head = nn.ModuleList([Block(), Block()]), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def half_of_each_row(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Wanda's mask by hand: the 4 lowest |w| * ||x_j|| of each row of 8 go."""
    score = np.abs(w) * np.sqrt((x**2).sum(0))[None, :]
    keep = np.ones(w.shape, dtype=bool)
    for r, row in enumerate(score):
        keep[r, np.argsort(row, kind="stable")[:4]] = False
    return keep


def test_wanda_prunes_block_by_block_as_the_paper():
    """A block's Linears are scored together on what the block gets from the pruned blocks before it:
    fc2 on fc1's dense output (the paper scores a decoder layer from one pass), block 1 on block 0 pruned.
    One pass per block."""
    net = TwoBlocks(seed=3).eval()
    x = rows(16, 8, 5)
    weights = {
        n: (m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
        for n, m in net.named_modules()
        if n.count(".") == 2
    }
    h, expected, differs = x.double().numpy(), {}, False
    for b in ("blocks.0", "blocks.1"):
        (w1, b1), (w2, b2) = weights[f"{b}.fc1"], weights[f"{b}.fc2"]
        expected[f"{b}.fc1"] = keep1 = half_of_each_row(w1, h)
        dense, pruned = np.maximum(h @ w1.T + b1, 0), np.maximum(h @ (w1 * keep1).T + b1, 0)
        expected[f"{b}.fc2"] = keep2 = half_of_each_row(w2, dense)
        differs |= not np.array_equal(keep2, half_of_each_row(w2, pruned))  # layer by layer would pick otherwise
        h = h + pruned @ (w2 * keep2).T + b2
    step = Wanda()
    step.apply(net, CompressContext(Splits([(x, torch.zeros(16))]), {}, {}))
    for name, keep in expected.items():
        assert np.array_equal(net.get_submodule(name).weight.detach().numpy() != 0, keep), name
    assert differs and step.stats_["wanda/passes"] == 2
