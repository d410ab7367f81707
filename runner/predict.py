"""Predict with a model a job logged to MLflow, from the command line.

    python -m runner.predict model=<models:/ URI or child run id> input=<file or folder> output=<file>
                             [tracking_uri=<MLflow URI>] [batch_size=<int, default 256>]

`model` is what `runner.load` takes (runner/serve.py): a models:/<id> URI, a registered
models:/<name>@<alias> (python -m runner.register) or a child run id; `tracking_uri` defaults to
$MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db.

`input`, checked against the shape of the model's input example (one sample, batch dim dropped):
- `.npy`: an array of samples shaped like one input (then a batch of one) or (N, *input shape);
- `.csv` / `.tsv`: for a model trained on `data=table`, raw rows with the training file's columns
  (text categories, gaps and all), encoded by the imputation, scaling and one-hot encoding fitted on
  its training split, which travel with the model; for other models, one sample per row of numeric
  feature columns; a header row is optional and a column named `label` is ignored; the columns fill
  one input (reshaped when it has several dims);
- a folder: every PNG / JPEG / BMP / GIF / WebP in it (not its subfolders), in sorted name order,
  read with Pillow, converted to grayscale (1-channel inputs) or RGB (3), resized to the input's
  HxW (bilinear) and scaled to [0, 1], as runner.data.vision.ImageFiles reads them.
  NOT applied: the data source's normalization. ImageFolder and the array image sources
  (scaling: channel, standard) subtract a mean and divide by a std computed on the training split;
  that is part of the data source, not of the logged model, so images here reach the model in
  [0, 1]. Normalize them yourself (and pass a `.npy`) unless the model includes it (EfficientNet-Lite does).
- a text model (token inputs): a `.txt` file of texts, one per line, or a `.csv`/`.tsv` with a `text`
  column; they are tokenized with the tokenizer the model was logged with (its pretrained one, or the
  one its data source trained).

`output`:
- `.csv`: columns `id` (the row index, or the image file name), `prediction` (the argmax class
  index), `class` (its name, where the data named its classes) and one probability per class
  (`prob_<name>`, else `prob_0` .. `prob_{C-1}`);
- `.npy`: the (N, C) float64 probabilities; `.npz`: `predictions`, `probs` and `ids`.

Probabilities are what `ShippedModel.predict_proba` gives (float64, as the evaluation computed them).
A bad model, a missing input, an unknown extension or an input of the wrong shape exits with status
2 and one line on stderr.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TABLE_EXTENSIONS = {".csv": ",", ".tsv": "\t"}
OUTPUT_EXTENSIONS = (".csv", ".npy", ".npz")
KEYS = ("model", "input", "output", "tracking_uri", "batch_size")
NOT_NORMALIZED = (
    "images scaled to [0, 1] only: the data source's per-channel mean/std normalization "
    "is not applied (it is not part of the logged model)"
)


class PredictError(ValueError):
    """Bad arguments or input: the message is the one line the command prints."""


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """`key=value` arguments (KEYS) -> a dict; model, input and output are required."""
    args: dict[str, Any] = {"tracking_uri": None, "batch_size": 256}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in KEYS:
            raise PredictError(f"argument {arg!r}: expected key=value with key one of {list(KEYS)}")
        args[key] = value
    missing = [k for k in ("model", "input", "output") if not args.get(k)]
    if missing:
        raise PredictError(
            f"missing {', '.join(k + '=' for k in missing)} (usage: python -m runner.predict "
            "model=<URI or run id> input=<file or folder> output=<.csv|.npy|.npz>)"
        )
    size = str(args["batch_size"])
    if not size.isdigit() or int(size) < 1:
        raise PredictError(f"batch_size={size!r}: expected a positive integer")
    args["batch_size"] = int(size)
    return args


def sample_shape(example: Any) -> tuple[tuple[int, ...], np.dtype]:
    """The shape of one input (the example's batch dim dropped) and its dtype."""
    if isinstance(example, dict) or example is None:
        raise PredictError(
            "this model takes token inputs (a dict of arrays): runner.predict reads "
            "arrays, tables and images only; use runner.load(...).predict_proba"
        )
    example = np.asarray(example)
    return tuple(example.shape[1:]), example.dtype


def read_input(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, list[str]]:
    """(inputs shaped (N, *shape), one id per sample) read from a .npy, .csv/.tsv or image folder."""
    check_input(path)
    if path.is_dir():
        x, ids = read_images(path, shape)
    elif path.suffix.lower() == ".npy":
        x = np.load(path, allow_pickle=False)
        x = x[None] if x.shape == shape else x
    else:
        x = read_table(path, TABLE_EXTENSIONS[path.suffix.lower()])
        if x.ndim == 2 and len(shape) > 1 and x.shape[1] == int(np.prod(shape)):
            x = x.reshape(len(x), *shape)
    if x.ndim == 0 or tuple(x.shape[1:]) != shape:
        raise PredictError(
            f"input={str(path)!r}: samples of shape {tuple(x.shape[1:])} (array {tuple(x.shape)}); "
            f"the model expects {shape} per sample, i.e. (N, {', '.join(map(str, shape))})"
        )
    if not path.is_dir():
        ids = [str(i) for i in range(len(x))]
    return x.astype(dtype, copy=False), ids


def check_input(path: Path) -> None:
    """A folder, or an existing file with an extension read here (before the model is loaded)."""
    if not path.exists():
        raise PredictError(f"input={str(path)!r}: no such file or folder")
    if not path.is_dir() and path.suffix.lower() not in (".npy", ".txt", *TABLE_EXTENSIONS):
        raise PredictError(
            f"input={str(path)!r}: unknown extension {path.suffix!r}; expected .npy, "
            ".csv, .tsv, .txt (texts) or a folder of images"
        )


def read_table(path: Path, delimiter: str) -> np.ndarray:
    """Rows of numbers; a first row that is not all numbers is a header; a `label` column is dropped."""
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f, delimiter=delimiter) if row]
    if not rows:
        raise PredictError(f"input={str(path)!r}: an empty table")
    header = None if _numeric(rows[0]) else [name.strip() for name in rows.pop(0)]
    keep = [i for i, name in enumerate(header or rows[0]) if header is None or name != "label"]
    try:
        return np.array([[float(row[i]) for i in keep] for row in rows], dtype=np.float64).reshape(len(rows), len(keep))
    except (ValueError, IndexError) as e:
        raise PredictError(f"input={str(path)!r}: every row must hold {len(keep)} numeric feature columns ({e})") from e


