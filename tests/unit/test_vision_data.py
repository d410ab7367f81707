"""Image datasets in their real on-disk formats (IDX, CIFAR python batches, image folders),
written tiny into tmp_path: no download, no torchvision."""

from __future__ import annotations

import importlib.abc
import pickle
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_config
from helpers.files import CIFAR_FOLDERS, write_cifar, write_folder, write_idx, write_mnist, write_png
from torch import nn

from runner.config import build
from runner.data.vision import ImageFolder, TorchvisionFormat, read_cifar, read_idx
from runner.errors import ConfigError
from runner.train import train_classifier

# ---- writers of the real formats -------------------------------------------------------------


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x}


def tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.tensor(ys)


def split_paths(dm: ImageFolder, split: str) -> list[str]:
    data = dm.data[split]
    if hasattr(data, "indices"):
        return [data.dataset.paths[i] for i in data.indices]
    return list(data.paths)


class HorizontalFlip:
    """A picklable per-sample transform (DataLoader workers may pickle the dataset)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, dims=[-1])


# ---- fake torchvision: records downloads instead of reaching the internet ---------------------


def fake_torchvision(monkeypatch, writer=None) -> list:
    """Install a torchvision whose dataset classes record their calls (and run `writer`)."""
    calls = []

    def dataset_class(cls_name):
        def create(root, train=True, download=False):
            calls.append((cls_name, root, train, download))
            if writer is not None and download:
                writer(Path(root))

        return create

    package, datasets = types.ModuleType("torchvision"), types.ModuleType("torchvision.datasets")
    for cls_name in ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100"):
        setattr(datasets, cls_name, dataset_class(cls_name))
    package.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    return calls


class BrokenTorchvision(importlib.abc.MetaPathFinder):
    """A torchvision built for another torch: importing it raises RuntimeError."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return None


# ---- raw readers ------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_reads_plain_and_gzipped_files(tmp_path, gz):
    x = np.random.default_rng(0).integers(0, 256, (4, 5, 6), dtype=np.uint8)
    write_idx(tmp_path / "images", x, gz)
    read = read_idx(tmp_path / ("images.gz" if gz else "images"))
    assert read.dtype == np.uint8 and np.array_equal(read, x)
    write_idx(tmp_path / "labels", np.array([3, 1, 4]), gz)
    assert read_idx(tmp_path / ("labels.gz" if gz else "labels")).tolist() == [3, 1, 4]


def test_read_idx_rejects_other_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x89PNG\r\n\x1a\n....")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((2, 3), dtype=np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="expected"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_read_cifar_gives_chw_uint8_and_fine_labels(tmp_path, name):
    written = write_cifar(tmp_path, name)
    read = read_cifar(tmp_path / CIFAR_FOLDERS[name], name)
    for split in ("train", "test"):
        x, y = read[split]
        assert x.dtype == np.uint8 and x.shape[1:] == (3, 32, 32) and y.dtype == np.int64
        assert np.array_equal(x, written[split][0]) and np.array_equal(y, written[split][1])
    # a row of the file is 1024 red, then 1024 green, then 1024 blue values, row-major
    with open(tmp_path / CIFAR_FOLDERS[name] / ("test_batch" if name == "cifar10" else "test"), "rb") as f:
        row = pickle.load(f, encoding="bytes")[b"data"][0]
    assert np.array_equal(read["test"][0][0, 1].ravel(), row[1024:2048])


