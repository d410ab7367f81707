"""data=elpv: the solar-cell images of the elpv-dataset package, their three tasks, splits and sizes."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import compose_config
from PIL import Image

from runner.config import build
from runner.data import elpv
from runner.data.elpv import ELPV
from runner.errors import ConfigError

N_IMAGES = 2624


@pytest.fixture(scope="module")
def labels_csv():
    return elpv.package_file(elpv.PACKAGE, elpv.LABELS, "data", "elpv")


@pytest.fixture(scope="module")
def table(labels_csv) -> pd.DataFrame:
    """labels.csv read by pandas (whitespace-separated: path, defect probability, module type)."""
    return pd.read_csv(labels_csv, sep=r"\s+", header=None, names=["path", "probability", "type"])


def expected_counts(table: pd.DataFrame, task: str) -> list[int]:
    """Images per class, in the order of the task's class names, counted from the table."""
    if task == "defect":
        counts = table["probability"].round(2).value_counts()
        return [int(counts.get(p, 0)) for p in (0.0, 0.33, 0.67, 1.0)]
    if task == "defective":
        defective = int((table["probability"] >= 0.5).sum())
        return [len(table) - defective, defective]
    counts = table["type"].value_counts()
    return [int(counts["mono"]), int(counts["poly"])]


def cell_numbers(folder, paths, size):
    """Stands in for read_images: each image's pixels hold its cell number (cellNNNN.png), so tests
    can tell which images a split holds without decoding 2,624 PNGs."""
    numbers = [int(re.search(r"cell(\d+)", p).group(1)) for p in paths]
    return np.broadcast_to(np.array(numbers, dtype=np.float32)[:, None, None, None], (len(paths), 1, size, size)).copy()


def split_cells(dm: ELPV) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(cell numbers, labels) of every split of a datamodule set up with `cell_numbers` pixels."""
    dm.setup()
    return {split: (x[:, 0, 0, 0].numpy().astype(int), y.numpy()) for split, (x, y) in dm.splits.items()}


@pytest.fixture
def numbered(monkeypatch):
    monkeypatch.setattr(elpv, "read_images", cell_numbers)


@pytest.mark.parametrize("task", ["defect", "defective", "type"])
def test_class_counts_on_the_full_set(task, table, numbered):
    dm = ELPV(task=task, image_size=1)
    cells = split_cells(dm)
    labels = np.concatenate([y for _, y in cells.values()])
    assert len(labels) == N_IMAGES == len(table)
    assert np.bincount(labels, minlength=len(dm.classes)).tolist() == expected_counts(table, task)
    assert dm.num_classes == len(dm.classes) == len(elpv.TASKS[task])
    # and each cell carries its own row's label
    by_cell = dict(zip(np.concatenate([c for c, _ in cells.values()]), labels))
    row = table.iloc[42]
    cell = int(re.search(r"cell(\d+)", row["path"]).group(1))
    expected = {
        "defect": round(row["probability"] * 3),
        "defective": int(row["probability"] >= 0.5),
        "type": ["mono", "poly"].index(row["type"]),
    }[task]
    assert by_cell[cell] == expected


@pytest.mark.slow
def test_every_image_reads(table):
    """All 2,624 PNGs decode (real pixels, resized small); the counts are labels.csv's."""
    dm = ELPV(task="defect", image_size=8)
    dm.setup()
    x = torch.cat([x for x, _ in dm.splits.values()])
    labels = torch.cat([y for _, y in dm.splits.values()])
    assert x.shape == (N_IMAGES, 1, 8, 8) and 0.0 <= float(x.min()) < float(x.max()) <= 1.0
    assert torch.bincount(labels).tolist() == expected_counts(table, "defect")


def test_class_names():
    assert ELPV(task="defect").classes == ["0%", "33%", "67%", "100%"]
    assert ELPV(task="defective").classes == ["functional", "defective"]
    assert ELPV(task="type").classes == ["mono", "poly"]


def test_splits_are_stratified_disjoint_and_reproducible(numbered):
    cells = split_cells(ELPV(task="defect", image_size=1, split_seed=3))
    ids = {split: set(c.tolist()) for split, (c, _) in cells.items()}
    assert len(ids["train"]) + len(ids["val"]) + len(ids["test"]) == N_IMAGES
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    totals = np.bincount(np.concatenate([y for _, y in cells.values()]))
    test_share = np.bincount(cells["test"][1], minlength=4)
    assert len(cells["test"][1]) == round(0.25 * N_IMAGES)
    assert np.all(np.abs(test_share - 0.25 * totals) <= 1)  # every class a quarter, to one image
    val_share = np.bincount(cells["val"][1], minlength=4)
    assert np.all(np.abs(val_share - 0.1 * (totals - test_share)) <= 1)
    again = split_cells(ELPV(task="defect", image_size=1, split_seed=3))
    assert all(np.array_equal(again[s][0], cells[s][0]) for s in cells)
    other = split_cells(ELPV(task="defect", image_size=1, split_seed=4))
    assert set(other["test"][0].tolist()) != ids["test"]


