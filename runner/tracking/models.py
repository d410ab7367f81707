"""Evaluated models as MLflow 3 LoggedModels, and loading them back.

`pack_model` runs in the job's process and only pickles (torch.save into bytes): the model, a few
real test inputs, and the import path the job had, so a worker process can unpickle the user's own
classes too. `log_packed_model` (in the tracker, hence in the MLflow worker by default) unpickles
it, infers the signature from one forward pass on those inputs and logs it with
`mlflow.pytorch.log_model` as a LoggedModel of the evaluated model's child run, named by role and
member (`member-cnn1d-s0`, `fused-mean`); the tracker then logs the run's test metrics linked to it.
A cached member is logged once: its LoggedModel carries the member cache entry (CACHE_ENTRY_TAG) and
later runs of that member point at it (`find_cached_model`). `load_logged_model` brings one back by
`models:/<id>` URI or child run id.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NOT_IN_NAMES = re.compile(r"[/:.%\"']")  # what MLflow refuses in a LoggedModel's name (artifact-safe)
DICT_EXAMPLE = "input_example.npz"  # a dict input example (text models), beside the logged model
RAW_INPUTS = "raw_inputs.pkl"  # beside the logged model: raw rows -> inputs (pickled, like the model)
MODEL_META = "runner.json"  # beside the logged model: {"classes": [...], "tokenizer": ..., "max_length": ...}
MODEL_URI_TAG = "model_uri"  # the child run's tag: models:/<model_id>
CACHE_ENTRY_TAG = "member_cache_entry"  # a cached member's weights (<cache key>:<file sha256>), on its runs and model
EXAMPLE_ROWS = 5  # test inputs kept as the input example


@dataclass
class PackedModel:
    """A model ready to cross a process boundary: plain bytes and numpy arrays."""

    data: bytes  # torch.save(model) of the whole module
    example: Any  # numpy array, or dict of numpy arrays (token ids, masks)
    sys_path: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # JSON: the class names, the preprocessing (MODEL_META)
    raw_inputs: bytes | None = None  # pickled callable: raw rows -> model inputs (a table's fitted encoding)
    name: str = "model"  # the LoggedModel's name (logged_model_name)
    tags: dict[str, str] = field(default_factory=dict)  # the LoggedModel's tags: its source, CACHE_ENTRY_TAG


def logged_model_name(role: str, name: str) -> str:
    """`<role>-<name>` (member-cnn1d-s0, fused-mean) with what MLflow refuses in a name replaced by `_`."""
    return NOT_IN_NAMES.sub("_", f"{role}-{name}" if name else role)


def pack_model(
    model: Any,
    inputs: Any,
    rows: int = EXAMPLE_ROWS,
    meta: dict[str, Any] | None = None,
    raw_inputs: Any = None,
    name: str = "model",
    tags: dict[str, str] | None = None,
) -> PackedModel:
    """The model (moved nowhere, copied by pickling), its first `rows` inputs as numpy, and `meta`
    (what predictions need beside the module: class names, a tokenizer); `name` and `tags` are the
    LoggedModel's. A model that would not unpickle is the caller's to make one that does (the
    pipeline's recorder passes runner.compress.quantize.shippable's copy of an int8 graph)."""
    import torch

    buffer = io.BytesIO()
    torch.save(model, buffer)
    if isinstance(inputs, dict):
        example = {k: v[:rows].detach().cpu().numpy() for k, v in inputs.items()}
    else:
        example = inputs[:rows].detach().cpu().numpy()
    return PackedModel(
        buffer.getvalue(),
        example,
        [p for p in sys.path if p],
        dict(meta or {}),
        pickle.dumps(raw_inputs) if raw_inputs is not None else None,
        name,
        dict(tags or {}),
    )


def unpack_model(packed: PackedModel) -> Any:
    """The module on the CPU, in eval mode; the job's import path first extends this process's."""
    import torch

    sys.path.extend(p for p in packed.sys_path if p not in sys.path)
    model = torch.load(io.BytesIO(packed.data), map_location="cpu", weights_only=False)
    return model.eval()


def pip_requirements() -> list[str]:
    """What loading needs, pinned to this environment (explicit: MLflow's inference takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    names = [
        "torch",
        "numpy",
        "mlflow",
        "pytorch-lightning",
        "torchmetrics",
        "omegaconf",
        "hydra-core",
        "scikit-learn",
        "transformers",
        "torchao",
    ]
    found = []
    for name in names:
        try:
            found.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return found


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's model logging reads the global tracking URI: set it for the call only."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def prepare() -> None:
    """Import what logging a model needs (torch, mlflow.pytorch, which imports Lightning: seconds)."""
    import mlflow.pytorch  # noqa: F401
    import torch  # noqa: F401
    from mlflow.models import infer_signature  # noqa: F401


