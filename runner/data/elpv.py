"""The elpv data set: 2,624 electroluminescence images of solar cells, functional or defective.

Buerhop-Lutz et al. (2018) and Deitsch et al. (2019, "Automatic classification of defective
photovoltaic module cells in electroluminescence images", Solar Energy 185): 300x300 8-bit
grayscale cells cut from EL images of 44 solar modules (mono- and polycrystalline), each labelled
with a defect probability (0, 1/3, 2/3 or 1: experts' verdict and confidence) and the module type.
The images and `labels.csv` ship inside the PyPI package elpv-dataset (data CC BY-NC-SA 4.0:
non-commercial use only; the `pretrained` extra). Nothing is downloaded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split

from runner.data.base import ArrayDataModule, Split
from runner.errors import ConfigError, check
from runner.packages import package_file

PACKAGE, LABELS, PIP_NAME = "elpv_dataset", "data/labels.csv", "elpv-dataset"
NATIVE_SIZE = 300  # every image is 300x300
MIN_PER_CLASS = 3  # images of every class in a max_images subset: one each for train, val and test
# task -> class names in label order
TASKS = {
    "defect": ["0%", "33%", "67%", "100%"],  # the four defect probabilities
    "defective": ["functional", "defective"],  # probability < 0.5 / >= 0.5
    "type": ["mono", "poly"],  # the module's crystal type
}


def read_labels(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image paths relative to labels.csv, defect probabilities, module types) from the package's
    labels.csv: one whitespace-separated row per image (path, probability, mono|poly)."""
    rows = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    check(
        all(len(r) == 3 for r in rows),
        "data",
        str(path),
        f"labels.csv rows of path, probability, type (reinstall {PIP_NAME})",
    )
    return [r[0] for r in rows], np.array([float(r[1]) for r in rows]), np.array([r[2] for r in rows])


def task_labels(task: str, probabilities: np.ndarray, types: np.ndarray) -> np.ndarray:
    """Class indices (in the order of TASKS[task]) for every image."""
    if task == "defect":
        return np.rint(probabilities * 3).astype(np.int64)  # 0, 1/3, 2/3, 1 -> 0..3
    if task == "defective":
        return (probabilities >= 0.5).astype(np.int64)
    return np.searchsorted(TASKS["type"], types).astype(np.int64)


def subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Row indices of `n` images drawn with `seed`, stratified by the labels `y` (each class in
    proportion), with at least MIN_PER_CLASS of every class (the rare 67% class has 4% of the
    images): any shortfall is drawn from that class and taken off the largest one."""
    index, _ = train_test_split(np.arange(len(y)), train_size=n, random_state=seed, stratify=y)
    rng = np.random.default_rng(seed)
    for c in range(int(y.max()) + 1):
        short = min(MIN_PER_CLASS, int((y == c).sum())) - int((y[index] == c).sum())
        if short > 0:
            add = rng.choice(np.setdiff1d(np.flatnonzero(y == c), index), short, replace=False)
            largest = np.bincount(y[index]).argmax()
            drop = rng.choice(index[y[index] == largest], short, replace=False)
            index = np.concatenate([np.setdiff1d(index, drop), add])
    return np.sort(index)


def read_images(folder: Path, paths: list[str], size: int) -> np.ndarray:
    """The images at `paths` (relative to `folder`) as float32 (N, 1, size, size) in [0, 1], resized
    by Pillow (bilinear, antialiased when shrinking) where size is not 300."""
    out = np.empty((len(paths), 1, size, size), dtype=np.uint8)
    for i, relative in enumerate(paths):
        with Image.open(folder / relative) as image:
            image = image.convert("L")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            out[i, 0] = np.asarray(image)
    return out.astype(np.float32) / 255.0


class ELPV(ArrayDataModule):
    """elpv solar cells as 1 x image_size x image_size images in [0, 1], for one `task`:
    `defect` (4 classes: defect probability 0%, 33%, 67%, 100%), `defective` (2: functional with
    probability < 0.5, defective >= 0.5) or `type` (2: mono, poly). `image_size`: null keeps 300;
    images are resized once at load. `max_images`: null uses all 2,624; else a subset of that size,
    stratified by the label and drawn with `split_seed`, with at least 3 images of every class
    (small CPU runs). `test_fraction` of them is the test split, `val_fraction` of the rest the
    val split (both stratified, with `split_seed`, as ArrayDataModule carves val; at least one
    image per class each).
    `classes`: the class names in label order. No scaling by default: image models that normalise
    their inputs themselves (EfficientNet-Lite) take [0, 1] pixels.
    """

    name = "elpv"

    def __init__(
        self,
        task: str = "defect",
        image_size: int | None = None,
        max_images: int | None = None,
        test_fraction: float = 0.25,
        **kwargs: Any,
    ) -> None:
        check(task in TASKS, "data.task", task, list(TASKS))
        check(
            image_size is None
            or (isinstance(image_size, int) and not isinstance(image_size, bool) and image_size >= 1),
            "data.image_size",
            image_size,
            f"null (the images' {NATIVE_SIZE}) or an integer >= 1 (the side images are resized to)",
        )
        check(
            max_images is None
            or (isinstance(max_images, int) and not isinstance(max_images, bool) and max_images >= 1),
            "data.max_images",
            max_images,
            "null (all 2,624 images) or an integer >= 1",
        )
        check(
            isinstance(test_fraction, (int, float)) and 0.0 < test_fraction < 1.0,
            "data.test_fraction",
            test_fraction,
            "a float in (0, 1)",
        )
        if kwargs.get("num_classes") is None:
            kwargs["num_classes"] = len(TASKS[task])
        super().__init__(**kwargs)
        self.labels_file = package_file(PACKAGE, LABELS, "data", "elpv", pip_name=PIP_NAME)
        self.task, self.max_images, self.test_fraction = task, max_images, float(test_fraction)
        self.image_size = NATIVE_SIZE if image_size is None else image_size
        self.classes: list[str] = list(TASKS[task])
        least = MIN_PER_CLASS * len(self.classes)
        check(
            max_images is None or max_images >= least,
            "data.max_images",
            max_images,
            f"null or >= {least}: {MIN_PER_CLASS} images per class for the {len(self.classes)} classes of "
            f"task={task} (one each for train, val and test)",
        )

    def split_size(self, fraction: float, n: int) -> int:
        """Images a stratified split of `fraction` of `n` takes: ceil(fraction * n), as scikit-learn
        counts, but at least one per class (tiny subsets)."""
        return max(math.ceil(fraction * n), len(self.classes))

    def select(self, y: np.ndarray) -> dict[str, np.ndarray]:
        """Row indices of the train, val and test images: of a `max_images` subset if set (see
        `subset`), `test_fraction` held out, then `val_fraction` of the rest; stratified, `split_seed`."""
        n_classes = len(self.classes)
        index = np.arange(len(y))
        try:
            if self.max_images is not None and self.max_images < len(y):
                index = subset(y, self.max_images, self.split_seed)
            rest, test = train_test_split(
                index,
                test_size=self.split_size(self.test_fraction, len(index)),
                random_state=self.split_seed,
                stratify=y[index],
            )
            train, val = train_test_split(
                rest,
                test_size=self.split_size(self.val_fraction, len(rest)),
                random_state=self.split_seed,
                stratify=y[rest],
            )
        except ValueError as e:  # too few images of a class, or too few left for train, to stratify
            raise ConfigError(
                "data.max_images",
                self.max_images,
                f"enough images for stratified train, val "
                f"and test splits of {n_classes} classes (task={self.task}): {e}",
            ) from None
        return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}

    def load(self) -> dict[str, Split]:
        paths, probabilities, types = read_labels(self.labels_file)
        y = task_labels(self.task, probabilities, types)
        folder = self.labels_file.parent
        return {
            split: (read_images(folder, [paths[i] for i in rows], self.image_size), y[rows])
            for split, rows in self.select(y).items()
        }
