"""Guard: the member cache key covers every input that changes what a member learns, and nothing else.

A key that misses an input (the seed, an optimizer setting, a per-member fine-tuning entry, the shared
start, the code) silently hands one member's weights to a job that asked for another; a key that
covers too much only retrains. The inputs are derived from the schema, not listed by hand: every
field of runner.config's OptimConf and TrainerConf, every key of the composed data and model nodes,
every key an `ensemble.finetune` entry may set, the seed, the initial weights (a shared or pre-trained
start, a checkpoint) and the code. A field added to the schema is checked here without a new line
(a text field needs a second value in ALTERNATIVES: the test says so).

The key is the one train_member computes (runner/members.py), read by giving it a cache that
records the key it looks up and answers with weights made from that key (nothing trains). The keys
of the real job (runner.pipeline.run) are checked to be the same.

REFACTOR NOTE: if runner.members grows `member_key(member, datamodule, trainer, optim, data) -> str`
(the key computation factored out of train_member), `test_member_key_function_is_the_one_train_member_uses`
checks it returns train_member's key; until then that test is skipped.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf, open_dict

import runner.cache
import runner.members
import runner.pipeline
from runner.cache import MemberCache, source_digest, training_files
from runner.config import CacheConf, EvalConf, OptimConf, RunConf, TrackingConf, TrainerConf, build, validate
from runner.data import as_source, describe_data
from runner.data.sources import data_spec, with_data_values
from runner.errors import ConfigError
from runner.members import FINETUNE_DATA_KEYS, OPTIM_KEYS, plan_members, pretrain_shared_start, train_member
from runner.models.adapter import build_model, check_forward

BASE = ["model=mlp", "ensemble=seeds5", "ensemble.seeds=[0,1]"]
# What a member is: these top-level keys feed member training; the others cannot change a member.
# In a pool of tasks (runner/pool.py) a task's data is its member's `data`, and `merge` acts after training:
# tests/e2e/test_pool.py checks that another merge method reuses the fine-tunes and that rows dropped from a
# task's training split reach its member's key.
MEMBER_INPUTS = {"seed", "data", "model", "ensemble", "trainer", "optim", "tasks"}
NOT_MEMBER_INPUTS = {"eval", "tracking", "cache", "fuse", "compress", "merge"}
# `threads` (torch's CPU threads) is neither: a run's numbers may differ in the last bits with it,
# but it is a machine setting, kept out of the key on purpose.
UNCLASSIFIED = {"threads"}
# Keys documented as unable to change the trained weights (runner.cache.IGNORED): equal keys.
KEY_NEUTRAL = {("trainer", "enable_progress_bar"), ("data", "cache_dir"), ("data", "eval_batch_size")}
# Values checked against the data: changed alone, the job may refuse them before training (if it
# takes them, the key must change like any other input's).
MAY_BE_REFUSED = {("data", "num_features"), ("data", "num_classes"), ("model", "in_features"), ("model", "num_classes")}
# Second values for text fields (numbers and booleans are changed by type).
ALTERNATIVES = {
    ("optim", "name"): "sgd",
    ("optim", "finetune"): "linear_probe",
    ("trainer", "accelerator"): "auto",
    ("trainer", "precision"): "bf16-mixed",
    ("trainer", "strategy"): "ddp",
    ("trainer", "channels_last"): True,
    ("trainer", "limit_train_batches"): 2,
    ("trainer", "limit_val_batches"): 2,
    ("data", "scaling"): "standard",
    ("data", "cache_dir"): "<tmp>/other_data",
    ("data", "_target_"): None,
    ("model", "_target_"): None,  # data=wine, model=cnn1d below
    ("model", "checkpoint"): "<checkpoint>",
}


def changed(group: str, key: str, value):
    """Another valid value of `group.key` (None: covered by its own case, e.g. data=wine)."""
    if (group, key) in ALTERNATIVES:
        return ALTERNATIVES[group, key]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 2  # -1 (max_steps) -> 1, 0 -> 2, 1 -> 3: all valid
    if isinstance(value, float):
        return value * 2 + 0.1
    raise AssertionError(f"no second value for {group}.{key}={value!r}: add one to ALTERNATIVES")


class ProbeCache(MemberCache):
    """A cache that records every key looked up and answers each with weights drawn from the key: a
    hit, so nothing trains, and different keys give different weights (a pre-trained start whose key
    changed changes the members that start from it)."""

    def __init__(self, root=None) -> None:
        super().__init__(None)
        self.keys: list[str] = []

    def load(self, key: str, net: torch.nn.Module):
        self.keys.append(key)
        generator = torch.Generator().manual_seed(int(key[:12], 16))
        with torch.no_grad():
            for value in net.state_dict().values():
                if value.is_floating_point():
                    value.copy_(torch.randn(value.shape, generator=generator, dtype=value.dtype))
        return {"history": []}


def member_keys(cfg) -> dict[str, str]:
    """{member name: cache key} (and `pretrain` for a pre-trained shared start) as the job computes
    them: the pipeline's own steps up to training, with train_member asking a ProbeCache."""
    validate(cfg)
    datamodule = as_source(build(cfg.data, "data"))
    composed = OmegaConf.to_container(cfg.data, resolve=True)
    spec = data_spec(datamodule)
    cfg = with_data_values(cfg, datamodule)
    members = plan_members(cfg, composed)
    for member in members:
        check_forward(member.net, spec.example, spec.num_classes, member.key, spec.input_spec)
    cache = ProbeCache()
    optim = pretrain_shared_start(members, cfg, datamodule, cache)
    keys = {"pretrain": cache.keys[0]} if cache.keys else {}
    for member in members:
        train_member(member, datamodule, cfg.trainer, optim, cfg.data, cache)
        keys[member.name] = cache.keys[-1]
    return keys


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("guard_cache_key")


