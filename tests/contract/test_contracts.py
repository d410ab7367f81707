"""Contract tests: every YAML in conf/compress and conf/fuse on a tiny model of each architecture
family beyond MNIST-1D (a CNN, a residual net with BatchNorm, a vision transformer, a text
transformer). A recipe or strategy either refuses a family before training with a ConfigError
naming its key, or works: a new model with finite outputs of the right shape, the input model
untouched. Which ones refuse is asserted exactly, so a refusal that appears or disappears fails.
(The MNIST-1D MLP/CNN/GRU contracts: tests/unit/test_compress.py, tests/unit/test_fuse.py.)
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import CONF_DIR, compose_config
from hydra.utils import get_class
from omegaconf import open_dict

from runner.compress import CompressContext, build_recipe
from runner.compress.requirements import REQUIREMENTS as STEP_REQUIREMENTS
from runner.config import build
from runner.data import as_source, describe_data
from runner.errors import ConfigError
from runner.fuse import OutputFusion
from runner.models.adapter import build_model
from runner.models.facts import set_init_id

RECIPES = sorted(p.stem for p in Path(CONF_DIR, "compress").glob("*.yaml"))
STRATEGIES = sorted(p.stem for p in Path(CONF_DIR, "fuse").glob("*.yaml") if p.stem != "none")  # none: no strategy
TRAINER = {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "limit_train_batches": 2}
OPTIM = {"name": "adam", "lr": 1e-2}
VIT = [
    "model=vit_tiny",
    "model.config.hidden_size=16",
    "model.config.intermediate_size=32",
    "model.config.num_hidden_layers=1",
    "model.config.num_attention_heads=2",
    "model.config.patch_size=7",
]
FAMILIES = {  # family: overrides of the real configs, shrunk
    "cnn": ["data=mnist5k", "model=lenet5", "model.channels=[4,8]", "model.hidden=32"],
    "resnet": ["data=mnist5k", "model=resnet20", "model.width=8"],
    "vit": ["data=mnist5k", *VIT],
    "text": [
        "data=text",
        "data.max_length=12",
        "data.vocab_size=60",
        "model=bert_tiny",
        "model.config.hidden_size=16",
        "model.config.intermediate_size=32",
        "model.config.num_hidden_layers=1",
        "model.config.num_attention_heads=2",
    ],
}

# Refusals, by family (a ConfigError before training). Everything else must work.
# The tiny LeNet-5 and BERT are too narrow for prune_structured_macs' and prune_channels_2x's channel multiples of 8 (BERT keeps
# its embedding width); dynamic int8 leaves
# convs in float, so conv-heavy nets (ResNet) are refused, LeNet-5 (mostly Linear weights) is not;
# static int8 needs convs or fx-traceable nets (not Hugging Face); the default distillation student is
# an MLP on num_features (text has token ids); distill_features' default pair names `head`.
TEXT_STUDENTS = {"distill_text_bow", "distill_bert_tiny", "distill_minilm"}  # students on token ids
# The refusals no class declaration explains, each from a step's settings: a student config that does
# not fit the data (TEXT_STUDENTS on images; the default MLP student, num_features, on token ids), the
# channel multiples of 8 of prune_structured_macs and prune_channels_2x, distill_features' default
# pair naming `head`, and quant_static's fx_traceable, which holds only for the engine it picks
# (torch_ao). Every other refusal is computed from the classes' `requires` (declared_refusal).
BY_SETTINGS = {
    "cnn": {"prune_structured_macs", "prune_channels_2x", *TEXT_STUDENTS},
    "resnet": {*TEXT_STUDENTS},
    "vit": {"distill_features", "quant_static", *TEXT_STUDENTS},
    "text": {
        "quant_static",
        "distill",
        "distill_ensemble",
        "distill_multi",
        "distill_then_quantize",
        "distill_features",
        "prune_structured_macs",
        "prune_channels_2x",
    },
}
# The refusals the classes' declarations explain: dynamic and weight-only int8 on a conv-heavy ResNet
# (mostly_dense), Wanda and its magnitude baseline on it (linear_layers: no Linear but its head), QAT's FX graph on Hugging Face
# models (fx_traceable), and the distillation of a causal LM on every classifier (causal_lm; it is
# tested on a tiny Llama in tests/unit/test_distill_lm.py).
LM_ONLY = {"distill_lm"}
BY_DECLARATION = {
    "cnn": {*LM_ONLY},
    "resnet": {
        "deep_compression",
        "quant_dynamic",
        "quant_int8_weight",
        "quant_int4_weight",
        "prune_wanda",
        "prune_wanda_2_4",
        "prune_magnitude_rows",
        "prune_magnitude_2_4",
        *LM_ONLY,
    },
    "vit": {"qat", *LM_ONLY},
    "text": {"qat", *LM_ONLY},
}
REFUSED = {family: BY_SETTINGS[family] | BY_DECLARATION[family] for family in FAMILIES}


def declared_refusal(recipe, model) -> bool:
    """Whether a requirement its steps' classes declare (`requires`) fails on the model each step would
    get (the steps in order, as Recipe.check previews them)."""
    for i, step in enumerate(recipe.steps):
        for name in type(step).requires:
            try:
                STEP_REQUIREMENTS[name](step, model)
            except ConfigError:
                return True
        if i < len(recipe.steps) - 1:
            model = step.preview(model)
    return False


# The members here start from their own weights: the strategies that declare `shared_start` refuse them.
REFUSED_FUSION = {
    family: {
        name
        for name in STRATEGIES
        if "shared_start" in get_class(compose_config([f"fuse={name}"]).fuse["_target_"]).requires
    }
    for family in FAMILIES
}


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    words = {"pos": ["great", "fine", "lovely", "superb"], "neg": ["awful", "bad", "dull", "poor"]}
    rows = [
        {"text": f"a {rng.choice(w)} and {rng.choice(w)} film", "label": k} for _ in range(60) for k, w in words.items()
    ]
    path = tmp_path_factory.mktemp("text") / "reviews.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="session")
def sources(text_file) -> dict:
    """family -> (data source, spec, composed config) set up once."""
    out = {}
    for family, overrides in FAMILIES.items():
        extra = [f"data.path={text_file}"] if family == "text" else []
        cfg = compose_config([*overrides, *extra])
        dm = as_source(build(cfg.data, "data"))
        out[family] = (dm, describe_data(cfg, dm), cfg)
    return out


def family_config(sources, family: str, *overrides: str):
    """The family's config with `overrides` (compress=..., fuse=...), data values filled in."""
    dm, spec, base = sources[family]
    extra = [f"data.path={base.data.path}"] if family == "text" else []
    cfg = compose_config([*FAMILIES[family], *extra, *overrides])
    with open_dict(cfg):
        for key in ("num_classes", "input_shape", "num_features", "vocab_size", "max_length"):
            if key in base.data:
                cfg.data[key] = base.data[key]
    return dm, spec, cfg


