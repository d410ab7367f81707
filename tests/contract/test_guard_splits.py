"""Guard: split provenance. Members train on train, fusion fits on val, the sweep objective is a val
number and every reported test/* number comes from test, for every option of conf/fuse and
conf/compress, checked on what a real (tiny) job actually read, not on what its code says.

How: the runner's loaders carry their split (`loader.split`) and show every batch they yield to the
watchers of runner.batches.watch_batches; this test installs one, wraps the stages of the job
(member training, fusion fit, objective, compression, evaluation) so each batch is filed under the
stage that read it, and records the rows every gradient step of a LitClassifier (members,
compression fine-tuning, distillation) trained on. Rows are identified by content, so the check does
not trust the tags: it checks them too.

A plausible one-line bug (fusion fitted on datamodule.test_dataloader(), a compression step that
fine-tunes on val, an objective computed on test, a stacker fitted on every row it scores) fails here.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import CONF_DIR, compose_config
from hydra.utils import get_class
from sklearn.base import clone as sklearn_clone
from torch.utils.data import DataLoader, TensorDataset

import runner.fuse.stacking
import runner.members
import runner.pipeline
from runner.batches import Chunk, split_batch, split_of, watch_batches
from runner.compress.base import Recipe
from runner.data import DatasetDataModule, SklearnDataset, as_source
from runner.evaluate import predict_proba
from runner.fuse.base import Fusion, OutputFusion, member_probs
from runner.fuse.soup import _Soup
from runner.fuse.stacking import Stacking, stack_features
from runner.models import LitClassifier
from runner.recorder import Recorder

SPLITS = ("train", "val", "test")
STRATEGIES = sorted(p.stem for p in Path(CONF_DIR, "fuse").glob("*.yaml") if p.stem != "none")
# none has no steps; the text-student distillations are the `distill` step (checked here) with students that
# need token ids, which these row checks (tensors) do not read; distill_lm takes causal LMs only (runner/lm.py's
# job, which reads the training split alone: tests/unit/test_distill_lm.py)
RECIPES = sorted(
    p.stem
    for p in Path(CONF_DIR, "compress").glob("*.yaml")
    if p.stem not in ("none", "distill_text_bow", "distill_bert_tiny", "distill_minilm", "distill_lm")
)
ONE_MLP = ["model=mlp"]
TWO_MLPS = ["model=mlp", "ensemble=seeds5", "ensemble.seeds=[0,1]"]
# weight-space fusion (soups, merges) needs members fine-tuned from one shared start
SHARED_START = ["model=mlp", "ensemble=soup5", "ensemble.seeds=[0,1]", "ensemble.pretrain_epochs=1"]
# recipes whose format needs other layer widths than the MLP's 100: int4 groups of 32 inputs
RECIPE_MODEL = {"quant_int4_weight": ["model.hidden=64"]}
# keys of compression steps and fusion strategies that only make a tiny job slower
EPOCH_KEYS = ("finetune_epochs", "epochs", "epochs_per_round", "final_epochs")
COUNT_KEYS = ("rounds", "iterative_steps")


def rows(x: torch.Tensor) -> list[bytes]:
    """Each sample of a batch of inputs as bytes: a row's identity, whatever batch it came in."""
    x = x.detach().cpu()
    return [r.tobytes() for r in x.reshape(len(x), -1).numpy()]


class Provenance:
    """What each stage of one job read: the rows of every batch a loader yielded, under the stage
    that iterated it, and the rows every gradient step trained on."""

    def __init__(self) -> None:
        self.stages = ["setup"]
        self.iterated: list[tuple[str, str | None, list[bytes]]] = []  # (stage, loader's split tag, rows)
        self.gradient: list[tuple[str, list[bytes]]] = []  # (stage, rows)
        self.datamodules: list = []
        self.members: list = []  # runner.members.Member, in order
        self.fusions: list[tuple[Fusion, list]] = []  # (strategy, the nets it fused)
        self.compressed: list = []  # what Recipe.apply returned, in order

    @property
    def stage(self) -> str:
        return self.stages[-1]

    def within(self, name: str, fn, keep=None):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self.stages.append(name)
            try:
                out = fn(*args, **kwargs)
            finally:
                self.stages.pop()
            if keep is not None:
                keep(args, out)
            return out

        return wrapper

    def on_batch(self, split: str | None, batch) -> None:
        self.iterated.append((self.stage, split, rows(split_batch(batch)[0])))

    # --- after the job: rows -> splits -------------------------------------------------------

    def index(self) -> dict[bytes, str]:
        (dm,) = {id(d): d for d in self.datamodules}.values()
        where: dict[bytes, str] = {}
        for split, (x, _) in dm.splits.items():
            for r in rows(x):
                assert where.setdefault(r, split) == split, "a row of the data is in two splits: pick other data"
        return where

    def splits_read(self, stage: str | None = None, kind: str = "iterated") -> Counter:
        """How many rows of each split `stage` (None: any) read; 'unknown' for rows of no split."""
        where = self.index()
        records = self.iterated if kind == "iterated" else [(s, None, r) for s, r in self.gradient]
        return Counter(where.get(r, "unknown") for s, _, rs in records if stage in (None, s) for r in rs)

    def rows_read(self, stage: str) -> set[bytes]:
        return {r for s, _, rs in self.iterated if s == stage for r in rs}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("guard_splits")


