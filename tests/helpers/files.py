"""Shared test helpers (moved from tests/unit/test_vision_data.py)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_mnist(root: Path, name: str, gz: bool, n_train: int = 100, n_test: int = 20, seed: int = 0) -> dict:
    """torchvision's layout: <root>/<MNIST|FashionMNIST>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte."""
    rng = np.random.default_rng(seed)
    raw = root / MNIST_FOLDERS[name] / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x, y = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), balanced_labels(n, 10)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x, gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y, gz)
        arrays[split] = (x, y)
    return arrays


def write_cifar(root: Path, name: str, seed: int = 0) -> dict:
    """CIFAR-10: data_batch_1..5 + test_batch (b"labels"); CIFAR-100: train + test (b"fine_labels",
    plus coarse labels that must not be read). 10 per class in train, 3 per class in test."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR_FOLDERS[name]
    folder.mkdir(parents=True, exist_ok=True)
    classes = 10 if name == "cifar10" else 5  # a few of CIFAR-100's classes
    x_train = rng.integers(0, 256, (10 * classes, 3, 32, 32), dtype=np.uint8)
    y_train = balanced_labels(len(x_train), classes)
    x_test = rng.integers(0, 256, (3 * classes, 3, 32, 32), dtype=np.uint8)
    y_test = balanced_labels(len(x_test), classes)
    if name == "cifar10":
        for i, part in enumerate(np.array_split(np.arange(len(x_train)), 5), start=1):
            write_cifar_batch(folder / f"data_batch_{i}", x_train[part], {b"labels": y_train[part].tolist()})
        write_cifar_batch(folder / "test_batch", x_test, {b"labels": y_test.tolist()})
    else:
        for file, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
            write_cifar_batch(folder / file, x, {b"fine_labels": y.tolist(), b"coarse_labels": [19] * len(y)})
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


def write_folder(
    root: Path,
    per_class: int = 10,
    mode: str = "RGB",
    sizes=((8, 8),),
    classes=("cat", "dog", "frog"),
    gray_variant: bool = True,
) -> Path:
    """<root>/<class>/<i>.png; with `gray_variant` one image of the second class is grayscale."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            variant = "L" if gray_variant and c == 1 and i == 3 else mode
            write_png(root / name / f"{i:03d}.png", sizes[i % len(sizes)], variant, seed=100 * c + i)
    return root


MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def balanced_labels(n: int, classes: int) -> np.ndarray:
    return np.arange(n) % classes


def write_cifar_batch(path: Path, images: np.ndarray, labels: dict[bytes, list[int]]) -> None:
    batch = {
        b"batch_label": b"testing batch",
        b"data": images.reshape(len(images), 3072),
        b"filenames": [b"img.png"] * len(images),
        **labels,
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))  # the real files are Python 2 pickles


def write_png(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    """A random image of `size` (H, W); an asymmetric one, so flips are visible."""
    rng = np.random.default_rng(seed)
    channels = 1 if mode == "L" else 3
    pixels = rng.integers(0, 256, (*size, channels), dtype=np.uint8)
    pixels[:, 0] = 255
    pixels[:, -1] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(path)