def test_max_images_is_a_stratified_seeded_subset(numbered, table):
    cells = split_cells(ELPV(task="defective", image_size=1, max_images=200, test_fraction=0.2))
    labels = np.concatenate([y for _, y in cells.values()])
    assert len(labels) == 200 and len(cells["test"][1]) == 40
    full = np.array(expected_counts(table, "defective"))
    assert np.all(np.abs(np.bincount(labels) - 200 * full / full.sum()) <= 1)
    again = split_cells(ELPV(task="defective", image_size=1, max_images=200, test_fraction=0.2))
    assert np.array_equal(again["test"][0], cells["test"][0])
    assert len(np.concatenate([c for c, _ in split_cells(ELPV(image_size=1, max_images=10_000)).values()])) == N_IMAGES


def test_images_are_resized_floats_in_unit_range(labels_csv):
    dm = ELPV(task="type", image_size=32, max_images=40)
    dm.setup()
    x, _ = dm.splits["train"]
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 32, 32)
    assert sum(len(y) for _, y in dm.splits.values()) == 40
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.05
    assert dm.input_spec["shape"] == [1, 32, 32]
    # the pixels are the package's images, resized by Pillow
    with Image.open(labels_csv.parent / "images" / "cell0001.png") as image:
        native = np.asarray(image, dtype=np.float32) / 255
        small = np.asarray(image.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    full = elpv.read_images(labels_csv.parent, ["images/cell0001.png"], 300)
    assert full.shape == (1, 1, 300, 300) and np.array_equal(full[0, 0], native)
    assert np.array_equal(elpv.read_images(labels_csv.parent, ["images/cell0001.png"], 32)[0, 0], small)


def test_native_size_by_default(numbered):
    dm = ELPV(task="type", max_images=40)
    assert dm.image_size == 300
    dm.setup()
    assert dm.splits["test"][0].shape[1:] == (1, 300, 300)


@pytest.mark.parametrize(
    "key, kwargs",
    [
        ("data.task", {"task": "severity"}),
        ("data.image_size", {"image_size": 0}),
        ("data.max_images", {"max_images": 0}),
        ("data.test_fraction", {"test_fraction": 1.0}),
    ],
)
def test_bad_values_are_config_errors(key, kwargs):
    with pytest.raises(ConfigError) as error:
        ELPV(**kwargs)
    assert error.value.key == key
    if key == "data.task":
        assert error.value.allowed == ["defect", "defective", "type"]


def test_small_subsets_keep_every_class(numbered):
    """The 67% class is 4% of the images: a subset of 40 still holds 3 of every class, and test and val
    at least one image per class each (40 -> 26 train, 4 val, 10 test)."""
    cells = split_cells(ELPV(task="defect", image_size=1, max_images=40))
    labels = np.concatenate([y for _, y in cells.values()])
    assert np.bincount(labels, minlength=4).min() >= 3 and len(labels) == 40
    assert {s: len(y) for s, (_, y) in cells.items()} == {"train": 26, "val": 4, "test": 10}
    with pytest.raises(ConfigError, match=r"data\.max_images=11; allowed: null or >= 12"):
        ELPV(task="defect", max_images=11)
    assert len(np.concatenate([c for c, _ in split_cells(ELPV(task="type", image_size=1, max_images=6)).values()])) == 6


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(elpv, "PACKAGE", "no_such_elpv_package")
    with pytest.raises(ConfigError, match=r"elpv-dataset installed.*\[pretrained\]"):
        ELPV()


def test_image_size_follows_the_model(tmp_path):
    """data.image_size reads model.input_size: an image model's size is not repeated by the user."""
    assert compose_config(["model=efficientnet_lite0", "data=elpv"], tmp_path).data.image_size == 224
    assert compose_config(["model=efficientnet_lite2", "data=elpv"], tmp_path).data.image_size == 260
    cfg = compose_config(
        ["model=efficientnet_lite0", "data=elpv", "model.input_size=64", "data.max_images=40"], tmp_path
    )
    assert cfg.data.image_size == 64
    dm = build(cfg.data, "data")
    assert isinstance(dm, ELPV) and dm.image_size == 64 and dm.max_images == 40
    assert compose_config(["data=elpv"], tmp_path).data.image_size is None  # the default model has no input_size
    cfg = compose_config(["model=efficientnet_lite0", "data=elpv", "data.image_size=96"], tmp_path)
    assert cfg.data.image_size == 96