def _numeric(row: list[str]) -> bool:
    try:
        [float(v) for v in row]
    except ValueError:
        return False
    return True


def read_images(folder: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, list[str]]:
    """Image files of `folder` as (N, C, H, W) float32 in [0, 1], not normalized; ids: file names."""
    from PIL import Image

    if len(shape) != 3 or shape[0] not in (1, 3):
        raise PredictError(
            f"input={str(folder)!r}: a folder of images, but the model expects {shape} per "
            "sample, not (C, H, W) with 1 or 3 channels"
        )
    channels, height, width = shape
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise PredictError(f"input={str(folder)!r}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    images = []
    for file in files:
        with Image.open(file) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.array(image, dtype=np.uint8).reshape(height, width, channels)
        images.append(pixels.transpose(2, 0, 1))
    log.info("predict: %d images from %s; %s", len(files), folder, NOT_NORMALIZED)
    return np.stack(images).astype(np.float32) / np.float32(255.0), [f.name for f in files]


def predict(shipped: Any, x: np.ndarray | dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """(N, C) float64 probabilities of `shipped.predict_proba`, batch by batch."""

    def batch(i: int) -> Any:
        if isinstance(x, dict):
            return {k: torch.from_numpy(np.ascontiguousarray(v[i : i + batch_size])) for k, v in x.items()}
        return torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size]))

    n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
    return torch.cat([shipped.predict_proba(batch(i)) for i in range(0, n, batch_size)]).numpy()