def job(store: Path, overrides: list[str], monkeypatch) -> tuple[dict, Provenance]:
    """Run one tiny job (members not cached: every job trains its own) and record what it read."""
    cfg = compose_config([*overrides, "cache.dir=null", "cache.skip_finished=false"], store)
    prov = Provenance()
    keep_member = lambda args, out: prov.members.append(args[0])  # noqa: E731
    monkeypatch.setattr(
        runner.pipeline,
        "as_source",
        prov.within("setup", runner.pipeline.as_source, keep=lambda args, out: prov.datamodules.append(out)),
    )
    monkeypatch.setattr(
        runner.pipeline, "train_member", prov.within("member", runner.pipeline.train_member, keep=keep_member)
    )
    monkeypatch.setattr(runner.members, "train_member", prov.within("member", runner.members.train_member))
    monkeypatch.setattr(
        Fusion,
        "fit",
        prov.within("fuse.fit", Fusion.fit, keep=lambda args, out: prov.fusions.append((out, list(args[1])))),
    )
    monkeypatch.setattr(runner.pipeline, "predict_proba", prov.within("objective", runner.pipeline.predict_proba))
    monkeypatch.setattr(
        Recipe, "apply", prov.within("compress", Recipe.apply, keep=lambda args, out: prov.compressed.append(out))
    )
    monkeypatch.setattr(Recorder, "evaluate", prov.within("evaluate", Recorder.evaluate))
    training_step = LitClassifier.training_step

    def recorded_step(self, batch, batch_idx):
        for x, _ in batch if isinstance(batch, Chunk) else [split_batch(batch)]:
            prov.gradient.append((prov.stage, rows(x)))
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(LitClassifier, "training_step", recorded_step)
    with watch_batches(prov.on_batch):
        results = runner.pipeline.run(cfg)
    return results, prov


def shrink(node, prefix: str) -> list[str]:
    """Overrides that cut epochs to 1 (never to 0: a step that fine-tunes must still fine-tune)."""
    out = []
    for key in EPOCH_KEYS + COUNT_KEYS:
        value = node.get(key) if node is not None else None
        if isinstance(value, int) and value > (1 if key in EPOCH_KEYS else 2):
            out.append(f"{prefix}.{key}={1 if key in EPOCH_KEYS else 2}")
    return out


def fuse_overrides(name: str) -> list[str]:
    node = compose_config([f"fuse={name}"]).fuse
    members = SHARED_START if issubclass(get_class(node._target_), _Soup) else TWO_MLPS
    return [*members, f"fuse={name}", *shrink(node, "fuse")]


def compress_overrides(name: str) -> tuple[list[str], bool]:
    """(overrides, whether the recipe fine-tunes) for a recipe on tiny MLPs; a distillation from the
    fused ensemble gets two members and fuse=mean, one from every member two members."""
    steps = compose_config([f"compress={name}"]).compress.steps
    teachers = {s.get("teacher") for s in steps}
    members = TWO_MLPS + ["fuse=mean"] if "ensemble" in teachers else TWO_MLPS if "members" in teachers else ONE_MLP
    extra = [o for i, s in enumerate(steps) for o in shrink(s, f"compress.steps.{i}")]
    trains = any((s.get(k) or 0) > 0 for s in steps for k in EPOCH_KEYS)
    return [*members, *RECIPE_MODEL.get(name, []), f"compress={name}", *extra], trains


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    return float((probs.argmax(1) == y).float().mean())