# ---- TorchvisionFormat ------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_formats_load_as_unit_float_images(tmp_path, name, gz):
    written = write_mnist(tmp_path, name, gz)
    dm = TorchvisionFormat(name, root=str(tmp_path), scaling="none", val_fraction=0.2)
    dm.setup()
    (xtr, ytr), (xva, yva), (xte, yte) = (dm.splits[s] for s in ("train", "val", "test"))
    assert (xtr.shape, xva.shape, xte.shape) == ((80, 1, 28, 28), (20, 1, 28, 28), (20, 1, 28, 28))
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.long
    assert 0.0 <= float(xtr.min()) and float(xtr.max()) <= 1.0
    x_test, y_test = written["test"]  # test keeps the file's order
    assert torch.allclose(xte[:, 0], torch.from_numpy(x_test).float() / 255)
    assert yte.tolist() == y_test.tolist()
    assert Counter(yva.tolist()) == {c: 2 for c in range(10)}  # stratified: 20% of 10 per class
    assert not rows(xtr) & rows(xva)
    assert rows(xtr) | rows(xva) == rows(torch.from_numpy(written["train"][0]).float()[:, None] / 255)
    assert dm.num_classes == 10 and dm.input_spec == {"shape": [1, 28, 28], "dtype": "float32"}


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_formats_load_and_scale_per_channel(tmp_path, name):
    written = write_cifar(tmp_path, name)
    dm = TorchvisionFormat(name, root=str(tmp_path), val_fraction=0.2)  # default scaling: channel
    dm.setup()
    (xtr, ytr), (xva, yva), (xte, yte) = (dm.splits[s] for s in ("train", "val", "test"))
    n_train, n_test = len(written["train"][1]), len(written["test"][1])
    assert len(ytr) + len(yva) == n_train and len(yte) == n_test and len(yva) == n_train // 5
    assert xtr.shape[1:] == xte.shape[1:] == (3, 32, 32) and xtr.dtype == torch.float32
    assert torch.allclose(xtr.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)  # statistics of train
    assert torch.allclose(xtr.std((0, 2, 3)), torch.ones(3), atol=1e-3)
    assert set(Counter(yva.tolist()).values()) == {2}
    assert yte.tolist() == written["test"][1].tolist()
    assert dm.num_classes == (10 if name == "cifar10" else 100) and not rows(xtr) & rows(xva)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_missing_files_name_data_root_and_never_download(tmp_path, monkeypatch, name):
    calls = fake_torchvision(monkeypatch)
    dm = TorchvisionFormat(name, root=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError) as e:
        dm.setup()
    assert e.value.key == "data.root" and "data.download=true" in str(e.value)
    assert str(tmp_path / "nowhere") in str(e.value)
    assert calls == [] and not (tmp_path / "nowhere").exists()


def test_partial_files_are_missing_files(tmp_path):
    write_mnist(tmp_path, "mnist", gz=False)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte") as e:
        TorchvisionFormat("mnist", root=str(tmp_path)).setup()
    assert e.value.key == "data.root"


@pytest.mark.parametrize("failure", ["missing", "broken build"])
def test_download_without_a_working_torchvision_names_data_download(tmp_path, monkeypatch, failure):
    monkeypatch.delitem(sys.modules, "torchvision.datasets", raising=False)
    if failure == "missing":
        monkeypatch.setitem(sys.modules, "torchvision", None)  # import raises ImportError
    else:
        monkeypatch.delitem(sys.modules, "torchvision", raising=False)
        monkeypatch.setattr(sys, "meta_path", [BrokenTorchvision(), *sys.meta_path])
    dm = TorchvisionFormat("cifar10", root=str(tmp_path), download=True)
    with pytest.raises(ConfigError, match="torchvision installed") as e:
        dm.setup()
    assert e.value.key == "data.download"


@pytest.mark.parametrize("name", ["mnist", "cifar100"])
def test_download_true_fetches_with_torchvision_then_reads(tmp_path, monkeypatch, name):
    def writer(root: Path) -> None:  # what torchvision's download leaves on disk
        if name == "mnist":
            write_mnist(root, name, gz=True)
        else:
            write_cifar(root, name)

    calls = fake_torchvision(monkeypatch, writer)
    dm = TorchvisionFormat(name, root=str(tmp_path / "data"), download=True, val_fraction=0.2)
    dm.setup()
    assert calls == [({"mnist": "MNIST", "cifar100": "CIFAR100"}[name], str(tmp_path / "data"), True, True)]
    assert len(dm.splits["test"][1]) == (20 if name == "mnist" else 15)
    again = TorchvisionFormat(name, root=str(tmp_path / "data"), download=True, val_fraction=0.2)
    again.setup()
    assert len(calls) == 1  # files present: no second download


