"""Fusion strategies: the contract over every conf/fuse YAML, scikit-learn oracles, member checks, soups."""

from __future__ import annotations

import copy
import math
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import CONF_DIR, FAST_TRAINER, SPEC, compose_config
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.ensemble import StackingClassifier, VotingClassifier
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression

from runner.config import build
from runner.errors import ConfigError
from runner.fuse import (
    DARE,
    SLERP,
    CaruanaSelection,
    FeatureFusion,
    FeatureNet,
    GreedySoup,
    HardVoting,
    OutputFusion,
    ProbabilityMean,
    SoftVoting,
    Stacking,
    TaskArithmetic,
    UniformSoup,
    WeightedAverage,
    member_probs,
)
from runner.models import CNN1D, MLP
from runner.models.facts import copy_facts, set_init_id
from runner.train import train_classifier

FUSE_CONFIGS = sorted(p.stem for p in (Path(CONF_DIR) / "fuse").glob("*.yaml") if p.stem != "none")  # none: no strategy


@cache
def fuse_config(name: str):
    """The composed real config for `fuse=<name>` (composing costs ~1 s, so once per name)."""
    return compose_config([f"fuse={name}"])


def build_strategy(name: str):
    return build(fuse_config(name).fuse, "fuse")


@pytest.fixture(scope="module")
def shared_init_mlps(mnist1d_small) -> list[MLP]:
    """Three MLPs fine-tuned (different data orders) from one pretrained checkpoint: soups apply."""
    pl.seed_everything(0, verbose=False)
    base = train_classifier(MLP(40, 10, hidden=64), mnist1d_small, FAST_TRAINER, {"name": "adam", "lr": 1e-2})
    nets = []
    for seed in (1, 2, 3):
        pl.seed_everything(seed, verbose=False)
        net = train_classifier(
            copy.deepcopy(base).train(), mnist1d_small, {**FAST_TRAINER, "max_epochs": 2}, {"name": "adam", "lr": 1e-3}
        )
        set_init_id(net, "pretrained-s0")
        net.shared_start = copy.deepcopy(base.state_dict())  # what merging takes task vectors from
        nets.append(net)
    return nets


@pytest.fixture(scope="module")
def four_members(trained_mlps, trained_cnn) -> list:
    return [*trained_mlps, trained_cnn]


def split(dm, name):
    return dm.splits[name]


class FixedOutputs(ClassifierMixin, BaseEstimator):
    """A stand-in member for scikit-learn: X holds row indices into precomputed probabilities."""

    def __init__(self, probs=None):
        self.probs = probs

    def fit(self, X, y):
        self.classes_ = np.arange(self.probs.shape[1])
        return self

    def predict_proba(self, X):
        return self.probs[np.asarray(X)[:, 0].astype(int)]

    def predict(self, X):
        return self.predict_proba(X).argmax(1)


def sklearn_members(members, x) -> list:
    probs = member_probs(members, x).double().numpy()
    return [(f"m{i}", FixedOutputs(p).fit(None, None)) for i, p in enumerate(probs)]


def rows(n: int, offset: int = 0) -> np.ndarray:
    return np.arange(offset, offset + n)[:, None]


# --- the contract, for every YAML in conf/fuse ----------------------------------------------------


@pytest.mark.parametrize("name", FUSE_CONFIGS)
def test_fuse_config_contract(name, shared_init_mlps, mnist1d_small):
    strategy = build_strategy(name)
    x, y = split(mnist1d_small, "test")
    with pytest.raises(NotFittedError):
        strategy.predict_proba(x)
    with pytest.raises(NotFittedError):
        strategy.as_module()
    members = shared_init_mlps[: getattr(strategy, "MEMBERS", None)]  # SLERP: exactly two
    strategy.check_members(members)
    if hasattr(strategy, "set_start"):  # weight-space merging (the pipeline gives it the members' start)
        strategy.set_start(members[0].shared_start)
    assert strategy.fit(members, mnist1d_small.val_dataloader()) is strategy
    probs = strategy.predict_proba(x)
    assert probs.shape == (len(y), 10)
    assert torch.allclose(probs.sum(1), torch.ones(len(y), dtype=probs.dtype), atol=1e-5) and (probs >= 0).all()
    assert torch.equal(strategy.predict(x), probs.argmax(1))
    with torch.no_grad():
        log_probs = strategy.as_module()(x)
    assert torch.allclose(log_probs.exp(), probs, atol=1e-5)
    if isinstance(strategy, OutputFusion):  # the pipeline's path: reuse member probabilities
        assert torch.allclose(strategy.combine(member_probs(members, x)), probs)
    assert (probs.argmax(1) == y).float().mean() > 0.15  # far above chance (0.1) for 10 classes


