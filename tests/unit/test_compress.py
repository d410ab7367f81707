"""Contract tests for every recipe in conf/compress, plus the steps' own guarantees and errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import CONF_DIR, SPEC, compose_config
from omegaconf import OmegaConf
from torch import nn

from runner.compress import (
    CompressContext,
    Distill,
    DynamicQuantize,
    MagnitudePrune,
    Recipe,
    StaticQuantize,
    StructuredPrune,
    Wanda,
    build_recipe,
    compression_report,
    is_quantized,
    weight_bytes,
)
from runner.compress.distill import distillation_loss
from runner.compress.prune import prunable, weight_sparsity
from runner.errors import ConfigError
from runner.evaluate import evaluate_model, size_metrics
from runner.models import CNN1D, GRU, MLP, LogReg
from runner.models.facts import declared_head_name, set_head_name

# none: no steps (tests/unit/test_config.py); text students need token ids (tests/contract/test_contracts.py's text family);
# distill_lm takes causal LMs only (tests/unit/test_distill_lm.py)
TEXT_STUDENTS = {"distill_text_bow", "distill_bert_tiny", "distill_minilm"}
LM_ONLY = {"distill_lm"}
RECIPES = sorted(
    p.stem
    for p in Path(CONF_DIR, "compress").glob("*.yaml")
    if p.stem != "none" and p.stem not in TEXT_STUDENTS | LM_ONLY
)
TINY_TRAINER = {
    "max_epochs": 1,
    "accelerator": "cpu",
    "devices": 1,
    "enable_progress_bar": False,
    "limit_train_batches": 2,
}
OPTIM = {"name": "adam", "lr": 1e-2}


class LogProbEnsemble(nn.Module):
    """The fused-ensemble stand-in: mean probabilities of the members, as log-probabilities."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x).softmax(1) for m in self.members]).mean(0).log()


def recipe(name: str, *overrides: str) -> Recipe:
    return build_recipe(compose_config([f"compress={name}", *overrides]).compress)


def shortened(r: Recipe) -> Recipe:
    """The same steps with at most 2 fine-tuning epochs (of 2 batches each): the contract, not accuracy."""
    for step in r.steps:
        for attr in ("finetune_epochs", "epochs", "epochs_per_round", "rounds", "final_epochs"):
            if getattr(step, attr, 0) > 2:
                setattr(step, attr, 2)
    return r


