"""Int8 engines (runner.compress.quantize): exact weights, outputs checked against what the int8
scales imply, sizes, any model family, refusals, stats, copies."""

from __future__ import annotations

import copy
import io
import subprocess
import sys

import pytest
import torch
from conftest import compose_config
from helpers import ROOT
from helpers.quantize import inputs, quantize_step, seeded
from torch import nn

from runner.batches import DataSpec, num_samples, take
from runner.compress import (
    DynamicQuantize,
    QATQuantize,
    Recipe,
    StaticQuantize,
    build_recipe,
    is_quantized,
)
from runner.compress.quantize import Int8Graph, static_pt2e, static_torch_ao
from runner.errors import ConfigError
from runner.evaluate import count_macs, size_metrics, weight_bytes
from runner.models import CNN1D, GRU, MLP, HuggingFace, LeNet5, LogReg, ResNetCIFAR

TINY_VIT = {
    "model_type": "vit",
    "image_size": 8,
    "num_channels": 1,
    "patch_size": 4,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
}
TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 50,
    "max_position_embeddings": 12,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
}


def tokens(n: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 50, (n, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def fake_quant(x: torch.Tensor, scale: float, zero_point: int, low: int = 0, high: int = 255) -> torch.Tensor:
    """What an int8 kernel sees of `x`: rounded to the grid, clamped to the integer range."""
    return (torch.clamp(torch.round(x / scale) + zero_point, low, high) - zero_point) * scale


# ---- numerics: each engine computes what its int8 weights and scales say -----------------------


def test_dynamic_weights_are_rounded_to_the_symmetric_scale_and_error_is_within_the_bound():
    model, x = seeded(lambda: LogReg(40, 10)), inputs((40,))
    out = quantize_step(DynamicQuantize(), model, x)
    w, qw = model.head.weight.detach(), out.head.weight()
    scale = float(w.abs().max()) / 127.5  # per-tensor symmetric int8
    assert qw.q_scale() == pytest.approx(scale, rel=1e-6) and qw.q_zero_point() == 0
    assert torch.equal(qw.int_repr(), torch.round(w / qw.q_scale()).clamp(-128, 127).to(torch.int8))
    # activations: per batch on 7 bits (x86 reduce_range) over [min(x, 0), max(x, 0)]; each rounded
    # input is off by at most half a step, each rounded weight by half a weight step
    step_x = float(x.max().clamp(min=0) - x.min().clamp(max=0)) / 127
    w_dq = qw.dequantize()
    bound = step_x / 2 * w_dq.abs().sum(1) + qw.q_scale() / 2 * x.abs().sum(1, keepdim=True)
    with torch.no_grad():
        err = (out(x) - model(x)).abs()
    assert bool((err <= bound + 1e-5).all()) and float(err.max()) > 0


@pytest.mark.parametrize("engine", ["torch_ao", "pt2e"])
def test_static_output_is_the_int8_arithmetic_of_its_scales(engine):
    """A one-Linear model: the int8 output equals quantized input x dequantized weights computed
    in float (to float rounding; torch_ao also rounds the output to its output scale)."""
    model, x = seeded(lambda: LogReg(40, 10)), inputs((40,))
    out = quantize_step(StaticQuantize(engine=engine, calibration_batches=2), model, x)
    w = model.head.weight.detach()
    if engine == "pt2e":
        ref = out.reference
        (q_in,) = [n for n in ref.graph.nodes if n.target == torch.ops.quantized_decomposed.quantize_per_tensor.default]
        scale_x, zp_x = q_in.args[1], q_in.args[2]
        scale_w = ref._scale_0
        assert torch.equal(scale_w, w.abs().amax(1) / 127.5)  # per-channel symmetric
        rounded = torch.round(w * (1.0 / scale_w[:, None])).clamp(-128, 127).to(torch.int8)
        assert torch.equal(ref._frozen_param0, rounded)
        w_dq = ref._frozen_param0.float() * scale_w[:, None]
        expected = fake_quant(x, scale_x, zp_x) @ w_dq.T + model.head.bias.detach()
        tolerance = 1e-5
    else:
        scale_x, zp_x = float(out._scale_0), int(out._zero_point_0)
        qw = out.head.weight()
        assert torch.allclose(qw.q_per_channel_scales().float(), w.abs().amax(1) / 127.5, rtol=1e-6)
        w_dq = qw.dequantize()
        # x86 activations use 7 bits (reduce_range)
        y = fake_quant(x, scale_x, zp_x, 0, 127) @ w_dq.T + model.head.bias.detach()
        expected = fake_quant(y, out.head.scale, out.head.zero_point)
        tolerance = out.head.scale + 1e-6  # requantization may round a tie the other way
    with torch.no_grad():
        got = out(x)
    assert float((got - expected).abs().max()) <= tolerance
    # and the distance to fp32 is what rounding the inputs and weights allows
    x_err = (fake_quant(x, scale_x, zp_x, 0, 127 if engine == "torch_ao" else 255) - x).abs()
    bound = x_err @ w_dq.abs().T + x.abs() @ (w_dq - w).abs().T + tolerance
    assert bool(((got - model(x).detach()).abs() <= bound + 1e-5).all())


# ---- sizes -----------------------------------------------------------------------------------


def test_weight_bytes_of_each_engine_are_the_int8_layout():
    model, x = seeded(lambda: MLP(40, 10, hidden=64)), inputs((40,))
    layers = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert weight_bytes(model) == sum(4 * (i * o + o) for i, o in layers)
    dynamic = quantize_step(DynamicQuantize(), model, x)
    # int8 weights + one (scale, zero point) pair of 16 bytes, fp32 bias, the module's unused output qparams
    assert weight_bytes(dynamic) == sum(i * o + 16 + 4 * o + 12 for i, o in layers)
    fx = quantize_step(StaticQuantize(engine="torch_ao", calibration_batches=2), model, x)
    # per-channel: 16 bytes of qparams per output; input and output scale + zero point (4 + 8 bytes)
    assert weight_bytes(fx) == sum(i * o + 16 * o + 4 * o + 12 for i, o in layers) + 12
    pt2e = quantize_step(StaticQuantize(engine="pt2e", calibration_batches=2), model, x)
    # per-channel float32 scale, int64 zero point, fp32 bias
    assert weight_bytes(pt2e) == sum(i * o + (4 + 8 + 4) * o for i, o in layers)
    # parameters are the int8 weights and biases: as many as the float model's
    assert size_metrics(pt2e)["params"] == size_metrics(model)["params"] == sum(i * o + o for i, o in layers)


# ---- every model family ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, make, x",
    [
        ("vit_tiny", lambda: HuggingFace("image", 10, TINY_VIT), inputs((1, 8, 8))),
        ("bert_tiny", lambda: HuggingFace("text", 10, TINY_BERT), tokens()),
    ],
)
def test_transformers_quantize_dynamically_and_run(name, make, x):
    model = seeded(make)
    step = DynamicQuantize()
    out = quantize_step(step, model, x)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    quantized = [m for m in out.modules() if type(m).__module__ == "torch.ao.nn.quantized.dynamic.modules.linear"]
    assert len(quantized) == linears and is_quantized(out)
    with torch.no_grad():
        logits, float_logits = out(x), model(x)
    assert logits.shape == (num_samples(x), 10) and torch.isfinite(logits).all()
    assert step.stats_["macs"] == count_macs(model, take(x, slice(0, 1)))
    assert step.stats_["quant/fp32_agreement"] == float((logits.argmax(1) == float_logits.argmax(1)).double().mean())
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(out)(x), logits)


