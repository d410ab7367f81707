"""Small datasets that ship with scikit-learn (no download): tables, and digits as 8x8 images."""

from __future__ import annotations

import numpy as np
from sklearn import datasets
from sklearn.model_selection import train_test_split

from runner.data.base import ArrayDataModule, Split
from runner.errors import check

LOADERS = {
    "digits": datasets.load_digits,
    "wine": datasets.load_wine,
    "breast_cancer": datasets.load_breast_cancer,
}


class SklearnDataset(ArrayDataModule):
    """A scikit-learn toy dataset split into stratified train / val / test (scaling fitted on train).

    `input_shape: [1, 8, 8]` with `name: digits` gives the digits as one-channel images.
    """

    def __init__(self, name: str, test_fraction: float = 0.2, **kwargs) -> None:
        check(name in LOADERS, "data.name", name, sorted(LOADERS))
        check(0.0 < test_fraction < 1.0, "data.test_fraction", test_fraction, "a float in (0, 1)")
        kwargs.setdefault("scaling", "standard")
        super().__init__(**kwargs)
        self.name, self.test_fraction = name, test_fraction

    def load(self) -> dict[str, Split]:
        x, y = LOADERS[self.name](return_X_y=True)
        x_train, x_test, y_train, y_test = train_test_split(
            x.astype(np.float32), y, test_size=self.test_fraction, random_state=self.split_seed, stratify=y
        )
        return {"train": (x_train, y_train), "test": (x_test, y_test)}