def test_bad_torchvision_format_arguments_name_the_key():
    with pytest.raises(ConfigError) as e:
        TorchvisionFormat("svhn")
    assert e.value.key == "data.name"


def test_yaml_configs_build_the_sources(tmp_path):
    write_mnist(tmp_path, "fashion_mnist", gz=True)
    cfg = compose_config(["data=fashion_mnist", f"data.root={tmp_path}", "data.val_fraction=0.2"])
    dm = build(cfg.data, "data")
    assert isinstance(dm, TorchvisionFormat) and dm.download is False and dm.batch_size == 128
    dm.setup()
    assert dm.splits["train"][0].shape[1:] == (1, 28, 28)
    folder = write_folder(tmp_path / "images")
    cfg = compose_config(["data=image_folder", f"data.path={folder}", "data.image_size=[4,6]"])
    dm = build(cfg.data, "data")
    dm.setup()
    assert isinstance(dm, ImageFolder) and dm.input_spec["shape"] == [3, 4, 6]


# ---- ImageFolder ------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_folder(tmp_path / "images")


def test_image_folder_classes_splits_and_shapes(folder):
    dm = ImageFolder(str(folder), val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    assert dm.classes == ["cat", "dog", "frog"] and dm.num_classes == 3
    paths = {s: split_paths(dm, s) for s in ("train", "val", "test")}
    assert [len(p) for p in paths.values()] == [19, 5, 6]
    train, val, test = (set(p) for p in paths.values())
    assert not train & val and not test & (train | val)
    assert set().union(*paths.values()) == {str(p) for p in folder.rglob("*.png")}
    x, y = tensors(dm.data["test"])
    assert Counter(y.tolist()) == {0: 2, 1: 2, 2: 2}  # stratified test split
    assert x.shape == (6, 3, 8, 8) and x.dtype == torch.float32  # the grayscale variant too: RGB
    for path, label in zip(paths["test"], y.tolist()):
        assert Path(path).parent.name == dm.classes[label]
    assert dm.input_spec == {"shape": [3, 8, 8], "dtype": "float32"}
    train_x, _ = tensors(dm.data["train"])  # normalized with the training images' statistics
    assert torch.allclose(train_x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(train_x.std((0, 2, 3)), torch.ones(3), atol=1e-2)


def test_image_folder_channels_from_first_image_or_given(tmp_path):
    gray = write_folder(tmp_path / "gray", mode="L", gray_variant=False)
    dm = ImageFolder(str(gray), val_fraction=0.2)
    dm.setup()
    assert dm.input_spec["shape"] == [1, 8, 8]
    dm = ImageFolder(str(gray), val_fraction=0.2, channels=3)
    dm.setup()
    assert dm.input_spec["shape"] == [3, 8, 8]


def test_image_folder_given_mean_and_std(folder):
    dm = ImageFolder(str(folder), val_fraction=0.2, mean=[0.5], std=[0.25, 0.5, 1.0])
    dm.setup()
    x, _ = dm.data["test"][0]
    raw = dm.data["test"].read(0)
    expected = (raw - 0.5) / torch.tensor([0.25, 0.5, 1.0])[:, None, None]
    assert torch.allclose(x, expected)
    with pytest.raises(ConfigError) as e:
        ImageFolder(str(folder), mean=[0.1, 0.2], std=[1.0]).setup()
    assert e.value.key == "data.mean"


def test_image_folder_test_path_keeps_training_classes(tmp_path, folder):
    test = write_folder(tmp_path / "test", per_class=2, classes=("dog", "frog"), gray_variant=False)
    dm = ImageFolder(str(folder), test_path=str(test), val_fraction=0.2)
    dm.setup()
    _, y = tensors(dm.data["test"])
    assert sorted(y.tolist()) == [1, 1, 2, 2]  # dog and frog keep their training indices
    assert len(dm.data["train"]) + len(dm.data["val"]) == 30
    write_png(test / "bird" / "0.png", (8, 8), "RGB", 0)
    with pytest.raises(ConfigError, match="bird") as e:
        ImageFolder(str(folder), test_path=str(test)).setup()
    assert e.value.key == "data.test_path"


def test_image_folder_resizes_mixed_sizes(tmp_path):
    mixed = write_folder(tmp_path / "mixed", sizes=((8, 8), (12, 10), (5, 7)))
    dm = ImageFolder(str(mixed), image_size=[6, 5], val_fraction=0.2)
    dm.setup()
    x, _ = tensors(dm.data["train"])
    assert x.shape[1:] == (3, 6, 5)
    dm = ImageFolder(str(mixed), image_size=4, val_fraction=0.2)
    dm.setup()
    assert dm.input_spec["shape"] == [3, 4, 4]


def test_image_folder_mixed_sizes_need_image_size(tmp_path):
    mixed = write_folder(tmp_path / "mixed", sizes=((8, 8), (12, 10)))
    with pytest.raises(ConfigError) as e:
        ImageFolder(str(mixed)).setup()
    assert e.value.key == "data.image_size"


def test_image_folder_bad_folders_name_data_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    write_png(tmp_path / "flat" / "0.png", (8, 8), "RGB", 0)  # images but no class subfolders
    (tmp_path / "hollow" / "cat").mkdir(parents=True)  # a class folder without images
    write_png(tmp_path / "hollow" / "dog" / "0.png", (8, 8), "RGB", 0)
    for name in ("empty", "flat", "hollow", "absent"):
        with pytest.raises(ConfigError) as e:
            ImageFolder(str(tmp_path / name)).setup()
        assert e.value.key == "data.path", name
    with pytest.raises(ConfigError) as e:
        ImageFolder(str(tmp_path / "flat"), image_size=[0, 3])
    assert e.value.key == "data.image_size"


def test_train_transforms_apply_to_training_samples_only(folder):
    plain = ImageFolder(str(folder), val_fraction=0.2)
    flipped = ImageFolder(str(folder), val_fraction=0.2, train_transforms=[HorizontalFlip()])
    plain.setup()
    flipped.setup()
    for i in range(3):
        assert torch.equal(flipped.data["train"][i][0], torch.flip(plain.data["train"][i][0], dims=[-1]))
        assert torch.equal(flipped.data["val"][i][0], plain.data["val"][i][0])
        assert torch.equal(flipped.data["test"][i][0], plain.data["test"][i][0])
    assert not torch.equal(flipped.data["train"][0][0], plain.data["train"][0][0])
    restored = pickle.loads(pickle.dumps(flipped.data["train"]))  # what spawned workers receive
    assert torch.equal(restored[0][0], flipped.data["train"][0][0])


def test_image_folder_with_a_worker_process(folder):
    inline = ImageFolder(str(folder), val_fraction=0.2, batch_size=8)
    workers = ImageFolder(
        str(folder), val_fraction=0.2, batch_size=8, num_workers=1, train_transforms=[HorizontalFlip()]
    )
    inline.setup()
    workers.setup()
    x_inline = torch.cat([x for x, _ in inline.test_dataloader()])
    x_workers = torch.cat([x for x, _ in workers.test_dataloader()])
    assert torch.equal(x_inline, x_workers)
    seen = sum(len(y) for _, y in workers.train_dataloader())
    assert seen == len(workers.data["train"])


def test_a_model_trains_one_epoch_on_an_image_folder(folder):
    dm = ImageFolder(str(folder), val_fraction=0.2, batch_size=8)
    dm.setup()
    pl.seed_everything(0, verbose=False)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, dm.num_classes))
    before = [p.detach().clone() for p in net.parameters()]
    trained = train_classifier(
        net,
        dm,
        {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        {"name": "adam", "lr": 1e-2},
    )
    assert any(not torch.equal(a, b) for a, b in zip(before, trained.parameters()))
    x, _ = next(iter(dm.test_dataloader()))
    assert trained(x).shape == (len(x), 3)


def test_a_folder_of_corrupt_images_names_the_file(tmp_path):
    from runner.data import ImageFolder
    from runner.errors import ConfigError

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(4):
            (tmp_path / label / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(
        ConfigError, match=r"^Invalid config: data.path='.*\.png'; allowed: readable image files \(Pillow: "
    ):
        ImageFolder(str(tmp_path)).setup()