CNNS = {
    "lenet5": (lambda: LeNet5([1, 16, 16], 10, channels=(4, 8), hidden=32), (1, 16, 16)),
    "resnet20": (lambda: ResNetCIFAR(20, 10, [3, 8, 8], width=4), (3, 8, 8)),
    "cnn1d": (lambda: CNN1D(40, 10, channels=8), (40,)),
}


@pytest.mark.parametrize("engine", ["pt2e", "torch_ao"])
@pytest.mark.parametrize("name", sorted(CNNS))
def test_cnns_quantize_statically(name, engine):
    make, shape = CNNS[name]
    model, x = seeded(make), inputs(shape)
    step = StaticQuantize(engine=engine, calibration_batches=2)
    assert StaticQuantize().engine_for(model) == "pt2e"  # auto: every CNN
    out = quantize_step(step, model, x)
    assert is_quantized(out)
    with torch.no_grad():
        logits = out(x)
        assert logits.shape == (32, 10) and torch.isfinite(logits).all()
        assert step.stats_["quant/fp32_agreement"] == float((logits.argmax(1) == model(x).argmax(1)).double().mean())
        assert step.stats_["macs"] == count_macs(model, x[:1])
        if engine == "torch_ao" or name != "resnet20":  # a copy of an Int8Graph is lowered again: seconds
            assert torch.equal(copy.deepcopy(out)(x), logits)
        if engine == "pt2e":
            assert isinstance(out, Int8Graph)
            # oneDNN int8 kernels run, and compute what the quantize/dequantize reference graph says
            ops = {str(n.target) for n in out._lowered.graph.nodes}
            assert "onednn.qconv_pointwise.default" in ops and "onednn.qlinear_pointwise.default" in ops
            if name == "resnet20":  # conv + residual add + relu fused into one int8 kernel
                assert "onednn.qconv2d_pointwise.binary" in ops
                # each call of a block's shared ReLU annotated as its own partition (_one_partition_per_call):
                # the lowered graph quantizes 3 tensors and dequantizes 2 (recorded; a ReLU call left
                # without its module gives 2 and 1, and other logits)
                kinds = [str(n.target) for n in out._lowered.graph.nodes]
                assert kinds.count("quantized_decomposed.quantize_per_tensor.default") == 3
                assert kinds.count("quantized_decomposed.dequantize_per_tensor.default") == 2
            assert torch.allclose(logits, out.reference(x), atol=1e-4)
            if name == "resnet20":
                return
            buffer = io.BytesIO()
            torch.save(out, buffer)
            buffer.seek(0)
            assert torch.equal(torch.load(buffer, weights_only=False)(x), logits)  # lowered again on load


