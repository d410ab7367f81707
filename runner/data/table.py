"""A user's own table (CSV, TSV, Parquet, JSON or JSON lines), one labelled row per sample.

Numeric columns are median-imputed and standardized, categorical ones most-frequent-imputed and
one-hot encoded, by a scikit-learn ColumnTransformer fitted on the training split only. `FileData`
(reading, label encoding, the test split) is shared with runner.data.text.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import LabelEncoder, OneHotEncoder, StandardScaler

from runner.data.base import ArrayDataModule, Split
from runner.errors import ConfigError, check

log = logging.getLogger(__name__)


def _read_json(path: Path) -> pd.DataFrame:
    try:
        return pd.read_json(path)
    except ValueError:  # JSON lines saved as .json
        return pd.read_json(path, lines=True)


READERS = {
    ".csv": pd.read_csv,
    ".tsv": partial(pd.read_csv, sep="\t"),
    ".parquet": pd.read_parquet,
    ".json": _read_json,
    ".jsonl": partial(pd.read_json, lines=True),
}


def read_table(path: str | os.PathLike, key: str = "data.path") -> pd.DataFrame:
    """The table at `path`, read by pandas according to its extension (see READERS); a missing,
    unknown or unreadable file is a ConfigError naming `key`."""
    check(isinstance(path, (str, os.PathLike)) and str(path), key, path, "the path of a table file")
    file = Path(path).expanduser()
    reader = READERS.get(file.suffix.lower())
    check(reader is not None, key, str(path), f"a file ending in one of {list(READERS)}")
    check(file.is_file(), key, str(path), "an existing file (a relative path starts from the working directory)")
    try:
        frame = reader(file)
    except (ValueError, OSError, ImportError) as e:  # pandas' and pyarrow's parse errors are ValueErrors
        raise ConfigError(key, str(path), f"a readable {file.suffix} table ({type(e).__name__}: {e})") from e
    check(len(frame) > 0, key, str(path), "a table with at least one row")
    return frame


def require_columns(frame: pd.DataFrame, columns: Sequence[Any], key: str, value: Any, path: Any) -> None:
    """A ConfigError naming `key` unless `frame` (read from `path`) has every one of `columns`."""
    missing = [c for c in columns if c not in frame.columns]
    check(not missing, key, value, f"columns of {path}: {list(frame.columns)} (missing: {missing})")


def _whole_floats(column: pd.Series) -> bool:
    # pandas reads a column of integers with gaps as floats: 1.0 there should be the 1 of a file without gaps
    return pd.api.types.is_float_dtype(column) and bool((column.dropna() % 1 == 0).all())


def _label_values(labels: pd.Series) -> np.ndarray:
    # anything non-numeric becomes text so mixed types still sort
    if pd.api.types.is_bool_dtype(labels):
        return labels.to_numpy()
    if _whole_floats(labels):
        return labels.to_numpy(dtype=np.int64)
    if pd.api.types.is_numeric_dtype(labels):
        return labels.to_numpy()
    return labels.astype(str).to_numpy(dtype=object)


def encode_labels(labels: Sequence[pd.Series]) -> tuple[list[np.ndarray], list[str]]:
    """Every part of `labels` as class indices 0..C-1 of one LabelEncoder fitted on all of them
    (so the classes do not depend on the split), and the class names (the sorted values, as text)."""
    encoder = LabelEncoder()
    codes = encoder.fit_transform(_label_values(pd.concat(list(labels), ignore_index=True))).astype(np.int64)
    return np.split(codes, np.cumsum([len(part) for part in labels])[:-1]), [str(c) for c in encoder.classes_]


def drop_unlabelled(frame: pd.DataFrame, label: Any, path: Any) -> pd.DataFrame:
    """`frame` without its rows whose `label` is missing (logged)."""
    missing = frame[label].isna().to_numpy()
    if missing.any():
        log.warning("data: dropping %d of %d rows of %s with no %r label", missing.sum(), len(frame), path, label)
    check(not missing.all(), "data.label", label, f"a column of {path} with some labels (all are missing)")
    return frame[~missing].reset_index(drop=True)


def stratified_holdout(y: np.ndarray, fraction: float, seed: int, label: Any) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (kept, held out) with `fraction` of every class held out."""
    counts = np.bincount(y)
    rare = int((counts < 2).sum())
    check(rare == 0, "data.label", label, f"classes of at least 2 rows each, to stratify the splits ({rare} have 1)")
    try:
        return train_test_split(np.arange(len(y)), test_size=fraction, random_state=seed, stratify=y)
    except ValueError as e:  # e.g. fewer held-out rows than classes
        raise ConfigError("data.test_fraction", fraction, f"a fraction scikit-learn can stratify ({e})") from e


