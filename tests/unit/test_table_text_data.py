"""A user's own files: tables (runner.data.table) and texts (runner.data.text), checked on real values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_config
from helpers import ROOT
from hydra.utils import instantiate
from sklearn.model_selection import train_test_split
from torch import nn

from runner.data.table import TableData
from runner.data.text import TextData, train_wordpiece
from runner.errors import ConfigError
from runner.train import train_classifier

TRAINER = {"max_epochs": 5, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False}
OPTIM = {"name": "adam", "lr": 1e-2}
SPECIES = np.array(["setosa", "versicolor", "virginica"])
COLORS = np.array(["red", "green", "blue"])
NUMERIC = ["x1", "x2", "x3"]


def make_table(n: int, seed: int) -> pd.DataFrame:
    """Three balanced classes learnable from x1, x3 and color; x3 has ~15% missing values."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 3)
    return pd.DataFrame(
        {
            "x1": rng.normal(size=n) + 2.0 * y,
            "x2": rng.normal(size=n) * 5.0 + 10.0,
            "x3": np.where(rng.random(n) < 0.15, np.nan, rng.normal(size=n) + y),
            "color": np.where(rng.random(n) < 0.2, "red", COLORS[y]),  # red the most frequent
            "species": SPECIES[y],
        }
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """train.csv (300 rows, one without a label) in every format, and test.csv with a category
    ("purple") and a missing color that training never sees."""
    root = tmp_path_factory.mktemp("tables")
    train = make_table(300, seed=0)
    train.loc[7, "species"] = None
    test = make_table(60, seed=1)
    test.loc[0, "color"], test.loc[1, "color"], test.loc[2, "x3"] = "purple", None, np.nan
    paths = {ext: root / f"train.{ext}" for ext in ("csv", "tsv", "parquet", "jsonl")}
    train.to_csv(paths["csv"], index=False)
    train.to_csv(paths["tsv"], sep="\t", index=False)
    train.to_parquet(paths["parquet"])
    train.to_json(paths["jsonl"], orient="records", lines=True, double_precision=15)
    paths["test"] = root / "test.csv"
    test.to_csv(paths["test"], index=False)
    return paths


def fitted(*args, **kwargs) -> TableData | TextData:
    cls = TextData if "text" in kwargs else TableData
    dm = cls(*args, **kwargs)
    dm.setup()
    return dm


def train_rows(dm: TableData | TextData) -> tuple[pd.DataFrame | list, np.ndarray]:
    """The raw rows of the training split, selected by hand: the base class carves val out of
    load()'s train with a stratified split of `val_fraction`, seeded by `split_seed`."""
    x, y = dm.load()["train"]
    keep, _ = train_test_split(np.arange(len(y)), test_size=dm.val_fraction, random_state=dm.split_seed, stratify=y)
    return (x.iloc[keep] if hasattr(x, "iloc") else [x[i] for i in keep]), y[keep]


def test_accuracy(net: nn.Module, dm) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            correct += int((net(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


test_accuracy.__test__ = False  # a helper, not a test


# ---------------------------------------------------------------------------- tables


def test_table_splits_classes_and_one_hot_width(files):
    dm = fitted(str(files["csv"]), "species")
    sizes = {split: len(y) for split, (_, y) in dm.splits.items()}
    assert sum(sizes.values()) == 299  # the unlabelled row is dropped
    assert sizes["test"] == 60 and sizes["val"] == 24  # 20% of 299, then 10% of the rest
    raw, _ = train_rows(dm)
    width = len(NUMERIC) + raw["color"].nunique()
    assert all(x.shape == (len(y), width) and x.dtype == torch.float32 for x, y in dm.splits.values())
    assert dm.classes == list(SPECIES) and dm.num_classes == 3
    assert dm.input_spec == {"shape": [width], "dtype": "float32"}
    assert dm.feature_names[:3] == ["numeric__x1", "numeric__x2", "numeric__x3"]


def test_table_scaler_fitted_on_train_only(files):
    dm = fitted(str(files["csv"]), "species", test_path=str(files["test"]))
    x_train = dm.splits["train"][0][:, :3].double()
    assert torch.allclose(x_train.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(x_train.std(0, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-5)
    # val and test with the training rows' median and statistics, computed by hand
    raw, _ = train_rows(dm)
    test = pd.read_csv(files["test"])
    for j, column in enumerate(NUMERIC):
        median = raw[column].median()
        filled = raw[column].fillna(median)
        expected = (test[column].fillna(median) - filled.mean()) / filled.std(ddof=0)
        np.testing.assert_allclose(dm.splits["test"][0][:, j].numpy(), expected.to_numpy(), rtol=1e-4, atol=1e-5)
    # the val rows were not part of the fit: their mean is not exactly 0
    assert dm.splits["val"][0][:, 0].abs().mean() > 1e-3


def test_table_imputation_and_unseen_categories(files):
    dm = fitted(str(files["csv"]), "species", test_path=str(files["test"]), scaling="none")
    raw, _ = train_rows(dm)
    test = pd.read_csv(files["test"])
    x_test = dm.splits["test"][0].numpy()
    # without scaling numeric columns pass through; missing ones get the training median
    missing = test["x3"].isna().to_numpy()
    assert missing.sum() >= 3
    np.testing.assert_allclose(x_test[missing, 2], raw["x3"].median(), rtol=1e-6)
    np.testing.assert_allclose(x_test[~missing, 2], test["x3"][~missing], rtol=1e-6)
    np.testing.assert_allclose(x_test[:, :2], test[["x1", "x2"]], rtol=1e-6)
    one_hot = x_test[:, 3:]
    assert dm.feature_names[3:] == [f"categorical__color_{c}" for c in sorted(COLORS)]
    assert (one_hot[0] == 0).all()  # "purple": never seen in training
    most_frequent = raw["color"].value_counts().idxmax()
    assert one_hot[1].tolist() == [float(c == most_frequent) for c in sorted(COLORS)]  # missing color
    assert (one_hot[2:].sum(1) == 1).all()
    # labels decode back to the file's values
    assert (np.array(dm.classes)[dm.splits["test"][1].numpy()] == test["species"].to_numpy()).all()


@pytest.mark.parametrize("ext", ["parquet", "tsv", "jsonl"])
def test_table_formats_give_the_same_tensors(files, ext):
    csv, other = fitted(str(files["csv"]), "species"), fitted(str(files[ext]), "species")
    assert other.classes == csv.classes
    for split, (x, y) in csv.splits.items():
        assert torch.equal(other.splits[split][1], y)
        if ext == "jsonl":  # decimal text again, written with 15 digits
            torch.testing.assert_close(other.splits[split][0], x)
        else:
            assert torch.equal(other.splits[split][0], x)


def test_table_explicit_features_and_integer_labels(tmp_path):
    frame = make_table(120, seed=2)
    frame["grade"] = frame.pop("species").map({"setosa": 3, "versicolor": 1, "virginica": 2}).astype(float)
    frame.loc[0, "grade"] = np.nan  # so pandas reads the labels as floats
    frame["zip"] = np.arange(120) % 4
    path, test_path = tmp_path / "grades.csv", tmp_path / "grades_test.csv"
    frame.to_csv(path, index=False)
    frame.loc[1, "zip"] = np.nan  # read as floats here: 2.0 must still be zip 2
    frame.iloc[1:].to_csv(test_path, index=False)
    dm = fitted(str(path), "grade", features=["x1", "zip"], categorical=["zip"], test_path=str(test_path))
    assert dm.classes == ["1", "2", "3"]
    assert dm.feature_names == [
        "numeric__x1",
        "categorical__zip_0",
        "categorical__zip_1",
        "categorical__zip_2",
        "categorical__zip_3",
    ]
    one_hot = dm.splits["test"][0][:, 1:]
    assert (one_hot.argmax(1)[1:] == torch.tensor(frame["zip"].iloc[2:].tolist(), dtype=torch.long)).all()
    assert (one_hot.sum(1) == 1).all()  # the missing zip imputed


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"path": "{root}/nope.csv"}, "data.path"),
        ({"path": "{root}/train.xlsx"}, "data.path"),
        ({"label": "kind"}, "data.label"),
        ({"features": ["x1", "height"]}, "data.features"),
        ({"categorical": ["x1", "shape"]}, "data.categorical"),
        ({"categorical": []}, "data.categorical"),  # color is text, so it must be categorical
        ({"test_path": "{root}/missing.parquet"}, "data.test_path"),
    ],
)
def test_table_bad_files_and_columns_name_the_key(files, kwargs, key):
    root = files["csv"].parent
    (root / "train.xlsx").write_text("not a table")
    args = {
        "path": str(files["csv"]),
        "label": "species",
        **{k: v.format(root=root) if isinstance(v, str) else v for k, v in kwargs.items()},
    }
    with pytest.raises(ConfigError) as error:
        fitted(**args)
    assert error.value.key == key
    if key in ("data.label", "data.features"):
        assert "x2" in str(error.value)  # the message lists the available columns


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"scaling": "channel"}, "data.scaling"),
        ({"features": ["x1", "species"]}, "data.features"),
        ({"test_fraction": 1.5}, "data.test_fraction"),
        ({"input_shape": [2, 2]}, "data.input_shape"),
    ],
)
def test_table_bad_settings_fail_at_construction(files, kwargs, key):
    with pytest.raises(ConfigError) as error:
        TableData(str(files["csv"]), "species", **kwargs)
    assert error.value.key == key