def test_pt2e_int8_weights_of_a_cnn_are_the_per_channel_rounding():
    model, x = seeded(CNNS["lenet5"][0]), inputs((1, 16, 16))
    out = static_pt2e(model, x[:2], lambda prepared: prepared(x))
    ref = out.reference
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for i, layer in enumerate(layers):
        w, scale = layer.weight.detach(), getattr(ref, f"_scale_{i}")
        shape = (-1,) + (1,) * (w.dim() - 1)
        assert torch.equal(scale, w.abs().flatten(1).amax(1) / 127.5)
        expected = torch.round(w * (1.0 / scale.reshape(shape))).clamp(-128, 127).to(torch.int8)
        assert torch.equal(getattr(ref, f"_frozen_param{i}"), expected)


def test_auto_engines():
    step = StaticQuantize()
    assert step.engine_for(MLP(40, 10)) == "torch_ao" and step.engine_for(LogReg(40, 10)) == "torch_ao"
    assert StaticQuantize(engine="pt2e").engine_for(MLP(40, 10)) == "pt2e"
    assert StaticQuantize(engine="torch_ao").engine_for(LeNet5([1, 16, 16], 10)) == "torch_ao"


def test_static_pt2e_runs_a_transformer_when_asked():
    model, x = seeded(lambda: HuggingFace("text", 10, TINY_BERT)), tokens()
    out = quantize_step(StaticQuantize(engine="pt2e", calibration_batches=1), model, x)
    with torch.no_grad():
        assert torch.allclose(out(x), out.reference(x), atol=1e-4)


