"""python -m runner.predict: a logged model predicts from .npy, .csv and image folders exactly as
the run's evaluation did (its logged predictions/test.npz), and bad input fails in one line."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, logged_predictions
from helpers import ROOT
from mlflow import MlflowClient
from PIL import Image

import runner
import runner.pipeline
from runner.batches import split_batch
from runner.predict import main

REPO = ROOT


def log_one_model(tmp_path: Path, overrides: list[str]) -> tuple[object, torch.Tensor, str]:
    """Run a tiny job that logs its member; (its child run, the test split's inputs, the store URI)."""
    from runner.config import build
    from runner.data import as_source, describe_data

    cfg = compose_config([*overrides, "tracking.log_models=true"], tmp_path)
    runner.pipeline.run(cfg)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("runner").experiment_id
    [member] = [r for r in client.search_runs([exp]) if r.data.tags.get("role") == "member"]
    dm = as_source(build(cfg.data, "data"))
    describe_data(cfg, dm)
    return member, torch.cat([split_batch(b)[0] for b in dm.test_dataloader()]), uri


@pytest.fixture(scope="module")
def logged_mlp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlp")
    member, x, uri = log_one_model(tmp, ["model=mlp"])
    probs, _ = logged_predictions(tmp, member)
    return member, x.numpy(), uri, probs, tmp


def read_csv_output(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    classes = len(header) - 2
    assert header == ["id", "prediction", *(f"prob_{c}" for c in range(classes))]
    return (
        [r[0] for r in body],
        np.array([int(r[1]) for r in body]),
        np.array([[float(v) for v in r[2:]] for r in body]),
    )


def write_table(path: Path, x: np.ndarray, header: bool, delimiter: str = ",") -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        if header:  # a label column first, which the command must ignore
            writer.writerow(["label", *(f"f{i}" for i in range(x.shape[1]))])
        for row in x:
            writer.writerow(([7] if header else []) + [repr(float(v)) for v in row])


def test_npy_and_csv_inputs_give_the_logged_test_predictions(logged_mlp, tmp_path):
    member, x, uri, probs, _ = logged_mlp
    assert x.shape == (len(probs), 40)
    np.save(tmp_path / "x.npy", x)
    write_table(tmp_path / "x.csv", x, header=True)
    write_table(tmp_path / "x.tsv", x, header=False, delimiter="\t")
    model_uri = member.data.tags["model_uri"]

    assert (
        main(
            [
                f"model={model_uri}",
                f"input={tmp_path / 'x.npy'}",
                f"output={tmp_path / 'a.csv'}",
                f"tracking_uri={uri}",
                "batch_size=7",
            ]
        )
        == 0
    )
    ids, predictions, found = read_csv_output(tmp_path / "a.csv")
    assert ids == [str(i) for i in range(len(x))]
    np.testing.assert_allclose(found, probs, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(predictions, probs.argmax(1))

    for table in ("x.csv", "x.tsv"):  # by child run id, to .npz
        assert (
            main(
                [
                    f"model={member.info.run_id}",
                    f"input={tmp_path / table}",
                    f"output={tmp_path / 'b.npz'}",
                    f"tracking_uri={uri}",
                ]
            )
            == 0
        )
        with np.load(tmp_path / "b.npz") as f:
            np.testing.assert_allclose(f["probs"], probs, rtol=0, atol=1e-6)
            np.testing.assert_array_equal(f["predictions"], probs.argmax(1))
            np.testing.assert_array_equal(f["ids"], [str(i) for i in range(len(x))])

    np.save(tmp_path / "one.npy", x[3])  # one sample without its batch dim, to .npy
    assert (
        main(
            [
                f"model={model_uri}",
                f"input={tmp_path / 'one.npy'}",
                f"output={tmp_path / 'c.npy'}",
                f"tracking_uri={uri}",
            ]
        )
        == 0
    )
    np.testing.assert_allclose(np.load(tmp_path / "c.npy"), probs[3:4], rtol=0, atol=1e-6)


def test_wrong_shapes_and_bad_arguments_fail_in_one_line(logged_mlp, tmp_path, capsys):
    member, x, uri, _, _ = logged_mlp
    model = f"model={member.data.tags['model_uri']}"
    np.save(tmp_path / "wide.npy", np.zeros((4, 41), dtype=np.float32))
    write_table(tmp_path / "narrow.csv", x[:4, :39], header=False)
    (tmp_path / "x.parquet").write_text("not a table")
    (tmp_path / "images").mkdir()
    np.save(tmp_path / "x.npy", x[:2])
    cases = {
        (model, f"input={tmp_path / 'wide.npy'}"): f"input='{tmp_path / 'wide.npy'}': samples of shape (41,) "
        "(array (4, 41)); the model expects (40,) per sample",
        (model, f"input={tmp_path / 'narrow.csv'}"): "samples of shape (39,) (array (4, 39)); the model expects (40,)",
        (model, f"input={tmp_path / 'missing.npy'}"): f"input='{tmp_path / 'missing.npy'}': no such file or folder",
        (model, f"input={tmp_path / 'images'}"): "a folder of images, but the model expects (40,) per sample",
        (model, f"input={tmp_path / 'x.parquet'}"): "unknown extension '.parquet'; expected .npy, .csv, .tsv",
        (
            "model=models:/m-doesnotexist",
            f"input={tmp_path / 'x.npy'}",
        ): "model='models:/m-doesnotexist': cannot load it",
        ("model=0123456789abcdef", f"input={tmp_path / 'x.npy'}"): "model='0123456789abcdef': cannot load it",
    }
    for (model_arg, input_arg), message in cases.items():
        assert main([model_arg, input_arg, f"output={tmp_path / 'out.csv'}", f"tracking_uri={uri}"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (message, err)
    assert main([model, f"input={tmp_path / 'x.npy'}", f"output={tmp_path / 'out.json'}", f"tracking_uri={uri}"]) == 2
    assert "output=" in capsys.readouterr().err
    assert main([model, f"input={tmp_path / 'x.npy'}", "batch_size=0", f"output={tmp_path / 'o.csv'}"]) == 2
    assert "batch_size='0'" in capsys.readouterr().err
    assert main([model, f"output={tmp_path / 'o.csv'}"]) == 2
    assert "missing input=" in capsys.readouterr().err
    # a store that is not there (e.g. run from another folder) is said, not created empty
    missing = tmp_path / "elsewhere" / "mlflow.db"
    assert (
        main(
            [model, f"input={tmp_path / 'x.npy'}", f"output={tmp_path / 'o.csv'}", f"tracking_uri=sqlite:///{missing}"]
        )
        == 2
    )
    assert f"tracking_uri='sqlite:///{missing}': no MLflow store there" in capsys.readouterr().err
    assert not missing.parent.exists() and not (tmp_path / "out.csv").exists()
    assert main(["--help"]) == 0 and "python -m runner.predict model=" in capsys.readouterr().out


@pytest.mark.slow
def test_the_real_command_line(logged_mlp, tmp_path):
    member, x, uri, probs, _ = logged_mlp
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner.predict",
            f"model={member.data.tags['model_uri']}",
            f"input={tmp_path / 'x.npy'}",
            f"output={tmp_path / 'out.npz'}",
            f"tracking_uri={uri}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "out.npz") as f:
        np.testing.assert_allclose(f["probs"], probs, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(f["predictions"], probs.argmax(1))
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner.predict",
            f"model={member.data.tags['model_uri']}",
            f"input={tmp_path / 'nothing.npy'}",
            f"output={tmp_path / 'o.csv'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"runner.predict: error: input='{tmp_path / 'nothing.npy'}': no such file or folder"
    ]


def test_an_image_folder(tmp_path):
    from sklearn.datasets import load_digits

    member, x, uri = log_one_model(tmp_path, ["data=digits_image", "model=lenet300"])
    assert x.shape[1:] == (1, 8, 8)
    raw = load_digits().images[:6]  # 0..16 pixel values, as scikit-learn ships them
    folder = tmp_path / "images"
    folder.mkdir()
    names = [f"digit_{i}.png" for i in range(len(raw))]
    for name, image in zip(names, raw):
        Image.fromarray(np.round(image * 255 / 16).astype(np.uint8), mode="L").save(folder / name)
    Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8), mode="RGB").save(folder / "rgb_16x16.jpg")
    (folder / "notes.txt").write_text("not an image")

    assert (
        main(
            [f"model={member.info.run_id}", f"input={folder}", f"output={tmp_path / 'out.csv'}", f"tracking_uri={uri}"]
        )
        == 0
    )
    ids, predictions, probs = read_csv_output(tmp_path / "out.csv")
    assert ids == sorted([*names, "rgb_16x16.jpg"])
    np.testing.assert_allclose(probs.sum(1), np.ones(len(ids)), rtol=0, atol=1e-12)
    # the same preprocessing by hand: gray, 8x8 (the jpg resized), /255, no normalization
    rgb = Image.open(folder / "rgb_16x16.jpg").convert("L").resize((8, 8), Image.Resampling.BILINEAR)
    by_name = {n: np.round(im * 255 / 16) for n, im in zip(names, raw)} | {"rgb_16x16.jpg": np.array(rgb)}
    expected_x = torch.tensor(np.stack([by_name[i][None] for i in ids]), dtype=torch.float32) / 255
    expected = runner.load(member.info.run_id, tracking_uri=uri).predict_proba(expected_x).numpy()
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(predictions, expected.argmax(1))
