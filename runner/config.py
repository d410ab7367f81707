"""The config schema (types and ranges) and the one `build` wrapper around Hydra's instantiate.

The schema is registered as `schema` and sits first in conf/config.yaml's defaults, so Hydra
rejects a wrong type or an unknown key while composing; `validate` adds the range checks.
Every object is built from config through `build`, before any training starts.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from runner.errors import ConfigError, check

# Allowed names, kept here so checking a config imports no torch (runner.evaluate.METRICS and
# runner.models.lit build on these lists; a test keeps them in step).
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
METRICS = ("acc", "precision", "recall", "f1", "nll", "ece")
OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}  # name -> torch.optim class
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "64", "16", "bf16")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp", "deepspeed")
SEED_RANGE = 2**32  # numpy's and scikit-learn's random_state range


def _limit(value: Any) -> bool:
    """Lightning's batch limits: null, a number of batches (int >= 0) or a fraction in [0, 1]."""
    if value is None:
        return True
    if isinstance(value, bool):
        return False
    return (isinstance(value, int) and value >= 0) or (isinstance(value, float) and 0.0 <= value <= 1.0)


def _devices(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 1 or value == -1
    if isinstance(value, str):
        return value == "auto" or value.isdigit() and int(value) >= 1 or value == "-1"
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, int) and v >= 0 for v in value)


def check_optimizer(name: str, lr: float, weight_decay: float) -> None:
    """The `optim` settings' allowed values (used by the config schema and by LitClassifier)."""
    check(name in OPTIMIZERS, "optim.name", name, sorted(OPTIMIZERS))
    check(lr > 0, "optim.lr", lr, "a float > 0")
    check(weight_decay >= 0, "optim.weight_decay", weight_decay, "a float >= 0")


@dataclass
class TrainerConf:
    max_epochs: int = 40
    max_steps: int = -1  # > 0 stops after that many optimizer steps (the paper's 6000 steps)
    accelerator: str = "cpu"
    devices: Any = 1
    precision: Any = "32-true"
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    steps_per_call: int = 0  # optimizer steps per Lightning step on in-memory data; 0 = a whole epoch
    deterministic: bool = False
    enable_progress_bar: bool = False
    strategy: str = "auto"
    compile: bool = False  # train through torch.compile(net.forward) (runner/models/lit.py)
    channels_last: bool | None = None  # NHWC weights and image batches in training; null: CNNs on a GPU

    def __post_init__(self) -> None:
        for key in ("limit_train_batches", "limit_val_batches"):
            value = getattr(self, key)
            check(
                _limit(value),
                f"trainer.{key}",
                value,
                "null, a number of batches (an integer >= 0) or a fraction in [0.0, 1.0]",
            )
        check(
            _devices(self.devices),
            "trainer.devices",
            self.devices,
            "'auto', an integer >= 1, -1 (all) or a list of device indices",
        )
        check(str(self.precision) in PRECISIONS, "trainer.precision", self.precision, list(PRECISIONS))
        check(self.strategy in STRATEGIES, "trainer.strategy", self.strategy, list(STRATEGIES))
        check(self.max_epochs >= 1, "trainer.max_epochs", self.max_epochs, "an integer >= 1")
        check(
            self.max_steps == -1 or self.max_steps >= 1,
            "trainer.max_steps",
            self.max_steps,
            "-1 (no limit) or an integer >= 1",
        )
        check(
            self.steps_per_call >= 0,
            "trainer.steps_per_call",
            self.steps_per_call,
            "0 (a whole epoch) or an integer >= 1",
        )
        check(self.accelerator in ACCELERATORS, "trainer.accelerator", self.accelerator, list(ACCELERATORS))


FINETUNE_MODES = ("full", "linear_probe", "lp_ft", "lp_frozen_head")  # optim.finetune (runner/models/lit.py)


def check_finetune(finetune: str, backbone_lr_factor: float, probe_epochs: int) -> None:
    """The fine-tuning keys of `optim`: which weights train, and the backbone's share of the lr."""
    check(finetune in FINETUNE_MODES, "optim.finetune", finetune, list(FINETUNE_MODES))
    check(
        backbone_lr_factor > 0,
        "optim.backbone_lr_factor",
        backbone_lr_factor,
        "a float > 0 (the backbone's lr is optim.lr times this; the head's is optim.lr)",
    )
    check(
        isinstance(probe_epochs, int) and probe_epochs >= 1,
        "optim.probe_epochs",
        probe_epochs,
        "an integer >= 1 (epochs of the linear probe before optim.finetune=lp_ft trains everything)",
    )