def test_quantized_models_are_detected_and_not_quantized_twice():
    model, x = seeded(lambda: MLP(40, 10, hidden=16)), inputs((40,))
    fx = static_torch_ao(model, x[:2], lambda prepared: prepared(x))
    for out in (
        quantize_step(DynamicQuantize(), model, x),
        fx,
        quantize_step(StaticQuantize(engine="pt2e", calibration_batches=1), model, x),
    ):
        assert is_quantized(out) and is_quantized(copy.deepcopy(out))
        for step in (DynamicQuantize(), StaticQuantize(), StaticQuantize(engine="pt2e")):
            with pytest.raises(ConfigError) as e:
                Recipe([step]).check(out, DataSpec(10, x[:8], {}))
            assert e.value.key == "compress.steps[0]" and "quantize once" in str(e.value)
    assert not is_quantized(model)


# ---- refusals --------------------------------------------------------------------------------


class FixedBatch(nn.Module):
    """A conv net that reshapes with its batch size written in: torch.export captures it for that batch
    only, so engine pt2e, which captures with a dynamic batch, must refuse it before training."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv1d(1, 2, 3), nn.Linear(2 * 38, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x.unsqueeze(1)).reshape(4, -1))


@pytest.mark.parametrize(
    "step, make, x, says",
    [
        (DynamicQuantize(), lambda: ResNetCIFAR(20, 10, [3, 8, 8], width=4), inputs((3, 8, 8), 4), "StaticQuantize"),
        (StaticQuantize(), lambda: GRU(40, 10), inputs((40,), 4), "DynamicQuantize"),
        (StaticQuantize(engine="pt2e"), lambda: GRU(40, 10), inputs((40,), 4), "DynamicQuantize"),
        (StaticQuantize(), lambda: HuggingFace("image", 10, TINY_VIT), inputs((1, 8, 8), 4), "DynamicQuantize"),
        (StaticQuantize(engine="torch_ao"), lambda: HuggingFace("text", 10, TINY_BERT), tokens(4), "DynamicQuantize"),
        (QATQuantize(), lambda: HuggingFace("image", 10, TINY_VIT), inputs((1, 8, 8), 4), "DynamicQuantize"),
        (StaticQuantize(engine="pt2e"), FixedBatch, inputs((40,), 4), "with a dynamic batch"),
    ],
)
def test_models_an_engine_cannot_handle_are_refused_in_check(step, make, x, says):
    with pytest.raises(ConfigError) as e:
        Recipe([step]).check(make(), DataSpec(10, x, {}))
    assert e.value.key == "compress.steps[0]" and says in str(e.value)


@pytest.mark.parametrize(
    "recipe, override, key",
    [
        ("quant_static", "compress.steps.0.engine=tensorrt", "compress.steps[0].engine"),
        ("quant_dynamic", "compress.steps.0.engine=pt2e", "compress.steps[0].engine"),
        ("deep_compression", "compress.steps.2.engine=torchao", "compress.steps[2].engine"),
    ],
)
def test_bad_engines_fail_when_the_recipe_is_built(recipe, override, key):
    with pytest.raises(ConfigError) as e:
        build_recipe(compose_config([f"compress={recipe}", override]).compress)
    assert e.value.key == key and "torch_ao" in str(e.value)


def test_every_quantization_yaml_names_its_engine():
    for name in ("quant_dynamic", "quant_static", "deep_compression", "distill_then_quantize"):
        steps = build_recipe(compose_config([f"compress={name}"]).compress).steps
        assert steps[-1].engine == "auto", name


@pytest.mark.slow
def test_the_pipeline_logs_the_int8_cnn(tmp_path):
    """quant_static on a LeNet-5 member through the whole job: pt2e, its MACs and agreement logged."""
    import runner.pipeline

    results = runner.pipeline.run(
        compose_config(
            [
                "data=mnist5k",
                "model=lenet5",
                "model.channels=[4,8]",
                "model.hidden=32",
                "ensemble=seeds5",
                "ensemble.seeds=[0]",
                "compress=quant_static",
            ],
            tmp_path,
        )
    )
    member = "compressed/lenet5-s0"
    assert results[f"{member}/macs"] == results["member/lenet5-s0/macs"]  # the float model's, from the step
    assert 0.9 <= results[f"{member}/quant/fp32_agreement"] <= 1.0
    # int8 weights + per-channel float32 scale, int64 zero point and float32 bias
    lenet5 = LeNet5([1, 28, 28], 10, channels=(4, 8), hidden=32)
    layers = [m for m in lenet5.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    float_bytes = sum(4 * (m.weight.numel() + m.bias.numel()) for m in layers)
    assert results[f"{member}/weight_ratio"] == pytest.approx(
        float_bytes / sum(m.weight.numel() + 16 * m.bias.numel() for m in layers)
    )
    assert results[f"{member}/params"] == results["member/lenet5-s0/params"]


@pytest.mark.slow
def test_the_benchmark_runs():
    """benchmarks/quantization.py --quick on LeNet-5: every engine, torch.compile included, runs."""
    script = str(ROOT / "benchmarks" / "quantization.py")
    out = subprocess.run(
        [sys.executable, script, "--quick", "--models", "lenet5"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and "ms" not in line]
    assert "n/a" not in out and len(rows) == 8, out
    assert "auto: DynamicQuantize torch_ao, StaticQuantize pt2e" in out


@pytest.mark.slow
def test_qat_runs_in_fp32_under_mixed_precision_and_says_so(tmp_path):
    """trainer.precision=bf16-mixed trains the member in bf16; the QAT epochs (and every quantization
    step) run in fp32: under autocast torch.ao's fake-quantize raised after the member had trained."""
    from runner.pipeline import run

    results = run(
        compose_config(
            ["model=mlp", "compress=qat", "compress.steps.0.finetune_epochs=1", "trainer.precision=bf16-mixed"],
            tmp_path,
        )
    )
    assert results["compressed/mlp-s0/quant/precision_bits"] == 32
    assert results["compressed/mlp-s0/quant/fp32_agreement"] > 0.9  # a working int8 model of the member