def write_output(path: Path, probs: np.ndarray, ids: list[str], classes: Sequence[str] = ()) -> None:
    """Probabilities and their argmax (and its class name, where the classes have names) to .csv, .npy
    (probabilities only) or .npz."""
    predictions = probs.argmax(1)
    names = [classes[p] for p in predictions] if classes else None
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        np.save(path, probs)
    elif suffix == ".npz":
        np.savez(
            path,
            predictions=predictions,
            probs=probs,
            ids=np.array(ids),
            **({"classes": np.array(names)} if names else {}),
        )
    else:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                [
                    "id",
                    "prediction",
                    *(["class"] if names else []),
                    *(f"prob_{c}" for c in (classes or range(probs.shape[1]))),
                ]
            )
            for k, (i, p, row) in enumerate(zip(ids, predictions, probs)):
                writer.writerow([i, int(p), *([names[k]] if names else []), *(repr(float(v)) for v in row)])


def run(args: dict[str, Any]) -> Path:
    """Load the model, read and check the input, predict, write; returns the output path."""
    output = Path(args["output"])
    if output.suffix.lower() not in OUTPUT_EXTENSIONS:
        raise PredictError(
            f"output={str(output)!r}: unknown extension {output.suffix!r}; expected one of {list(OUTPUT_EXTENSIONS)}"
        )
    source = Path(args["input"])
    check_input(source)
    from runner.serve import load  # here: it imports torch; a bad argument fails before that

    try:
        shipped = load(args["model"], tracking_uri=args["tracking_uri"])
    except Exception as e:  # noqa: BLE001  (MLflow raises many types; the command says which, in one line)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PredictError(f"model={args['model']!r}: cannot load it ({type(e).__name__}: {reason})") from e
    if isinstance(shipped.input_example, dict):  # a text model: raw texts, tokenized as it was trained
        texts, ids = read_texts(source)
        x = {k: v.numpy() for k, v in shipped.encode(texts).items()}
    elif (
        shipped.raw_inputs is not None and source.suffix.lower() in TABLE_EXTENSIONS
    ):  # raw rows, encoded as in training
        x, ids = read_raw_rows(source, shipped.raw_inputs)
    else:
        shape, dtype = sample_shape(shipped.input_example)
        x, ids = read_input(source, shape, dtype)
    write_output(output, predict(shipped, x, args["batch_size"]), ids, shipped.classes)
    return output


def read_raw_rows(path: Path, encode: Any) -> tuple[np.ndarray, list[str]]:
    """Rows of the training file's columns (any order; a label column and others ignored), encoded by the
    imputation, scaling and one-hot encoding the data source fitted on its training split."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, sep=TABLE_EXTENSIONS[path.suffix.lower()])
        x = encode(frame)
    except ValueError as e:
        raise PredictError(f"input={str(path)!r}: {e}") from None
    return x, [str(i) for i in range(len(x))]


def read_texts(path: Path) -> tuple[list[str], list[str]]:
    """Raw texts: a .txt file (one per line) or a .csv/.tsv with a `text` column (else its first column)."""
    if not path.is_file() or path.suffix.lower() not in (".txt", *TABLE_EXTENSIONS):
        raise PredictError(
            f"input={str(path)!r}: a text model reads a .txt file (one text per line) or a .csv/.tsv "
            "with a `text` column"
        )
    if path.suffix.lower() == ".txt":
        texts = [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter=TABLE_EXTENSIONS[path.suffix.lower()]))
        column = "text" if rows and "text" in rows[0] else (next(iter(rows[0])) if rows else None)
        texts = [row[column] or "" for row in rows] if column else []
    if not texts:
        raise PredictError(f"input={str(path)!r}: no texts in it")
    return texts, [str(i) for i in range(len(texts))]


def main(argv: Sequence[str] | None = None) -> int:
    """The command: 0 on success, 2 with one line on stderr on bad arguments, model or input."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr keeps to the one line
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    try:
        output = run(parse_args(argv))
    except PredictError as e:
        print(f"runner.predict: error: {e}", file=sys.stderr)
        return 2
    print(f"runner.predict: wrote {output}")
    return 0


if __name__ == "__main__":
    from runner.quiet import quiet_libraries  # the command's entry only

    quiet_libraries()
    sys.exit(main())