@pytest.fixture(scope="module")
def base(tmp) -> dict[str, str]:
    return member_keys(compose_config(BASE, tmp))


@pytest.fixture(scope="module")
def checkpoint(tmp) -> str:
    """A weights file for the MLP of BASE: another start than its seeds'."""
    cfg = compose_config(BASE, tmp)
    with open_dict(cfg):
        cfg.data.num_features, cfg.data.num_classes = 40, 10
    net = build_model(cfg.model, "model")
    path = tmp / "start.pt"
    torch.save({k: v + 0.5 for k, v in net.state_dict().items()}, path)
    return str(path)


def variations(group: str, node, checkpoint: str) -> list[tuple[str, str, object]]:
    out = []
    for key, value in node.items():
        new = changed(group, key, value)
        if new == "<checkpoint>":
            new = checkpoint
        if isinstance(new, str) and new.startswith("<tmp>"):
            new = str(Path(checkpoint).parent) + new[len("<tmp>") :]
        if new is not None:
            out.append((group, key, new))
    return out


def schema_cases(checkpoint: str) -> list[tuple[str, str, object]]:
    """(group, key, new value) for every field of OptimConf and TrainerConf and every key of the
    composed data and model nodes."""
    cfg = compose_config(BASE)
    cases = []
    for group, schema in (("optim", OptimConf), ("trainer", TrainerConf)):
        names = [f.name for f in dataclasses.fields(schema)]
        assert set(names) == set(cfg[group]), f"{group}: the composed node and the schema disagree"
        cases += variations(group, {k: cfg[group][k] for k in names}, checkpoint)
    with open_dict(cfg):  # what describe_data writes in, so the model node resolves
        cfg.data.num_features, cfg.data.num_classes = 40, 10
    for group in ("data", "model"):
        cases += variations(group, OmegaConf.to_container(cfg[group], resolve=True), checkpoint)
    return cases


def test_every_top_level_key_is_classified():
    assert MEMBER_INPUTS | NOT_MEMBER_INPUTS | UNCLASSIFIED == set(RunConf.__dataclass_fields__)


def test_every_schema_input_changes_the_key(tmp, base, checkpoint):
    """Each field of the member config schema, changed alone: every member's key changes (or the job
    refuses the value before training; keys documented as neutral keep it)."""
    problems = []
    for group, key, new in schema_cases(checkpoint):
        try:
            keys = member_keys(compose_config([*BASE, f"++{group}.{key}={_literal(new)}"], tmp))
        except ConfigError as e:
            if (group, key) not in MAY_BE_REFUSED:
                problems.append(f"{group}.{key}={new!r} refused: {e}")
            continue
        same = sorted(name for name in base if keys.get(name) == base[name])
        if (group, key) in KEY_NEUTRAL:
            if keys != base:
                problems.append(f"{group}.{key}={new!r} cannot change a member but changed the key")
        elif same:
            problems.append(f"{group}.{key}={new!r} changes what a member learns but not the key of {same}")
    assert not problems, "\n".join(problems)