def context(dm, members) -> CompressContext:
    return CompressContext(dm, TINY_TRAINER, OPTIM, teacher=members[0], ensemble=LogProbEnsemble(members))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def accepts(r: Recipe, model: nn.Module) -> bool:
    try:
        r.check(model, SPEC)
        return True
    except ConfigError:
        return False


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_contract(name, mnist1d_small, trained_mlps, trained_cnn):
    r = shortened(recipe(name))
    assert len(r) >= 1
    checked = [m for m in (trained_mlps[0], trained_cnn) if accepts(r, m)]
    assert checked, f"{name} accepts neither an MLP nor a CNN"
    x, y = mnist1d_small.splits["test"]
    for model in checked:
        before, mode = snapshot(model), model.training
        pl.seed_everything(0, verbose=False)
        out = r.apply(model, context(mnist1d_small, trained_mlps))
        assert_same_state(before, model)
        assert model.training == mode and out is not model
        logits = out(x[:50])
        assert logits.shape == (50, 10) and torch.isfinite(logits).all()
        metrics, probs, _, targets = evaluate_model(
            out,
            mnist1d_small.test_dataloader(),
            10,
            ["acc", "f1"],
            latency_batch=x[:64],
            latency_repeats=2,
            latency_min_time_s=0.0,
            latency_warmup_s=0.0,
        )
        # the metrics are those of the model's own outputs (accuracy itself: benchmarks/compression.py)
        with torch.no_grad():
            assert torch.equal(probs.argmax(1), out(x).argmax(1)) and torch.equal(targets, y)
        assert metrics["acc"] == pytest.approx(float((probs.argmax(1) == y).double().mean()))
        assert torch.allclose(probs.sum(1), torch.ones(len(y), dtype=probs.dtype), atol=1e-4)
        assert not any("_orig" in k or "_mask" in k for k in out.state_dict())  # masks made permanent
        base = size_metrics(model)
        structured = type(r.steps[0]).__name__ == "StructuredPrune"
        if name.startswith("prune_") and not structured:
            assert type(out) is type(model)
            step = r.steps[0]
            # Wanda keeps the head dense and prunes each row to its sparsity; magnitude pruning ranks every layer
            pruned = (
                [(m, "weight") for m in step.targets(out)]
                if isinstance(step, Wanda)
                else prunable(out, step.min_params)
            )
            zeros = sum(int((m.weight == 0).sum()) for m, _ in pruned)
            assert zeros / sum(m.weight.numel() for m, _ in pruned) == pytest.approx(step.sparsity, abs=0.01)
            assert metrics["nonzero_params"] <= metrics["params"] - zeros
            if step.sparsity == 0.9:
                assert metrics["nonzero_params"] / metrics["params"] < 0.15
        if name == "prune_structured":  # Torch-Pruning keeps int(width / 2) of every hidden layer
            assert metrics["params"] < 0.6 * base["params"]
            assert metrics["size_bytes"] < base["size_bytes"]
            widths = [m.weight.shape[0] for m, _ in prunable(out)][:-1]
            assert widths == [m.weight.shape[0] // 2 for m, _ in prunable(model)][:-1]
        if structured:  # what the step reports is what was evaluated
            assert metrics["params"] == r.stats_["prune/params_after"] < r.stats_["prune/params_before"]
            assert metrics["macs"] == r.stats_["prune/macs_after"]
        if name == "prune_structured_macs":
            assert r.stats_["prune/macs_before"] / r.stats_["prune/macs_after"] >= 2.0
        if "quant" in name or name in ("qat", "deep_compression"):
            assert is_quantized(out)
            assert metrics["size_bytes"] < base["size_bytes"]
        if name == "deep_compression":
            assert metrics["nonzero_params"] / metrics["params"] < 0.15
        if name.startswith("distill"):
            student = r.steps[0].build_student()  # the member is replaced by the configured student
            assert type(out) is type(student) or is_quantized(out)
            assert metrics["params"] == sum(p.numel() for p in student.parameters())


def test_every_recipe_checks_the_gru_clearly():
    gru, refused = GRU(40, 10), set()
    for name in RECIPES:
        try:
            recipe(name).check(gru, SPEC)
        except ConfigError as e:
            assert e.key.startswith("compress.steps[") and "GRU" in str(e)
            refused.add(name)
    # recurrent layers have no static int8 kernels and no structured pruning here; Wanda and weight-only
    # quantization have no Linear but the head to work on
    assert refused == {
        "prune_wanda",
        "prune_magnitude_rows",
        "prune_magnitude_2_4",
        "prune_wanda_2_4",
        "quant_int8_weight",
        "quant_int4_weight",
        "prune_structured",
        "prune_structured_macs",
        "prune_channels_2x",
        "prune_heads_ffn",
        "qat",
        "quant_static",
    }


def test_int8_dynamic_is_over_3x_smaller_for_linear_heavy_models(mnist1d_small):
    model = MLP(40, 10, hidden=256)
    out = recipe("quant_dynamic").apply(model, context(mnist1d_small, [model]))
    ratio = compression_report(size_metrics(model), size_metrics(out))["compression_ratio"]
    assert ratio > 3.5
    x = mnist1d_small.splits["test"][0][:100]
    assert (out(x).argmax(1) == model(x).argmax(1)).float().mean() > 0.9


def test_weight_bytes_count_tensor_data_only(mnist1d_small, trained_cnn):
    mlp = MLP(40, 10, hidden=16)
    assert weight_bytes(mlp) == 4 * sum(p.numel() for p in mlp.parameters())
    # a 5k-parameter CNN: serialization overhead hides most of int8's saving, the tensor bytes do not
    out = StaticQuantize(calibration_batches=2).apply(copy.deepcopy(trained_cnn), context(mnist1d_small, [trained_cnn]))
    report = compression_report(
        {**size_metrics(trained_cnn), "weight_bytes": weight_bytes(trained_cnn)},
        {**size_metrics(out), "weight_bytes": weight_bytes(out)},
    )
    assert report["weight_ratio"] > 2.5 and report["weight_ratio"] > report["compression_ratio"] + 1


def test_min_params_keeps_small_layers_dense(mnist1d_small, trained_cnn):
    out = MagnitudePrune(0.8, min_params=200).apply(copy.deepcopy(trained_cnn), context(mnist1d_small, [trained_cnn]))
    first, *rest = [m.weight for m, _ in prunable(out)]
    assert first.numel() < 200 and bool((first != 0).all())
    zeros = sum(int((w == 0).sum()) for w in rest)
    assert zeros / sum(w.numel() for w in rest) == pytest.approx(0.8, abs=0.01)
    with pytest.raises(ConfigError) as e:
        MagnitudePrune(0.8, min_params=10**6).check(trained_cnn, SPEC)
    assert e.value.key.endswith(".min_params")


def test_static_quantization_keeps_predictions(mnist1d_small, trained_cnn):
    out = StaticQuantize(calibration_batches=5).apply(copy.deepcopy(trained_cnn), context(mnist1d_small, [trained_cnn]))
    x = mnist1d_small.splits["test"][0]
    with torch.no_grad():
        agree = (out(x).argmax(1) == trained_cnn(x).argmax(1)).float().mean()
    assert agree >= 0.85


@pytest.mark.parametrize("net", [MLP(40, 10, hidden=16), CNN1D(40, 10, channels=8)])
def test_structured_prune_equals_zeroing_the_removed_units(net):
    """Removing a unit == zeroing its incoming weights and bias (ReLU(0) = 0 feeds nothing). Units
    are ranked by the L2 norm of their group: the unit's incoming weights and the next layer's
    weights reading it (for the last conv, the head columns of all its flattened positions)."""
    torch.manual_seed(0)
    x = torch.randn(20, 40)
    step = Recipe([StructuredPrune(amount=0.5)]).steps[0]
    step.check(net, SPEC)
    small = step.preview(net)
    masked = copy.deepcopy(net)
    layers = [m for m, _ in prunable(masked)]
    with torch.no_grad():
        drops = []
        for layer, after in zip(layers[:-1], layers[1:]):
            reads = after.weight.transpose(0, 1).reshape(layer.weight.shape[0], -1)  # by input unit
            score = layer.weight.pow(2).flatten(1).sum(1) + reads.pow(2).sum(1)
            drops.append(torch.topk(score, layer.weight.shape[0] // 2, largest=False).indices)
        for layer, drop in zip(layers[:-1], drops):
            layer.weight[drop] = 0
            layer.bias[drop] = 0
    assert torch.allclose(small(x), masked(x), atol=1e-5)
    assert [m.weight.shape[0] for m, _ in prunable(small)][:-1] == [m.weight.shape[0] // 2 for m in layers[:-1]]
    step = Recipe([StructuredPrune(amount=0.0)]).steps[0]
    step.check(net, SPEC)
    assert torch.equal(step.preview(net)(x), net(x))
    assert small.feature_dim == small.head.in_features


def test_gradual_schedule_is_cubic_and_ends_at_target():
    from runner.compress import GradualPrune

    values = GradualPrune(sparsity=0.8, rounds=4).schedule_values()
    assert values[-1] == pytest.approx(0.8) and values == sorted(values)
    assert values[0] > 0.8 / 4  # front-loaded


def test_finetune_keeps_pruned_weights_at_zero(mnist1d_small, trained_mlps):
    r = Recipe(
        [
            MagnitudePrune(sparsity=0.7),
            build_recipe(OmegaConf.create({"steps": [{"_target_": "runner.compress.FineTune", "epochs": 1}]})).steps[0],
        ]
    )
    out = r.apply(trained_mlps[0], context(mnist1d_small, trained_mlps))
    assert weight_sparsity(out) == pytest.approx(0.7, abs=0.01)


def test_distillation_loss():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert distillation_loss(s, t, y, 3.0, 0.0) == pytest.approx(float(nn.functional.cross_entropy(s, y)))
    assert float(distillation_loss(t, t, y, 3.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(s, t.log_softmax(1), y, 2.0, 1.0)) == pytest.approx(
        float(distillation_loss(s, t, y, 2.0, 1.0)), rel=1e-5
    )


def test_mixup_distillation_matches_a_teacher_equal_to_the_student():
    """With the student as its own teacher the soft terms vanish, mixup or not: only (1-alpha) CE is left."""
    from runner.compress.distill import DistillModule

    torch.manual_seed(0)
    net, x, y = MLP(40, 10, hidden=8), torch.randn(16, 40), torch.randint(0, 10, (16,))
    module = DistillModule(net, teacher=net, temperature=2.0, alpha=0.7, mixup=1.0)
    logits = net(x)
    expected = 0.3 * float(nn.functional.cross_entropy(logits, y))
    assert float(module.loss(logits, y, x)) == pytest.approx(expected, abs=1e-5)


def test_compression_report():
    base = {"test/acc": 0.9, "test/f1": 0.8, "size_bytes": 400.0, "zip_bytes": 300.0, "latency_ms": 2.0, "params": 10.0}
    comp = {
        "test/acc": 0.85,
        "test/f1": 0.8,
        "size_bytes": 100.0,
        "zip_bytes": 60.0,
        "latency_ms": 0.5,
        "params": 10.0,
        "nonzero_params": 2.0,
    }
    report = compression_report(base, comp)
    assert report["delta/acc"] == pytest.approx(-0.05) and report["delta/f1"] == 0.0
    assert report["compression_ratio"] == 4.0 and report["zip_ratio"] == 5.0 and report["speedup"] == 4.0
    assert report["nonzero_fraction"] == 0.2
    assert "speedup_low" not in report  # no quartiles (metrics logged before they existed): no spread
    base.update(latency_q25_ms=1.5, latency_q75_ms=3.0)
    comp.update(latency_q25_ms=0.25, latency_q75_ms=1.0)
    report = compression_report(base, comp)
    assert (report["speedup_low"], report["speedup_high"], report["speedup_meaningful"]) == (1.5, 12.0, 1.0)
    comp["latency_q75_ms"] = 2.0  # the IQRs overlap now
    assert compression_report(base, comp)["speedup_meaningful"] == 0.0


def test_empty_recipe_copies(trained_cnn, mnist1d_small):
    r = build_recipe(None)
    assert not r
    out = r.apply(trained_cnn, context(mnist1d_small, [trained_cnn]))
    assert out is not trained_cnn
    assert_same_state(snapshot(trained_cnn), out)


@pytest.mark.parametrize(
    "overrides, key, allowed",
    [
        (
            ["compress=prune_gradual", "compress.steps.0.sparsity=1.0"],
            "compress.steps[0].sparsity",
            "a float in [0, 1)",
        ),
        (["compress=distill", "compress.steps.0.temperature=0"], "compress.steps[0].temperature", "a float > 0"),
        (["compress=prune_global", "compress.steps.0.sparsity=1.0"], "compress.steps[0].sparsity", None),
        (["compress=prune_global", "compress.steps.0.sparsity=-0.1"], "compress.steps[0].sparsity", None),
        (["compress=prune_layerwise", "compress.steps.0.scope=row"], "compress.steps[0].scope", None),
        (["compress=prune_gradual", "compress.steps.0.rounds=0"], "compress.steps[0].rounds", "an integer >= 1"),
        (["compress=prune_structured", "compress.steps.0.amount=1.5"], "compress.steps[0].amount", None),
        (["compress=distill", "compress.steps.0.teacher=oracle"], "compress.steps[0].teacher", None),
        (["compress=distill", "compress.steps.0.alpha=2"], "compress.steps[0].alpha", None),
        (["compress=distill", "compress.steps.0.mixup=-1"], "compress.steps[0].mixup", None),
        (["compress=prune_global", "compress.steps.0.min_params=-1"], "compress.steps[0].min_params", None),
        (["compress=deep_compression", "compress.steps.2.dtype=int4"], "compress.steps[2].dtype", None),
        (["compress=quant_static", "compress.steps.0.backend=tpu"], "compress.steps[0].backend", None),
    ],
)
def test_bad_values_fail_when_the_recipe_is_built(overrides, key, allowed):
    """Each refusal names its key; where given, also exactly what is allowed."""
    with pytest.raises(ConfigError) as e:
        build_recipe(compose_config(overrides).compress)
    assert e.value.key == key
    if allowed is not None:
        assert e.value.allowed == allowed


def test_weight_only_quantization_without_torchao_names_its_step(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a)
    )
    with pytest.raises(ConfigError) as e:
        recipe("quant_int8_weight").check(MLP(40, 10), SPEC)
    assert e.value.key == "compress.steps[0]" and "torchao" in e.value.allowed


def test_dynamic_quantization_takes_models_with_as_many_dense_weights_as_conv_ones():
    """Mostly dense means conv weights <= dense parameters: a tie passes, one conv weight more does not."""
    from runner.compress.requirements import _mostly_dense

    step = recipe("quant_dynamic").steps[0]
    tie = nn.Sequential(nn.Conv1d(1, 4, 3, bias=False), nn.Flatten(), nn.Linear(3, 3))  # 12 and 9 + 3
    _mostly_dense(step, tie)
    with pytest.raises(ConfigError) as e:
        _mostly_dense(step, nn.Sequential(nn.Conv1d(1, 13, 1, bias=False), nn.Flatten(), nn.Linear(3, 3)))
    assert e.value.key == "compress.steps[0]" and "(13 of 25 weights in Conv layers)" in e.value.value


@pytest.mark.parametrize(
    "name, model, key",
    [
        ("quant_static", GRU(40, 10), "compress.steps[0]"),
        ("qat", GRU(40, 10), "compress.steps[0]"),
        ("quant_dynamic", CNN1D(40, 10), "compress.steps[0]"),
        ("deep_compression", CNN1D(40, 10), "compress.steps[2]"),
        ("prune_structured", GRU(40, 10), "compress.steps[0]"),
        ("prune_structured", LogReg(40, 10), "compress.steps[0]"),
    ],
)
def test_models_a_step_cannot_handle_fail_in_check(name, model, key):
    with pytest.raises(ConfigError) as e:
        recipe(name).check(model, SPEC)
    assert e.value.key == key
    assert str(e.value.value).startswith(type(model).__name__)  # the model named, not the step


def test_student_with_other_classes_fails_in_check():
    with pytest.raises(ConfigError) as e:
        recipe("distill", "compress.student.num_classes=3").check(MLP(40, 10), SPEC)
    assert e.value.key == "compress.steps[0].student / data.num_classes"
    assert "(8, 3)" in str(e.value) and "(8, 10)" in str(e.value)


def test_chains_are_checked_in_order():
    # quantizing the distilled MLP student of a CNN member is fine ...
    recipe("distill_then_quantize").check(CNN1D(40, 10), SPEC)
    # ... pruning or quantizing an already quantized model is not
    for steps in ([DynamicQuantize(), MagnitudePrune(0.5)], [DynamicQuantize(), DynamicQuantize()]):
        with pytest.raises(ConfigError) as e:
            Recipe(steps).check(MLP(40, 10), SPEC)
        assert e.value.key == "compress.steps[1]"


def test_ensemble_teacher_needs_an_ensemble(mnist1d_small):
    r = recipe("distill_ensemble")
    r.check(MLP(40, 10), SPEC)
    with pytest.raises(ConfigError) as e:
        r.check(MLP(40, 10), SPEC, ensemble=False)
    assert e.value.key == "compress.steps[0].teacher"
    with pytest.raises(ConfigError):
        r.apply(MLP(40, 10), CompressContext(mnist1d_small, TINY_TRAINER, OPTIM))


def test_student_module_is_copied_per_member(mnist1d_small, trained_mlps):
    student = MLP(40, 10, hidden=8)
    before = snapshot(student)
    step = Recipe([Distill(student=student, epochs=1)])
    out = step.apply(trained_mlps[0], context(mnist1d_small, trained_mlps))
    assert out is not student
    assert_same_state(before, student)


def test_a_declared_head_name_travels_with_the_compressed_copy(mnist1d_small):
    """The head a YAML names (`head:`) is recorded beside the model, not on it; a recipe works on a
    copy, and the copy's head must still be the named layer (not the last Linear found)."""
    net = MLP(40, 10)
    set_head_name(net, "net.0")  # deliberately not the last Linear
    out = recipe("prune_global").apply(net, CompressContext(mnist1d_small, TINY_TRAINER, OPTIM))
    assert out is not net and declared_head_name(out) == "net.0"


def test_weight_bytes_count_a_tied_weight_once():
    """A language model's output layer that is its input embedding is one tensor, listed twice."""
    embed, out = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
    out.weight = embed.weight
    tied = torch.nn.Sequential(embed, out)
    assert len(tied.state_dict()) == 2 and weight_bytes(tied) == 4 * 40
    untied = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    assert weight_bytes(untied) == 4 * 80
