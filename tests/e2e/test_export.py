"""Export (runner/export.py): ONNX for every model kind ONNX can express, torch.export where only it can,
a reason where nothing can; ONNX Runtime's predictions and latency logged beside PyTorch's (eval.export)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose_config, logged_predictions
from helpers.logged import logged_test_inputs
from mlflow import MlflowClient
from torch import nn

import runner.pipeline
from runner.errors import ConfigError
from runner.export import OrtModel, export_model, load_exported, main
from runner.models import CNN1D, MLP, HuggingFace
from runner.models.reference import LeNet5, ResNetCIFAR

IMAGES = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
SIGNALS = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
VIT = {
    "model_type": "vit",
    "image_size": 28,
    "num_channels": 1,
    "patch_size": 4,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
BERT = {
    "model_type": "bert",
    "vocab_size": 50,
    "max_position_embeddings": 12,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def tokens(n: int) -> dict[str, torch.Tensor]:
    mask = torch.ones(n, 12, dtype=torch.long)
    mask[::2, 8:] = 0  # padded rows
    return {
        "input_ids": torch.randint(0, 50, (n, 12), generator=torch.Generator().manual_seed(0)),
        "attention_mask": mask,
    }


FLOAT_MODELS = {
    "mlp": (lambda: MLP(40, 10), SIGNALS),
    "cnn1d": (lambda: CNN1D(40, 10), SIGNALS),
    "lenet5": (lambda: LeNet5([1, 28, 28], 10), IMAGES),
    "resnet20": (lambda: ResNetCIFAR(20, 10, [1, 28, 28], width=8), IMAGES),
    "vit": (lambda: HuggingFace("image", 10, VIT), IMAGES),
    "bert": (lambda: HuggingFace("text", 2, BERT), tokens(16)),
}


@pytest.mark.parametrize("name", list(FLOAT_MODELS))
def test_float_models_export_to_onnx_with_a_dynamic_batch(name):
    make, x = FLOAT_MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    exported = export_model(model, x)
    assert (exported.format, exported.reason) == ("onnx", None)
    ort = load_exported(exported.data, "onnx")
    assert isinstance(ort, OrtModel)
    with torch.no_grad():
        for n in (16, 5, 1):  # any batch size, one included
            part = {k: v[:n] for k, v in x.items()} if isinstance(x, dict) else x[:n]
            np.testing.assert_allclose(ort(part).numpy(), model(part).numpy(), atol=2e-5, err_msg=f"{name} batch {n}")


def test_static_int8_cnn_exports_its_quantize_dequantize_graph():
    """PT2E int8 is exported as QuantizeLinear/DequantizeLinear: ONNX Runtime computes in int8 and agrees
    with the oneDNN kernels up to rounding."""
    import onnx

    from runner.compress.quantize import static_pt2e

    torch.manual_seed(0)
    model = LeNet5([1, 28, 28], 10).eval()
    int8 = static_pt2e(model, IMAGES, lambda m: m(IMAGES))
    exported = export_model(int8, IMAGES)
    assert exported.format == "onnx"
    ops = {node.op_type for node in onnx.load_from_string(exported.data).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    with torch.no_grad():
        ours, theirs = int8(IMAGES), load_exported(exported.data, "onnx")(IMAGES)
        float_logits = model(IMAGES)
    scale = float_logits.abs().max()
    assert (theirs - ours).abs().max() < 0.02 * scale  # int8 rounding, not a different model
    assert not torch.allclose(theirs, float_logits, atol=1e-6)  # and not the float model either

    # a fused ensemble of int8 members: each member's reference graph goes in its place
    from runner.fuse.averaging import ProbabilityMean

    fused = ProbabilityMean().fit([int8, int8], [(IMAGES, torch.arange(16) % 10)]).as_module()
    exported = export_model(fused, IMAGES)
    assert exported.format == "onnx" and isinstance(fused.members[0], type(int8))  # the original untouched
    with torch.no_grad():
        ours, theirs = fused(IMAGES).exp(), load_exported(exported.data, "onnx")(IMAGES).exp()
    assert (theirs - ours).abs().max() < 0.02


def test_what_cannot_be_exported_says_why():
    from runner.compress.quantize import dynamic_torch_ao
    from runner.fuse.averaging import ProbabilityMean
    from runner.fuse.stacking import Stacking

    torch.manual_seed(0)
    members = [MLP(40, 10).eval() for _ in range(2)]
    val = [(SIGNALS, torch.arange(16) % 10)]
    dynamic = export_model(dynamic_torch_ao(MLP(40, 10).eval()), SIGNALS)
    assert dynamic.format == "none" and dynamic.data is None
    assert dynamic.reason.startswith("torch.ao quantized modules (Linear, LinearPackedParams)")
    stacked = export_model(Stacking().fit(members, val).as_module(), SIGNALS)
    assert stacked.format == "none" and "scikit-learn" in stacked.reason
    mean = ProbabilityMean().fit(members, val).as_module()
    assert export_model(mean, SIGNALS).format == "onnx"


class CumMax(nn.Module):
    """A model with an op ONNX has no function for (aten.cummax): torch.export holds it, ONNX cannot."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(self.linear(x), dim=1).values


