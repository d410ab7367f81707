"""Your own models and data: the data contract, the features/head adapter, checks before training,
and every data source and model family through training, one compression recipe and one fusion
strategy (tiny settings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_config
from helpers import ROOT
from helpers.files import write_cifar, write_folder, write_mnist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from runner.batches import Chunk, split_batch
from runner.config import build
from runner.data import DatasetDataModule, SklearnDataset, as_source, describe_data
from runner.data.sources import with_data_values
from runner.errors import ConfigError
from runner.evaluate import size_metrics
from runner.models.adapter import build_model, check_split, features, head, head_name
from runner.pipeline import run
from runner.train import train_classifier

EXAMPLE = ROOT / "examples" / "byo"
sys.path.insert(0, str(EXAMPLE))  # the example's my_model / my_data, as a user's cwd would provide
from my_data import DigitsDataModule  # noqa: E402
from my_model import SmallConvNet  # noqa: E402

TRAINER = {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


# --- batches and the two loader paths --------------------------------------------------------------


def test_batches_in_every_form_split_into_inputs_and_labels():
    x, y = torch.zeros(4, 3), torch.arange(4)
    for batch in ((x, y), [x, y], {"x": x, "labels": y}, {"pixel_values": x, "label": y}):
        got_x, got_y = split_batch(batch)
        assert got_x is x and got_y is y
    ids = {"input_ids": torch.ones(4, 5, dtype=torch.long), "attention_mask": torch.ones(4, 5, dtype=torch.long)}
    got_x, got_y = split_batch({**ids, "labels": y})
    assert got_x.keys() == ids.keys() and got_y is y
    with pytest.raises(ValueError, match="labels"):
        split_batch({"input_ids": ids["input_ids"]})
    with pytest.raises(ValueError):
        split_batch(Chunk([(x, y), (x, y)]))  # a chunk of batches is never one [x, y] batch


@pytest.mark.parametrize("steps_per_call", [0, 1])
def test_tensor_and_dataloader_paths_train_identically(steps_per_call):
    """The in-memory fast path and a standard DataLoader over the same arrays: same batches in the
    same order, so bit-identical weights (whole-epoch chunks or one step per Lightning step)."""
    nets = []
    for loader in ("tensors", "dataloader"):
        dm = SklearnDataset("digits", input_shape=[1, 8, 8], scaling="channel", batch_size=32, loader=loader)
        pl.seed_everything(0, verbose=False)
        net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10))
        pl.seed_everything(1, verbose=False)
        nets.append(
            train_classifier(net, dm, {**TRAINER, "steps_per_call": steps_per_call}, {"name": "adam", "lr": 1e-2})
        )
        assert isinstance(dm.train_dataloader(), DataLoader) == (loader == "dataloader")
    start = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10))
    a, b = (n.state_dict() for n in nets)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], start.state_dict()["0.weight"])  # and they did train


def test_train_transforms_switch_to_the_dataloader_path():
    dm = SklearnDataset("digits", input_shape=[1, 8, 8], train_transforms=[torch.nn.Identity()])
    dm.setup()
    assert not dm.tensor_batches and isinstance(dm.train_dataloader(), DataLoader)
    assert isinstance(dm.val_dataloader(), DataLoader)


# --- the features/head adapter -------------------------------------------------------------------


class TwoHeads(nn.Module):
    """A classifier whose last registered Linear is not its classifier (an auxiliary projection)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.classifier = nn.Linear(16, 10)
        self.aux = nn.Linear(16, 3)

    def forward(self, x):
        return self.classifier(self.body(x))


def test_the_head_is_found_in_any_module_or_named():
    x = torch.randn(5, 1, 8, 8)
    net = SmallConvNet(1, 10).eval()
    assert head_name(net) == "classifier"  # the last nn.Linear
    f = features(net, x)
    assert f.shape == (5, 32) and torch.allclose(head(net, f), net(x), atol=1e-6)
    assert check_split(net, x) == 32
    two = TwoHeads().eval()
    with pytest.raises(ConfigError, match="model.head='aux'.*name it with `head:`"):
        check_split(two, x)
    two.head_name = "classifier"
    assert check_split(two, x) == 16


def test_head_in_a_model_yaml_names_the_classifier(tmp_path):
    from runner.members import plan_members

    (tmp_path / "conf" / "model").mkdir(parents=True)
    for name, head_key in (("two_heads", "classifier"), ("typo", "clasifier")):
        (tmp_path / "conf" / "model" / f"{name}.yaml").write_text(f"_target_: test_byo.TwoHeads\nhead: {head_key}\n")
    search = f"hydra.searchpath=[file://{tmp_path}/conf]"
    [member] = plan_members(compose_config([search, "data=digits_image", "model=two_heads"], tmp_path))
    assert head_name(member.net) == "classifier" and check_split(member.net, torch.randn(3, 1, 8, 8)) == 16
    with pytest.raises(ConfigError, match="model.head='clasifier'.*classifier"):
        plan_members(compose_config([search, "data=digits_image", "model=typo"], tmp_path))