def test_table_trains(files):
    dm = fitted(str(files["csv"]), "species")
    pl.seed_everything(0, verbose=False)
    d = dm.input_spec["shape"][0]
    net = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, dm.num_classes))
    train_classifier(net, dm, TRAINER, OPTIM)
    assert test_accuracy(net, dm) > 0.7  # chance: 1/3


def test_table_yaml(files):
    cfg = compose_config(["data=table", f"data.path={files['csv']}", "data.label=species", "model=mlp"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, TableData) and dm.scaling == "standard" and dm.batch_size == 64
    dm.setup()
    assert dm.num_classes == 3


# ---------------------------------------------------------------------------- texts

WORDS = {
    "pos": "good great excellent happy love wonderful superb delight".split(),
    "neg": "bad awful terrible sad hate horrible dreadful gloomy".split(),
    "neutral": "table chair window door floor wall shelf lamp".split(),
}
COMMON = "the a it was is this movie really very so and of".split()
UNSEEN = "marmalade"  # only in the test file
UNSEEN_CHAR = "zq9"  # only in the test file, with a character ("9") no training text has


def make_texts(n: int, seed: int, extra: str = "") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = list(WORDS)[i % 3]
        words = [*rng.choice(WORDS[label], 3), *rng.choice(COMMON, 3), *([extra] if extra else [])]
        rng.shuffle(words)
        rows.append({"text": " ".join(words).capitalize() + ".", "label": label})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("texts")
    paths = {"jsonl": root / "reviews.jsonl", "test": root / "test.csv"}
    make_texts(300, seed=0).to_json(paths["jsonl"], orient="records", lines=True)
    test = make_texts(30, seed=1, extra=UNSEEN)
    test.loc[0, "text"] = f"Good {UNSEEN_CHAR} movie"
    test.to_csv(paths["test"], index=False)
    return paths


def test_text_ids_masks_and_vocab(texts):
    dm = fitted(str(texts["jsonl"]), text="text", label="label", max_length=12)
    tokenizer = dm.tokenizer
    for x, y in dm.splits.values():
        ids, mask = x["input_ids"], x["attention_mask"]
        assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape == (len(y), 12)
        assert (ids[mask == 0] == 0).all() and (ids[mask == 1] != 0).all()  # [PAD] is id 0, and only padding
        assert (ids[:, 0] == tokenizer.cls_token_id).all()
        ends = mask.sum(1) - 1  # [SEP] closes every text (truncated ones too)
        assert (ids[torch.arange(len(y)), ends] == tokenizer.sep_token_id).all()
    assert (dm.splits["train"][0]["attention_mask"].sum(1) < 12).all()  # short texts: padded, not truncated
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert dm.vocab_size == len(tokenizer) < 8000  # the real size of a small corpus' vocabulary
    assert dm.config_values() == {"vocab_size": dm.vocab_size, "max_length": 12}
    assert dm.input_spec == {
        "input_ids": {"shape": [12], "dtype": "int64"},
        "attention_mask": {"shape": [12], "dtype": "int64"},
    }
    assert dm.classes == ["neg", "neutral", "pos"]
    # lowercased: "Good" and "good" are one token
    assert tokenizer("Good")["input_ids"] == tokenizer("good")["input_ids"]


def test_text_vocabulary_from_train_split_only(texts):
    dm = fitted(str(texts["jsonl"]), text="text", label="label", test_path=str(texts["test"]), max_length=16)
    vocab = dm.tokenizer.get_vocab()
    assert UNSEEN not in vocab  # in every test text, so trained on test it would be a whole token
    raw_texts, _ = train_rows(dm)
    assert dict(train_wordpiece(raw_texts, 8000, True, 16).get_vocab()) == dict(vocab)
    ids = dm.splits["test"][0]["input_ids"]
    unk = dm.tokenizer.unk_token_id
    assert dm.tokenizer.convert_ids_to_tokens(ids[0, :5].tolist()) == ["[CLS]", "good", "[UNK]", "movie", "[SEP]"]
    assert (ids[1:] != unk).all()  # the unseen word's letters are known: it becomes word pieces
    assert dm.tokenizer.tokenize(UNSEEN)[1].startswith("##")
    test = pd.read_csv(texts["test"])
    assert (np.array(dm.classes)[dm.splits["test"][1].numpy()] == test["label"].to_numpy()).all()


def test_text_is_deterministic(texts):
    first = fitted(str(texts["jsonl"]), text="text", label="label")
    second = fitted(str(texts["jsonl"]), text="text", label="label")
    assert first.tokenizer.get_vocab() == second.tokenizer.get_vocab()
    for split, (x, _) in first.splits.items():
        assert torch.equal(second.splits[split][0]["input_ids"], x["input_ids"])


def test_wordpiece_vocabulary_is_the_same_in_another_process(tmp_path):
    # tokenizers' trainer alone gives a different vocabulary in every process (hash-map order)
    corpus = make_texts(300, seed=3)["text"].tolist() + ["Émile's 42 numbers: 7, 99 and 1234!"]
    (tmp_path / "corpus.json").write_text(json.dumps(corpus))
    script = (
        "import json, sys; from runner.data.text import train_wordpiece; "
        "texts = json.load(open(sys.argv[1])); "
        "print(json.dumps([train_wordpiece(texts, n).get_vocab() for n in (120, 8000)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "corpus.json")],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert json.loads(out) == [train_wordpiece(corpus, n).get_vocab() for n in (120, 8000)]


def test_text_loaded_tokenizer(texts, tmp_path):
    trained = fitted(str(texts["jsonl"]), text="text", label="label", max_length=16)
    trained.tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = fitted(
        str(texts["jsonl"]), text="text", label="label", max_length=16, tokenizer=str(tmp_path / "tokenizer")
    )
    assert loaded.vocab_size == trained.vocab_size
    for split, (x, _) in trained.splits.items():
        assert torch.equal(loaded.splits[split][0]["input_ids"], x["input_ids"])
        assert torch.equal(loaded.splits[split][0]["attention_mask"], x["attention_mask"])


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"text": "review"}, "data.text"),
        ({"label": "sentiment"}, "data.label"),
        ({"path": "{root}/reviews.txt"}, "data.path"),
        ({"tokenizer": "{root}/no-such-tokenizer"}, "data.tokenizer"),
    ],
)
def test_text_bad_columns_and_tokenizer_name_the_key(texts, kwargs, key):
    root = texts["jsonl"].parent
    args = {
        "path": str(texts["jsonl"]),
        "text": "text",
        "label": "label",
        **{k: v.format(root=root) for k, v in kwargs.items()},
    }
    with pytest.raises(ConfigError) as error:
        dm = TextData(**args)
        dm.setup()
    assert error.value.key == key
    if key in ("data.text", "data.label"):
        assert "'text', 'label'" in str(error.value)  # the available columns


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"scaling": "standard"}, "data.scaling"),
        ({"max_length": 1}, "data.max_length"),
        ({"vocab_size": 3}, "data.vocab_size"),
    ],
)
def test_text_bad_settings_fail_at_construction(texts, kwargs, key):
    with pytest.raises(ConfigError) as error:
        TextData(str(texts["jsonl"]), "text", "label", **kwargs)
    assert error.value.key == key