def test_torch_export_where_onnx_cannot_express_the_model():
    model = CumMax().eval()
    exported = export_model(model, SIGNALS)
    assert exported.format == "torch.export" and exported.suffix == ".pt2"
    assert exported.reason.startswith("ONNX:") and "aten.cummax" in exported.reason
    with torch.no_grad():
        np.testing.assert_allclose(
            load_exported(exported.data, "torch.export")(SIGNALS[:3]).numpy(), model(SIGNALS[:3]).numpy(), atol=1e-6
        )


def test_bad_export_option_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.export.*tflite.*\['none', 'onnx'\]"):
        runner.pipeline.run(compose_config(["eval.export=tflite"], tmp_path))


@pytest.mark.slow
def test_a_job_exports_every_model_and_logs_onnx_runtime_beside_pytorch(tmp_path):
    """Members and the mean-fused model: ONNX files on their child runs whose ONNX Runtime predictions
    are the logged test probabilities; dynamic int8 members: no file, the reason as a tag."""
    cfg = compose_config(
        [
            "model=mlp",
            "ensemble=seeds5",
            "ensemble.seeds=[0,1]",
            "compress=quant_dynamic",
            "fuse=mean",
            "eval.export=onnx",
            "tracking.log_models=true",
        ],
        tmp_path,
    )
    runner.pipeline.run(cfg)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("runner").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([exp])}
    children = {n: r for n, r in runs.items() if r.data.tags.get("role") != "job"}
    [job] = [r for r in runs.values() if r.data.tags.get("role") == "job"]
    formats = {n: r.data.tags["export"] for n, r in children.items()}
    assert formats == {
        "member/mlp-s0": "onnx",
        "member/mlp-s1": "onnx",
        "fused": "onnx",
        "compressed/mlp-s0": "none",
        "compressed/mlp-s1": "none",
        "fused_compressed": "none",
    }
    x = logged_test_inputs(cfg)
    for name, run in children.items():
        metrics, tags = run.data.metrics, run.data.tags
        if formats[name] == "none":
            assert tags["export_error"].startswith("torch.ao quantized modules")
            assert not client.list_artifacts(run.info.run_id, "export") and "export/latency_ms" not in metrics
            continue
        path = client.download_artifacts(run.info.run_id, "export/model.onnx", str(tmp_path / name.replace("/", "_")))
        probs, targets = logged_predictions(tmp_path, run)
        ort_probs = torch.softmax(OrtModel(open(path, "rb").read())(x).double(), dim=1).numpy()
        np.testing.assert_allclose(ort_probs, probs, atol=1e-5, err_msg=name)
        assert metrics["export/agreement"] == 1.0 and metrics["export/max_abs_diff"] < 1e-5
        assert metrics["export/acc"] == pytest.approx(metrics["test/acc"])
        assert metrics["export/speedup"] == pytest.approx(metrics["latency_ms"] / metrics["export/latency_ms"])
        assert metrics["export/latency_q25_ms"] <= metrics["export/latency_ms"] <= metrics["export/latency_q75_ms"]
    # the job run: the members' mean and the fused model's, under names that do not depend on the members
    assert job.data.metrics["members/mean/export/agreement"] == job.data.metrics["fused/export/agreement"] == 1.0
    assert job.data.metrics["compressed/n"] == 2 and "compressed/mean/export/agreement" not in job.data.metrics

    # python -m runner.export: a logged model, by child run id, to a file
    member = children["member/mlp-s0"]
    out = tmp_path / "shipped" / "mlp.onnx"
    assert main([f"model={member.info.run_id}", f"output={out}", f"tracking_uri={uri}"]) == 0
    probs, _ = logged_predictions(tmp_path, member)
    np.testing.assert_allclose(torch.softmax(OrtModel(out.read_bytes())(x).double(), 1).numpy(), probs, atol=1e-5)
    # a model that cannot be exported: exit 2, the reason on stderr
    int8 = children["compressed/mlp-s0"]
    assert main([f"model={int8.info.run_id}", f"output={tmp_path / 'int8.onnx'}", f"tracking_uri={uri}"]) == 2
    assert not (tmp_path / "int8.onnx").exists()
