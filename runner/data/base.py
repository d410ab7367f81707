"""In-memory classification data as a LightningDataModule.

Small datasets fit in memory, so batches are sliced straight from tensors instead of
collating samples through a DataLoader (that alone is ~2.5x faster for tiny models).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.model_selection import train_test_split

from runner.errors import check


class TensorBatches:
    """An iterable of (x, y) batches sliced from in-memory tensors; reshuffled each epoch.

    With `chunk=k` it yields lists of k consecutive batches instead (the last list may be
    shorter): the training module takes k optimizer steps per Lightning step, which divides
    Lightning's per-step overhead by k. `chunk=0` puts a whole epoch in one list.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 shuffle: bool = False, seed: int = 0, chunk: int | None = None) -> None:
        self.x, self.y, self.batch_size, self.shuffle, self.chunk = x, y, batch_size, shuffle, chunk
        self.generator = torch.Generator().manual_seed(seed)

    def num_batches(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def __len__(self) -> int:
        if self.chunk is None:
            return self.num_batches()
        return 1 if self.chunk == 0 else (self.num_batches() + self.chunk - 1) // self.chunk

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.x, self.y
        if self.shuffle:
            order = torch.randperm(len(y), generator=self.generator)
            x, y = x[order], y[order]
        for start in range(0, len(y), self.batch_size):
            yield x[start:start + self.batch_size], y[start:start + self.batch_size]

    def __iter__(self) -> Iterator:
        if self.chunk is None:
            yield from self.batches()
            return
        size = self.chunk or self.num_batches()
        chunk: list[tuple[torch.Tensor, torch.Tensor]] = []
        for batch in self.batches():
            chunk.append(batch)
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


class ArrayDataModule(pl.LightningDataModule):
    """Base class: subclasses implement `load()` returning (x_train, y_train, x_test, y_test).

    The validation split is carved out of the training split with `split_seed`, stratified.
    `split_seed` is independent of the model seed so every ensemble member sees the same
    train / val / test partition (fusion is fitted on val, all reported numbers come from test).
    """

    name: str = "array"

    def __init__(self, num_features: int, num_classes: int, batch_size: int = 100,
                 eval_batch_size: int = 1000, val_fraction: float = 0.1, split_seed: int = 0,
                 standardize: bool = False) -> None:
        super().__init__()
        check(batch_size >= 1, "data.batch_size", batch_size, "an integer >= 1")
        check(eval_batch_size >= 1, "data.eval_batch_size", eval_batch_size, "an integer >= 1")
        check(0.0 < val_fraction < 1.0, "data.val_fraction", val_fraction, "a float in (0, 1)")
        self.num_features, self.num_classes = num_features, num_classes
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.standardize = standardize
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        x, y, x_test, y_test = self.load()
        x_train, x_val, y_train, y_val = train_test_split(
            x, y, test_size=self.val_fraction, random_state=self.split_seed, stratify=y)
        if self.standardize:
            mean, std = x_train.mean(0), x_train.std(0) + 1e-8
            x_train, x_val, x_test = ((a - mean) / std for a in (x_train, x_val, x_test))
        for split, (xs, ys) in {"train": (x_train, y_train), "val": (x_val, y_val),
                                "test": (x_test, y_test)}.items():
            self.splits[split] = (torch.as_tensor(np.asarray(xs), dtype=torch.float32),
                                  torch.as_tensor(np.asarray(ys), dtype=torch.long))
        found = (self.splits["train"][0].shape[1], int(max(int(s[1].max()) for s in self.splits.values())) + 1)
        check(found[0] == self.num_features, "data.num_features", self.num_features,
              f"{found[0]} (the number of features in the data)")
        check(found[1] <= self.num_classes, "data.num_classes", self.num_classes,
              f">= {found[1]} (labels found in the data)")

    def loader(self, split: str, shuffle: bool = False, chunk: int | None = None) -> TensorBatches:
        self.setup()
        x, y = self.splits[split]
        size = self.batch_size if split == "train" else self.eval_batch_size
        # The shuffle order follows torch's global RNG, i.e. the seed of the member being trained.
        seed = int(torch.randint(0, 2**62, ())) if shuffle else 0
        return TensorBatches(x, y, size, shuffle=shuffle, seed=seed, chunk=chunk)

    def train_dataloader(self) -> TensorBatches:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> TensorBatches:
        return self.loader("val")

    def test_dataloader(self) -> TensorBatches:
        return self.loader("test")