def members(cfg, n: int = 2, shared: bool = False) -> list[torch.nn.Module]:
    nets = []
    for seed in range(n):
        pl.seed_everything(seed, verbose=False)
        nets.append(build_model(cfg.model, "model"))
    if shared:
        for net in nets[1:]:
            net.load_state_dict(nets[0].state_dict())
    for net in nets:
        set_init_id(net, "shared" if shared else str(id(net)))
    return nets


def shortened(recipe):
    for step in recipe.steps:
        for attr in ("finetune_epochs", "epochs", "epochs_per_round", "rounds", "final_epochs", "iterative_steps"):
            if getattr(step, attr, 0) > 1:
                setattr(step, attr, 1)
    return recipe


class MeanLogProbs(torch.nn.Module):
    def __init__(self, nets):
        super().__init__()
        self.nets = torch.nn.ModuleList(nets)

    def forward(self, x):
        return torch.stack([n(x).softmax(1) for n in self.nets]).mean(0).log()


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_recipe_on_every_family(family, sources):
    refused, declared = set(), set()
    for name in RECIPES:
        dm, spec, cfg = family_config(sources, family, f"compress={name}")
        nets = members(cfg)
        try:  # a student config that does not fit the data fails while the recipe is built
            recipe = shortened(build_recipe(cfg.compress))
            if declared_refusal(recipe, nets[0]):
                declared.add(name)
            recipe.check(nets[0], spec, ensemble=True, members=len(nets))
        except ConfigError as e:
            assert e.key.startswith("compress.steps["), (name, e)
            refused.add(name)
            continue
        before = copy.deepcopy(nets[0].state_dict())
        pl.seed_everything(0, verbose=False)
        out = recipe.apply(
            nets[0], CompressContext(dm, TRAINER, OPTIM, teacher=nets[0], ensemble=MeanLogProbs(nets), members=nets)
        )
        assert all(torch.equal(before[k], v) for k, v in nets[0].state_dict().items()), name
        with torch.no_grad():
            logits = out(spec.example)
        assert logits.shape == (len(logits), spec.num_classes) and torch.isfinite(logits).all(), name
    assert refused == REFUSED[family], " ".join(sorted(refused))
    # what the classes declare accounts for every refusal but those of a step's settings
    assert declared == BY_DECLARATION[family] and refused - declared == BY_SETTINGS[family], " ".join(sorted(declared))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_fusion_strategy_on_every_family(family, sources):
    refused = set()
    for name in STRATEGIES:
        dm, spec, cfg = family_config(sources, family, f"fuse={name}")
        strategy = build(cfg.fuse, "fuse")
        for attr in ("epochs", "finetune_epochs"):  # a trained head: the contract, not its accuracy
            if hasattr(strategy, attr):
                setattr(strategy, attr, 1)
        nets = members(cfg)
        try:
            strategy.check_members(nets, spec)
        except ConfigError as e:
            assert e.key.startswith(("ensemble", "fuse")), (name, e)
            refused.add(name)
            if name not in REFUSED_FUSION[family]:
                raise
            nets = members(cfg, shared=True)  # weight averaging: one shared start
            strategy.check_members(nets, spec)
        if hasattr(strategy, "set_start"):
            strategy.set_start(copy.deepcopy(nets[0].state_dict()))
        strategy.fit(nets, dm.val_dataloader())
        fused = strategy.as_module()
        with torch.no_grad():
            log_probs = fused(spec.example).double()
        assert log_probs.shape == (len(log_probs), spec.num_classes)
        assert torch.allclose(log_probs.exp().sum(1), torch.ones(len(log_probs), dtype=torch.double), atol=1e-4), name
        if isinstance(strategy, OutputFusion):
            assert torch.allclose(strategy.predict_proba(spec.example).double(), log_probs.exp(), atol=1e-5)
    assert refused == REFUSED_FUSION[family]
