"""On a CUDA GPU (marked `gpu`: skipped where none is visible, see conftest.py): the whole job runs on
it, not only member training. Run them with `pytest -m gpu` on a machine with a GPU."""

import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_config
from helpers.models import train_lenet
from mlflow import MlflowClient

import runner.device
import runner.pipeline
from runner.data import SklearnDataset
from runner.device import on_device
from runner.evaluate import predict_proba
from runner.models import LitClassifier
from runner.train import fit

pytestmark = pytest.mark.gpu
# two real epochs (not trainer=fast's 3 batches), so accuracies mean something
GPU = ["trainer.accelerator=gpu", "trainer.devices=1", "trainer.max_epochs=2", "trainer.limit_train_batches=null"]
LENETS = ["data=mnist5k", "model=lenet5", "ensemble=seeds5", "ensemble.seeds=[0,1]"]


def child_tags(tmp_path) -> dict[str, dict[str, str]]:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    return {r.info.run_name: r.data.tags for r in runs if r.data.tags["role"] != "job"}


@pytest.mark.parametrize(
    "fuse, compress", [("mean", "quant_static"), ("feature", "distill"), ("stacking", "prune_structured")]
)
def test_the_whole_job_runs_on_the_gpu_and_int8_on_the_cpu(tmp_path, fuse, compress):
    results = runner.pipeline.run(compose_config([*LENETS, *GPU, f"fuse={fuse}", f"compress={compress}"], tmp_path))
    tags = child_tags(tmp_path)
    int8 = compress == "quant_static"
    for name, t in tags.items():
        on_cpu = int8 and name.startswith(("compressed", "fused_compressed"))
        assert t["device"] == ("cpu" if on_cpu else "cuda"), name
        assert ("int8" in t.get("device_note", "")) == on_cpu, name
    assert results["fused/test/acc"] > 0.5 and results["objective/val_acc"] > 0.5


def test_in_memory_data_live_on_the_gpu_and_models_come_back_to_the_cpu():
    dm = SklearnDataset("digits", batch_size=64)
    assert runner.device.data_on_device(dm, torch.device("cuda", 0), {"accelerator": "gpu", "devices": 1})
    x, y = next(iter(dm.train_dataloader()))
    assert x.is_cuda and y.is_cuda
    pl.seed_everything(0, verbose=False)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    fit(LitClassifier(net, "adam", lr=1e-2), dm, {"max_epochs": 3, "accelerator": "gpu", "devices": 1})
    with on_device(net, torch.device("cuda", 0)) as where:
        assert where.type == "cuda" and next(net.parameters()).is_cuda
        probs, targets = predict_proba(net, dm.test_dataloader())
    assert not probs.is_cuda and not next(net.parameters()).is_cuda  # back on the CPU after the step
    assert float((probs.argmax(1) == targets).float().mean()) > 0.8


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains_members_fine_tunes_and_distills(tmp_path, precision):
    results = runner.pipeline.run(
        compose_config([*LENETS, *GPU, f"trainer.precision={precision}", "fuse=mean", "compress=distill"], tmp_path)
    )
    assert results["compressed/mean/test/acc"] > 0.5


def test_qat_runs_in_fp32_on_the_gpu_and_its_int8_model_on_the_cpu(tmp_path):
    results = runner.pipeline.run(
        compose_config([*LENETS, *GPU, "trainer.precision=bf16-mixed", "compress=qat"], tmp_path)
    )
    assert results["compressed/lenet5-s0/quant/precision_bits"] == 32
    assert child_tags(tmp_path)["compressed/lenet5-s0"]["device"] == "cpu"


def test_channels_last_is_the_default_for_cnns_on_the_gpu():
    _, seen = train_lenet(accelerator="gpu")
    assert seen and all(w and x for w, x in seen)


def test_compile_on_the_gpu(tmp_path):
    results = runner.pipeline.run(compose_config([*LENETS, *GPU, "trainer.compile=true"], tmp_path))
    assert results["members/mean/test/acc"] > 0.5


def test_latency_on_the_gpu_is_timed_with_synchronize(monkeypatch):
    from runner.evaluate import latency_stats

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(1))
    net = torch.nn.Linear(8, 2).cuda()
    stats = latency_stats(net, torch.randn(4, 8, device="cuda"), 5, warmup_s=0, min_time_s=0)
    assert stats.metrics()["latency_repeats"] >= 5 and len(calls) >= 10  # before and after each timed call


def test_onnx_export_of_a_gpu_job_compares_cpu_with_cpu(tmp_path):
    results = runner.pipeline.run(compose_config([*LENETS, *GPU, "eval.export=onnx"], tmp_path))
    for name in ("member/lenet5-s0", "member/lenet5-s1"):
        assert results[f"{name}/export/agreement"] > 0.99
        assert results[f"{name}/export/speedup"] == pytest.approx(
            results[f"{name}/export/torch_cpu_latency_ms"] / results[f"{name}/export/latency_ms"]
        )