class FileData(ArrayDataModule):
    """Labelled rows of a file (`path`) and optionally of a test file (`test_path`; without it a
    stratified `test_fraction` of `path` with `split_seed`). Rows without a label are dropped;
    labels are encoded over both files, their original values kept in `classes`. Subclasses say
    which inputs a frame gives (`inputs`) and check their columns (`read`)."""

    def __init__(
        self, path: str, label: str, test_path: str | None = None, test_fraction: float = 0.2, **kwargs: Any
    ) -> None:
        check(isinstance(label, (str, int)), "data.label", label, "the name of the label column")
        check(0.0 < test_fraction < 1.0, "data.test_fraction", test_fraction, "a float in (0, 1)")
        check(
            kwargs.get("input_shape") is None,
            "data.input_shape",
            kwargs.get("input_shape"),
            "null (rows of a file are encoded into flat vectors)",
        )
        super().__init__(**kwargs)
        self.path, self.label, self.test_path, self.test_fraction = path, label, test_path, test_fraction
        self.classes: list[str] = []

    def sources(self) -> dict[str, Any]:
        """The file each split comes from."""
        return {"train": self.path} if self.test_path is None else {"train": self.path, "test": self.test_path}

    def read(self) -> dict[str, pd.DataFrame]:
        """The file(s) by split, checked, without unlabelled rows."""
        frames = {}
        for split, path in self.sources().items():
            frame = read_table(path, "data.path" if split == "train" else "data.test_path")
            require_columns(frame, [self.label], "data.label", self.label, path)
            frames[split] = drop_unlabelled(frame, self.label, path)
        return frames

    def inputs(self, frame: pd.DataFrame) -> Any:
        raise NotImplementedError

    def load(self) -> dict[str, Split]:
        frames = self.read()
        codes, self.classes = encode_labels([frame[self.label] for frame in frames.values()])
        labels = dict(zip(frames, codes))
        if "test" not in frames:
            keep, held = stratified_holdout(labels["train"], self.test_fraction, self.split_seed, self.label)
            frames = {"train": frames["train"].iloc[keep], "test": frames["train"].iloc[held]}
            labels = {"train": labels["train"][keep], "test": labels["train"][held]}
        return {split: (self.inputs(frames[split]), labels[split]) for split in ("train", "test")}


def _is_categorical(column: pd.Series) -> bool:
    dtype = column.dtype
    return (
        pd.api.types.is_object_dtype(dtype)
        or pd.api.types.is_bool_dtype(dtype)
        or isinstance(dtype, pd.CategoricalDtype)
        or pd.api.types.is_string_dtype(dtype)
    )


def _as_categories(column: pd.Series) -> pd.Series:
    # text values with NaN for missing ones: OneHotEncoder cannot sort mixed types, and
    # SimpleImputer does not see pd.NA as missing
    if _whole_floats(column):
        column = column.astype("Int64")
    return column.map(str, na_action="ignore").astype(object).where(column.notna(), np.nan)


def _names(value: Any, key: str) -> list[Any] | None:
    ok = value is None or (
        isinstance(value, Sequence) and not isinstance(value, str) and all(isinstance(c, (str, int)) for c in value)
    )
    check(ok, key, value, "null or a list of column names")
    return None if value is None else list(value)