class MeanEmbedding(nn.Module):
    """The mean embedding of the real tokens, classified by a Linear layer."""

    def __init__(self, vocab_size: int, num_classes: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, 16, padding_idx=0)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = x["attention_mask"].unsqueeze(-1).float()
        return self.head((self.embedding(x["input_ids"]) * mask).sum(1) / mask.sum(1).clamp_min(1.0))


def test_text_trains(texts):
    dm = fitted(str(texts["jsonl"]), text="text", label="label", max_length=16, batch_size=16)
    pl.seed_everything(0, verbose=False)
    net = MeanEmbedding(dm.vocab_size, dm.num_classes)
    train_classifier(net, dm, TRAINER, OPTIM)
    assert test_accuracy(net, dm) > 0.7  # chance: 1/3


def test_text_yaml(texts):
    cfg = compose_config(["data=text", f"data.path={texts['jsonl']}", "model=text_bow"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, TextData) and dm.max_length == 64 and dm.scaling == "none"
    dm.setup()
    assert dm.config_values()["vocab_size"] == len(dm.tokenizer)


def test_an_infinity_in_a_number_column_names_the_file_and_column(tmp_path):
    from runner.data import TableData
    from runner.errors import ConfigError

    path = tmp_path / "t.csv"
    path.write_text("a,b,y\n" + "".join(f"{i},{'inf' if i == 3 else i * 2},{i % 2}\n" for i in range(20)))
    with pytest.raises(
        ConfigError,
        match=r"data.path='.*t.csv'; allowed: finite numbers in every numeric column "
        r"\(column 'b' holds an infinity",
    ):
        TableData(str(path), label="y").setup()