def log_packed_model(uri: str, run_id: str, packed: PackedModel, client: Any = None) -> str:
    """Log `packed` as a LoggedModel of run `run_id` (its source run, and one of the run's outputs)
    through `client` (default: a new MlflowClient of `uri`); its model id. No metrics are linked
    here: the caller logs the run's own with this id."""
    import mlflow
    import torch
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import infer_signature

    model = unpack_model(packed)
    x = packed.example
    with torch.no_grad():
        out = model({k: torch.from_numpy(v) for k, v in x.items()} if isinstance(x, dict) else torch.from_numpy(x))
    out = out.detach()
    signature = infer_signature(x, (out.float() if out.dtype == torch.bfloat16 else out).numpy())  # numpy has no bf16
    # The LoggedModel is created here, not by log_model inside the run: log_model would link every metric
    # of the run's step 0 to it (the first epoch of the learning curves too) and tag it with this process's
    # script (worker.py) as its source; `packed.tags` carry the job's.
    client = client or MlflowClient(uri)
    run = client.get_run(run_id)
    logged = client.create_logged_model(
        run.info.experiment_id, name=packed.name, source_run_id=run_id, tags=packed.tags, params=run.data.params
    )
    # pickle, not MLflow's default pt2 (torch.export): quantized, int8-graph, Hugging Face and ensemble
    # modules do not all export, and the modules must come back as they were evaluated
    # MLflow's PyTorch flavor refuses a dict input example (token ids and masks): the signature names
    # the tensors, and the example travels as a file beside the model (read back by load_logged_model)
    with tempfile.TemporaryDirectory() as tmp, using_tracking_uri(uri), _quiet_pickle_warning():
        extra = []
        if isinstance(x, dict):
            np.savez(Path(tmp) / DICT_EXAMPLE, **x)
            extra = [str(Path(tmp) / DICT_EXAMPLE)]
        if packed.meta:
            (Path(tmp) / MODEL_META).write_text(json.dumps(packed.meta))
            extra.append(str(Path(tmp) / MODEL_META))
        if packed.raw_inputs is not None:
            (Path(tmp) / RAW_INPUTS).write_bytes(packed.raw_inputs)
            extra.append(str(Path(tmp) / RAW_INPUTS))
        mlflow.pytorch.log_model(
            model,
            name=packed.name,
            model_id=logged.model_id,
            input_example=None if isinstance(x, dict) else x,
            signature=signature,
            pip_requirements=pip_requirements(),
            serialization_format="pickle",
            extra_files=extra or None,
        )
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])  # the run's page lists it
    return logged.model_id


def find_cached_model(client: Any, experiment_id: str, entry: str | None) -> str | None:
    """The id of the newest READY LoggedModel of the experiment logged from member cache entry `entry`
    (CACHE_ENTRY_TAG: the same cache key and weights file), if there is one. Jobs that run at the same
    time may each log a member the other one is logging: two copies, never a wrong one."""
    if not entry:
        return None
    found = client.search_logged_models([experiment_id], filter_string=f"tags.`{CACHE_ENTRY_TAG}` = '{entry}'")
    ready = [m for m in found if str(m.status) == "READY"]  # (a status filter does not match in SQLite stores)
    return max(ready, key=lambda m: m.creation_timestamp).model_id if ready else None


class _NotThePickleWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Pickle or CloudPickle" not in record.getMessage()


@contextlib.contextmanager
def _quiet_pickle_warning() -> Iterator[None]:
    """MLflow warns on every pickled model; pickling is this module's documented choice, said once here."""
    logger, quiet = logging.getLogger("mlflow.pytorch"), _NotThePickleWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


@dataclass
class LoadedModel:
    """A logged model brought back: the module and what it was logged with."""

    model: Any
    model_uri: str
    run_id: str | None
    input_example: Any
    signature: Any
    meta: dict[str, Any] = field(default_factory=dict)  # MODEL_META: class names, tokenizer
    raw_inputs: Any = None  # RAW_INPUTS: raw rows -> model inputs


def model_uri_of(client: Any, ref: str) -> str:
    """`models:/<id>` as given; a registered version, `models:/<name>@<alias>` or `models:/<name>/<version>`
    (python -m runner.register), as the logged model it was registered from; or the model a child run
    logged (its tag, else its LoggedModel)."""
    if ref.startswith("models:/"):
        name, at, alias = ref.removeprefix("models:/").partition("@")
        name, slash, number = name.partition("/")
        if not at and not slash:
            return ref
        version = client.get_model_version_by_alias(name, alias) if at else client.get_model_version(name, number)
        if getattr(version, "model_id", None):
            return f"models:/{version.model_id}"
        logged = (version.source or "").removeprefix("models:/")
        if version.source.startswith("models:/") and "/" not in logged and "@" not in logged:
            return version.source  # registered from a logged model's models:/<id>
        raise LookupError(
            f"{ref}: version {version.version} of {name!r} was not registered from a logged "
            f"model (its source: {version.source}); load it with mlflow.pytorch.load_model"
        )
    run = client.get_run(ref)
    if MODEL_URI_TAG in run.data.tags:
        return run.data.tags[MODEL_URI_TAG]
    found = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{ref}'")
    if not found:
        raise LookupError(
            f"run {ref} logged no model (was tracking.log_models false? its role: "
            f"{run.data.tags.get('role', 'not an evaluated model')})"
        )
    return f"models:/{found[0].model_id}"


def load_logged_model(ref: str, tracking_uri: str) -> LoadedModel:
    """Download and unpickle a logged model: `ref` is a models:/<id> URI or a child run id."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import Model

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        raise LookupError(
            f"tracking_uri={tracking_uri!r}: no MLflow store there (run from the folder of the "
            "job's outputs/, or pass the store's tracking_uri)"
        )
    client = MlflowClient(tracking_uri)
    uri = model_uri_of(client, ref)
    logged = client.get_logged_model(uri.removeprefix("models:/"))
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=logged.artifact_location, dst_path=tmp, tracking_uri=tracking_uri
        )
        meta = Model.load(local)
        example = meta.load_input_example(local)
        dict_example = Path(local) / "extra_files" / DICT_EXAMPLE
        if example is None and dict_example.exists():
            with np.load(dict_example) as arrays:
                example = {k: arrays[k] for k in arrays.files}
        meta_file = Path(local) / "extra_files" / MODEL_META
        meta_data = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        raw_file = Path(local) / "extra_files" / RAW_INPUTS
        raw_inputs = pickle.loads(raw_file.read_bytes()) if raw_file.exists() else None
        model = mlflow.pytorch.load_model(local, map_location="cpu")
    return LoadedModel(model.eval(), uri, logged.source_run_id, example, meta.signature, meta_data, raw_inputs)
