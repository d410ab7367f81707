"""Shared fixtures: tiny data and quickly trained tiny models (seconds, offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import runner.config  # noqa: F401  (registers the schema)
from runner.batches import DataSpec
from runner.data import MNIST1D, SklearnDataset
from runner.models import CNN1D, MLP
from runner.train import train_classifier

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
# What checks before training see of MNIST-1D-shaped data: 10 classes, 8 real-looking inputs of 40 floats.
SPEC = DataSpec(10, torch.randn(8, 40, generator=torch.Generator().manual_seed(0)), {"shape": [40], "dtype": "float32"})
FAST_TRAINER = {"max_epochs": 3, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


def pytest_configure(config):
    """The library notices a command silences at its entry (runner/quiet.py), silenced for the tests."""
    from runner.quiet import WARNINGS, quiet_libraries

    quiet_libraries()
    for message in WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}")


TIERS = ("unit", "contract", "e2e")  # tests/<tier>/: `pytest -m unit` (or the folder) runs one tier


def pytest_collection_modifyitems(config, items):
    """Every test is marked with its tier (its folder). Tests marked `gpu` need a CUDA GPU: skipped,
    saying so, where none is visible."""
    for item in items:
        tier = item.path.parent.name
        assert tier in TIERS, f"{item.path}: a test file belongs in tests/{{{','.join(TIERS)}}}/"
        item.add_marker(getattr(pytest.mark, tier))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible here)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


def compose_config(overrides: list[str] | tuple[str, ...] = (), tmp_path: Path | None = None) -> DictConfig:
    """The real config, shrunk to tiny settings; MLflow and caches under tmp_path."""
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        mnist1d = compose("config", overrides=list(overrides)).data.get("_target_") == "runner.data.MNIST1D"
        # MLflow as users run it: the default tracking settings, models logged (issue #24). Measured cost:
        # tests/e2e/test_pipeline.py 141 s and 135 s vs 125 s and 101 s with log_models off (2 cores, load 4.5-5.5)
        tiny = ["trainer=fast", "eval.latency_repeats=2", "eval.latency_min_time_s=0", "eval.latency_warmup_s=0"]
        tiny += ["data.num_samples=600"] if mnist1d else []
        if tmp_path is not None:
            tiny += [
                f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                f"tracking.artifact_location={tmp_path}/mlartifacts",
                f"cache.dir={tmp_path}/cache",
            ]
            tiny += [f"data.cache_dir={tmp_path}/data"] if mnist1d else []
        return compose("config", overrides=tiny + list(overrides))


@pytest.fixture(scope="session")
def mnist1d_small(tmp_path_factory) -> MNIST1D:
    dm = MNIST1D(num_samples=1000, cache_dir=str(tmp_path_factory.mktemp("data")))
    dm.setup()
    return dm


@pytest.fixture(scope="session")
def wine() -> SklearnDataset:
    dm = SklearnDataset("wine", num_features=13, num_classes=3)
    dm.setup()
    return dm


def _train(net, dm, seed: int, epochs: int = 3):
    pl.seed_everything(seed, verbose=False)
    return train_classifier(net, dm, {**FAST_TRAINER, "max_epochs": epochs}, {"name": "adam", "lr": 1e-2})


@pytest.fixture(scope="session")
def trained_mlps(mnist1d_small) -> list[MLP]:
    """Three MLPs trained for a few epochs on small MNIST-1D with different seeds."""
    nets = []
    for seed in range(3):
        pl.seed_everything(seed, verbose=False)
        nets.append(_train(MLP(40, 10, hidden=64), mnist1d_small, seed))
    return nets


@pytest.fixture(scope="session")
def trained_cnn(mnist1d_small) -> CNN1D:
    pl.seed_everything(0, verbose=False)
    return _train(CNN1D(40, 10), mnist1d_small, 0)


def logged_predictions(tmp_path: Path, run) -> tuple:
    """(probabilities, targets) a child run logged as predictions/test.npz."""
    import numpy as np
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    with np.load(client.download_artifacts(run.info.run_id, "predictions/test.npz", str(tmp_path))) as f:
        return f["probs"], f["targets"]


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> str:
    """A folder holding a tiny random Llama and a WordPiece tokenizer trained on review texts: what
    model.weights of the SmolLM2 options take in tests (a causal LM, or a classifier on its decoder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from runner.data.packaged_text import RottenTomatoes
    from runner.data.text import train_wordpiece

    texts = RottenTomatoes().frame()["text"].tolist()[:2000]
    tokenizer = train_wordpiece(texts, vocab_size=300)
    folder = tmp_path_factory.mktemp("tiny_lm")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session", autouse=True)
def repository_outputs_untouched():
    """The suite writes under pytest's tmp_path only, never into the repository's outputs/ (nor an MLflow
    default ./mlruns folder there)."""
    outputs = Path(CONF_DIR).parent / "outputs"
    mlruns = Path(CONF_DIR).parent / "mlruns"
    existed = mlruns.exists()

    def listing() -> set[str]:
        return {str(p.relative_to(outputs)) for p in outputs.glob("*/*")} | {p.name for p in outputs.glob("*")}

    before = listing()
    yield
    new = sorted(listing() - before)
    assert not new, f"tests wrote into the repository's outputs/: {new[:10]}"
    assert existed or not mlruns.exists(), f"tests wrote MLflow's default store {mlruns} (a tracking URI was lost)"