def test_bad_parameters_fail_at_build():
    with pytest.raises(ConfigError, match="fuse.source"):
        build(compose_config(["fuse=weighted_acc", "fuse.source=median"]).fuse, "fuse")
    with pytest.raises(ConfigError, match="fuse.cv"):
        build(compose_config(["fuse=stacking", "fuse.cv=1"]).fuse, "fuse")
    with pytest.raises(ConfigError, match="fuse.head"):
        FeatureFusion(head="transformer")
    with pytest.raises(ConfigError, match="fuse.weights"):
        SoftVoting(weights=[1.0, -1.0])


# --- oracles: scikit-learn on the same member outputs ---------------------------------------------


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 1.0, 0.5]])
def test_soft_voting_matches_sklearn(weights, four_members, mnist1d_small):
    x, y = split(mnist1d_small, "test")
    ours = SoftVoting(weights).fit(four_members, mnist1d_small.val_dataloader())
    oracle = VotingClassifier(sklearn_members(four_members, x), voting="soft", weights=weights)
    oracle.fit(rows(len(y)), y.numpy())
    np.testing.assert_allclose(ours.predict_proba(x).numpy(), oracle.predict_proba(rows(len(y))), atol=1e-6)
    np.testing.assert_array_equal(ours.predict(x).numpy(), oracle.predict(rows(len(y))))


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 1.0, 0.5]])
def test_hard_voting_matches_sklearn(weights, four_members, mnist1d_small):
    x, y = split(mnist1d_small, "test")
    ours = HardVoting(weights).fit(four_members, mnist1d_small.val_dataloader())
    oracle = VotingClassifier(sklearn_members(four_members, x), voting="hard", weights=weights)
    oracle.fit(rows(len(y)), y.numpy())
    np.testing.assert_array_equal(ours.predict(x).numpy(), oracle.predict(rows(len(y))))


def test_stacking_matches_sklearn(four_members, mnist1d_small):
    (xv, yv), (xt, yt) = split(mnist1d_small, "val"), split(mnist1d_small, "test")
    meta = LogisticRegression(C=0.5, max_iter=1000)
    ours = Stacking(meta).fit(four_members, mnist1d_small.val_dataloader())
    both = sklearn_members(four_members, torch.cat([xv, xt]))  # rows: val first, then test
    oracle = StackingClassifier([(n, FrozenEstimator(e)) for n, e in both], final_estimator=meta)
    oracle.fit(rows(len(yv)), yv.numpy())
    test_rows = rows(len(yt), offset=len(yv))
    np.testing.assert_allclose(ours.predict_proba(xt).numpy(), oracle.predict_proba(test_rows), atol=1e-5)
    np.testing.assert_array_equal(ours.predict(xt).numpy(), oracle.predict(test_rows))


def test_stacking_cross_fitting(four_members, mnist1d_small):
    ours = Stacking(cv=4).fit(four_members, mnist1d_small.val_dataloader())
    assert len(ours.meta_learners_) == 4
    assert ours.oof_proba_.shape == (len(split(mnist1d_small, "val")[1]), 10)
    _, yv = split(mnist1d_small, "val")
    oof = ours.oof_proba_.double()  # the out-of-fold score is that of the out-of-fold probabilities
    assert ours.oof_score_["acc"] == pytest.approx(float((oof.argmax(1) == yv).double().mean()))
    assert ours.oof_score_["nll"] == pytest.approx(float(-oof[torch.arange(len(yv)), yv].log().mean()), rel=1e-5)


# --- learnt weights never lose on what they optimise ----------------------------------------------


def val_nll(probs, y):
    return float(-probs[torch.arange(len(y)), y].clamp_min(1e-12).log().mean())


def test_optimized_weights_and_caruana_beat_uniform_and_best_member_on_val(four_members, mnist1d_small):
    xv, yv = split(mnist1d_small, "val")
    probs = member_probs(four_members, xv)
    optimized = WeightedAverage("optimize").fit_outputs(probs, yv)
    assert torch.isclose(optimized.weights_.sum(), torch.tensor(1.0)) and (optimized.weights_ >= 0).all()
    uniform = val_nll(probs.mean(0), yv)
    assert val_nll(optimized.combine(probs), yv) <= uniform + 1e-6
    caruana = CaruanaSelection("nll", rounds=10).fit_outputs(probs, yv)
    assert val_nll(caruana.combine(probs), yv) <= min(val_nll(p, yv) for p in probs) + 1e-6
    assert int(caruana.counts_.sum()) >= 1


def test_feature_head_starts_as_mean_of_member_logits(trained_mlps, mnist1d_small):
    x, _ = split(mnist1d_small, "test")
    head = FeatureFusion()._build_head(trained_mlps, sum(m.feature_dim for m in trained_mlps))
    with torch.no_grad():
        expected = torch.stack([m(x) for m in trained_mlps]).mean(0)
        assert torch.allclose(FeatureNet(trained_mlps, head)(x), expected, atol=1e-5)


def test_feature_finetune_leaves_members_unchanged(trained_mlps, mnist1d_small):
    before = [copy.deepcopy(m.state_dict()) for m in trained_mlps]
    FeatureFusion(epochs=1, finetune_members=True, finetune_epochs=1, finetune_lr=1e-2).fit(
        trained_mlps, mnist1d_small.val_dataloader()
    )
    for m, state in zip(trained_mlps, before):
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())


# --- incompatible members fail with ConfigError, before any training -------------------------------


@pytest.mark.parametrize("name", FUSE_CONFIGS)
@pytest.mark.parametrize(
    "other, what",
    [
        (MLP(40, 3), r"ensemble.members\[1\] \(MLP\) / data.num_classes"),
        (MLP(13, 10), r"ensemble.members\[1\] \(MLP\) / data"),
    ],
)
def test_incompatible_members_raise(name, other, what):
    strategy = build_strategy(name)
    first = MLP(40, 10)
    set_init_id(first, "same")
    set_init_id(other, "same")
    with pytest.raises(ConfigError, match=what):
        strategy.check_members([first, other], SPEC)
    with pytest.raises(ConfigError, match="num_classes"):  # without data, the declared classes differ
        strategy.check_members([first, MLP(40, 3)])


def test_single_member_is_refused():
    with pytest.raises(ConfigError, match="2 or more"):
        ProbabilityMean().check_members([MLP(40, 10)])


@pytest.mark.parametrize("soup", [UniformSoup, GreedySoup])
def test_soups_need_one_architecture_and_one_init(soup):
    a, b, c = MLP(40, 10), MLP(40, 10, hidden=32), CNN1D(40, 10)
    for net in (a, b, c):
        set_init_id(net, "same")
    for pair in ([a, b], [a, c]):
        with pytest.raises(ConfigError, match="shared initial checkpoint") as info:
            soup().check_members(pair)
        assert "architecture" in str(info.value) and "ensemble.shared_init: true" in str(info.value)
    d = copy.deepcopy(a)
    set_init_id(d, "other")
    with pytest.raises(ConfigError, match="init_id"):
        soup().check_members([a, d])
    e = MLP(40, 10)  # no init_id at all
    with pytest.raises(ConfigError, match="shared_init"):
        soup().check_members([a, e])
    ProbabilityMean().check_members([a, b, c])  # output-level strategies accept mixed architectures


def test_what_a_strategy_needs_is_declared_and_checked():
    """`requires` on the class says what the members must have; check_members reads it (no type switch)."""
    assert (
        UniformSoup.requires == GreedySoup.requires == TaskArithmetic.requires == {"one_architecture", "shared_start"}
    )
    assert FeatureFusion.requires == {"feature_split"} and ProbabilityMean.requires == frozenset()
    assert ProbabilityMean.fuses_outputs and Stacking.fuses_outputs and not UniformSoup.fuses_outputs

    class OneStartMean(ProbabilityMean):
        requires = frozenset({"shared_start"})
        requirement = "members of one start"

    a, b = MLP(40, 10), MLP(40, 10)
    set_init_id(a, "x")
    set_init_id(b, "y")
    with pytest.raises(ConfigError, match="members of one start"):
        OneStartMean().check_members([a, b])
    set_init_id(b, "x")
    OneStartMean().check_members([a, b])

    class Typo(ProbabilityMean):
        requires = frozenset({"shared_stat"})

    with pytest.raises(ConfigError, match="shared_stat"):
        Typo().check_members([a, b])


def test_output_fusion_reuses_outputs_and_other_strategies_run(shared_init_mlps, mnist1d_small):
    """fused_test_probs / val_outputs: what output-level fusion computes from member outputs; None
    for a strategy whose fused model has to run."""
    x, _ = split(mnist1d_small, "test")
    probs = member_probs(shared_init_mlps, x)
    mean = ProbabilityMean().fit(shared_init_mlps, mnist1d_small.val_dataloader())
    assert torch.allclose(mean.fused_test_probs(probs), probs.mean(0))
    val_probs, val_y = mean.val_outputs()
    assert torch.equal(val_y, split(mnist1d_small, "val")[1]) and val_probs.shape == (len(val_y), 10)
    soup = UniformSoup().fit(shared_init_mlps, mnist1d_small.val_dataloader())
    assert soup.fused_test_probs(probs) is None and soup.val_outputs() is None


def test_soup_of_identical_members_is_the_member(shared_init_mlps, mnist1d_small):
    x, _ = split(mnist1d_small, "test")
    member = shared_init_mlps[0]
    copies = [copy_facts(member, copy.deepcopy(member)) for _ in range(3)]  # facts: its init_id
    for soup in (UniformSoup(), GreedySoup()):
        soup.fit(copies, mnist1d_small.val_dataloader())
        with torch.no_grad():
            assert torch.allclose(soup.predict_proba(x), torch.softmax(member(x), 1), atol=1e-6)


def test_greedy_soup_never_worse_than_best_member_on_val(shared_init_mlps, mnist1d_small):
    xv, yv = split(mnist1d_small, "val")
    soup = GreedySoup().fit(shared_init_mlps, mnist1d_small.val_dataloader())
    accs = soup.member_val_acc_
    assert soup.val_acc_ >= max(accs)
    assert float((soup.predict(xv) == yv).float().mean()) == pytest.approx(soup.val_acc_)
    assert soup.ingredients_[0] == int(np.argmax(accs))
    uniform = UniformSoup().fit(shared_init_mlps, mnist1d_small.val_dataloader())
    assert uniform.ingredients_ == [0, 1, 2]


def test_metric_weights_follow_validation_scores():
    y = torch.tensor([0, 1, 0, 1])
    good = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.8, 0.2], [0.3, 0.7]])
    poor = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.4, 0.6], [0.3, 0.7]])
    probs = torch.stack([good, poor])
    for source in ("acc", "nll"):
        weights = WeightedAverage(source).fit_outputs(probs, y).weights_
        assert torch.isclose(weights.sum(), torch.tensor(1.0)) and weights[0] > weights[1]
    assert torch.allclose(WeightedAverage("acc").fit_outputs(probs, y).weights_, torch.tensor([1.0, 0.5]) / 1.5)


def test_combine_checks_member_count_and_classes():
    probs = torch.softmax(torch.randn(3, 5, 4), 2)
    fitted = ProbabilityMean().fit_outputs(probs, torch.tensor([0, 1, 2, 3, 0]))
    assert torch.allclose(fitted.combine(probs), probs.mean(0))
    with pytest.raises(ConfigError, match="fuse.combine"):
        fitted.combine(probs[:2])
    with pytest.raises(ConfigError, match="fuse.weights"):
        SoftVoting([1.0, 2.0]).fit_outputs(probs, torch.tensor([0, 1, 2, 3, 0]))


def three_members_val_outputs() -> tuple[torch.Tensor, torch.Tensor]:
    """(probs (members, rows, classes), y): member 0 the best, member 1 a useful second opinion."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (60,), generator=gen)
    probs = torch.distributions.Dirichlet(torch.ones(3)).sample((3, 60))
    probs[0, torch.arange(60), y] += 1.0
    probs[1, torch.arange(30), y[:30]] += 0.6
    return probs / probs.sum(2, keepdim=True), y


def test_optimized_weights_are_the_minimiser_of_the_val_nll_over_the_simplex():
    """Against scipy's SLSQP on the simplex itself (no softmax parametrisation): the same weights and NLL."""
    from scipy.optimize import minimize

    probs, y = three_members_val_outputs()
    p_true = probs[:, torch.arange(60), y].double().T.numpy()
    ref = minimize(
        lambda w: -np.log(p_true @ w).mean(),
        np.full(3, 1 / 3),
        method="SLSQP",
        bounds=[(0, 1)] * 3,
        constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
        options={"ftol": 1e-12, "maxiter": 500},
    )
    fitted = WeightedAverage("optimize").fit_outputs(probs, y)
    assert np.allclose(fitted.weights_.numpy(), ref.x, atol=2e-3), (fitted.weights_, ref.x)
    assert fitted.val_nll_ == pytest.approx(ref.fun, abs=5e-5)  # softmax weights only approach a 0 weight


def test_hard_voting_smoothing_zero_gives_the_raw_vote_shares():
    probs = torch.tensor([[[0.9, 0.1]], [[0.2, 0.8]], [[0.6, 0.4]]])  # votes 0, 1, 0
    fused = HardVoting(smoothing=0).fit_outputs(probs, torch.tensor([0]))
    assert torch.allclose(fused.combine(probs), torch.tensor([[2 / 3, 1 / 3]]))


def test_every_strategy_s_python_defaults_are_the_ones_a_yaml_of_it_builds():
    """`FeatureFusion()` in a notebook fuses as `fuse=feature` on the command line: for every class,
    one of its YAMLs (the others are variants, e.g. feature_finetune) builds exactly its defaults."""
    by_class: dict[type, list[str]] = {}
    for name in FUSE_CONFIGS:
        by_class.setdefault(type(build_strategy(name)), []).append(name)

    def settings(strategy) -> dict:
        return {k: repr(v) for k, v in vars(strategy).items()}  # an estimator by its repr (its non-defaults)

    for cls, names in by_class.items():
        assert settings(cls()) in [settings(build_strategy(n)) for n in names], (cls.__name__, names)


def test_caruana_picks_by_its_metric_and_its_trajectory_scores_the_bag_it_keeps():
    # y = 0 twice; A: right on both, unsure (NLL 0.598); B: sure on one, wrong on the other (NLL 0.463)
    a, b = [[0.55, 0.45], [0.55, 0.45]], [[0.99, 0.01], [0.4, 0.6]]
    probs, y = torch.tensor([a, b]), torch.tensor([0, 0])
    by_nll = CaruanaSelection("nll", rounds=1).fit_outputs(probs, y)
    by_acc = CaruanaSelection("acc", rounds=1).fit_outputs(probs, y)
    assert by_nll.counts_.tolist() == [0.0, 1.0] and by_acc.counts_.tolist() == [1.0, 0.0]
    assert by_nll.trajectory_ == pytest.approx([val_nll(probs[1], y)]) and by_acc.trajectory_ == [1.0]
    # three members, each sure and right on its own row only: the bag of all three is the best
    probs = torch.full((3, 3, 2), 0.3)
    probs[:, :, 1] = 0.7
    probs[torch.arange(3), torch.arange(3)] = torch.tensor([0.99, 0.01])
    fitted = CaruanaSelection("nll", rounds=3).fit_outputs(probs, torch.zeros(3, dtype=torch.long))
    assert fitted.counts_.tolist() == [1.0, 1.0, 1.0]
    assert fitted.trajectory_[-1] == pytest.approx(-math.log(0.53))
    # more rounds on random members: each round's score is the score of the bag the counts describe
    gen = torch.Generator().manual_seed(0)
    probs = torch.distributions.Dirichlet(torch.ones(4)).sample((5, 40))
    y = torch.randint(0, 4, (40,), generator=gen)
    for rounds in (1, 2, 3, 6):
        fitted = CaruanaSelection("nll", rounds=rounds).fit_outputs(probs, y)
        assert fitted.counts_.sum() <= rounds and fitted.counts_.sum() == int(fitted.counts_.sum())
        assert val_nll(fitted.combine(probs), y) == pytest.approx(min(fitted.trajectory_), abs=1e-6)
    fitted = CaruanaSelection("acc", rounds=6).fit_outputs(probs, y)
    acc = float((fitted.combine(probs).argmax(1) == y).float().mean())
    assert acc == pytest.approx(max(fitted.trajectory_))


def test_greedy_soup_keeps_an_ingredient_that_ties_and_never_hands_out_a_member_as_its_soup(
    shared_init_mlps, mnist1d_small
):
    """Wortsman et al.'s recipe adds an ingredient when val accuracy does not drop (>=): a copy of the
    best member ties and is kept. With one ingredient the soup is a new net, not the member itself."""
    best = shared_init_mlps[0]
    twins = [best, copy_facts(best, copy.deepcopy(best))]
    soup = GreedySoup().fit(twins, mnist1d_small.val_dataloader())
    assert soup.ingredients_ == [0, 1] and soup.stats()["fuse/ingredients"] == 2.0
    worse = copy_facts(best, copy.deepcopy(best))
    with torch.no_grad():
        for p in worse.parameters():
            p.mul_(-1.0)  # a member whose every logit is negated: adding it lowers val accuracy
    alone = GreedySoup().fit([best, worse], mnist1d_small.val_dataloader())
    assert alone.ingredients_ == [0] and alone.stats() == {"fuse/ingredients": 1.0}
    assert alone.soup_ is not best
    assert all(torch.equal(a, b) for a, b in zip(alone.soup_.state_dict().values(), best.state_dict().values()))


def test_a_soup_averages_float_tensors_and_takes_integer_buffers_from_the_first_member():
    from runner.fuse.soup import average_state

    nets = [torch.nn.BatchNorm1d(3) for _ in range(2)]
    for i, net in enumerate(nets):
        net.running_mean.fill_(float(i))
        net.num_batches_tracked.fill_(5 + i)
    state = average_state(nets)
    assert torch.equal(state["running_mean"], torch.full((3,), 0.5))
    assert state["num_batches_tracked"].dtype == torch.long and int(state["num_batches_tracked"]) == 5


def test_the_feature_head_trains_on_every_row_s_features_once_in_batches_shuffled_by_the_seed(
    trained_mlps, monkeypatch
):
    """4,100 rows: more than one 4,096-row chunk of features."""
    import runner.fuse.features as features

    seen = {}
    real = features.TensorBatches

    def spy(x, y, batch_size, **kwargs):
        seen.update(x=x, y=y, batch_size=batch_size, **kwargs)
        return real(x, y, batch_size, **kwargs)

    monkeypatch.setattr(features, "TensorBatches", spy)
    x = torch.randn(4100, 40, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (4100,), generator=torch.Generator().manual_seed(1))
    strategy = FeatureFusion(epochs=1, batch_size=1000, seed=7)
    strategy._fit(trained_mlps[:2], x, y)
    with torch.no_grad():
        expected = torch.cat([trained_mlps[0].forward_features(x), trained_mlps[1].forward_features(x)], 1)
    assert torch.allclose(seen["x"], expected, atol=1e-6) and torch.equal(seen["y"], y)
    assert (seen["batch_size"], seen["shuffle"], seen["seed"]) == (1000, True, 7)


def test_gain_over_best_compares_with_the_best_member_in_each_metric_s_direction():
    from runner.fuse.base import gain_over_best

    fused = {"test/acc": 0.9, "test/f1": 0.8, "test/nll": 0.3, "test/ece": 0.05}
    members = [
        {"test/acc": 0.85, "test/f1": 0.82, "test/nll": 0.35, "test/ece": 0.04},
        {"test/acc": 0.8, "test/f1": 0.7, "test/nll": 0.4, "test/ece": 0.1},
    ]
    assert gain_over_best(fused, members) == pytest.approx(
        {"gain/acc": 0.05, "gain/f1": -0.02, "gain/nll": 0.05, "gain/ece": -0.01}
    )


def test_optimized_weights_ignore_power_and_stop_at_maxiter():
    probs, y = three_members_val_outputs()
    full = WeightedAverage("optimize").fit_outputs(probs, y)
    assert torch.equal(WeightedAverage("optimize", power=3.0).fit_outputs(probs, y).weights_, full.weights_)
    one_step = WeightedAverage("optimize", maxiter=1).fit_outputs(probs, y)
    assert one_step.val_nll_ > full.val_nll_ + 1e-3  # one L-BFGS iteration is not the optimum here


class _Unmet(ProbabilityMean):
    requires = frozenset({"telepathy"})


@pytest.mark.parametrize(
    ("make", "error"),
    [  # (key, value) or (key, value, allowed)
        (lambda: CaruanaSelection(metric="auc"), ("fuse.metric", "auc")),
        (lambda: CaruanaSelection(rounds=0), ("fuse.rounds", 0)),
        (lambda: FeatureFusion(batch_size=0), ("fuse.batch_size", 0)),
        (lambda: DARE(seed=-1), ("fuse.seed", -1)),
        (lambda: SLERP(t=1.5), ("fuse.t", 1.5)),
        (lambda: HardVoting(smoothing=-0.5), ("fuse.smoothing", -0.5)),
        (lambda: WeightedAverage(power=0), ("fuse.power", 0, "a float > 0")),
        (
            lambda: Stacking(cv=1),
            ("fuse.cv", 1, "null (one meta-learner on all of val) or an integer >= 2"),
        ),
        (
            lambda: ProbabilityMean().check_members([MLP(40, 10)]),
            ("ensemble", "1 member(s)", "2 or more members to fuse"),
        ),
        (
            lambda: ProbabilityMean().fit_outputs(torch.ones(2, 3, 4) / 4, torch.zeros(5, dtype=torch.long)),
            ("fuse.fit_outputs", (2, 3, 4), "member probabilities of shape (M, 5, C)"),
        ),
        (
            lambda: TaskArithmetic().set_start({"w": torch.zeros(1)})._checked_start(MLP(40, 10)),
            ("fuse (shared start)", "1 tensors", "the members' state dict (6 tensors of the same names and shapes)"),
        ),
    ],
)
def test_a_refusal_names_the_key_the_value_and_what_is_allowed(make, error):
    with pytest.raises(ConfigError) as e:
        make()
    assert (e.value.key, e.value.value, e.value.allowed)[: len(error)] == error


def test_a_strategy_needing_an_unknown_property_names_its_class():
    with pytest.raises(ConfigError) as e:
        _Unmet().check_members([MLP(40, 10), MLP(40, 10)])
    assert (e.value.key, e.value.value) == ("_Unmet.requires", ["telepathy"])


def test_the_mixture_nll_s_gradient_is_its_finite_difference():
    from scipy.optimize import check_grad

    from runner.fuse.averaging import mixture_nll

    p_true = np.random.default_rng(0).uniform(0.05, 1.0, (30, 4))
    for theta in (np.zeros(4), np.array([0.3, -1.0, 2.0, 0.5])):
        value = mixture_nll(theta, p_true)[0]
        w = np.exp(theta) / np.exp(theta).sum()
        assert value == pytest.approx(-np.log(p_true @ w).mean(), rel=1e-12)
        error = check_grad(lambda t: mixture_nll(t, p_true)[0], lambda t: mixture_nll(t, p_true)[1], theta)
        assert error < 1e-6