def test_nonzero_params_count_parameters_not_batchnorm_buffers():
    net = SmallConvNet(1, 10)
    sizes = size_metrics(net)
    assert sizes["params"] == sum(p.numel() for p in net.parameters()) == 5226
    # BatchNorm biases start at zero; its running variances (ones) are buffers and do not count
    assert sizes["nonzero_params"] == sum(int(p.count_nonzero()) for p in net.parameters()) == 5226 - 48


# --- checks before training ------------------------------------------------------------------------


def finished_runs(tmp_path) -> int:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data=wine", "model=lenet5"], "model.input_shape"),  # a conv net on flat rows: its own check
        (
            ["data=wine", f"hydra.searchpath=[file://{EXAMPLE}/conf]", "model=small_cnn", "model.in_channels=1"],
            "model / data",
        ),  # a user's Conv2d net on flat rows: the forward pass
    ],
)
def test_a_model_that_does_not_fit_the_data_fails_before_training(overrides, key, tmp_path):
    cfg = compose_config(overrides, tmp_path)
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert e.value.key.startswith(key)
    if key == "model / data":
        assert "SmallConvNet" in str(e.value) and "[13]" in str(e.value)
    assert not (tmp_path / "mlflow.db").exists() or finished_runs(tmp_path) == 0


def test_a_wrong_number_of_classes_names_model_and_data(tmp_path):
    cfg = compose_config(["data=digits_image", "model=lenet300", "model.num_classes=3"], tmp_path)
    with pytest.raises(ConfigError, match=r"model / data.num_classes.*\(8, 10\)"):
        run(cfg)


def test_text_models_need_text_data(tmp_path):
    cfg = compose_config(["data=wine", "model=bert_tiny"], tmp_path)
    with pytest.raises(ConfigError, match="vocab_size"):
        run(cfg)


# --- every data source and model family, end to end ---------------------------------------------


