"""Data that is not arrays in memory: torch Datasets and a user's own LightningDataModule.

`as_source(obj)` brings whatever `data._target_` built to the contract of runner.data.base
(train/val/test loaders, `num_classes`, `input_spec` after `setup()`); `DatasetDataModule` serves
torch Datasets (a user's, or image files read lazily) through DataLoaders with workers and
pinned memory.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, open_dict
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, Subset

from runner.batches import DataSpec, describe, first_inputs, split_batch, tag_split
from runner.data.base import ArrayDataModule, SplitLoaders, check_num_classes, check_split_settings, seeded_loader
from runner.errors import ConfigError, check

log = logging.getLogger(__name__)


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Every label of a dataset: its `targets`/`labels` attribute when it has one (torchvision's
    datasets do), else read sample by sample."""
    for attr in ("targets", "labels"):
        labels = getattr(dataset, attr, None)
        if labels is not None:
            return np.asarray(labels, dtype=np.int64)
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices)]
    return np.asarray([int(split_batch(dataset[i])[1]) for i in range(len(dataset))], dtype=np.int64)


class DatasetDataModule(SplitLoaders, pl.LightningDataModule):
    """torch Datasets for train and test (and val, or a stratified `val_fraction` of train).

    Samples are `(x, y)` or dicts with labels; DataLoaders use `num_workers` processes and pinned
    memory when asked. `num_classes` is counted from the labels when not given. Subclasses
    (image folders) override `datasets()`.
    """

    def __init__(
        self,
        train: Dataset | None = None,
        test: Dataset | None = None,
        val: Dataset | None = None,
        num_classes: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        check_split_settings(batch_size, eval_batch_size, val_fraction)
        check(isinstance(num_workers, int) and num_workers >= 0, "data.num_workers", num_workers, "an integer >= 0")
        self.given = {"train": train, "val": val, "test": test}
        self.num_classes, self.batch_size, self.eval_batch_size = num_classes, batch_size, eval_batch_size
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.data: dict[str, Dataset] = {}
        self.input_spec: dict[str, Any] = {}

    def datasets(self) -> dict[str, Dataset | None]:
        for split in ("train", "test"):
            check(self.given[split] is not None, f"data.{split}", None, "a torch Dataset (a `_target_` node)")
        return dict(self.given)

    def setup(self, stage: str | None = None) -> None:
        if self.data:
            return
        data = self.datasets()
        labels = {"train": dataset_labels(data["train"]), "test": dataset_labels(data["test"])}
        if data.get("val") is None:
            index = np.arange(len(labels["train"]))
            train, val = train_test_split(
                index, test_size=self.val_fraction, random_state=self.split_seed, stratify=labels["train"]
            )
            data["val"], data["train"] = Subset(data["train"], val.tolist()), Subset(data["train"], train.tolist())
            labels["val"], labels["train"] = labels["train"][val], labels["train"][train]
        self.data = data
        self.num_classes = check_num_classes(self.num_classes, [torch.as_tensor(y) for y in labels.values()])
        self.input_spec = describe(first_inputs(self.loader("val"), 1))

    def loader(self, split: str, shuffle: bool = False) -> Any:
        self.setup()
        size = self.batch_size if split == "train" else self.eval_batch_size
        return seeded_loader(self.data[split], size, shuffle, self.num_workers, self.pin_memory, split)


class LightningSource(pl.LightningDataModule):
    """A user's LightningDataModule under the contract: its own loaders, `num_classes` from its
    attribute of that name (else counted from the training labels, one pass), `input_spec` from
    one validation batch. Its loaders must yield (x, y) or dicts with labels."""

    def __init__(self, datamodule: pl.LightningDataModule, num_classes: int | None = None) -> None:
        super().__init__()
        self.inner = datamodule
        self.num_classes = num_classes if num_classes is not None else getattr(datamodule, "num_classes", None)
        self.input_spec: dict[str, Any] = {}
        self._ready = False

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        self.inner.prepare_data()
        self.inner.setup("fit")
        self.inner.setup("test")
        name = type(self.inner).__name__
        for split in ("train", "val", "test"):
            try:
                getattr(self.inner, f"{split}_dataloader")()
            except Exception as e:  # noqa: BLE001 - Lightning's default raises MisconfigurationException
                raise ConfigError(
                    "data._target_",
                    name,
                    f"a LightningDataModule with train, val and test loaders "
                    f"(members train on train, fusion fits on val, every number comes from test); "
                    f"{split}_dataloader() failed: {e}",
                ) from e
        if self.num_classes is None:
            log.info(
                "data: counting the classes of %s's training labels (give it a num_classes attribute "
                "to skip this pass)",
                name,
            )
            labels = [split_batch(b)[1] for b in self.inner.train_dataloader()]
            self.num_classes = check_num_classes(None, labels)
        self.input_spec = describe(first_inputs(self.inner.val_dataloader(), 1))
        self._ready = True

    # the user's loaders, tagged with their split (split provenance, runner.batches; their batches
    # are not shown to watchers: they are the user's objects)
    def train_dataloader(self) -> Any:
        return tag_split(self.inner.train_dataloader(), "train")

    def val_dataloader(self) -> Any:
        return tag_split(self.inner.val_dataloader(), "val")

    def test_dataloader(self) -> Any:
        return tag_split(self.inner.test_dataloader(), "test")


def as_source(obj: Any) -> pl.LightningDataModule:
    """The object `data._target_` built, under the data contract (ours pass through unchanged)."""
    if isinstance(obj, (ArrayDataModule, DatasetDataModule, LightningSource)):
        return obj
    if isinstance(obj, pl.LightningDataModule):
        return LightningSource(obj)
    raise ConfigError(
        "data._target_",
        type(obj).__name__,
        "a LightningDataModule (yours, or one of runner.data); for torch Datasets use "
        "data=dataset with data.train._target_ and data.test._target_",
    )


def data_values(dm: Any) -> dict[str, Any]:
    """What model configs interpolate from the data (`${data.num_classes}`, `${data.input_shape}`,
    `${data.num_features}`, and a source's own, e.g. `${data.vocab_size}`), after `setup()`."""
    values: dict[str, Any] = {"num_classes": int(dm.num_classes)}
    spec = dm.input_spec
    if "shape" in spec:
        values["input_shape"] = list(spec["shape"])
        values["num_features"] = int(np.prod(spec["shape"])) if spec["shape"] else 1
    values.update(getattr(dm, "config_values", dict)())
    return values


def data_spec(dm: Any, examples: int = 8) -> DataSpec:
    """Set up the data source and return the spec every check before training runs against (a few
    real validation inputs included)."""
    dm.setup()
    return DataSpec(int(dm.num_classes), first_inputs(dm.val_dataloader(), examples), dm.input_spec)


def with_data_values(cfg: DictConfig, dm: Any) -> DictConfig:
    """A copy of `cfg` whose `data` node also holds what the data source found (`data_values`:
    num_classes, input_shape, num_features, a source's own values), so the models' configs resolve
    `${data.num_classes}` and the like; `cfg` itself is left as it is."""
    dm.setup()
    derived = copy.deepcopy(cfg)
    with open_dict(derived):
        for key, value in data_values(dm).items():
            derived.data[key] = value
    return derived


def describe_data(cfg: Any, dm: Any, examples: int = 8) -> DataSpec:
    """`data_spec`, with what the data holds written into `cfg.data` itself: for a caller that builds
    models from the very config it holds (the pipeline builds from `with_data_values`'s copy)."""
    spec = data_spec(dm, examples)
    with open_dict(cfg):
        for key, value in data_values(dm).items():
            cfg.data[key] = value
    return spec