def check_provenance(results: dict, prov: Provenance, fits_fusion: bool, fine_tunes: bool) -> None:
    """The invariants every job keeps, whatever its options."""
    where = prov.index()
    # every loader's tag tells the truth about the rows it yields
    for stage, tag, rs in prov.iterated:
        if tag is not None:
            found = Counter(where.get(r, "unknown") for r in rs)
            assert set(found) == {tag}, f"a loader tagged {tag!r} yielded rows of {dict(found)} ({stage})"
    # test is read by evaluation only
    for stage in {s for s, _, _ in prov.iterated}:
        read = prov.splits_read(stage)
        assert stage == "evaluate" or not read["test"], f"stage {stage!r} read test rows: {dict(read)}"
    assert set(prov.splits_read("evaluate")) == {"test"}, f"evaluation read {dict(prov.splits_read('evaluate'))}"
    # every gradient step (members, fine-tuning, distillation) trains on train rows only
    for stage in ("member", "compress"):
        trained = prov.splits_read(stage, "gradient")
        assert set(trained) <= {"train"}, f"{stage}: gradient steps on {dict(trained)}"
    assert prov.splits_read("member", "gradient")["train"] > 0, "members did not train on train"
    assert set(prov.splits_read("member")) <= {"train", "val"}, (
        f"member training read {dict(prov.splits_read('member'))}"
    )
    if fine_tunes:
        assert prov.splits_read("compress", "gradient")["train"] > 0, "the recipe fine-tunes, but no train rows"
    assert set(prov.splits_read("compress")) <= {"train", "val"}, (
        f"compression read {dict(prov.splits_read('compress'))}"
    )
    # fusion fits on val, all of it, nothing else
    dm = prov.datamodules[0]
    val_rows = set(rows(dm.splits["val"][0]))
    if fits_fusion:
        read = prov.splits_read("fuse.fit")
        assert set(read) == {"val"}, f"fusion fit read {dict(read)}"
        assert prov.rows_read("fuse.fit") == val_rows, "fusion fit did not read all of val"
    else:
        assert not prov.fusions
    # the objective is a val number: it reads val only, and it is the val accuracy it says it is
    read = prov.splits_read("objective")
    assert set(read) <= {"val"}, f"the objective read {dict(read)}"
    nets = [m.net for m in prov.members]
    val_loader, test_loader = dm.val_dataloader(), dm.test_dataloader()
    x_val, y_val = dm.splits["val"]
    if prov.fusions:
        strategy = prov.fusions[0][0]
        if isinstance(strategy, OutputFusion):
            expected = accuracy(strategy.combine(member_probs(nets, x_val)), y_val)
        else:
            expected = accuracy(*predict_proba(strategy.as_module(), val_loader))
    else:
        expected = max(accuracy(*predict_proba(net, val_loader)) for net in nets)
    assert results["objective/val_acc"] == pytest.approx(expected, abs=1e-9), "objective/val_acc is not val accuracy"
    # each reported test/acc is the accuracy of the model it names on test
    for member in prov.members:
        if f"member/{member.name}/test/acc" in results:  # (the pre-trained shared start is no member)
            assert results[f"member/{member.name}/test/acc"] == pytest.approx(
                accuracy(*predict_proba(member.net, test_loader)), abs=1e-9
            ), member.name
    reported = [m for m in prov.members if f"member/{m.name}/test/acc" in results]
    for member, small in zip(reported, prov.compressed):
        assert results[f"compressed/{member.name}/test/acc"] == pytest.approx(
            accuracy(*predict_proba(small, test_loader)), abs=1e-9
        ), f"compressed {member.name}"
    if prov.fusions:
        strategy = prov.fusions[0][0]
        if isinstance(strategy, OutputFusion):
            fused = accuracy(
                strategy.combine(torch.stack([predict_proba(n, test_loader)[0] for n in nets])), dm.splits["test"][1]
            )
        else:
            fused = accuracy(*predict_proba(strategy.as_module(), test_loader))
        assert results["fused/test/acc"] == pytest.approx(fused, abs=1e-9), "fused/test/acc"


