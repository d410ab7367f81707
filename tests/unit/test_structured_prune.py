"""Structured pruning with Torch-Pruning (runner.compress.StructuredPrune) on a tiny model of every
family: exact pruned sizes, coupled widths, importance rankings, schedules, MACs targets, refusals."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import SPEC, compose_config
from torch import nn

import runner.compress.structured as structured
from runner.batches import DataSpec, take
from runner.compress import CompressContext, DynamicQuantize, Recipe, StructuredPrune, build_recipe
from runner.data import SklearnDataset
from runner.errors import ConfigError
from runner.evaluate import count_macs
from runner.models import CNN1D, GRU, MLP, HuggingFace, LeNet5, LeNet300, ResNetCIFAR

# conf/model/vit_tiny.yaml and bert_tiny.yaml on MNIST-shaped images / a 100-token vocabulary
VIT = {
    "model_type": "vit",
    "image_size": 28,
    "num_channels": 1,
    "patch_size": 4,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}
BERT = {
    "model_type": "bert",
    "vocab_size": 100,
    "max_position_embeddings": 16,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
}
TINY_TRAINER = {
    "max_epochs": 1,
    "accelerator": "cpu",
    "devices": 1,
    "enable_progress_bar": False,
    "limit_train_batches": 2,
}
OPTIM = {"name": "adam", "lr": 1e-3}
LOGGER = "runner.compress.structured"


class Batches:
    """What apply() reads of a data source when it does not train: one batch of `x` with random
    labels as the train and val loaders."""

    def __init__(self, x, num_classes: int = 10) -> None:
        n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
        self.x, self.num_classes = x, num_classes
        self.y = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(0))

    def train_dataloader(self):
        return [(self.x, self.y)]

    val_dataloader = train_dataloader


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def images(*shape: int, n: int = 8) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))


def tokens(n: int = 8, length: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, BERT["vocab_size"], (n, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 10:], ids[0, 10:] = 0, 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def prune(model: nn.Module, x, num_classes: int = 10, **kwargs) -> tuple[nn.Module, StructuredPrune]:
    """check() then apply() on a copy, as the first step of a recipe (fine-tuning only if asked)."""
    step = Recipe([StructuredPrune(**kwargs)]).steps[0]
    step.check(model, DataSpec(num_classes, x, {}))
    out = step.apply(copy.deepcopy(model), CompressContext(Batches(x, num_classes), TINY_TRAINER, OPTIM))
    return out, step


def bert_half_params(vocab: int = 100, positions: int = 16, hidden: int = 64, classes: int = 10) -> int:
    """bert_tiny after uniform 0.5 by hand: the embedding tables (and so the residual width 64) stay,
    q/k/v 64 -> 32 (2 heads x 16 dims), the MLP's 128 -> 64, the pooler's 64 -> 32."""
    embeddings = (vocab + positions + 2) * hidden + 2 * hidden  # word, position, token-type tables, LayerNorm
    attention = 3 * (hidden * 32 + 32) + (32 * hidden + hidden) + 2 * hidden
    mlp = (hidden * 64 + 64) + (64 * hidden + hidden) + 2 * hidden
    return embeddings + 2 * (attention + mlp) + (hidden * 32 + 32) + (32 * classes + classes)


# name: (model, inputs, the model uniform 0.5 should equal in size: a half-width build or a count by hand)
FAMILIES = {
    "mlp": (lambda: MLP(40, 10, hidden=256), lambda: images(40), lambda: MLP(40, 10, hidden=128)),
    "cnn1d": (lambda: CNN1D(40, 10), lambda: images(40), lambda: CNN1D(40, 10, channels=12)),  # int(25 / 2)
    "lenet300": (
        lambda: LeNet300(784, 10),
        lambda: images(784),
        lambda: 784 * 150 + 150 + 150 * 50 + 50 + 50 * 10 + 10,
    ),
    "lenet5": (
        lambda: LeNet5([1, 28, 28], 10),
        lambda: images(1, 28, 28),
        lambda: LeNet5([1, 28, 28], 10, channels=(10, 25), hidden=250),
    ),
    "resnet20": (
        lambda: ResNetCIFAR(20, 10, (3, 16, 16)),
        lambda: images(3, 16, 16),
        lambda: ResNetCIFAR(20, 10, (3, 16, 16), width=8),
    ),
    "vit_tiny": (
        lambda: HuggingFace("image", 10, VIT),
        lambda: images(1, 28, 28),
        lambda: HuggingFace("image", 10, {**VIT, "hidden_size": 32, "intermediate_size": 64}),
    ),
    "bert_tiny": (lambda: HuggingFace("text", 10, BERT), tokens, bert_half_params),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_uniform_half_is_the_half_width_model(name):
    make, inputs, half = FAMILIES[name]
    torch.manual_seed(0)
    model, x = make(), inputs()
    out, step = prune(model, x, amount=0.5)
    with torch.no_grad():
        logits = out(x)
    assert type(out) is type(model) and logits.shape == (8, 10) and torch.isfinite(logits).all()
    reference = half()
    expected = reference if isinstance(reference, int) else n_params(reference)
    one = take(x, slice(0, 1))
    assert n_params(out) == expected == step.stats_["prune/params_after"]
    assert step.stats_["prune/params_before"] == n_params(model)
    assert step.stats_["prune/macs_before"] == count_macs(model, one)
    assert step.stats_["prune/macs_after"] == count_macs(out, one) < count_macs(model, one)
    if isinstance(reference, nn.Module):  # the same layers, so the same MACs
        assert step.stats_["prune/macs_after"] == count_macs(reference, one)
    if hasattr(model, "feature_dim"):
        assert out.feature_dim == out.head.in_features
    assert torch.equal(copy.deepcopy(out)(x), logits)


def test_residual_stages_keep_one_width():
    """Channels added together (a stage's blocks, its projection shortcut, the next stage's
    inputs) are pruned as one group, whatever global ranking does to each stage."""
    model = ResNetCIFAR(20, 10, (3, 16, 16))
    out, _ = prune(model, images(3, 16, 16), amount=0.4, scope="global")
    width = out.stem[0].out_channels
    assert out.stem[1].num_features == width
    residual = []
    for stage in out.stages:
        first = stage[0]
        assert first.conv1.in_channels == width
        if isinstance(first.shortcut, nn.Sequential):
            assert first.shortcut[0].in_channels == width
        width = first.conv2.out_channels
        residual.append(width)
        for i, block in enumerate(stage):
            assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels
            assert block.conv2.out_channels == block.bn2.num_features == width
            assert i == 0 or block.conv1.in_channels == width
            if isinstance(block.shortcut, nn.Sequential):
                assert block.shortcut[0].out_channels == block.shortcut[1].num_features == width
    assert out.head.in_features == out.feature_dim == width
    assert n_params(out) < n_params(model) and residual != [16, 32, 64]
    assert out(images(3, 16, 16)).shape == (8, 10)


def test_global_ranks_across_layers_uniform_per_layer():
    torch.manual_seed(0)
    model, x = LeNet300(784, 10), images(784)
    uniform, _ = prune(model, x, amount=0.5)
    glob, _ = prune(model, x, amount=0.5, scope="global")
    widths = [[m.out_features for m in net.body if isinstance(m, nn.Linear)] for net in (uniform, glob)]
    assert widths[0] == [150, 50]
    assert sum(widths[1]) == 200 and widths[1] != [150, 50]  # half of all 400 hidden units, unevenly


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor"])
def test_kept_units_are_the_top_ranked_by_hand(importance):
    """Torch-Pruning scores a unit over its whole group: the layer's row and the next layer's column."""
    torch.manual_seed(0)
    model, x = MLP(40, 10, hidden=16, depth=1), images(40, n=32)
    first, head = model.body[0], model.head
    if importance == "taylor":  # first-order Taylor: |w * dL/dw| on the training batch
        F.cross_entropy(model(x), Batches(x).y).backward()
        score = (first.weight * first.weight.grad).abs().sum(1) + (head.weight * head.weight.grad).abs().sum(0)
        model.zero_grad(set_to_none=True)
    else:
        p = 1 if importance == "l1" else 2
        score = first.weight.abs().pow(p).sum(1) + head.weight.abs().pow(p).sum(0)
    kept = score.topk(8).indices.sort().values
    out, _ = prune(model, x, amount=0.5, importance=importance)
    assert torch.equal(out.body[0].weight, first.weight[kept]) and torch.equal(out.body[0].bias, first.bias[kept])
    assert torch.equal(out.head.weight, head.weight[:, kept]) and torch.equal(out.head.bias, head.bias)


def test_bn_scale_keeps_the_largest_gammas_and_needs_batchnorm():
    torch.manual_seed(0)
    model = ResNetCIFAR(20, 10, (3, 16, 16))
    bn1 = model.stages[0][0].bn1  # a block's inner channels: ranked by this BatchNorm alone
    with torch.no_grad():
        bn1.weight.copy_(torch.randn(16))
    kept = bn1.weight.abs().topk(8).indices.sort().values
    out, _ = prune(model, images(3, 16, 16), amount=0.5, importance="bn_scale")
    assert torch.equal(out.stages[0][0].bn1.weight, bn1.weight[kept])
    with pytest.raises(ConfigError) as e:
        Recipe([StructuredPrune(importance="bn_scale")]).check(MLP(40, 10), SPEC)
    assert e.value.key == "compress.steps[0].importance"


def test_round_to_keeps_multiples():
    model, x = MLP(40, 10, hidden=100), images(40)
    assert prune(model, x, amount=0.5)[0].body[0].out_features == 50
    out, _ = prune(model, x, amount=0.5, round_to=8)
    assert out.body[0].out_features == out.body[2].out_features == out.head.in_features == 48


def test_attention_dims_or_whole_heads():
    torch.manual_seed(0)
    model, x = HuggingFace("image", 10, VIT), images(1, 28, 28)
    dims, _ = prune(model, x, amount=0.5)
    heads, _ = prune(model, x, amount=0.5, attention="heads")
    for net, (n_heads, head_dim) in ((dims, (4, 8)), (heads, (2, 16))):
        for layer in net.model.vit.layers:
            attention = layer.attention
            assert (attention.num_attention_heads, attention.head_dim) == (n_heads, head_dim)
            assert attention.q_proj.out_features == attention.k_proj.out_features == n_heads * head_dim
            assert attention.o_proj.in_features == n_heads * head_dim
        assert net(x).shape == (8, 10)
    torch.manual_seed(0)
    bert, x = HuggingFace("text", 10, BERT), tokens()
    for n_heads, kwargs in ((2, {}), (1, {"attention": "heads"})):
        out, _ = prune(bert, x, amount=0.5, **kwargs)
        for layer in out.model.bert.encoder.layer:
            attention = layer.attention.self
            assert attention.num_attention_heads == n_heads and attention.all_head_size == 32
            assert attention.attention_head_size == 32 // n_heads
        assert out(x).shape == (8, 10)


def test_embeddings_are_kept_whole_with_a_log_line_each(caplog):
    model, x = HuggingFace("text", 10, BERT), tokens()
    step = Recipe([StructuredPrune(amount=0.5)]).steps[0]
    with caplog.at_level(logging.INFO, logger=LOGGER):
        step.check(model, DataSpec(10, x, {}))
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 3 and all("(Embedding) is kept whole" in line for line in lines)
    assert {line.split()[1] for line in lines} == {
        f"model.bert.embeddings.{t}_embeddings" for t in ("word", "position", "token_type")
    }
    out = step.apply(copy.deepcopy(model), CompressContext(Batches(x), TINY_TRAINER, OPTIM))
    assert step.stats_["prune/ignored_layers"] == 4.0  # the three tables and the classifier
    assert out.model.bert.embeddings.word_embeddings.weight.shape == (100, 64)


def test_iterative_steps_fine_tune_after_each(monkeypatch):
    calls = []

    def fake_finetune(net, ctx, epochs, lr):
        calls.append((epochs, lr, net.body[0].out_features))
        return net

    monkeypatch.setattr(structured, "finetune", fake_finetune)
    out, _ = prune(
        MLP(40, 10, hidden=256), images(40), amount=0.5, iterative_steps=3, finetune_epochs=2, final_epochs=5, lr=0.01
    )
    # a linear schedule 1/6, 2/6, 3/6: Torch-Pruning keeps int(256 * (1 - ratio)) units
    assert calls == [(2, 0.01, 213), (2, 0.01, 170), (2, 0.01, 128), (5, 0.01, 128)]
    assert out.body[2].out_features == 128


@pytest.mark.parametrize("name, scope", [("resnet20", "global"), ("lenet5", "uniform"), ("vit_tiny", "global")])
def test_macs_target_is_reached_step_by_step(name, scope, monkeypatch):
    make, inputs, _ = FAMILIES[name]
    torch.manual_seed(0)
    model, x = make(), inputs()
    one = take(x, slice(0, 1))
    base, ratios = count_macs(model, one), []
    monkeypatch.setattr(structured, "finetune", lambda net, ctx, epochs, lr: ratios.append(base / count_macs(net, one)))
    out, step = prune(model, x, amount=0.8, scope=scope, macs_target=2.0, iterative_steps=4, finetune_epochs=1)
    reached = step.stats_["prune/macs_before"] / step.stats_["prune/macs_after"]
    assert step.stats_["prune/macs_after"] == count_macs(out, one) and step.stats_["prune/macs_before"] == base
    assert 2.0 <= reached < 2.2  # increments of 2% of the channels overshoot a little
    assert len(ratios) == 5 and ratios[-1] == pytest.approx(reached)  # 4 steps + the final fine-tuning call
    assert all(r >= 2.0 ** (i / 4) for i, r in enumerate(ratios[:4], 1)) and ratios == sorted(ratios)
    assert out(x).shape == (8, 10)


def test_unreachable_macs_target_fails_in_check():
    with pytest.raises(ConfigError) as e:
        Recipe([StructuredPrune(amount=0.1, macs_target=2.0)]).check(MLP(40, 10, hidden=64), SPEC)
    assert e.value.key == "compress.steps[0].macs_target" and "amount" in str(e.value)


@pytest.mark.parametrize("name", ["mlp", "cnn1d", "resnet20", "vit_tiny", "bert_tiny"])
def test_amount_zero_keeps_predictions(name):
    make, inputs, _ = FAMILIES[name]
    torch.manual_seed(0)
    model, x = make().eval(), inputs()
    out, step = prune(model, x, amount=0.0)
    with torch.no_grad():
        assert torch.equal(out(x), model(x))
    assert n_params(out) == n_params(model) == step.stats_["prune/params_after"]


def test_check_leaves_the_model_alone_and_preview_is_pruned():
    model = MLP(40, 10, hidden=256)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = Recipe([StructuredPrune(amount=0.5, importance="taylor"), DynamicQuantize()])
    recipe.check(model, SPEC)  # the quantization step is checked on the pruned architecture
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    step = recipe.steps[0]
    step.check(model, SPEC)
    preview = step.preview(model)
    assert preview is not model and preview.body[0].out_features == 128 and model.body[0].out_features == 256
    other = MLP(40, 10, hidden=64)  # not the checked model: pruned anew on the inputs check() saw
    assert step.preview(other).body[2].out_features == 32


def test_gru_is_refused_with_a_log_line(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER), pytest.raises(ConfigError) as e:
        Recipe([StructuredPrune()]).check(GRU(40, 10), SPEC)
    assert e.value.key == "compress.steps[0]" and "GRU" in str(e.value) and "rnn (GRU)" in str(e.value)
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [
        "compress.steps[0]: rnn (GRU) is kept whole: Torch-Pruning cannot prune it"
    ]


def test_quantized_models_are_refused():
    with pytest.raises(ConfigError) as e:
        Recipe([DynamicQuantize(), StructuredPrune()]).check(MLP(40, 10), SPEC)
    assert e.value.key == "compress.steps[1]"
    quantized = torch.ao.quantization.quantize_dynamic(MLP(40, 10), {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ConfigError) as e:
        Recipe([StructuredPrune()]).check(quantized, SPEC)
    assert e.value.key == "compress.steps[0]"


@pytest.mark.parametrize(
    "recipe, override, key",
    [
        ("prune_structured", "amount=1.0", "amount"),
        ("prune_structured", "amount=-0.1", "amount"),
        ("prune_structured", "importance=l3", "importance"),
        ("prune_structured", "scope=layer", "scope"),
        ("prune_structured", "iterative_steps=0", "iterative_steps"),
        ("prune_structured", "finetune_epochs=-1", "finetune_epochs"),
        ("prune_structured", "final_epochs=-1", "final_epochs"),
        ("prune_structured", "lr=0", "lr"),
        ("prune_structured", "macs_target=1.0", "macs_target"),
        ("prune_structured", "round_to=0", "round_to"),
        ("prune_structured", "attention=all", "attention"),
        ("prune_structured_macs", "attention=heads", "attention"),  # whole heads go in one step only
        ("prune_structured_macs", "amount=0", "amount"),
    ],
)
def test_bad_values_fail_when_the_recipe_is_built(recipe, override, key):
    with pytest.raises(ConfigError) as e:
        build_recipe(compose_config([f"compress={recipe}", f"compress.steps.0.{override}"]).compress)
    assert e.value.key == f"compress.steps[0].{key}"


@pytest.fixture(scope="module")
def digits() -> SklearnDataset:
    dm = SklearnDataset("digits", num_classes=10, input_shape=[1, 8, 8], scaling="channel", batch_size=64)
    dm.setup()
    return dm


@pytest.mark.parametrize(
    "make",
    [
        lambda: ResNetCIFAR(20, 10, (1, 8, 8), width=8),
        lambda: HuggingFace("image", 10, {**VIT, "image_size": 8}),
    ],
    ids=["resnet20", "vit_tiny"],
)
def test_pruned_models_fine_tune_with_lightning(make, digits):
    torch.manual_seed(0)
    model, x = make(), digits.splits["test"][0][:16]
    step = Recipe([StructuredPrune(amount=0.5, iterative_steps=2, finetune_epochs=1)]).steps[0]
    step.check(model, DataSpec(10, x[:8], digits.input_spec))
    untrained = step.preview(model)
    out = step.apply(copy.deepcopy(model), CompressContext(digits, TINY_TRAINER, OPTIM))
    shapes = {k: v.shape for k, v in out.state_dict().items()}
    assert shapes == {k: v.shape for k, v in untrained.state_dict().items()}  # uniform: the same widths
    assert any(not torch.equal(v, untrained.state_dict()[k]) for k, v in out.state_dict().items())  # trained
    copied = copy.deepcopy(out)
    with torch.no_grad():
        assert copied(x).shape == (16, 10) and torch.equal(copied(x), out(x))


@pytest.mark.slow
def test_pipeline_logs_the_pruned_size(tmp_path):
    from runner.pipeline import run

    results = run(
        compose_config(
            ["compress=prune_structured", "model=lenet5", "data=mnist5k", "compress.steps.0.finetune_epochs=1"],
            tmp_path,
        )
    )
    members = sorted({k.split("/")[1] for k in results if k.startswith("member/")})
    assert members
    for m in members:
        compressed, member = f"compressed/{m}", f"member/{m}"
        assert results[f"{compressed}/params"] == results[f"{compressed}/prune/params_after"]
        assert results[f"{compressed}/macs"] == results[f"{compressed}/prune/macs_after"]
        assert results[f"{member}/params"] == results[f"{compressed}/prune/params_before"]
        assert results[f"{member}/macs"] == results[f"{compressed}/prune/macs_before"]
        # LeNet-5 at half width: 20, 50, 500 -> 10, 25, 250
        assert results[f"{compressed}/params"] == 109_295 < results[f"{member}/params"] == 431_080
        assert results[f"{compressed}/macs"] < results[f"{member}/macs"]


def test_the_classifier_is_the_adapter_s_head_else_the_last_linear_with_as_many_outputs_as_classes():
    from runner.compress.structured import _classifier

    plain = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.Softmax(-1))  # no declared head
    assert _classifier(plain, 3) is plain[2]
    assert _classifier(plain, 5) is plain[2]  # no Linear gives 5 outputs: the head it found
    wider = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    assert _classifier(wider, 5) is wider[0]  # the last layer gives 3: not the classifier of 5 classes
    mlp = MLP(40, 10)
    assert _classifier(mlp, 10) is mlp.head


class GroupedQueryAttention(nn.Module):
    """LLaMA-style names with fewer key/value heads than query heads (4 query heads of 4 dims, 2 kv heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 4
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        self.o_proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.q_proj(x) + torch.cat([self.k_proj(x), self.v_proj(x)], -1))


def test_head_counts_follow_the_query_heads_size_under_grouped_query_attention():
    net = nn.Sequential(GroupedQueryAttention(), nn.Linear(16, 3))
    attention = structured._attention_modules(net)
    pruner = StructuredPrune(amount=0.25)._pruner(net, torch.randn(2, 16), [net[1]], attention)
    gqa = net[0]
    assert [pruner.num_heads[m] for m in (gqa.q_proj, gqa.k_proj, gqa.v_proj)] == [4, 2, 2]