def test_qat_trains_with_observers_then_without_for_the_last_epoch(monkeypatch):
    """finetune_epochs=3: two epochs that still calibrate the ranges, then one with the ranges frozen."""
    import runner.compress.quantize as quantize

    seen = []

    def recorded(model, ctx, epochs, lr):
        on = {int(m.observer_enabled) for m in model.modules() if hasattr(m, "observer_enabled")}
        seen.append((epochs, on, ctx.trainer["precision"]))
        return model

    monkeypatch.setattr(quantize, "finetune", recorded)
    quantize_step(QATQuantize(finetune_epochs=3), seeded(lambda: MLP(40, 10)), inputs((40,)))
    assert seen == [(2, {1}, "32-true"), (1, {0}, "32-true")]
    seen.clear()
    quantize_step(QATQuantize(finetune_epochs=1), seeded(lambda: MLP(40, 10)), inputs((40,)))
    assert seen == [(1, {0}, "32-true")]


class Branchy(nn.Module):
    """Dense layers only (engine auto picks torch_ao's FX) with a branch on the data: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_a_model_fx_cannot_trace_is_refused_by_name_for_fx_quantization():
    with pytest.raises(ConfigError) as e:
        Recipe([StaticQuantize()]).check(Branchy(), DataSpec(10, inputs((40,), 4), {}))
    assert (e.value.key, e.value.value) == ("compress.steps[0]", "Branchy")
    assert "a model torch.fx can trace" in e.value.allowed