@dataclass
class OptimConf:
    name: str = "adam"
    lr: float = 1e-2
    weight_decay: float = 0.0
    momentum: float = 0.0
    # full: every weight trains; linear_probe: the backbone is frozen (eval mode), only the head trains;
    # lp_ft: a linear probe for probe_epochs, then every weight (Kumar et al. 2022, LP-FT);
    # lp_frozen_head: a linear probe, then the backbone alone with the probe's head frozen (fine-tunes whose
    # heads stay fixed, as FusionBench's CLIP fine-tunes keep their zero-shot heads: what merging needs)
    finetune: str = "full"
    backbone_lr_factor: float = 1.0  # the backbone's lr = lr x this (the head keeps lr)
    probe_epochs: int = 1

    def __post_init__(self) -> None:
        check_optimizer(self.name, self.lr, self.weight_decay)
        check(self.momentum >= 0, "optim.momentum", self.momentum, "a float >= 0 (used by sgd)")
        check_finetune(self.finetune, self.backbone_lr_factor, self.probe_epochs)


EXPORTS = ("none", "onnx")  # eval.export (runner/export.py)


@dataclass
class EvalConf:
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    ece_bins: int = 15
    latency_batch_size: int = 256
    latency_repeats: int = 30  # timed calls at least (runner/measure.py) ...
    latency_min_time_s: float = 0.5  # ... and more until they add up to this ...
    latency_max_repeats: int = 10000  # ... but no more than this
    latency_warmup_s: float = 0.2  # untimed calls first (3 at least) for at least this long
    latency_threads: int | None = None  # torch threads while timing; null: the job's `threads` (or torch's)
    export: str = "none"  # onnx: export every evaluated model, run it in ONNX Runtime (runner/export.py)

    def __post_init__(self) -> None:
        check(self.export in EXPORTS, "eval.export", self.export, list(EXPORTS))
        for name in self.metrics:
            check(name in METRICS, "eval.metrics", name, sorted(METRICS))
        check(self.ece_bins >= 1, "eval.ece_bins", self.ece_bins, "an integer >= 1")
        check(self.latency_batch_size >= 1, "eval.latency_batch_size", self.latency_batch_size, "an integer >= 1")
        check(self.latency_repeats >= 1, "eval.latency_repeats", self.latency_repeats, "an integer >= 1")
        check(
            self.latency_min_time_s >= 0, "eval.latency_min_time_s", self.latency_min_time_s, "a number of seconds >= 0"
        )
        check(
            self.latency_max_repeats >= self.latency_repeats,
            "eval.latency_max_repeats",
            self.latency_max_repeats,
            f"an integer >= eval.latency_repeats ({self.latency_repeats})",
        )
        check(self.latency_warmup_s >= 0, "eval.latency_warmup_s", self.latency_warmup_s, "a number of seconds >= 0")
        check(
            self.latency_threads is None or self.latency_threads >= 1,
            "eval.latency_threads",
            self.latency_threads,
            "null (the job's threads) or an integer >= 1",
        )


@dataclass
class TrackingConf:
    _target_: str = "runner.tracking.make_tracker"
    uri: str = "sqlite:///outputs/mlflow.db"
    experiment: str = "runner"
    artifact_location: str | None = "outputs/mlartifacts"
    timeout_s: float = 30.0  # the longest one request to a tracking server may go unanswered
    log_models: bool = True  # every evaluated model as an MLflow LoggedModel of its child run (runner.load)
    async_logging: bool = False  # MLflow's own asynchronous logging (conf/tracking/local.yaml says why off)

    def __post_init__(self) -> None:
        check(bool(self.experiment.strip()), "tracking.experiment", self.experiment, "a non-empty name")
        check_tracking_uri(self.uri)
        check(self.timeout_s > 0, "tracking.timeout_s", self.timeout_s, "a number of seconds > 0")


