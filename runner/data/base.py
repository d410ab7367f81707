"""The data contract, and in-memory data as a LightningDataModule.

Every data source the pipeline takes is a LightningDataModule with train/val/test loaders whose
batches `split_batch` understands, `num_classes` and `input_spec` (what one input looks like),
both known after `setup()`. The pipeline depends on nothing else (see `runner.data.sources.as_source`
for how a user's own datamodule is brought to it).

Data that fits in memory (ArrayDataModule) keeps a fast path: batches are sliced straight from
tensors instead of collating samples through a DataLoader (~2.5x faster for tiny models). With
per-sample augmentation (`train_transforms`), worker processes (`num_workers > 0`) or
`loader: dataloader`, the same arrays go through a standard DataLoader instead; both paths see
the same batches in the same order (tested).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from runner.batches import Chunk, Inputs, describe, notify, take, to_device, watched, watching
from runner.errors import check

log = logging.getLogger(__name__)

SCALINGS = ("none", "standard", "channel")
LOADERS = ("auto", "tensors", "dataloader")
Split = tuple[Any, Any]  # (inputs, labels): arrays, a dict of arrays, a DataFrame or a list of texts


def distributed_shard() -> tuple[int, int]:
    """(rank, world size) of this process in a torch.distributed group; (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TensorBatches:
    """An iterable of (x, y) batches sliced from in-memory tensors; reshuffled each epoch.

    `x` is a tensor or a dict of tensors. With `chunk=k` it yields Chunks of k consecutive batches
    instead (the last may be shorter): the training module takes k optimizer steps per Lightning
    step, which divides Lightning's per-step overhead by k. `chunk=0` puts a whole epoch in one.

    Under DDP (a torch.distributed group of N processes) a shuffled (training) loader gives each rank
    its own 1/N of every epoch: the ranks draw the same permutation (same seed) and take every N-th
    sample of it from their rank on, the same count each (the remainder is dropped, as
    DistributedSampler(drop_last=True) does). Evaluation loaders are not split.

    `split` says which split the tensors are (train / val / test), and their batches are shown to split
    provenance's watchers (runner.batches); None: batches of something else, e.g. a fusion head's
    minibatches of features of the val rows its fit already read, which are not shown.
    """

    def __init__(
        self,
        x: Inputs,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        chunk: int | None = None,
        split: str | None = None,
    ) -> None:
        self.x, self.y, self.batch_size, self.shuffle, self.chunk = x, y, batch_size, shuffle, chunk
        self.split = split
        self.generator = torch.Generator().manual_seed(seed)

    def _shard(self) -> tuple[int, int]:
        return distributed_shard() if self.shuffle else (0, 1)

    def num_samples(self) -> int:
        return len(self.y) // self._shard()[1]

    def num_batches(self) -> int:
        return (self.num_samples() + self.batch_size - 1) // self.batch_size

    def __len__(self) -> int:
        if self.chunk is None:
            return self.num_batches()
        return 1 if self.chunk == 0 else (self.num_batches() + self.chunk - 1) // self.chunk

    def batches(self) -> Iterator[tuple[Inputs, torch.Tensor]]:
        x, y = self.x, self.y
        if self.shuffle:
            rank, world = self._shard()
            order = torch.randperm(len(y), generator=self.generator)[rank::world][: self.num_samples()].to(y.device)
            x, y = take(x, order), y[order]
        for start in range(0, len(y), self.batch_size):
            window = slice(start, start + self.batch_size)
            yield take(x, window), y[window]

    def __iter__(self) -> Iterator:
        batches = watched(self.split, self.batches()) if self.split and watching() else self.batches()
        if self.chunk is None:
            yield from batches
            return
        size = self.chunk or self.num_batches()
        chunk = Chunk()
        for batch in batches:
            chunk.append(batch)
            if len(chunk) == size:
                yield chunk
                chunk = Chunk()
        if chunk:
            yield chunk


class ArrayDataset(Dataset):
    """Samples of in-memory tensors, optionally transformed one by one (augmentation)."""

    def __init__(self, x: Inputs, y: torch.Tensor, transform: Callable | None = None) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        x = take(self.x, i)
        return (self.transform(x) if self.transform else x), self.y[i]


class Transforms:
    """Per-sample transforms applied in order; a class (not a closure) so DataLoader workers
    started by spawn (macOS, Windows) can pickle it."""

    def __init__(self, steps: Sequence[Callable]) -> None:
        self.steps = list(steps)

    def __call__(self, x: Any) -> Any:
        for step in self.steps:
            x = step(x)
        return x


def compose(transforms: Sequence[Callable] | Callable | None) -> Callable | None:
    """One callable from a list of per-sample transforms (built from `_target_` nodes in YAML)."""
    if transforms is None or callable(transforms):
        return transforms
    steps = list(transforms)
    for i, t in enumerate(steps):
        check(
            callable(t),
            f"data.train_transforms[{i}]",
            t,
            "a callable (a `_target_` node, e.g. "
            "torchvision.transforms.v2.RandomCrop with the vision extra) taking and returning one input",
        )
    return Transforms(steps) if steps else None


class Shuffled(Sampler):
    """One permutation per epoch from its own generator: the order TensorBatches slices in
    (torch's RandomSampler draws a second, empty permutation each epoch, which shifts the next)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.generator = n, torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


class SplitCollate:
    """torch's default_collate, then the batch shown to split provenance's watchers (runner.batches);
    a class, not a closure, so workers started by spawn can pickle it."""

    def __init__(self, split: str | None) -> None:
        self.split = split

    def __call__(self, samples: list) -> Any:
        batch = default_collate(samples)
        if watching():
            notify(self.split, batch)
        return batch


def seeded_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, pin_memory: bool, split: str | None = None
) -> DataLoader:
    """A DataLoader whose shuffle order follows torch's global RNG (the member's seed), drawn from a
    generator of its own: the worker seeds come from another, so they do not shift the order.
    `split` becomes `loader.split` (split provenance, runner.batches)."""
    seed = int(torch.randint(0, 2**62, ())) if shuffle else 0
    sampler = Shuffled(len(dataset), seed) if shuffle else None
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed + 1),
        collate_fn=SplitCollate(split),
    )
    loader.split = split
    return loader


def check_loader_settings(loader: str, num_workers: int) -> None:
    check(loader in LOADERS, "data.loader", loader, list(LOADERS))
    check(isinstance(num_workers, int) and num_workers >= 0, "data.num_workers", num_workers, "an integer >= 0")


def check_split_settings(batch_size: int, eval_batch_size: int, val_fraction: float) -> None:
    check(isinstance(batch_size, int) and batch_size >= 1, "data.batch_size", batch_size, "an integer >= 1")
    check(
        isinstance(eval_batch_size, int) and eval_batch_size >= 1,
        "data.eval_batch_size",
        eval_batch_size,
        "an integer >= 1",
    )
    check(0.0 < val_fraction < 1.0, "data.val_fraction", val_fraction, "a float in (0, 1)")


def check_num_classes(num_classes: int | None, labels: Sequence[torch.Tensor]) -> int:
    """The number of classes: `num_classes` if given (checked against the labels), else counted."""
    low = min(int(y.min()) for y in labels if len(y))
    found = max(int(y.max()) for y in labels if len(y)) + 1
    check(low >= 0, "data (labels)", low, "class indices 0 .. num_classes - 1")
    if num_classes is None:
        return found
    check(
        isinstance(num_classes, int) and num_classes >= found,
        "data.num_classes",
        num_classes,
        f">= {found} (labels found in the data)",
    )
    return num_classes


class SplitLoaders:
    """train/val/test loaders of a datamodule from its one `loader(split, shuffle)` method."""

    def train_dataloader(self) -> Any:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> Any:
        return self.loader("val")

    def test_dataloader(self) -> Any:
        return self.loader("test")


class ArrayDataModule(SplitLoaders, pl.LightningDataModule):
    """Base class of in-memory sources: subclasses implement `load()` returning
    {"train": (x, y), "test": (x, y)} and optionally "val"; `preprocess` turns raw splits (texts,
    tables) into arrays, fitted on the training split only.

    Without a "val" split, it is carved out of train with `split_seed`, stratified. `split_seed`
    is independent of the model seed, so every ensemble member sees the same partition (fusion
    is fitted on val, all reported numbers come from test). `scaling`: none, standard
    (scikit-learn's StandardScaler per feature, fitted on train) or channel (one mean and std per
    image channel, from train). `input_shape` reshapes each sample (e.g. 64 pixels -> [1, 8, 8]);
    `num_features`, when given, is checked against the data.
    """

    name: str = "array"

    def __init__(
        self,
        num_classes: int | None = None,
        batch_size: int = 100,
        eval_batch_size: int = 1000,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        scaling: str = "none",
        num_features: int | None = None,
        input_shape: Sequence[int] | None = None,
        loader: str = "auto",
        num_workers: int = 0,
        pin_memory: bool = False,
        train_transforms: Sequence[Callable] | None = None,
    ) -> None:
        super().__init__()
        check_split_settings(batch_size, eval_batch_size, val_fraction)
        check(scaling in SCALINGS, "data.scaling", scaling, list(SCALINGS))
        check_loader_settings(loader, num_workers)
        check(
            input_shape is None or all(int(d) >= 1 for d in input_shape),
            "data.input_shape",
            input_shape,
            "null or a list of positive sizes, e.g. [1, 28, 28]",
        )
        self.num_classes, self.num_features = num_classes, num_features
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.split_seed, self.scaling = val_fraction, split_seed, scaling
        self.input_shape = [int(d) for d in input_shape] if input_shape is not None else None
        self.train_transform = compose(train_transforms)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.mode = (
            loader if loader != "auto" else ("dataloader" if self.train_transform or num_workers > 0 else "tensors")
        )
        self.splits: dict[str, tuple[Inputs, torch.Tensor]] = {}
        self.input_spec: dict[str, Any] = {}
        # split -> one key per row of the raw data, before any preprocessing, in the splits' row order:
        # filled by setup() when record_row_keys is set (runner.pool compares tasks' rows with them)
        self.record_row_keys = False
        self.row_keys: dict[str, list[bytes]] = {}

    @property
    def tensor_batches(self) -> bool:
        """Whether batches are sliced from tensors (so training may take them in chunks)."""
        return self.mode == "tensors"

    def load(self) -> dict[str, Split]:
        raise NotImplementedError

    def preprocess(self, splits: dict[str, Split]) -> dict[str, Split]:
        """Scaling fitted on the training split; subclasses encode texts or tables here."""
        if self.scaling == "none":
            return splits
        x_train = np.asarray(splits["train"][0], dtype=np.float32)
        if self.scaling == "standard":
            flat = x_train.reshape(len(x_train), -1)
            scaler = StandardScaler().fit(flat)  # zero-variance features keep scale 1

            def scale(x: np.ndarray) -> np.ndarray:
                x = np.asarray(x, dtype=np.float32)
                return scaler.transform(x.reshape(len(x), -1)).astype(np.float32).reshape(x.shape)
        else:
            check(
                x_train.ndim >= 3, "data.scaling", "channel", "images shaped (N, C, H, W) (use standard for features)"
            )
            axes = (0, *range(2, x_train.ndim))
            mean, std = x_train.mean(axes, keepdims=True), x_train.std(axes, keepdims=True)
            std[std == 0] = 1.0

            def scale(x: np.ndarray) -> np.ndarray:
                return ((np.asarray(x, dtype=np.float32) - mean[:1]) / std[:1]).astype(np.float32)

        return {s: (scale(x), y) for s, (x, y) in splits.items()}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        raw = self.load()
        if "val" not in raw:
            x, y = raw["train"]
            index = np.arange(len(y))
            train, val = train_test_split(
                index, test_size=self.val_fraction, random_state=self.split_seed, stratify=np.asarray(y)
            )
            raw["train"], raw["val"] = (_rows(x, train), np.asarray(y)[train]), (_rows(x, val), np.asarray(y)[val])
        if self.input_shape is not None:
            raw = {split: (self._reshape(x), y) for split, (x, y) in raw.items()}
        if self.record_row_keys:
            self.row_keys = {split: row_keys(x) for split, (x, _) in raw.items()}
        for split, (x, y) in self.preprocess(raw).items():
            self.splits[split] = (_tensors(x), torch.as_tensor(np.asarray(y), dtype=torch.long))
        x_train = self.splits["train"][0]
        if self.num_features is not None and not isinstance(x_train, dict):
            found = x_train[0].numel()
            check(
                found == self.num_features,
                "data.num_features",
                self.num_features,
                f"{found} (the number of values per sample in the data)",
            )
        self.num_classes = check_num_classes(self.num_classes, [y for _, y in self.splits.values()])
        self.input_spec = describe(take(x_train, slice(0, 1)))

    def to_device(self, device: torch.device | str) -> bool:
        """Move the splits to `device` (runner/device.py's data_on_device), if batches are sliced
        from them (tensor batches; DataLoaders keep theirs on the CPU). Says whether it did."""
        self.setup()
        if not self.tensor_batches:
            return False
        self.splits = {s: (to_device(x, device), y.to(device)) for s, (x, y) in self.splits.items()}
        return True

    def _reshape(self, x: Any) -> np.ndarray:
        x = np.asarray(x)
        size = math.prod(x.shape[1:])
        check(
            x.dtype != object and math.prod(self.input_shape) == size,
            "data.input_shape",
            self.input_shape,
            f"a shape of {size} values per sample",
        )
        return x.reshape(len(x), *self.input_shape)

    def loader(self, split: str, shuffle: bool = False, chunk: int | None = None) -> Any:
        self.setup()
        x, y = self.splits[split]
        size = self.batch_size if split == "train" else self.eval_batch_size
        if self.mode == "tensors":
            # The shuffle order follows torch's global RNG, i.e. the seed of the member being trained.
            seed = int(torch.randint(0, 2**62, ())) if shuffle else 0
            return TensorBatches(x, y, size, shuffle=shuffle, seed=seed, chunk=chunk, split=split)
        transform = self.train_transform if split == "train" else None
        return seeded_loader(ArrayDataset(x, y, transform), size, shuffle, self.num_workers, self.pin_memory, split)


def _rows(x: Any, index: np.ndarray) -> Any:
    """Rows `index` of an array, a dict of arrays, a DataFrame or a list."""
    if isinstance(x, dict):
        return {k: _rows(v, index) for k, v in x.items()}
    if hasattr(x, "iloc"):
        return x.iloc[index]
    if isinstance(x, list):
        return [x[i] for i in index]
    return np.asarray(x)[index]


def row_keys(x: Any) -> list[bytes]:
    """A 12-byte key per row of raw data (an array, a dict of arrays, a DataFrame, a list of texts):
    equal rows, equal keys, whatever preprocessing is fitted on them later."""
    if isinstance(x, dict):
        return [b"".join(parts) for parts in zip(*(row_keys(v) for v in x.values()))]
    if hasattr(x, "iloc"):
        x = x.to_numpy()
    if isinstance(x, list) or (isinstance(x, np.ndarray) and x.dtype == object):
        return [hashlib.blake2b(repr(v).encode(), digest_size=12).digest() for v in x]
    rows = np.ascontiguousarray(np.asarray(x)).reshape(len(x), -1)
    return [hashlib.blake2b(r.tobytes(), digest_size=12).digest() for r in rows]


def _tensors(x: Any) -> Inputs:
    """Float arrays -> float32 tensors, integer arrays (token ids, masks) -> int64 tensors."""
    if isinstance(x, dict):
        return {k: _tensors(v) for k, v in x.items()}
    x = torch.as_tensor(np.asarray(x))
    return x.float() if x.is_floating_point() else x.long()
