"""Image datasets in their real on-disk formats, read without torchvision.

- `TorchvisionFormat`: MNIST, FashionMNIST (IDX files), CIFAR-10 and CIFAR-100 (pickled python
  batches), read from where torchvision's dataset classes put them, so a folder downloaded once
  by torchvision (or copied by hand) works here and the other way round. Nothing is downloaded
  unless `download=True`, and only that needs torchvision.
- `ImageFolder`: a user's folder of images in torchvision's ImageFolder layout
  (<path>/<class name>/<image files>), read lazily with Pillow.
"""

from __future__ import annotations

import copy
import gzip
import logging
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, Subset

from runner.data.base import ArrayDataModule, Split, compose
from runner.data.sources import DatasetDataModule
from runner.errors import ConfigError, check

log = logging.getLogger(__name__)

# IDX type codes (the third magic byte) -> big-endian numpy dtypes
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# name -> (torchvision class, folder under root, input shape, classes)
TORCHVISION_SETS = {
    "mnist": ("MNIST", "MNIST/raw", [1, 28, 28], 10),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw", [1, 28, 28], 10),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", [3, 32, 32], 10),
    "cifar100": ("CIFAR100", "cifar-100-python", [3, 32, 32], 100),
}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_FILES = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": (["train"], ["test"], b"fine_labels"),
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
GRAYSCALE_MODES = ("1", "L", "LA")  # read as one channel; every other mode as RGB
STATS_IMAGES = 512  # training images the per-channel mean and std are computed from
SIZE_PROBES = 32  # images whose size is checked at setup when they are not resized


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST's format) as a numpy array; `.gz` files are decompressed.

    Layout: two zero bytes, a type byte (0x08 = uint8), the number of dimensions, one big-endian
    uint32 size per dimension, then the values (big-endian).
    """
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":  # gzip magic: torchvision keeps the .gz next to the extracted file
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (magic bytes {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_TYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def read_cifar(folder: str | Path, name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CIFAR-10 or CIFAR-100 python batches in `folder` (cifar-10-batches-py or cifar-100-python)
    as {"train": (x, y), "test": (x, y)}: x uint8 (N, 3, 32, 32), y int64 (CIFAR-100: fine labels)."""
    check(name in CIFAR_FILES, "data.name", name, sorted(CIFAR_FILES))
    train_files, test_files, label_key = CIFAR_FILES[name]
    return {
        split: _cifar_batches(Path(folder), files, label_key)
        for split, files in (("train", train_files), ("test", test_files))
    }