@pytest.mark.slow
@pytest.mark.parametrize("name", STRATEGIES)
def test_fusion_fits_on_val_only(name, store, monkeypatch):
    results, prov = job(store, fuse_overrides(name), monkeypatch)
    check_provenance(results, prov, fits_fusion=True, fine_tunes=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_compression_trains_on_train_only(name, store, monkeypatch):
    overrides, fine_tunes = compress_overrides(name)
    results, prov = job(store, overrides, monkeypatch)
    fused = any(o.startswith("fuse=") for o in overrides)
    check_provenance(results, prov, fits_fusion=fused, fine_tunes=fine_tunes)
    assert len(prov.compressed) == len([m for m in prov.members if f"compressed/{m.name}/test/acc" in results]) >= 1


class UserData(pl.LightningDataModule):
    """A user's own LightningDataModule (runner.data.LightningSource wraps it)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 2
        g = torch.Generator().manual_seed(0)
        self.data = {s: TensorDataset(torch.randn(20, 4, generator=g), torch.arange(20) % 2) for s in SPLITS}

    def train_dataloader(self):
        return DataLoader(self.data["train"], batch_size=5)

    def val_dataloader(self):
        return DataLoader(self.data["val"], batch_size=5)

    def test_dataloader(self):
        return DataLoader(self.data["test"], batch_size=5)


@pytest.mark.parametrize("source", ["tensors", "dataloader", "datasets", "lightning"])
def test_every_loader_says_its_split_and_shows_its_rows(source):
    """Each kind of data source tags its loaders; the runner's own also show every batch to watchers,
    rows of that split only (the user's LightningDataModule's loaders are tagged only)."""
    if source in ("tensors", "dataloader"):
        dm = SklearnDataset("wine", num_features=13, num_classes=3, scaling="standard", loader=source)
    elif source == "datasets":
        g = torch.Generator().manual_seed(0)
        dm = DatasetDataModule(
            train=TensorDataset(torch.randn(40, 4, generator=g), torch.arange(40) % 2),
            test=TensorDataset(torch.randn(10, 4, generator=g), torch.arange(10) % 2),
            batch_size=8,
            val_fraction=0.25,
        )
    else:
        dm = as_source(UserData())
    dm.setup()
    for split in SPLITS:
        loader = getattr(dm, f"{split}_dataloader")()
        assert split_of(loader) == split
        seen = []
        with watch_batches(lambda tag, batch, seen=seen: seen.append((tag, batch))):
            batches = list(loader)
        if source == "lightning":
            assert not seen
            continue
        assert [tag for tag, _ in seen] == [split] * len(batches)
        shown = torch.cat([split_batch(b)[0] for _, b in seen])
        data = (
            dm.splits[split][0]
            if source != "datasets"
            else torch.stack([dm.data[split][i][0] for i in range(len(dm.data[split]))])
        )
        assert sorted(rows(shown)) == sorted(rows(data)), f"{split}: the rows shown are not that split's"
    with watch_batches(lambda tag, batch: pytest.fail("watched after the watcher left")):
        pass
    list(dm.val_dataloader())  # no watcher: nothing is called


@pytest.mark.slow
def test_dataloader_path_keeps_provenance(store, monkeypatch):
    """The same invariants when batches go through DataLoaders (SplitCollate) instead of tensor slices;
    a fusion, a fine-tuning recipe and the objective in one job."""
    results, prov = job(
        store,
        [
            *TWO_MLPS,
            "+data.loader=dataloader",
            "fuse=stacking",
            "compress=prune_global",
            "compress.steps.0.finetune_epochs=1",
        ],
        monkeypatch,
    )
    assert {tag for _, tag, _ in prov.iterated} >= {"train", "val", "test"}
    check_provenance(results, prov, fits_fusion=True, fine_tunes=True)


@pytest.mark.slow
def test_cross_fitted_stacker_never_scores_a_row_it_was_fitted_on(store, monkeypatch):
    """stacking_cv: each out-of-fold prediction comes from a meta-learner not fitted on that row, every
    val row gets exactly one, and each fold's meta-learner is fitted on every other row."""
    fitted: dict[int, list[bytes]] = {}
    scored: list[tuple[int, list[bytes]]] = []
    in_fit = []

    def recording_clone(estimator):
        meta = sklearn_clone(estimator)
        fit, proba = meta.fit, meta.predict_proba

        def recorded_fit(features, target, *args, **kwargs):
            fitted[id(meta)] = [r.tobytes() for r in np.asarray(features)]
            return fit(features, target, *args, **kwargs)

        def recorded_proba(features):
            if in_fit:
                scored.append((id(meta), [r.tobytes() for r in np.asarray(features)]))
            return proba(features)

        meta.fit, meta.predict_proba = recorded_fit, recorded_proba
        return meta

    fit_outputs = Stacking._fit_outputs

    def flagged(self, *args, **kwargs):
        in_fit.append(True)
        try:
            return fit_outputs(self, *args, **kwargs)
        finally:
            in_fit.pop()

    monkeypatch.setattr(runner.fuse.stacking, "clone", recording_clone)
    monkeypatch.setattr(Stacking, "_fit_outputs", flagged)
    results, prov = job(store, fuse_overrides("stacking_cv"), monkeypatch)
    check_provenance(results, prov, fits_fusion=True, fine_tunes=False)
    strategy = prov.fusions[0][0]
    assert strategy.cv and len(strategy.meta_learners_) == strategy.cv
    every = Counter(r.tobytes() for r in stack_features(strategy.val_probs_))
    assert len(every) == len(strategy.val_y_), "two val rows with the same member outputs: pick other data"
    out_of_fold = Counter(r for _, rs in scored for r in rs)
    assert out_of_fold == Counter(dict.fromkeys(every, 1)), "every val row gets exactly one out-of-fold prediction"
    for meta in strategy.meta_learners_:
        own = set(fitted[id(meta)])
        held_out = {r for m, rs in scored if m == id(meta) for r in rs}
        assert not own & held_out, f"a fold's meta-learner scored {len(own & held_out)} rows it was fitted on"
        assert own | held_out == set(every), "a fold's meta-learner must be fitted on all the other rows"