def _literal(value) -> str:
    """`value` as a Hydra override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    return repr(value)


def test_other_data_and_model_change_the_key(tmp, base):
    for overrides in (["data=wine"], ["model=mlp_small"], ["model=cnn1d"]):
        keys = member_keys(compose_config([*BASE, *overrides], tmp))
        assert all(keys[n] != base[n] for n in base if n in keys), overrides
        assert set(keys) == set(base) or overrides[0].startswith("model"), overrides


@pytest.mark.parametrize(
    "entry",
    [*[("optim", k) for k in OPTIM_KEYS], *[("data", k) for k in FINETUNE_DATA_KEYS]],
    ids=lambda entry: ".".join(entry),
)
def test_every_finetune_entry_changes_its_members_key_only(entry, tmp, base):
    """ensemble.finetune[i] (per-member optimizer and training-data settings): the member it names gets
    another key, the others keep theirs."""
    group, key = entry
    cfg = compose_config(BASE, tmp)
    values = {
        ("data", "train_transforms"): [{"_target_": "runner.data.RandomShift", "max_shift": 2}],
        ("data", "num_workers"): 1,
    }
    value = values.get(entry) or changed(group, key, cfg[group][key] if key in cfg[group] else cfg.data[key])
    with open_dict(cfg):
        cfg.ensemble.finetune = [None, {group: {key: value}}]
    keys = member_keys(cfg)
    first, second = list(base)
    assert keys[first] == base[first], f"finetune[1].{group}.{key} changed member 0's key"
    assert keys[second] != base[second], f"finetune[1].{group}.{key}={value!r} left member 1's key as it was"
    node = cfg[group] if group == "optim" else cfg.data
    if key in node:  # the entry's value counts, not its presence: the job's own value is the same member
        with open_dict(cfg):
            cfg.ensemble.finetune = [None, {group: {key: OmegaConf.to_container(node, resolve=True)[key]}}]
        assert member_keys(cfg) == base, f"finetune[1].{group}.{key} set to the job's own value changed a key"


def test_the_seed_alone_changes_the_key(tmp):
    """Members with one shared start differ only in their seed (their data order): different keys."""
    keys = member_keys(compose_config([*BASE, "ensemble.shared_init=true"], tmp))
    assert len(keys) == 2 and len(set(keys.values())) == 2, (
        f"members that differ only in their seed share a key: {keys}"
    )
    one = member_keys(compose_config(["model=mlp"], tmp))
    other = member_keys(compose_config(["model=mlp", "seed=1"], tmp))
    assert len(one) == len(other) == 1 and set(one.values()).isdisjoint(other.values()), (
        f"seed=0 and seed=1 give the same key: {one} {other}"
    )


def test_the_start_changes_the_key(tmp, base):
    """Same seed, another initial state: a shared start (seed 1 starts from seed 0's weights), a
    pre-trained start trained longer, a pre-trained start fine-tuned at another lr."""
    shared = member_keys(compose_config([*BASE, "ensemble.shared_init=true"], tmp))
    name0, name1 = list(base)
    assert shared[name0] == base[name0] and shared[name1] != base[name1]
    soup = ["model=mlp", "ensemble=soup5", "ensemble.seeds=[0,1]"]
    short = member_keys(compose_config([*soup, "ensemble.pretrain_epochs=1"], tmp))
    longer = member_keys(compose_config([*soup, "ensemble.pretrain_epochs=2"], tmp))
    lr = member_keys(compose_config([*soup, "ensemble.pretrain_epochs=1", "ensemble.finetune_lr=0.002"], tmp))
    assert short["pretrain"] != longer["pretrain"]
    for name in (name0, name1):
        assert short[name] != longer[name], "a pre-trained start trained longer must change the members' keys"
        assert short[name] != lr[name], "ensemble.finetune_lr must change the members' keys"


def test_the_code_changes_the_key(tmp, base, monkeypatch):
    """The runner's training code, a library version, a user's own model source: each changes the key."""
    monkeypatch.setattr(runner.cache, "_runner_digest", lambda parts=None: "other runner code")
    assert set(member_keys(compose_config(BASE, tmp)).values()).isdisjoint(base.values())
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert set(member_keys(compose_config(BASE, tmp)).values()).isdisjoint(base.values())
    monkeypatch.undo()
    module = tmp / "guard_user_model.py"
    module.write_text("from runner.models import MLP\n\nclass Net(MLP):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp))
    user = [*BASE, "model._target_=guard_user_model.Net"]
    before = member_keys(compose_config(user, tmp))
    module.write_text("from runner.models import MLP\n\nclass Net(MLP):\n    pass  # edited\n")
    after = member_keys(compose_config(user, tmp))
    assert set(before.values()).isdisjoint(after.values()), "a user's model source changed, the key did not"


def test_training_code_covers_training_only(tmp_path):
    """The runner's digest for member keys covers the files given (the training code) and ignores the
    others (what acts after training: fusion, compression, evaluation)."""
    root = tmp_path / "runner"
    for rel in ("models/net.py", "data/source.py", "fuse/mean.py", "compress/prune.py", "train.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x = 1\n")
    digest = lambda: source_digest(root, ("models/net.py", "data/source.py", "train.py"))  # noqa: E731
    before = digest()
    for rel in ("fuse/mean.py", "compress/prune.py"):
        (root / rel).write_text("x = 2\n")
        assert digest() == before, rel
    for rel in ("models/net.py", "data/source.py", "train.py"):
        (root / rel).write_text((root / rel).read_text() + "y = 3\n")
        assert digest() != before, rel
        before = digest()


def test_training_code_is_what_members_import():
    """The training code is found by following the imports of runner.members and runner.train: the
    modules they import, directly or not, and the packages holding them; not what acts after training."""
    files = set(training_files())
    assert {"members.py", "train.py", "cache.py", "device.py", "models/__init__.py", "data/__init__.py"} <= files
    assert not {f for f in files if f.split("/")[0] in ("fuse", "compress", "evaluate", "tracking", "report")}
    assert "pipeline.py" not in files


def test_a_change_to_code_members_import_changes_the_key(tmp, tmp_path, monkeypatch):
    """On a copy of the runner's source: an edit of a module runner.members imports (runner/device.py,
    once missing from a hand-kept list) changes every member's key; an edit of one it does not import
    (runner/report/) leaves the keys as they were."""
    root = tmp_path / "runner"
    shutil.copytree(runner.cache.RUNNER_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(runner.cache, "RUNNER_ROOT", root)
    runner.cache._cached_digest.cache_clear()
    try:
        before = member_keys(compose_config(BASE, tmp))
        report = next(p for p in sorted((root / "report").glob("*.py")) if p.name != "__init__.py")
        report.write_text(report.read_text() + "\n# edited\n")
        runner.cache._cached_digest.cache_clear()
        assert member_keys(compose_config(BASE, tmp)) == before, (
            f"an edit of {report.name} (after training) changed a key"
        )
        (root / "device.py").write_text((root / "device.py").read_text() + "\n# edited\n")
        runner.cache._cached_digest.cache_clear()
        after = member_keys(compose_config(BASE, tmp))
        assert set(after.values()).isdisjoint(before.values()), (
            "an edit of runner/device.py left a member's key as it was"
        )
    finally:
        runner.cache._cached_digest.cache_clear()


NEUTRAL_VALUES = {
    ("tracking", "uri"): "sqlite:///<tmp>/other.db",
    ("tracking", "artifact_location"): "<tmp>/other_art",
    ("tracking", "experiment"): "other",
    ("cache", "dir"): "<tmp>/other_cache",
    ("eval", "metrics"): ["acc", "nll"],
}
# kept as they are: the tracker's class; a background MLflow worker process (slow to start); ONNX export
# of every model (slow); skip_finished (a job whose config already finished is not run: no keys to read)
NEUTRAL_KEPT = {("tracking", "_target_"), ("eval", "export"), ("cache", "skip_finished")}


def neutral_overrides(tmp: Path) -> dict[str, list[str]]:
    """Per group that cannot change a member: every field of it changed at once."""
    cfg = compose_config(BASE, tmp)
    groups = {}
    for group, schema in (("tracking", TrackingConf), ("eval", EvalConf), ("cache", CacheConf)):
        out = []
        for f in dataclasses.fields(schema):
            if (group, f.name) in NEUTRAL_KEPT:
                continue
            new = NEUTRAL_VALUES.get((group, f.name))
            new = changed(group, f.name, cfg[group][f.name]) if new is None else new
            new = new.replace("<tmp>", str(tmp)) if isinstance(new, str) else new
            out.append(f"{group}.{f.name}={_literal(new)}")
        groups[group] = out
    groups["fuse"] = ["fuse=mean"]
    groups["compress"] = ["compress=quant_dynamic"]
    groups["neutral keys"] = [
        f"{g}.{k}={_literal(changed(g, k, cfg[g][k]))}"
        for g, k in sorted(KEY_NEUTRAL)
        if (g, k) != ("data", "cache_dir")
    ] + [f"data.cache_dir='{tmp}/other_data'"]
    return groups


@pytest.mark.slow
def test_job_keys_are_train_members_and_ignore_what_cannot_change_a_member(tmp, monkeypatch):
    """Through runner.pipeline.run: the job looks up exactly the keys computed above, and changing
    tracking, eval, cache, fuse or compress settings (every field at once) leaves them as they were."""
    caches: list[ProbeCache] = []

    def probe(root):
        caches.append(ProbeCache(root))
        return caches[-1]

    monkeypatch.setattr(runner.pipeline, "MemberCache", probe)
    expected = list(member_keys(compose_config(BASE, tmp)).values())
    runner.pipeline.run(compose_config([*BASE, "cache.skip_finished=false"], tmp))
    assert caches[-1].keys == expected, "the job's member keys are not train_member's"
    for group, overrides in neutral_overrides(tmp).items():
        runner.pipeline.run(compose_config([*BASE, "cache.skip_finished=false", *overrides], tmp))
        assert caches[-1].keys == expected, f"{group} ({overrides}) changed a member's cache key"


def test_member_key_function_is_the_one_train_member_uses(tmp):
    """REFACTOR NOTE: runner.members.member_key(member, datamodule, trainer, optim, data) -> str, once
    factored out of train_member, must return the key train_member looks up."""
    member_key = getattr(runner.members, "member_key", None)
    if member_key is None:
        pytest.skip("runner.members.member_key does not exist yet (the key is computed inside train_member)")
    cfg = compose_config([*BASE, "ensemble.finetune=[null,{optim:{lr:0.003},data:{batch_size:50}}]"], tmp)
    datamodule = as_source(build(cfg.data, "data"))
    composed = OmegaConf.to_container(cfg.data, resolve=True)
    describe_data(cfg, datamodule)
    for member in plan_members(cfg, composed):
        cache = ProbeCache()
        key = member_key(copy.copy(member), datamodule, cfg.trainer, cfg.optim, cfg.data)
        train_member(member, datamodule, cfg.trainer, cfg.optim, cfg.data, cache)
        assert key == cache.keys[-1], member.name


@pytest.mark.slow
@pytest.mark.parametrize("shared_init", [False, True])
def test_members_of_one_ensemble_learn_different_weights(shared_init, tmp, monkeypatch):
    """Trained for real (with the cache on): members of a seeds ensemble differ in every weight
    tensor, also when they share their start; two members the config makes identical (the same model
    node and seed) get one key and the same weights, so the difference above is not noise."""
    trained: dict[str, dict[str, torch.Tensor]] = {}
    train = runner.pipeline.train_member

    def keep(member, *args, **kwargs):
        hit = train(member, *args, **kwargs)
        trained[member.name] = {k: v.detach().clone() for k, v in member.net.state_dict().items()}
        return hit

    monkeypatch.setattr(runner.pipeline, "train_member", keep)
    cache = f"cache.dir={tmp}/cache_{shared_init}"
    runner.pipeline.run(
        compose_config(
            [
                "model=mlp",
                "ensemble=seeds5",
                "ensemble.seeds=[0,1,2]",
                f"ensemble.shared_init={str(shared_init).lower()}",
                cache,
            ],
            tmp,
        )
    )
    names = sorted(trained)
    assert len(names) == 3
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            same = [k for k in trained[a] if torch.equal(trained[a][k], trained[b][k])]
            assert not same, f"members {a} and {b} have identical {same}"
    if shared_init:
        return
    trained.clear()
    twins = ["ensemble=seeds5", "ensemble.seeds=[0]", "+model@ensemble.members.a=mlp", "+model@ensemble.members.b=mlp"]
    keys = member_keys(compose_config(twins, tmp))
    assert keys["a-s0"] == keys["b-s0"]
    runner.pipeline.run(compose_config([*twins, "cache.dir=null"], tmp))
    assert all(torch.equal(trained["a-s0"][k], trained["b-s0"][k]) for k in trained["a-s0"])