def _cifar_batches(folder: Path, files: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for file in files:
        with open(folder / file, "rb") as f:
            batch = pickle.load(f, encoding="bytes")  # pickled by Python 2: keys are bytes
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _idx_path(folder: Path, stem: str) -> Path:
    """The extracted file, else its .gz (the path reported when neither exists)."""
    plain = folder / stem
    return plain if plain.exists() or not (folder / f"{stem}.gz").exists() else folder / f"{stem}.gz"


def _to_unit(x: np.ndarray) -> np.ndarray:
    # straight to float32: a float64 intermediate would double the peak memory of CIFAR
    return np.divide(x, np.float32(255.0), dtype=np.float32)


def open_image(path: str) -> Any:
    """Pillow's image at `path`; an unreadable or corrupt file is a ConfigError naming it."""
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError, truncated files, bad chunks
        raise ConfigError("data.path", str(path), f"readable image files (Pillow: {type(e).__name__}: {e})") from None
    return image


class TorchvisionFormat(ArrayDataModule):
    """MNIST, FashionMNIST, CIFAR-10 or CIFAR-100 (`name`: mnist, fashion_mnist, cifar10, cifar100)
    read from the files torchvision's dataset classes write under `root`:
    <root>/MNIST/raw, <root>/FashionMNIST/raw (IDX files, plain or .gz), <root>/cifar-10-batches-py,
    <root>/cifar-100-python. Images are float32 (N, C, H, W) in [0, 1] before scaling (by default
    one mean and std per channel from train); val is a stratified `val_fraction` of train.

    Missing files are fetched with torchvision only when `download=True`; otherwise a ConfigError
    names data.root and the path expected.
    """

    def __init__(self, name: str, root: str = "outputs/data", download: bool = False, **kwargs: Any) -> None:
        check(name in TORCHVISION_SETS, "data.name", name, sorted(TORCHVISION_SETS))
        _, _, shape, classes = TORCHVISION_SETS[name]
        kwargs.setdefault("scaling", "channel")
        kwargs.setdefault("input_shape", shape)
        kwargs.setdefault("num_classes", classes)
        super().__init__(**kwargs)
        self.name, self.root, self.download = name, Path(root), bool(download)

    @property
    def folder(self) -> Path:
        """Where this dataset's files are (or will be downloaded to)."""
        return self.root / TORCHVISION_SETS[self.name][1]

    def expected_files(self) -> list[Path]:
        if self.name in CIFAR_FILES:
            train, test, _ = CIFAR_FILES[self.name]
            return [self.folder / f for f in train + test]
        return [_idx_path(self.folder, stem) for pair in IDX_FILES.values() for stem in pair]

    def missing_files(self) -> list[Path]:
        return [p for p in self.expected_files() if not p.exists()]

    def prepare_data(self) -> None:
        self.ensure_files()

    def ensure_files(self) -> None:
        """Fetch the files when missing and allowed to; else say where to put them."""
        missing = self.missing_files()
        if not missing:
            return
        if not self.download:
            shown = ", ".join(str(p) for p in missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise ConfigError(
                "data.root",
                str(self.root),
                f"a folder holding {self.name} in torchvision's layout under {self.folder} "
                f"(missing: {shown}); set data.download=true to fetch them "
                f"(needs internet and torchvision)",
            )
        self._download()
        missing = self.missing_files()
        check(
            not missing,
            "data.root",
            str(self.root),
            f"a folder torchvision downloads {self.name} into; still missing after the download: {missing}",
        )

    def _download(self) -> None:
        try:
            import torchvision.datasets
        except (ImportError, RuntimeError) as e:  # RuntimeError: a torchvision built for another torch
            raise ConfigError(
                "data.download",
                True,
                "torchvision installed (pip install -e '.[vision]' with a torchvision build "
                f"matching your torch); or put the files under {self.root} yourself "
                f"(importing torchvision failed: {e})",
            ) from e
        log.info("data: downloading %s into %s with torchvision", self.name, self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        # one call fetches both splits: torchvision downloads every file of the dataset
        getattr(torchvision.datasets, TORCHVISION_SETS[self.name][0])(str(self.root), train=True, download=True)

    def load(self) -> dict[str, Split]:
        self.ensure_files()
        if self.name in CIFAR_FILES:
            raw = read_cifar(self.folder, self.name)
        else:
            raw = {split: self._read_idx_split(split) for split in IDX_FILES}
        return {split: (_to_unit(x), y) for split, (x, y) in raw.items()}

    def _read_idx_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = (read_idx(_idx_path(self.folder, stem)) for stem in IDX_FILES[split])
        check(
            images.ndim == 3 and labels.ndim == 1 and len(images) == len(labels),
            "data.root",
            str(self.root),
            f"IDX files of (N, H, W) images and N labels; {split} has images {images.shape}, labels {labels.shape}",
        )
        return images[:, None], labels.astype(np.int64)


class ImageFiles(Dataset):
    """Images read lazily from `paths` with Pillow: converted to `mode` ("L" or "RGB"), resized to
    `size` (H, W) when `resize`, else checked to be that size, as CHW float tensors in [0, 1],
    normalized with `mean` and `std` when set, then `transform`ed. `targets`: the labels."""

    def __init__(
        self,
        paths: Sequence[str],
        targets: Sequence[int],
        classes: Sequence[str],
        mode: str,
        size: tuple[int, int],
        resize: bool,
    ) -> None:
        self.paths, self.targets, self.classes = list(paths), [int(t) for t in targets], list(classes)
        self.mode, self.size, self.resize = mode, size, resize
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.transform: Callable | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> torch.Tensor:
        """Image `i` as a CHW float tensor in [0, 1], neither normalized nor transformed."""
        with open_image(self.paths[i]) as image:
            image = image.convert(self.mode)
            height, width = self.size
            if self.resize and image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            elif not self.resize and image.size != (width, height):
                raise ConfigError(
                    "data.image_size",
                    None,
                    f"a size to resize to ([H, W] or an int): "
                    f"{self.paths[i]} is {image.height}x{image.width}, other images "
                    f"{height}x{width}",
                )
            pixels = np.array(image, dtype=np.uint8)
        x = torch.from_numpy(pixels.reshape(height, width, -1)).permute(2, 0, 1)
        return x.float().div_(255.0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.read(i)
        if self.mean is not None:
            x = (x - self.mean[:, None, None]) / self.std[:, None, None]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[i]


def _image_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = [image_size] if isinstance(image_size, int) else list(image_size)
    check(
        len(size) in (1, 2) and all(isinstance(s, int) and s >= 1 for s in size),
        "data.image_size",
        image_size,
        "null, an int or [H, W] of positive ints",
    )
    return (size[0], size[-1])


def _stats(values: Sequence[float] | None, key: str) -> list[float] | None:
    if values is None:
        return None
    values = [values] if isinstance(values, (int, float)) else list(values)
    check(
        bool(values) and all(isinstance(v, (int, float)) for v in values),
        key,
        values,
        "null or a list of floats, one per channel",
    )
    return [float(v) for v in values]


def scan_folder(path: Path, key: str, classes: Sequence[str] | None = None) -> tuple[list[str], list[str], list[int]]:
    """(classes, image paths, labels) of a folder in the ImageFolder layout. With `classes` (the
    training classes), the folder's subfolders are labeled by them, so test labels match train."""
    check(path.is_dir(), key, str(path), "an existing folder holding one subfolder of images per class")
    found = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    check(bool(found), key, str(path), "a folder with one subfolder of images per class (<path>/<class>/<image>)")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    check(not unknown, key, str(path), f"class folders among the training classes {list(classes)}; unknown: {unknown}")
    index = {name: i for i, name in enumerate(classes)}
    paths, labels, empty = [], [], []
    for name in found:
        files = sorted(str(f) for f in (path / name).rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        if not files:
            empty.append(name)
        paths += files
        labels += [index[name]] * len(files)
    check(not empty, key, str(path), f"class folders holding images ({', '.join(IMAGE_EXTENSIONS)}); empty: {empty}")
    return list(classes), paths, labels


class ImageFolder(DatasetDataModule):
    """A folder of images in torchvision's ImageFolder layout, <path>/<class name>/<images>, read
    lazily with Pillow. Classes are the sorted subfolder names (`classes`).

    Test is `test_path` (the same layout) or a stratified `test_fraction` of the images
    (`split_seed`); val a stratified `val_fraction` of the rest. `image_size` (int or [H, W])
    resizes every image; without it all images must have one size. `channels`: 1 or 3, by default
    from the first image (grayscale stays 1 channel, everything else RGB). Images are normalized
    per channel by `mean` and `std`, computed from up to 512 training images when not given;
    `train_transforms` (callables on the normalized CHW tensor) apply to training samples only.
    Other arguments: DatasetDataModule's (batch sizes, val_fraction, split_seed, workers).
    """

    def __init__(
        self,
        path: str,
        test_path: str | None = None,
        test_fraction: float = 0.2,
        image_size: int | Sequence[int] | None = None,
        channels: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        train_transforms: Sequence[Callable] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check(0.0 < test_fraction < 1.0, "data.test_fraction", test_fraction, "a float in (0, 1)")
        check(channels in (None, 1, 3), "data.channels", channels, "null (from the first image), 1 or 3")
        self.path, self.test_path = Path(path), Path(test_path) if test_path is not None else None
        self.test_fraction, self.channels = test_fraction, channels
        self.image_size = _image_size(image_size)
        self.mean, self.std = _stats(mean, "data.mean"), _stats(std, "data.std")
        self.train_transform = compose(train_transforms)
        self.classes: list[str] = []

    def datasets(self) -> dict[str, Dataset | None]:
        classes, paths, labels = scan_folder(self.path, "data.path")
        first = paths[0]
        self.classes = classes
        if self.num_classes is None:
            self.num_classes = len(classes)
        if self.test_path is not None:
            _, test_paths, test_labels = scan_folder(self.test_path, "data.test_path", classes)
        else:
            paths, test_paths, labels, test_labels = self._split_test(paths, labels)
        mode = self._mode(first)
        size, resize = self._size(paths + test_paths)
        train = ImageFiles(paths, labels, classes, mode, size, resize)
        test = ImageFiles(test_paths, test_labels, classes, mode, size, resize)
        return {"train": train, "test": test, "val": None}

    def _split_test(self, paths: list[str], labels: list[int]) -> tuple[list, list, list, list]:
        try:
            return train_test_split(
                paths, labels, test_size=self.test_fraction, random_state=self.split_seed, stratify=labels
            )
        except ValueError as e:  # too few images per class for a stratified split
            raise ConfigError(
                "data.path",
                str(self.path),
                f"enough images per class for a stratified "
                f"test_fraction={self.test_fraction} split, or a data.test_path ({e})",
            ) from e

    def _mode(self, first: str) -> str:
        if self.channels is not None:
            return "L" if self.channels == 1 else "RGB"
        with open_image(first) as image:
            return "L" if image.mode in GRAYSCALE_MODES else "RGB"

    def _size(self, paths: list[str]) -> tuple[tuple[int, int], bool]:
        """(H, W) all images get, and whether they are resized to it. Without `image_size`, images
        spread over the list (all classes) are checked for one size; the rest are checked as read."""
        if self.image_size is not None:
            return self.image_size, True
        probes = sorted({int(i) for i in np.linspace(0, len(paths) - 1, min(SIZE_PROBES, len(paths)))})
        sizes = {}
        for i in probes:
            with open_image(paths[i]) as image:
                sizes.setdefault((image.height, image.width), paths[i])
        check(
            len(sizes) == 1,
            "data.image_size",
            None,
            "an int or [H, W] to resize to: the images have "
            "different sizes (" + ", ".join(f"{p}: {h}x{w}" for (h, w), p in list(sizes.items())[:3]) + ")",
        )
        return next(iter(sizes)), False

    def _normalize(self, datasets: Sequence[ImageFiles], mean: Sequence[float], std: Sequence[float]) -> None:
        channels = 1 if datasets[0].mode == "L" else 3
        for key, values in (("data.mean", mean), ("data.std", std)):
            check(len(values) in (1, channels), key, list(values), f"one value or {channels} (one per channel)")
        check(all(s > 0 for s in std), "data.std", list(std), "positive values")
        mean_t = torch.tensor(mean, dtype=torch.float32).expand(channels).clone()
        std_t = torch.tensor(std, dtype=torch.float32).expand(channels).clone()
        for dataset in datasets:
            dataset.mean, dataset.std = mean_t, std_t

    def setup(self, stage: str | None = None) -> None:
        if self.data:
            return
        super().setup(stage)
        train: Subset = self.data["train"]
        mean, std = self.mean, self.std
        if mean is None or std is None:
            found_mean, found_std = self._train_stats(train)
            log.info(
                "data: per-channel mean %s, std %s from %d training images",
                found_mean,
                found_std,
                min(len(train), STATS_IMAGES),
            )
            mean, std = mean or found_mean, std or found_std
        self._normalize([train.dataset, self.data["test"]], mean, std)
        # train and val share one dataset (val is carved from it): training gets a copy that augments
        augmented = copy.copy(train.dataset)
        augmented.transform = self.train_transform
        self.data["train"] = Subset(augmented, train.indices)

    def _train_stats(self, train: Subset) -> tuple[list[float], list[float]]:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.split_seed))
        total, squares, count = 0.0, 0.0, 0
        for i in order[:STATS_IMAGES].tolist():
            x = train.dataset.read(train.indices[i]).double()
            total = total + x.sum((1, 2))
            squares = squares + (x * x).sum((1, 2))
            count += x.shape[1] * x.shape[2]
        mean = total / count
        std = (squares / count - mean * mean).clamp_min(0).sqrt()
        std[std == 0] = 1.0  # a constant channel keeps its scale
        return mean.tolist(), std.tolist()