class DictDigits(Dataset):
    """A user's torch Dataset of Hugging Face-style dict samples."""

    def __init__(self, part: str) -> None:
        dm = SklearnDataset("digits", input_shape=[1, 8, 8], scaling="channel")
        dm.setup()
        self.x, self.y = dm.splits["train" if part == "train" else "test"]
        self.targets = self.y.numpy()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    write_mnist(root, "mnist", gz=True, n_train=200, n_test=50)
    write_cifar(root, "cifar10")
    write_folder(root / "folder", per_class=12)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"a": rng.normal(size=240), "b": rng.normal(size=240), "colour": rng.choice(["red", "green", "blue"], 240)}
    )
    frame["kind"] = np.where(frame.a + (frame.colour == "red") > 0.5, "x", np.where(frame.b > 0, "y", "z"))
    frame.to_csv(root / "table.csv", index=False)
    words = {"pos": ["great", "fine", "lovely", "superb"], "neg": ["awful", "bad", "dull", "poor"]}
    rows = [
        {"text": f"a {rng.choice(w)} and {rng.choice(w)} film", "label": k} for _ in range(60) for k, w in words.items()
    ]
    (root / "reviews.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return {"root": root}


SOURCES = {  # id: (overrides, recipe that applies); every one: 2 seeds, probability averaging
    "mnist5k-lenet5": (["data=mnist5k", "model=lenet5"], "quant_static"),
    "mnist5k-vit_tiny": (["data=mnist5k", "model=vit_tiny"], "quant_dynamic"),
    "digits_image-resnet20": (["data=digits_image", "model=resnet20"], "prune_global"),
    "mnist_idx-lenet300": (["data=mnist", "data.root={root}", "model=lenet300"], "deep_compression"),
    "cifar10-resnet20": (["data=cifar10", "data.root={root}", "model=resnet20"], "prune_global"),
    "image_folder-cnn1d": (
        ["data=image_folder", "data.path={root}/folder", "data.image_size=8", "model=cnn1d"],
        "prune_structured",
    ),
    "table-mlp": (["data=table", "data.path={root}/table.csv", "data.label=kind", "model=mlp"], "quant_dynamic"),
    "text-bert_tiny": (
        ["data=text", "data.path={root}/reviews.jsonl", "data.max_length=12", "model=bert_tiny"],
        "quant_dynamic",
    ),
    "text-text_bow": (
        [
            "data=text",
            "data.path={root}/reviews.jsonl",
            "data.max_length=12",
            "model=text_bow",
            "model@compress.student=text_bow",
            "model.dim=32",
            "compress.steps.0.mixup=0",
        ],
        "distill",
    ),
    "user_datamodule-user_model": (
        [f"hydra.searchpath=[file://{EXAMPLE}/conf]", "data=digits_dm", "model=small_cnn"],
        "prune_global",
    ),
    "torch_datasets-lenet300": (
        [
            "data=dataset",
            "+data.train._target_=test_byo.DictDigits",
            "+data.train.part=train",
            "+data.test._target_=test_byo.DictDigits",
            "+data.test.part=test",
            "model=lenet300",
        ],
        "distill",
    ),
}


def logged_probs(tmp_path: Path, role: str) -> list[np.ndarray]:
    """The test probabilities each `role` child run logged to MLflow (predictions/test.npz)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    out = []
    for r in client.search_runs(experiments, f"tags.role = '{role}'", order_by=["tags.member"]):
        with np.load(client.download_artifacts(r.info.run_id, "predictions/test.npz", str(tmp_path))) as f:
            out.append(f["probs"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_every_source_trains_compresses_and_fuses(source, files, tmp_path):
    overrides, recipe = SOURCES[source]
    overrides = [o.format(root=files["root"]) for o in overrides]
    cfg = compose_config(
        overrides + [f"compress={recipe}", "fuse=mean", "ensemble=seeds5", "ensemble.seeds=[0,1]", "optim.lr=0.003"],
        tmp_path,
    )
    results = run(cfg)
    members = sorted(k.split("/")[1] for k in results if k.startswith("member/") and k.endswith("/test/acc"))
    assert len(members) == 2 and [m[-3:] for m in members] == ["-s0", "-s1"]
    # what was logged: the fused model's test probabilities are the mean of the members'
    fused, member_probs = logged_probs(tmp_path, "fused")[0], logged_probs(tmp_path, "member")
    assert len(member_probs) == 2 and np.allclose(fused, np.mean(member_probs, axis=0), atol=1e-5)
    assert results["fused/params"] == sum(results[f"member/{m}/params"] for m in members)
    for m in members:
        ratio = results[f"compressed/{m}/compression_ratio"]
        if recipe == "prune_global":  # masks made permanent: as many bytes, 90% of the pruned weights zero
            assert results[f"compressed/{m}/nonzero_fraction"] < 0.5 and ratio == pytest.approx(1.0, abs=0.01)
        elif recipe == "distill":  # the student from conf/model replaced the member
            student = build_model(with_data_values(cfg, as_source(build(cfg.data, "data"))).compress.student)
            assert results[f"compressed/{m}/params"] == sum(p.numel() for p in student.parameters())
        else:  # quantization or structured pruning makes the file smaller
            assert ratio > 1.2
        if recipe == "prune_structured":  # the rebuilt layers: as many parameters as the step reported
            assert (
                results[f"compressed/{m}/params"]
                == results[f"compressed/{m}/prune/params_after"]
                < results[f"member/{m}/params"]
            )


def test_a_user_datamodule_without_num_classes_is_counted_once():
    class NoCount(DigitsDataModule):
        num_classes = None

    source = as_source(NoCount())
    source.setup()
    assert source.num_classes == 10 and source.input_spec == {"shape": [1, 8, 8], "dtype": "float32"}


def test_datasets_without_val_get_a_stratified_val_split():
    dm = DatasetDataModule(DictDigits("train"), DictDigits("test"), val_fraction=0.25)
    dm.setup()
    val = np.concatenate([split_batch(b)[1].numpy() for b in dm.val_dataloader()])
    train = np.concatenate([split_batch(b)[1].numpy() for b in dm.train_dataloader()])
    assert len(val) + len(train) == len(DictDigits("train")) and abs(len(val) / (len(val) + len(train)) - 0.25) < 0.01
    assert np.abs(np.bincount(val) / len(val) - np.bincount(train) / len(train)).max() < 0.02
    assert dm.num_classes == 10 and dm.input_spec == {"shape": [1, 8, 8], "dtype": "float32"}


def test_describe_data_fills_what_models_interpolate(tmp_path, files):
    cfg = compose_config(
        ["data=text", f"data.path={files['root']}/reviews.jsonl", "data.max_length=12", "model=bert_tiny"], tmp_path
    )
    dm = as_source(build(cfg.data, "data"))
    spec = describe_data(cfg, dm)
    assert cfg.data.max_length == 12 and cfg.data.num_classes == 2 == spec.num_classes
    assert cfg.data.vocab_size == len(dm.tokenizer) and cfg.model.config.vocab_size == len(dm.tokenizer)
    assert spec.example["input_ids"].shape == (8, 12) and spec.example["input_ids"].dtype == torch.long


@pytest.mark.slow
def test_the_worked_example_runs_from_outside_the_package(tmp_path):
    """examples/byo: a user's model file, datamodule file and YAML, with --config-dir."""
    cmd = [
        sys.executable,
        "-m",
        "runner",
        "--config-dir",
        "conf",
        "experiment=byo",
        "trainer=fast",
        "compress.steps.0.finetune_epochs=1",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.artifact_location={tmp_path}/art",
        f"cache.dir={tmp_path}/cache",
        f"hydra.run.dir={tmp_path}/run",
    ]
    out = subprocess.run(cmd, cwd=EXAMPLE, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split()[0] for line in out.stdout.splitlines() if line.startswith(("member/", "fused", "compressed/"))]
    assert rows == [
        "member/small_cnn-s0",
        "member/small_cnn-s1",
        "member/small_cnn-s2",
        "fused",
        "compressed/small_cnn-s0",
        "compressed/small_cnn-s1",
        "compressed/small_cnn-s2",
    ]
    # 90% of the prunable weights (conv2 and the classifier; conv1 has < 200) are zero: 298 dense + 493 kept
    assert all(line.split()[6] == "791" for line in out.stdout.splitlines() if line.startswith("compressed/"))
