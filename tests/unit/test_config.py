"""Every YAML in every config group composes and instantiates; bad configs fail before training."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, compose_config
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from runner.config import build, validate
from runner.data import as_source, describe_data, split_batch
from runner.errors import ConfigError
from runner.lm import is_lm, plan_lm
from runner.members import plan_members
from runner.models.adapter import check_forward
from runner.pipeline import run
from runner.pool import plan_pool

CONF = Path(CONF_DIR)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


FILE_SOURCES = {"mnist", "fashion_mnist", "cifar10", "cifar100", "image_folder", "table", "text"}  # need files


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "reviews.jsonl"
    rows = [{"text": f"{word} movie number {i}", "label": word} for i in range(40) for word in ("good", "bad")]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.mark.parametrize("name", options("data"))
def test_data_configs(name, tmp_path):
    """Every data option builds; the offline ones load and tell the models what they need."""
    extra = ["data.path=some/file.csv"] if name in ("image_folder", "table", "text") else []
    extra += ["data.label=y"] if name == "table" else []
    extra += {"elpv": ["data.max_images=40", "data.image_size=32"], "rotten_tomatoes": ["data.max_rows=200"]}.get(
        name, []
    )
    extra += [
        f"data.{part}={{_target_:test_byo.DictDigits,part:{part}}}" for part in ("train", "test") if name == "dataset"
    ]
    cfg = compose_config([f"data={name}", *extra], tmp_path)
    validate(cfg)
    dm = as_source(build(cfg.data, "data"))
    if name in FILE_SOURCES:  # loading them is tested on files the tests write (test_vision_data, ...)
        return
    spec = describe_data(cfg, dm)
    labels = torch.cat([split_batch(b)[1] for b in dm.train_dataloader()])
    assert cfg.data.num_classes == spec.num_classes == len(set(labels.tolist()))
    if isinstance(spec.example, dict):  # token ids: what text models read is the vocabulary and length
        assert cfg.data.vocab_size == len(dm.tokenizer) and cfg.data.max_length == spec.example["input_ids"].shape[1]
        return
    assert cfg.data.input_shape == list(spec.example.shape[1:])
    assert cfg.data.num_features == spec.example[0].numel()


# Models for images or token ids are built on data of that kind; the rest on MNIST-1D and wine.
MODEL_DATA = {
    "lenet5": ["mnist5k"],
    "resnet20": ["mnist5k"],
    "resnet56": ["mnist5k"],
    "vit_tiny": ["mnist5k"],
    "timm": ["mnist5k"],
    "torchvision": ["mnist5k"],
    "bert_tiny": ["text"],
    "text_bow": ["text"],
    "minilm": ["rotten_tomatoes"],
    "smollm2": ["rotten_tomatoes"],
    "smollm2_lm": ["rotten_tomatoes"],
    **{f"efficientnet_lite{i}": ["elpv"] for i in range(3)},
}
# pretrained models on real data: a small subset (the weights load once per model, seconds)
SMALL = {"rotten_tomatoes": ["data.max_rows=200"], "elpv": ["data.max_images=40", "model.input_size=64"]}
# SmolLM2 from random weights (its config and tokenizer are the GGUF's): dequantizing the real ones takes
# ~15 s more; tests/unit/test_smollm2.py builds the pretrained model through the pipeline
MODEL_EXTRA = {"smollm2": ["model.pretrained=false"], "smollm2_lm": ["model.pretrained=false"]}


@pytest.mark.parametrize(
    "name, data", [(m, d) for m in options("model") for d in MODEL_DATA.get(m, ["mnist1d", "wine"])]
)
def test_model_configs(name, data, tmp_path, text_file):
    """Every model option builds from the values its data provides and runs once on real inputs."""
    extra = [f"data.path={text_file}"] if data == "text" else SMALL.get(data, [])
    cfg = compose_config([f"model={name}", f"data={data}", *extra, *MODEL_EXTRA.get(name, [])], tmp_path)
    spec = describe_data(cfg, as_source(build(cfg.data, "data")))
    if name in ("timm", "torchvision") and importlib.util.find_spec(name) is None:
        with pytest.raises(ConfigError, match="model.name.*not installed"):
            plan_members(cfg)
        return
    if is_lm(cfg):  # the language model itself (runner/lm.py): next-token logits over its vocabulary
        job = plan_lm(cfg)
        with torch.no_grad():
            logits = job.model.eval()(spec.example)
        assert logits.shape == (*spec.example["input_ids"].shape, job.model.vocab_size)
        return
    [member] = plan_members(cfg)
    check_forward(member.net, spec.example, spec.num_classes)
    with torch.no_grad():
        n = len(spec.example["input_ids"] if isinstance(spec.example, dict) else spec.example)
        assert member.net.eval()(spec.example).shape == (n, cfg.data.num_classes)


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_configs(name, tmp_path):
    from runner.train import build_trainer

    cfg = compose_config([f"trainer={name}"], tmp_path)
    validate(cfg)
    if cfg.trainer.accelerator == "cpu":
        assert build_trainer(cfg.trainer).max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("name", options("tracking"))
def test_tracking_configs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    cfg = compose_config([f"tracking={name}"])
    tracker = build(cfg.tracking, "tracking")
    assert tracker.uri == {"local": "sqlite:///outputs/mlflow.db", "remote": "http://127.0.0.1:5999"}[name]


def test_remote_uri_is_one_override():
    cfg = compose_config(["tracking.uri=http://mlflow.example:5000"])
    assert build(cfg.tracking, "tracking").uri == "http://mlflow.example:5000"


ENSEMBLE_DATA = {  # ensembles of models that need a kind of data (and pretrained ones: a small subset)
    "mixed_image": ["data=mnist5k"],
    "efficientnet_pair": ["data=elpv", "model=efficientnet_lite0", "model.input_size=64", "data.max_images=40"],
    "minilm_bow": ["data=rotten_tomatoes", "data.max_rows=200", "model=minilm"],
}


@pytest.mark.parametrize("name", options("ensemble"))
def test_ensemble_configs(name, tmp_path):
    cfg = compose_config([f"ensemble={name}", *ENSEMBLE_DATA.get(name, [])], tmp_path)
    if name in ENSEMBLE_DATA:
        describe_data(cfg, as_source(build(cfg.data, "data")))  # members read ${data.input_shape}, vocab_size...
    members = plan_members(cfg)
    assert len(members) >= 2 and len({m.name for m in members}) == len(members)


@pytest.mark.parametrize("name", options("fuse"))
def test_fuse_configs(name, tmp_path):
    from runner.fuse import Fusion

    cfg = compose_config([f"fuse={name}"], tmp_path)
    if name == "none":  # the baseline as a sweep option: no strategy, as fuse=null
        assert not cfg.fuse
        return
    assert isinstance(build(cfg.fuse, "fuse"), Fusion)


@pytest.mark.parametrize("name", options("compress"))
def test_compress_configs(name, tmp_path):
    from runner.compress import build_recipe

    text = name in ("distill_text_bow", "distill_bert_tiny", "distill_minilm")  # students on token ids
    cfg = compose_config(
        [f"compress={name}", *(["data=rotten_tomatoes", "data.max_rows=200"] if text else [])], tmp_path
    )
    if text:
        describe_data(cfg, as_source(build(cfg.data, "data")))
    assert len(build_recipe(cfg.compress)) == (0 if name == "none" else len(cfg.compress.steps)) and (
        name == "none" or len(cfg.compress.steps) >= 1
    )


# SmolLM2's architecture and tokenizer from its GGUF, random weights (dequantizing the real ones: ~15 s more)
EXPERIMENT_EXTRA = {
    "smollm2_lm": ["model.pretrained=false", "data.max_rows=200"],
    "smollm2_merge": ["model.pretrained=false", "data.max_rows=200"],
    "smollm2_distill": ["model.pretrained=false", "data.max_rows=200"],
}


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_configs(name, tmp_path):
    cfg = compose_config([f"experiment={name}", *EXPERIMENT_EXTRA.get(name, [])], tmp_path)
    validate(cfg)
    if is_lm(cfg):  # a causal LM job (runner/lm.py): data, model and recipe planned
        assert plan_lm(cfg).model.vocab_size == 49152
        return
    if cfg.tasks:  # a pool of tasks (runner/pool.py): every task planned, no training
        assert [t.name for t in plan_pool(cfg).tasks] == list(cfg.tasks)
        return
    describe_data(cfg, as_source(build(cfg.data, "data")))
    ens = cfg.ensemble or {}
    seeds = ens.get("seeds") or range(ens.get("size") or 1)
    assert len(plan_members(cfg)) == len(ens.get("members") or [None]) * len(seeds)


# --- bad input: a clear message naming the key, the value and what is allowed -------------------


def test_unknown_group_option_lists_the_available_ones():
    with pytest.raises(ConfigCompositionException, match=r"(?s)model/transformer.*cnn1d.*gru.*logreg.*mlp"):
        compose_config(["model=transformer"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigCompositionException, match="trainer.max_epochs=abc") as info:
        compose_config(["trainer.max_epochs=abc"])
    assert isinstance(info.value.__cause__, ValidationError)
    assert "could not be converted to Integer" in str(info.value.__cause__)


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigCompositionException, match="trainer.max_epoch"):
        compose_config(["trainer.max_epoch=3"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.max_epochs=-1", r"trainer.max_epochs=-1; allowed: an integer >= 1"),
        (
            "eval.metrics=[acc,auroc]",
            r"eval.metrics='auroc'; allowed: \['acc', 'ece', 'f1', 'nll', 'precision', 'recall'\]",
        ),
        ("optim.name=rmsprop", r"optim.name='rmsprop'; allowed: \['adam', 'adamw', 'sgd'\]"),
        ("model.channels=0", r"model.channels=0"),
        ("+model.width=3", r"model=.*parameters of runner.models.CNN1D"),
        ("data.num_features=41", r"data.num_features=41"),
    ],
)
def test_bad_values_fail_before_training(override, message, tmp_path, monkeypatch):
    import runner.members

    trained = []
    monkeypatch.setattr(runner.members, "train_classifier", lambda *a, **k: trained.append(a))
    cfg = compose_config([override], tmp_path)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not trained


def test_schema_names_match_the_implementations_and_import_no_torch():
    import subprocess
    import sys

    import torch

    from runner import config
    from runner.evaluate import METRICS

    assert tuple(METRICS) == config.METRICS
    assert all(issubclass(getattr(torch.optim, cls), torch.optim.Optimizer) for cls in config.OPTIMIZERS.values())
    # checking a config must stay light: the command line validates it before the heavy imports
    code = "import sys, runner.config, runner.tracking, runner.tracking.sweep; print(sorted({'torch', 'mlflow'} & set(sys.modules)))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )
