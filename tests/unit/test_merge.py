"""Model merging (task arithmetic, TIES, DARE) against hand computations; the shared start; per-member
fine-tuning settings (ensemble.finetune) from validation to the member cache and the whole pipeline."""

from __future__ import annotations

import copy
import json

import pytest
import pytorch_lightning as pl
import torch
from conftest import FAST_TRAINER, compose_config, logged_predictions
from omegaconf import OmegaConf
from sklearn.metrics import log_loss
from torch import nn

import runner.members
import runner.pipeline
from runner.cache import MemberCache
from runner.config import build
from runner.data import as_source, describe_data
from runner.errors import ConfigError
from runner.fuse import DARE, TIES, TaskArithmetic, UniformSoup
from runner.fuse.merge import SCALING_GRID, dare, disjoint_mean, elect_signs, trim
from runner.members import Member, plan_members, shared_start, state_hash, train_member
from runner.models import MLP
from runner.models.facts import copy_facts, init_id, set_init_id
from runner.train import train_classifier

# --- tiny nets with hand-made task vectors -------------------------------------------------------

START = {"weight": torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]]), "bias": torch.tensor([0.5, -0.5])}
TAU = [
    {"weight": torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.25, -1.0]]), "bias": torch.tensor([1.0, 0.0])},
    {"weight": torch.tensor([[-0.5, -1.0, 0.5], [2.0, -0.25, 0.0]]), "bias": torch.tensor([-3.0, 0.75])},
]
VAL = [(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 1]))]


def linear(state: dict, init_id: str = "start") -> nn.Linear:
    net = nn.Linear(len(state["weight"][0]), len(state["weight"]))
    net.load_state_dict(state)
    set_init_id(net, init_id)
    return net


def members_of(start: dict, taus: list[dict]) -> list[nn.Module]:
    return [linear({k: start[k] + tau[k] for k in start}) for tau in taus]


def merged(strategy, start=START, taus=TAU, val=VAL) -> dict:
    strategy.set_start(start).fit(members_of(start, taus), val)
    return strategy.soup_.state_dict()


def test_task_arithmetic_is_start_plus_scaled_sum():
    state = merged(TaskArithmetic(scaling=0.5))
    # theta_0 + 0.5 * (tau_1 + tau_2); tau_1 + tau_2 = [[0.5, -3, 1], [2, 0, -1]], [-2, 0.75]
    assert torch.equal(state["weight"], torch.tensor([[1.25, -1.5, -0.5], [1.0, 2.0, -0.5]]))
    assert torch.equal(state["bias"], torch.tensor([-0.5, -0.125]))


def test_ties_trims_elects_and_takes_the_disjoint_mean():
    # density 0.5 keeps 4 of 8 entries per task vector (weights row by row, then the bias):
    #   tau_1 [1, -2, .5, 0, .25, -1, 1, 0]     -> [1, -2, 0, 0, 0, -1, 1, 0]
    #   tau_2 [-.5, -1, .5, 2, -.25, 0, -3, .75] -> [0, -1, 0, 2, 0, 0, -3, .75]
    # summed signs [+, -, 0, +, 0, -, -, +]; means of the agreeing entries [1, -1.5, 0, 2, 0, -1, -3, .75]
    state = merged(TIES(density=0.5, scaling=1.0))
    assert torch.equal(state["weight"], torch.tensor([[2.0, -1.5, -1.0], [2.0, 2.0, -1.0]]))
    assert torch.equal(state["bias"], torch.tensor([-2.5, 0.25]))
    trimmed = trim([{k: v.clone() for k, v in t.items()} for t in TAU], 0.5)
    assert torch.equal(trimmed[1]["weight"], torch.tensor([[0.0, -1.0, 0.0], [2.0, 0.0, 0.0]]))


def test_ties_sign_election_and_disjoint_mean_by_hand():
    vectors = [
        {"w": torch.tensor([3.0, 1.0, 2.0, 1.0])},
        {"w": torch.tensor([-1.0, -2.0, 4.0, -1.0])},
        {"w": torch.tensor([-1.0, -2.0, -1.0, 0.0])},
    ]
    signs = elect_signs(vectors)  # sums 1, -3, 5, 0; the 0 takes the majority of the elected signs (+)
    assert torch.equal(signs["w"], torch.tensor([1.0, -1.0, 1.0, 1.0]))
    # entry 0: only 3 agrees; 1: mean(-2, -2); 2: mean(2, 4); 3: only 1 agrees (the 0 does not count)
    assert torch.equal(disjoint_mean(vectors, signs)["w"], torch.tensor([3.0, -2.0, 3.0, 1.0]))


def test_dare_without_dropping_is_task_arithmetic_or_ties():
    ta, dare_ta = merged(TaskArithmetic(scaling=0.5)), merged(DARE(drop_rate=0.0, scaling=0.5, seed=3))
    assert all(torch.equal(ta[k], dare_ta[k]) for k in ta)
    ties, dare_ties = merged(TIES(density=1.0, scaling=1.0)), merged(DARE(0.0, combine="ties", scaling=1.0))
    assert all(torch.equal(ties[k], dare_ties[k]) for k in ties)


def test_dare_drops_the_expected_fraction_reproducibly():
    torch.manual_seed(0)
    start = {"weight": torch.randn(100, 100), "bias": torch.randn(100)}
    taus = [{k: torch.randn_like(v) for k, v in start.items()} for _ in range(2)]
    dropped, fraction = dare(taus, 0.3, torch.Generator().manual_seed(7))
    for tau, kept in zip(taus, dropped):
        for k in tau:  # each entry is dropped (0) or rescaled by exactly 1 / (1 - 0.3)
            survivors = kept[k] != 0
            assert torch.equal(kept[k][survivors], tau[k][survivors] / 0.7)
    zeros = sum(int((kept[k] == 0).sum()) for kept in dropped for k in kept)
    assert fraction == zeros / 20200
    assert abs(fraction - 0.3) < 4 * (0.3 * 0.7 / 20200) ** 0.5  # Binomial(20200, 0.3): 4 standard deviations
    val = [(torch.randn(4, 100), torch.zeros(4, dtype=torch.long))]
    first, again = (merged(DARE(0.3, scaling=1.0, seed=7), start, taus, val) for _ in range(2))
    other = merged(DARE(0.3, scaling=1.0, seed=8), start, taus, val)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["weight"], other["weight"])
    expected = {k: start[k] + (dropped[0][k] + dropped[1][k]) for k in start}  # the same masks: same seed
    assert all(torch.allclose(first[k], expected[k], rtol=0, atol=1e-5) for k in first)  # float32 rounding


@pytest.mark.parametrize(
    "strategy,x,best",
    [
        (TaskArithmetic, [0.35, 0.45], 0.4),  # class 1 iff x > scaling
        (lambda: TIES(density=1.0), [0.375, 0.425], 0.8),  # disjoint mean: class 1 iff x > scaling / 2
    ],
)
def test_scaling_null_picks_the_grid_value_with_the_best_val_accuracy(strategy, x, best):
    start = {"weight": torch.tensor([[0.0], [1.0]]), "bias": torch.tensor([0.0, 0.0])}
    taus = [{"weight": torch.zeros(2, 1), "bias": torch.tensor([0.0, -0.5])}] * 2
    fused = strategy()
    val = [(torch.tensor(x)[:, None], torch.tensor([0, 1]))]
    merged(fused, start, taus, val)
    assert fused.scaling_ == best and fused.val_acc_ == 1.0
    assert fused.grid_val_acc_ == {lam: 1.0 if lam == best else 0.5 for lam in SCALING_GRID}
    with torch.no_grad():
        assert torch.allclose(fused.as_module()(val[0][0]).exp(), fused.predict_proba(val[0][0]))


def test_batchnorm_statistics_are_averaged_and_integer_buffers_copied():
    def net(shift: float, batches: int) -> nn.Module:
        m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        with torch.no_grad():
            for p in m.parameters():
                p.fill_(shift)
        m[1].running_mean.fill_(shift)
        m[1].running_var.fill_(1.0 + shift)
        m[1].num_batches_tracked.fill_(batches)
        set_init_id(m, "start")
        return m

    start, a, b = net(0.0, 0), net(1.0, 5), net(3.0, 7)
    val = [(torch.ones(4, 2), torch.zeros(4, dtype=torch.long))]
    fused = TaskArithmetic(scaling=1.0).set_start(start.state_dict()).fit([a, b], val)
    state = fused.soup_.state_dict()
    assert torch.equal(state["0.weight"], torch.full((2, 2), 4.0))  # 0 + (1 - 0) + (3 - 0)
    assert torch.equal(state["1.running_mean"], torch.full((2,), 2.0))  # mean(1, 3), not 0 + 1 + 3
    assert torch.equal(state["1.running_var"], torch.full((2,), 3.0))  # mean(2, 4)
    assert int(state["1.num_batches_tracked"]) == 5  # the first member's


def test_members_must_share_architecture_init_and_a_start():
    a, b = members_of(START, TAU)
    wide = nn.Linear(3, 3)
    set_init_id(wide, "start")
    for strategy in (TaskArithmetic(), TIES(), DARE()):
        with pytest.raises(ConfigError, match="architecture"):
            strategy.check_members([a, wide])
        set_init_id(b, "other")
        with pytest.raises(ConfigError) as info:
            strategy.check_members([a, b])
        assert info.value.key == "ensemble.shared_init" and "false" in str(info.value.value)
        assert "ensemble=finetune5" in str(info.value)
        set_init_id(b, "start")
        with pytest.raises(ConfigError, match="set_start"):
            type(strategy)().fit([a, b], VAL)


def test_prepare_keeps_the_members_shared_start():
    """prepare(members), called before they train (the pipeline does), keeps the start to take task
    vectors from; once a member trained, the start can no longer be read from them."""
    start = linear(START)
    set_init_id(start, state_hash(start))
    a, b = (copy_facts(start, copy.deepcopy(start)) for _ in range(2))
    merge = TaskArithmetic(scaling=1.0).prepare([a, b])
    with torch.no_grad():
        a.weight.add_(1.0)  # what training did
    merge.fit([a, b], VAL)
    assert torch.equal(merge.soup_.state_dict()["weight"], START["weight"] + 1.0)
    with pytest.raises(ConfigError, match="before training"):
        TaskArithmetic().prepare([a, b])
    assert UniformSoup().prepare([a, b]).fused_test_probs(torch.ones(2, 1, 2)) is None  # nothing to keep


def test_bad_parameters_fail_at_build():
    for overrides, key in (
        (["fuse=ties", "fuse.density=0"], "fuse.density"),
        (["fuse=dare", "fuse.drop_rate=1.0"], "fuse.drop_rate"),
        (["fuse=dare", "fuse.combine=mean"], "fuse.combine"),
        (["fuse=task_arithmetic", "fuse.scaling=-1"], "fuse.scaling"),
    ):
        with pytest.raises(ConfigError) as info:
            build(compose_config(overrides).fuse, "fuse")
        assert info.value.key == key


# --- the YAMLs on members fine-tuned from one trained start --------------------------------------


@pytest.fixture(scope="module")
def finetuned(mnist1d_small):
    """A start trained for 3 epochs, then three members fine-tuned from it with their own lr."""
    pl.seed_everything(0, verbose=False)
    start = train_classifier(MLP(40, 10, hidden=32), mnist1d_small, FAST_TRAINER, {"name": "adam", "lr": 1e-2})
    state, nets = copy.deepcopy(start.state_dict()), []
    for seed, lr in ((1, 1e-3), (2, 3e-3), (3, 1e-3)):
        pl.seed_everything(seed, verbose=False)
        net = train_classifier(
            copy.deepcopy(start).train(), mnist1d_small, {**FAST_TRAINER, "max_epochs": 1}, {"name": "adam", "lr": lr}
        )
        set_init_id(net, "start")
        nets.append(net)
    return state, nets


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare"])
def test_merge_configs_fit_one_network(name, finetuned, mnist1d_small):
    state, nets = finetuned
    strategy = build(compose_config([f"fuse={name}"]).fuse, "fuse")
    strategy.set_start(state).fit(nets, mnist1d_small.val_dataloader())
    x, y = mnist1d_small.splits["test"]
    probs = strategy.predict_proba(x)
    assert torch.allclose(probs.sum(1), torch.ones(len(y)), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(strategy.as_module()(x).exp(), probs, atol=1e-5)
    assert sum(p.numel() for p in strategy.as_module().parameters()) == sum(p.numel() for p in nets[0].parameters())
    assert strategy.scaling_ in SCALING_GRID and strategy.val_acc_ == max(strategy.grid_val_acc_.values())
    xv, yv = mnist1d_small.splits["val"]
    assert strategy.val_acc_ == pytest.approx(float((strategy.predict(xv) == yv).double().mean()))
    assert (probs.argmax(1) == y).float().mean() > 0.15  # far above chance (0.1) for 10 classes


def test_task_arithmetic_at_one_over_m_is_the_uniform_soup(finetuned, mnist1d_small):
    state, nets = finetuned
    ta = TaskArithmetic(scaling=1 / 3).set_start(state).fit(nets, mnist1d_small.val_dataloader())
    soup = UniformSoup().fit(nets, mnist1d_small.val_dataloader())
    for k, v in soup.soup_.state_dict().items():
        assert torch.allclose(ta.soup_.state_dict()[k], v, rtol=0, atol=1e-6)


# --- the shared start and per-member settings ----------------------------------------------------


@pytest.fixture(scope="module")
def two_mlps_cfg():
    return compose_config(["model=mlp", "ensemble=finetune5", "ensemble.seeds=[0,1]", "ensemble.finetune=null"])


def with_finetune(cfg, finetune):
    cfg = copy.deepcopy(cfg)
    cfg.ensemble.finetune = finetune
    return cfg


def test_shared_start_is_the_members_first_weights(two_mlps_cfg):
    members = plan_members(two_mlps_cfg)
    start = shared_start(members)
    assert all(torch.equal(start[k], v) for k, v in members[1].net.state_dict().items())
    with torch.no_grad():
        members[0].net.head.bias.add_(1.0)  # once a member trained, its weights are no longer the start
    with pytest.raises(ConfigError, match="before training"):
        shared_start(members)
    independent = plan_members(compose_config(["model=mlp", "ensemble=seeds5", "ensemble.seeds=[0,1]"]))
    with pytest.raises(ConfigError, match="ensemble.shared_init"):
        shared_start(independent)


@pytest.mark.parametrize(
    "finetune,key",
    [
        ([{"optim": {"lr": 0.1}}], "ensemble.finetune"),  # 1 entry for 2 members
        ([{"optimizer": {"lr": 0.1}}, None], "ensemble.finetune[0].optimizer"),
        ([None, {"optim": {"learning_rate": 0.1}}], "ensemble.finetune[1].optim.learning_rate"),
        ([None, {"optim": {"lr": -1.0}}], "ensemble.finetune[1].optim.lr"),
        ([None, {"optim": {"lr": "fast"}}], "ensemble.finetune[1].optim.lr"),
        ([None, {"optim": {"name": "lion"}}], "ensemble.finetune[1].optim.name"),
        ([None, {"data": {"split_seed": 3}}], "ensemble.finetune[1].data.split_seed"),
        ([None, {"data": {"batch_size": 0}}], "ensemble.finetune[1].data.batch_size"),
        ([None, {"data": {"train_transforms": [3]}}], "ensemble.finetune[1].data.train_transforms[0]"),
    ],
)
def test_bad_finetune_settings_name_the_key(finetune, key, two_mlps_cfg):
    with pytest.raises(ConfigError) as info:
        plan_members(with_finetune(two_mlps_cfg, finetune))
    assert info.value.key == key


def test_finetune_settings_reach_each_member_with_the_jobs_splits(tmp_path):
    cfg = compose_config(
        [
            "data=digits_image",
            "model=mlp",
            "ensemble=finetune5",
            "ensemble.seeds=[0,1,2]",
            "ensemble.finetune=[{optim:{lr:0.003}},null,{data:{batch_size:8,train_transforms:"
            "[{_target_:torch.nn.Dropout,p:0.5}]}}]",
        ],
        tmp_path,
    )
    job = as_source(build(cfg.data, "data"))
    composed = OmegaConf.to_container(cfg.data, resolve=True)
    describe_data(cfg, job)
    members = plan_members(cfg, composed)
    assert [m.optim for m in members] == [{"lr": 0.003}, {}, {}]
    assert members[0].datamodule is None and members[1].datamodule is None
    own = members[2].datamodule
    own.setup()
    for split in ("train", "val", "test"):  # the same split seed: identical splits
        assert all(torch.equal(a, b) for a, b in zip(own.splits[split], job.splits[split]))
    assert own.batch_size == 8 and job.batch_size == 32
    x, _ = next(iter(own.train_dataloader()))
    assert ((x == 0).float().mean() > 0.3) and not (job.splits["train"][0] == 0).float().mean() > 0.3


def test_members_with_different_lr_get_different_cache_keys_and_weights(tmp_path, mnist1d_small, monkeypatch):
    pl.seed_everything(0, verbose=False)
    start = MLP(40, 10, hidden=16)
    set_init_id(start, state_hash(start))
    trainer = {**FAST_TRAINER, "max_epochs": 1, "limit_train_batches": 3}
    cache, job_optim = MemberCache(str(tmp_path)), {"name": "adam", "lr": 0.01}
    seen = []
    real = runner.members.train_classifier

    def spy(net, dm, trainer_cfg, optim, *args, **kwargs):  # records what each member trains with
        seen.append((dm, dict(optim)))
        return real(net, dm, trainer_cfg, optim, *args, **kwargs)

    monkeypatch.setattr(runner.members, "train_classifier", spy)

    def member(**settings) -> Member:
        net = copy.deepcopy(start)
        set_init_id(net, init_id(start))
        return Member("mlp-s0", 0, net, **settings)

    slow, fast, slow_again = member(optim={"lr": 0.001}), member(optim={"lr": 0.003}), member(optim={"lr": 0.001})
    own_data = member(data={"batch_size": 50}, datamodule=copy.copy(mnist1d_small))
    hits = [
        train_member(m, mnist1d_small, trainer, job_optim, {"name": "mnist1d"}, cache)
        for m in (slow, fast, slow_again, own_data)
    ]
    assert hits == [False, False, True, False]
    assert [optim["lr"] for _, optim in seen] == [0.001, 0.003, 0.01]
    assert seen[2][0] is own_data.datamodule and seen[0][0] is mnist1d_small
    entries = sorted((tmp_path / "members").iterdir())
    specs = sorted(
        (
            json.loads((e / "meta.json").read_text())["spec"]["optim"]["lr"],
            json.loads((e / "meta.json").read_text())["spec"]["data"],
        )
        for e in entries
    )
    assert specs == [
        (0.001, {"name": "mnist1d"}),
        (0.003, {"name": "mnist1d"}),
        (0.01, {"name": "mnist1d", "batch_size": 50}),
    ]
    assert not torch.equal(slow.net.head.weight, fast.net.head.weight)
    assert torch.equal(slow.net.head.weight, slow_again.net.head.weight)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["ensemble=seeds5", "ensemble.seeds=[0,1]", "fuse=ties"], "ensemble.shared_init"),
        (["ensemble=finetune5", "ensemble.seeds=[0,1]", "fuse=dare"], "ensemble.finetune"),  # 5 entries, 2 members
    ],
)
def test_refused_before_training(overrides, key, tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(runner.members, "train_classifier", lambda *a, **k: trained.append(a))
    with pytest.raises(ConfigError) as info:
        runner.pipeline.run(compose_config(["model=mlp", *overrides], tmp_path))
    assert info.value.key == key and not trained


@pytest.mark.slow
def test_ties_of_members_finetuned_with_their_own_settings(tmp_path):
    """ensemble=finetune5 shrunk: a pre-trained start, three members with their own lr and augmentation,
    merged by TIES; the logged fused metrics are those of the merged network's logged predictions."""
    cfg = compose_config(
        [
            "model=mlp",
            "ensemble=finetune5",
            "ensemble.seeds=[0,1,2]",
            "ensemble.pretrain_epochs=1",
            "ensemble.finetune=[{optim:{lr:0.001}},{optim:{lr:0.003}},{optim:{lr:0.001},data:"
            "{batch_size:50,train_transforms:[{_target_:torch.nn.Dropout,p:0.1}]}}]",
            "fuse=ties",
        ],
        tmp_path,
    )
    results = runner.pipeline.run(cfg)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("runner").experiment_id])}
    probs, targets = logged_predictions(tmp_path, runs["fused"])
    assert results["fused/test/acc"] == pytest.approx((probs.argmax(1) == targets).mean())
    assert results["fused/test/nll"] == pytest.approx(log_loss(targets, probs, labels=range(10)), rel=1e-5)
    assert results["fused/params"] == results["member/mlp-s0/params"]  # one merged network
    assert runs["fused"].data.metrics["test/acc"] == pytest.approx(results["fused/test/acc"])
    assert {f"member/mlp-s{i}/test/acc" for i in range(3)} <= set(results)
    assert results["fused/fuse/scaling"] in SCALING_GRID  # chosen on val, logged with the fused model
