"""Where models and data live (runner/device.py) and the channels_last layout, checked on the CPU.
The same paths on a real GPU are in tests/unit/test_gpu.py (marked `gpu`)."""

import subprocess
import sys

import pytest
import torch
from conftest import compose_config
from helpers import ROOT
from helpers.models import train_lenet
from helpers.quantize import inputs, quantize_step, seeded
from mlflow import MlflowClient

import runner.pipeline
from runner.compress import DynamicQuantize, StaticQuantize
from runner.compress.quantize import ScriptBox
from runner.data import SklearnDataset
from runner.device import cpu_only, data_on_device, job_device, placement
from runner.models import MLP, LeNet5, LitClassifier
from runner.train import channels_last

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize(
    "trainer, device",
    [
        ({"accelerator": "cpu"}, "cpu"),
        ({"accelerator": "gpu", "devices": 1}, "cuda:0"),
        ({"accelerator": "cuda", "devices": [1, 2]}, "cuda:1"),
        ({"accelerator": "mps"}, "mps"),
    ],
)
def test_the_job_device_is_the_trainers(trainer, device):
    assert job_device(trainer) == torch.device(device)


def test_device_lists_from_a_config_name_their_gpu():
    from omegaconf import OmegaConf

    trainer = OmegaConf.create({"accelerator": "gpu", "devices": [1]})
    assert job_device(trainer) == torch.device("cuda", 1)
    dm = SklearnDataset("digits")
    assert data_on_device(dm, torch.device("meta"), trainer)  # one device, named by index
    assert not data_on_device(dm, torch.device("meta"), OmegaConf.create({"devices": [0, 1]}))


def test_auto_is_the_gpu_when_one_is_visible():
    assert job_device({"accelerator": "auto"}).type == (
        "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    )


def test_int8_models_stay_on_the_cpu_and_say_why():
    mlp, cnn = seeded(lambda: MLP(40, 10, hidden=16)), seeded(lambda: LeNet5(input_shape=(1, 28, 28), num_classes=10))
    int8 = {
        "dynamic": quantize_step(DynamicQuantize(), mlp, inputs((40,))),
        "pt2e": quantize_step(StaticQuantize(engine="pt2e", calibration_batches=1), cnn, inputs((1, 28, 28))),
        "torch_ao": quantize_step(StaticQuantize(engine="torch_ao", calibration_batches=1), mlp, inputs((40,))),
    }
    int8["script"] = ScriptBox(torch.jit.script(int8["torch_ao"]))
    for name, model in int8.items():
        assert "int8" in cpu_only(model), name
        assert placement(model, CUDA) == (torch.device("cpu"), cpu_only(model)), name
    for model in (mlp, cnn):  # float models go where the job is
        assert cpu_only(model) == "" and placement(model, CUDA) == (CUDA, "")
    assert placement(int8["pt2e"], torch.device("cpu")) == (torch.device("cpu"), "")  # nothing to say on a CPU job


def test_in_memory_splits_move_to_the_device_on_one_device_only():
    dm = SklearnDataset("digits", batch_size=50, eval_batch_size=50)
    dm.setup()
    meta = torch.device("meta")
    assert not data_on_device(dm, torch.device("cpu"), {"accelerator": "cpu"})
    assert not data_on_device(dm, meta, {"devices": 2, "strategy": "ddp"})  # DDP ranks take CPU tensors
    assert data_on_device(dm, meta, {"devices": 1, "strategy": "auto"})
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))  # batches are sliced where the splits are: no copy per batch
        assert x.device == meta and y.device == meta and len(y) == 50
    images = SklearnDataset("digits", batch_size=50, train_transforms=[abs])  # a DataLoader keeps its CPU tensors
    assert not data_on_device(images, meta, {"devices": 1})


def test_channels_last_trains_in_nhwc_and_hands_back_the_default_layout():
    nhwc, seen = train_lenet(channels_last=True)
    assert seen and all(w and x for w, x in seen)
    assert all(p.is_contiguous() for p in nhwc.parameters())  # back to the default layout after fit
    plain, seen = train_lenet()  # null on a CPU: the default layout
    assert seen and not any(w or x for w, x in seen)
    for a, b in zip(nhwc.parameters(), plain.parameters()):  # the same training, another memory layout
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_channels_last_is_for_2d_convolutions_and_by_default_on_a_gpu():
    lenet, mlp = LeNet5(input_shape=(1, 28, 28), num_classes=10), MLP(4, 2)
    assert channels_last({"accelerator": "gpu"}, lenet) and not channels_last({"accelerator": "cpu"}, lenet)
    assert channels_last({"accelerator": "cpu", "channels_last": True}, lenet)
    assert not channels_last({"accelerator": "gpu", "channels_last": False}, lenet)
    assert not channels_last({"accelerator": "gpu", "channels_last": True}, mlp)


def test_every_evaluated_model_says_where_it_ran(tmp_path):
    cfg = compose_config(
        ["model=mlp", "ensemble=seeds5", "ensemble.seeds=[0,1]", "fuse=mean", "compress=quant_dynamic"], tmp_path
    )
    runner.pipeline.run(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    children = {r.info.run_name: r.data.tags for r in runs if r.data.tags["role"] != "job"}
    assert sorted(children) == [
        "compressed/mlp-s0",
        "compressed/mlp-s1",
        "fused",
        "fused_compressed",
        "member/mlp-s0",
        "member/mlp-s1",
    ]
    assert {name: tags["device"] for name, tags in children.items()} == dict.fromkeys(children, "cpu")
    assert not any("device_note" in tags for tags in children.values())  # a CPU job: nothing moved elsewhere


@pytest.mark.slow
def test_the_gpu_benchmark_runs_on_the_cpu_as_a_smoke_run():
    """benchmarks/gpu.py --device cpu: both loops train ResNet-20 and print samples/s and their ratio."""
    script = ROOT / "benchmarks" / "gpu.py"
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            "--device",
            "cpu",
            "--samples",
            "256",
            "--batch",
            "128",
            "--epochs",
            "1",
            "--repeats",
            "1",
            "--models",
            "resnet20",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    [row] = [line for line in out.splitlines() if line.startswith("| resnet20")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    hand, ours, ratio = (float(c.replace(",", "")) for c in cells[2:5])
    assert cells[1] == "272,474" and hand > 0 and ours > 0
    assert ratio == pytest.approx(ours / hand, rel=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("compress, module", [("prune_gradual", "LitClassifier"), ("distill", "DistillModule")])
def test_mixed_precision_reaches_fine_tuning_and_distillation(tmp_path, monkeypatch, compress, module):
    """trainer.precision=bf16-mixed: the member's steps and the recipe's (pruning's fine-tuning,
    distillation) all run under bf16 autocast (here on the CPU; tests/unit/test_gpu.py on a GPU)."""
    from runner.compress.distill import DistillModule

    steps = []
    for cls in (LitClassifier, DistillModule):

        def loss(self, logits, y, x, original=cls.loss, cls=cls):
            if type(self) is cls:
                steps.append((cls.__name__, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return original(self, logits, y, x)

        monkeypatch.setattr(cls, "loss", loss)
    cfg = compose_config(
        ["model=mlp", "trainer.precision=bf16-mixed", f"compress={compress}", "trainer.steps_per_call=1"], tmp_path
    )
    runner.pipeline.run(cfg)
    assert {name for name, *_ in steps} == {"LitClassifier", module}
    assert all(on and dtype == torch.bfloat16 for _, on, dtype in steps)
    assert sum(name == module for name, *_ in steps) > 3  # the recipe's own training steps