class TableData(FileData):
    """A table file (.csv, .tsv, .parquet, .json, .jsonl) with a `label` column.

    `features`: the input columns (default: all but the label). `categorical`: those one-hot
    encoded (default: columns of object, string, category or bool type); the others must be numeric.
    Fitted on the training split only: numeric columns are median-imputed and, with
    `scaling: standard`, standardized; categorical ones are imputed with the most frequent value
    and one-hot encoded, a category unseen in training giving all zeros. After `setup()`,
    `transformer` is the fitted ColumnTransformer and `feature_names` its output columns.
    """

    name = "table"

    def __init__(
        self,
        path: str,
        label: str,
        features: Sequence[str] | None = None,
        categorical: Sequence[str] | None = None,
        test_path: str | None = None,
        test_fraction: float = 0.2,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("scaling", "standard")
        check(kwargs["scaling"] in ("none", "standard"), "data.scaling", kwargs["scaling"], ["none", "standard"])
        self.features, self.categorical = _names(features, "data.features"), _names(categorical, "data.categorical")
        check(
            self.features is None or (self.features and label not in self.features),
            "data.features",
            features,
            "null or a non-empty list of columns other than the label",
        )
        check(
            self.categorical is None or self.features is None or set(self.categorical) <= set(self.features),
            "data.categorical",
            categorical,
            f"columns among data.features: {self.features}",
        )
        super().__init__(path, label, test_path, test_fraction, **kwargs)
        self.numeric_columns: list[Any] = []
        self.categorical_columns: list[Any] = []
        self.transformer: ColumnTransformer | None = None
        self.feature_names: list[str] = []

    def read(self) -> dict[str, pd.DataFrame]:
        frames = super().read()
        sources = self.sources()
        features = self.features or [c for c in frames["train"].columns if c != self.label]
        check(bool(features), "data.features", self.features, f"feature columns; {self.path} has only the label")
        for split, frame in frames.items():
            require_columns(frame, features, "data.features", self.features, sources[split])
        self.categorical_columns = self._categorical(frames["train"][features])
        self.numeric_columns = [c for c in features if c not in self.categorical_columns]
        for split, frame in frames.items():
            bad = [c for c in self.numeric_columns if not pd.api.types.is_numeric_dtype(frame[c])]
            check(
                not bad,
                "data.categorical",
                self.categorical,
                f"a list naming every non-numeric feature column "
                f"of {sources[split]} (or leave them out of data.features): {bad} are not numbers",
            )
        return frames

    def _categorical(self, features: pd.DataFrame) -> list[Any]:
        """The categorical columns: as configured, else by type (decided on the training file)."""
        if self.categorical is None:
            return [c for c in features.columns if _is_categorical(features[c])]
        require_columns(
            features, self.categorical, "data.categorical", self.categorical, f"data.features of {self.path}"
        )
        return self.categorical

    def inputs(self, frame: pd.DataFrame) -> pd.DataFrame:
        x = frame[self.numeric_columns].astype("float64")
        infinite = [c for c in self.numeric_columns if np.isinf(x[c].to_numpy()).any()]
        check(
            not infinite,
            "data.path",
            str(self.path),
            f"finite numbers in every numeric column (column "
            f"{infinite[0] if infinite else ''!r} holds an infinity; make it empty to impute it, or list the "
            "column in data.categorical)",
        )
        for column in self.categorical_columns:
            x[column] = _as_categories(frame[column])
        return x

    def column_transformer(self) -> ColumnTransformer:
        """The (unfitted) encoding of the feature columns."""
        numeric = [SimpleImputer(strategy="median")] + ([StandardScaler()] if self.scaling == "standard" else [])
        categorical = [
            SimpleImputer(strategy="most_frequent"),
            OneHotEncoder(handle_unknown="ignore", sparse_output=False),
        ]
        parts = [
            ("numeric", make_pipeline(*numeric), self.numeric_columns),
            ("categorical", make_pipeline(*categorical), self.categorical_columns),
        ]
        return ColumnTransformer([p for p in parts if p[2]], remainder="drop", sparse_threshold=0.0)

    def raw_inputs(self) -> TableInputs:
        """What turns new raw rows into this model's inputs: the encoding fitted on train (it travels
        with every logged model, so runner.predict takes rows of the training file's columns)."""
        return TableInputs(list(self.numeric_columns), list(self.categorical_columns), self.transformer)

    def preprocess(self, splits: dict[str, Split]) -> dict[str, Split]:
        # replaces the base's scaling, which would also scale the one-hot columns
        self.transformer = self.column_transformer().fit(splits["train"][0])
        self.feature_names = [str(n) for n in self.transformer.get_feature_names_out()]
        return {split: (self.transformer.transform(x).astype(np.float32), y) for split, (x, y) in splits.items()}


class TableInputs:
    """Raw rows (a DataFrame with the training file's feature columns; others ignored) -> float32 model
    inputs, by the imputation, scaling and one-hot encoding fitted on the training split."""

    def __init__(self, numeric: list[Any], categorical: list[Any], transformer: ColumnTransformer) -> None:
        self.numeric, self.categorical, self.transformer = numeric, categorical, transformer

    def __call__(self, frame: pd.DataFrame) -> np.ndarray:
        missing = [c for c in self.numeric + self.categorical if c not in frame.columns]
        if missing:
            raise ValueError(
                f"rows without the feature columns {missing} (the model was trained on "
                f"{self.numeric + self.categorical})"
            )
        try:
            x = frame[self.numeric].astype("float64")
        except ValueError as e:
            raise ValueError(f"numeric columns {self.numeric} hold text: {e}") from None
        for column in self.categorical:
            x[column] = _as_categories(frame[column])
        return self.transformer.transform(x).astype(np.float32)
