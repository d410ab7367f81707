"""What a batch is, whatever the data source: inputs `x` and labels `y`.

`x` is a tensor (features, images, sequences) or a dict of tensors (token ids and attention
masks); a batch is `(x, y)` (a tuple or a default-collated `[x, y]` list) or a dict holding the
labels under one of LABEL_KEYS (the Hugging Face style). Everything downstream (training,
evaluation, fusion, compression) reads batches through `split_batch` and handles `x` through
the helpers here, so no step assumes one input type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

Inputs = Tensor | dict[str, Tensor]
LABEL_KEYS = ("labels", "label", "y", "target", "targets")
TENSOR_KEYS = ("x", "input", "inputs", "pixel_values", "image", "images")  # a lone input of these is a plain tensor


class Chunk(list):
    """Several (x, y) batches handed to the training step at once (see TensorBatches' `chunk`).

    A type of its own so a default-collated `[x, y]` batch, also a list, is never read as one.
    """


def split_batch(batch: Any) -> tuple[Inputs, Tensor]:
    """(inputs, labels) of one batch."""
    if isinstance(batch, Mapping):
        key = next((k for k in LABEL_KEYS if k in batch), None)
        if key is None:
            raise ValueError(f"a dict batch needs its labels under one of {LABEL_KEYS}; got keys {sorted(batch)}")
        x = {k: v for k, v in batch.items() if k != key}
        if len(x) == 1 and next(iter(x)) in TENSOR_KEYS:
            x = next(iter(x.values()))
        return x, batch[key]
    if isinstance(batch, (tuple, list)) and not isinstance(batch, Chunk) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"a batch must be (x, y), [x, y] or a dict with labels; got {type(batch).__name__}")


def num_samples(x: Inputs) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def take(x: Inputs, index: Any) -> Inputs:
    """x[index] for a tensor or for every tensor of a dict."""
    return {k: v[index] for k, v in x.items()} if isinstance(x, dict) else x[index]


def cat(xs: list[Inputs]) -> Inputs:
    if isinstance(xs[0], dict):
        return {k: torch.cat([x[k] for x in xs]) for k in xs[0]}
    return torch.cat(xs)


def to_device(x: Inputs, device: torch.device | str) -> Inputs:
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def first_inputs(batches: Iterable, n: int) -> Inputs:
    """The first `n` inputs of a loader (fewer if it holds fewer), as one batch on the CPU (in-memory
    data may live on the GPU; the models that take these examples are on the CPU)."""
    xs, count = [], 0
    for batch in batches:
        x, _ = split_batch(batch)
        xs.append(x)
        count += num_samples(x)
        if count >= n:
            break
    if not xs:
        raise ValueError("the loader yielded no batches")
    return to_device(take(cat(xs), slice(0, n)), "cpu")


def collect(batches: Iterable) -> tuple[Inputs, Tensor]:
    """All (x, y) of a loader concatenated (for small splits: fusion fits on val)."""
    pairs = [split_batch(b) for b in batches]
    if not pairs:
        raise ValueError("the loader yielded no batches")
    return cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])


def describe(x: Inputs) -> dict[str, Any]:
    """What one input looks like: {"shape": per-sample shape, "dtype": name}, or that per dict key."""
    if isinstance(x, dict):
        return {k: describe(v) for k, v in x.items()}
    return {"shape": list(x.shape[1:]), "dtype": str(x.dtype).removeprefix("torch.")}


class DataSpec:
    """What checks before training know of the data: classes, what an input looks like, and a
    few real inputs to run every model, student and fusion head on once."""

    def __init__(self, num_classes: int, example: Inputs, input_spec: dict[str, Any]) -> None:
        self.num_classes, self.example, self.input_spec = num_classes, example, input_spec

    @property
    def float_inputs(self) -> bool:
        return not isinstance(self.example, dict) and self.example.is_floating_point()

    def __repr__(self) -> str:
        return f"DataSpec(num_classes={self.num_classes}, input_spec={self.input_spec})"


# --- split provenance ---------------------------------------------------------------------------
# Members train on train, fusion fits on val, every reported number comes from test. Every loader a
# data source returns carries its split as `loader.split` ("train" / "val" / "test"), and the split
# loaders the runner makes (TensorBatches, the DataLoaders of runner.data.base.seeded_loader) show each
# batch they yield to the watchers installed with `watch_batches`: how tests check which split each
# stage of a job read (tests/contract/test_guard_splits.py). Loaders of no split (a TensorBatches with
# split=None, e.g. a fusion head's minibatches of features of val rows already read) are not watched.
# No watcher outside tests: one list check per pass over a loader (TensorBatches) or per batch
# (DataLoaders), nothing else. DataLoader worker processes have watchers of their own (none): watch
# with num_workers=0.

Watcher = Callable[[str | None, Any], None]
_watchers: list[Watcher] = []


@contextmanager
def watch_batches(watcher: Watcher) -> Iterator[Watcher]:
    """Call `watcher(split, batch)` for every batch a runner loader yields while inside."""
    _watchers.append(watcher)
    try:
        yield watcher
    finally:
        _watchers.remove(watcher)


def watching() -> bool:
    return bool(_watchers)


def notify(split: str | None, batch: Any) -> None:
    for watcher in list(_watchers):
        watcher(split, batch)


def watched(split: str | None, batches: Iterable) -> Iterator:
    """`batches`, each shown to the watchers (with `split`) as it is yielded."""
    for batch in batches:
        notify(split, batch)
        yield batch


def split_of(loader: Any) -> str | None:
    """The split a loader says it holds (None: not said)."""
    return getattr(loader, "split", None)


def tag_split(loader: Any, split: str) -> Any:
    """`loader` with `loader.split = split`, where the object takes attributes; returns it."""
    try:
        loader.split = split
    except (AttributeError, TypeError):  # a loader that refuses attributes stays untagged
        pass
    return loader