URI_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def check_tracking_uri(uri: str) -> None:
    """A scheme MLflow can track to; a SQLite file this process can write (else MLflow retries for minutes)."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    check(
        scheme in URI_SCHEMES,
        "tracking.uri",
        uri,
        f"an MLflow tracking URI with one of the schemes {list(URI_SCHEMES)}, "
        "e.g. sqlite:///outputs/mlflow.db or http://host:5000",
    )
    if scheme == "sqlite":
        path = Path(uri.split("://", 1)[1].removeprefix("/"))
        if str(path) in ("", ":memory:"):
            return
        existing = next(p for p in (path, *path.parents) if p.exists())
        writable = os.access(existing, os.W_OK) and (existing == path or existing.is_dir())
        check(writable, "tracking.uri", uri, f"a SQLite file this process can write ({existing} is not writable)")


@dataclass
class CacheConf:
    dir: str | None = "outputs/cache"  # trained members and checkpoints; null disables both
    skip_finished: bool = True  # a job whose config already FINISHED in MLflow is skipped


@dataclass
class RunConf:
    seed: int = 0
    threads: int | None = 1  # torch CPU threads per job (1: the same numbers on a busy machine); null: torch's default
    data: Any = MISSING
    model: Any = MISSING
    ensemble: Any = None  # members: {name: model config} x seeds; null -> the `model` group, one seed
    compress: Any = None  # a recipe from conf/compress/, or null for none
    fuse: Any = None  # a strategy from conf/fuse/, or null for none
    tasks: Any = None  # a pool of tasks (runner/pool.py): name -> {data: <data config>, checkpoint: null}
    merge: Any = None  # a pool's merging method from conf/merge/ (runner/fuse/multitask.py), or null for none
    trainer: TrainerConf = field(default_factory=TrainerConf)
    optim: OptimConf = field(default_factory=OptimConf)
    eval: EvalConf = field(default_factory=EvalConf)
    tracking: TrackingConf = field(default_factory=TrackingConf)
    cache: CacheConf = field(default_factory=CacheConf)


ConfigStore.instance().store(name="schema", node=RunConf)


# What model configs may interpolate from the data (`${data.num_classes}`): once the data is loaded, the
# pipeline builds models from a copy of the config that holds them (runner.data.sources.with_data_values).
DATA_KEYS = ("num_classes", "num_features", "input_shape", "vocab_size", "max_length")


def validate(cfg: DictConfig) -> None:
    """Range checks of the schema (`__post_init__` of its typed nodes), on the resolved config.

    The untyped groups (data, model, ensemble, compress, fuse) are checked by their constructors
    when built: model configs interpolate values the data provides (`${data.num_classes}`,
    `${data.input_shape}`), which exist only once the data is loaded (runner.data.sources.with_data_values).
    """
    seed = OmegaConf.select(cfg, "seed")
    check(isinstance(seed, int) and 0 <= seed < SEED_RANGE, "seed", seed, f"an integer in [0, {SEED_RANGE})")
    unknown = sorted(set(cfg) - set(RunConf.__dataclass_fields__))
    check(
        not unknown,
        unknown[0] if unknown else "",
        cfg.get(unknown[0]) if unknown else None,
        f"no keys beyond the top-level ones {sorted(RunConf.__dataclass_fields__)}",
    )
    for key in ("split_seed", "dataset_seed"):
        value = OmegaConf.select(cfg, f"data.{key}")
        check(
            value is None or (isinstance(value, int) and 0 <= value < SEED_RANGE),
            f"data.{key}",
            value,
            f"an integer in [0, {SEED_RANGE})",
        )
    threads = OmegaConf.select(cfg, "threads")
    check(threads is None or threads >= 1, "threads", threads, "null or an integer >= 1")
    for key in ("trainer", "optim", "eval", "tracking", "cache"):
        if key in cfg:
            OmegaConf.to_object(cfg[key])
    if OmegaConf.select(cfg, "optim.finetune") in ("lp_ft", "lp_frozen_head"):
        probe, epochs = cfg.optim.probe_epochs, OmegaConf.select(cfg, "trainer.max_epochs")
        check(
            epochs is None or probe < epochs,
            "optim.probe_epochs",
            probe,
            f"fewer than trainer.max_epochs ({epochs}): {cfg.optim.finetune} probes first, then trains the backbone",
        )


def interpolation_error(e: OmegaConfBaseException, key: str) -> ConfigError:
    """A config that does not resolve, e.g. ${data.vocab_size} in a model config on data without one."""
    if isinstance(e, MissingMandatoryValue):
        return ConfigError(getattr(e, "full_key", None) or key, "???", "a value: this key is required")
    return ConfigError(
        getattr(e, "full_key", None) or key,
        (getattr(e, "msg", None) or str(e)).split("\n")[0],
        "a value this data provides (see runner.config.DATA_KEYS), or one set in the config",
    )


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """Instantiate `node` (a config with `_target_`); errors name the config key."""
    try:
        return instantiate(node, **kwargs)
    except OmegaConfBaseException as e:
        raise interpolation_error(e, key) from None
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        target = OmegaConf.select(node, "_target_")
        allowed: Any = str(cause or e)
        if isinstance(cause, TypeError) and target:
            params = [p for p in inspect.signature(get_class(target)).parameters if p not in ("self", "kwargs")]
            allowed = f"parameters of {target}: {params} ({cause})"
        raise ConfigError(key, OmegaConf.to_container(node, resolve=True), allowed) from e


def check_seed_sweep(ensemble_seeds: Any, swept: Mapping[str, Sequence[str]]) -> None:
    """A sweep over `seed` beside one fixed `ensemble.seeds` list changes nothing a member learns: its jobs
    would train and report the same members as if they were replicates. Refused before the sweep starts;
    `ensemble.size` seeds the members from `seed` instead. `swept`: key -> its values in the sweep."""
    seeds = swept.get("ensemble.seeds") or ([str(ensemble_seeds)] if ensemble_seeds is not None else [])
    check(
        not (len(swept.get("seed", [])) > 1 and len(seeds) == 1),
        "seed",
        ",".join(swept.get("seed", [])),
        f"one seed beside ensemble.seeds={seeds[0] if seeds else None} (the members' seeds are that list, so "
        "the jobs would repeat the same members); sweep ensemble.seeds instead, or use ensemble.seeds=null "
        "ensemble.size=N to seed the members seed * N + i",
    )
