"""MNIST-1D (Greydanus 2020), generated locally by the `mnist1d` package: no download."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import numpy as np

from runner.data.base import ArrayDataModule, Split
from runner.errors import check


class MNIST1D(ArrayDataModule):
    """4000 train / 1000 test sequences of length 40, 10 classes (the published defaults).

    `dataset_seed` and `num_samples` are the generator's own arguments; the generated arrays
    are cached as .npz under `cache_dir` (keyed by the generator arguments) to skip the ~2 s
    regeneration on later runs.
    """

    name = "mnist1d"

    def __init__(
        self, dataset_seed: int = 42, num_samples: int = 5000, cache_dir: str | None = "outputs/data", **kwargs
    ) -> None:
        kwargs.setdefault("num_features", 40)
        kwargs.setdefault("num_classes", 10)
        check(
            isinstance(num_samples, int) and num_samples >= 200,
            "data.num_samples",
            num_samples,
            "an integer >= 200 (80% train, 20% test, 10 classes)",
        )
        super().__init__(**kwargs)
        self.dataset_seed, self.num_samples, self.cache_dir = dataset_seed, num_samples, cache_dir

    def load(self) -> dict[str, Split]:
        x, y, x_test, y_test = self.arrays()
        return {"train": (x, y), "test": (x_test, y_test)}

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        from mnist1d.data import get_dataset_args, make_dataset
        from mnist1d.utils import ObjectView

        args = get_dataset_args(as_dict=True)
        args.update(seed=self.dataset_seed, num_samples=self.num_samples)
        args.pop("url")
        path = None
        if self.cache_dir:
            key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
            path = Path(self.cache_dir) / f"mnist1d-{key}.npz"
            if path.exists():
                try:
                    with np.load(path) as f:
                        return f["x"], f["y"], f["x_test"], f["y_test"]
                except Exception:  # a partial or corrupt cache file is regenerated
                    path.unlink(missing_ok=True)
        state = np.random.get_state()  # mnist1d reseeds numpy's global RNG; keep ours intact
        try:
            data = make_dataset(ObjectView(args))
        finally:
            np.random.set_state(state)
        arrays = {k: data[k] for k in ("x", "y", "x_test", "y_test")}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.npz")  # one per writer
            np.savez(tmp, **arrays)
            tmp.replace(path)  # atomic: concurrent jobs never read a half-written file
        return arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"]
