"""SLERP of two members' weights (runner.fuse.SLERP, conf/fuse/slerp.yaml) against hand computations:
the formula on tensors of known angle, the ends t = 0 and t = 1, the linear fallback for colinear
tensors, integer buffers, the refusals, and one job through the pipeline whose fused weights are the
SLERP of its members' weights computed here with numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import compose_config
from torch import nn

import runner.members
import runner.pipeline
from runner.config import build
from runner.errors import ConfigError
from runner.fuse import SLERP
from runner.fuse.merge import DOT_THRESHOLD, slerp
from runner.models.facts import set_init_id

VAL = [(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))]


def linear(weight, bias, init_id: str = "start") -> nn.Linear:
    net = nn.Linear(len(weight[0]), len(weight))
    net.load_state_dict({"weight": torch.tensor(weight), "bias": torch.tensor(bias)})
    set_init_id(net, init_id)
    return net


def fused_state(strategy: SLERP, members: list[nn.Module], val=VAL) -> dict:
    return strategy.fit(members, val).soup_.state_dict()


def np_slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """mergekit's slerp, written out again in numpy (float64)."""
    v0, v1 = v0.astype(np.float64), v1.astype(np.float64)
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    dot = np.sum((v0 / n0 if n0 > 1e-8 else v0) * (v1 / n1 if n1 > 1e-8 else v1))
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = np.arccos(dot)
    return np.sin((1 - t) * theta) / np.sin(theta) * v0 + np.sin(t * theta) / np.sin(theta) * v1


def test_the_formula_on_tensors_of_known_angle():
    # weights: orthogonal (theta = pi/2) of norms 3 and 4; biases: 60 degrees apart, of norms 2 and 5
    a = linear([[3.0, 0.0], [0.0, 0.0]], [2.0, 0.0])
    b = linear([[0.0, 4.0], [0.0, 0.0]], [5 * 0.5, 5 * math.sqrt(3) / 2])
    state = fused_state(SLERP(t=0.5), [a, b])
    # theta = pi/2, t = 1/2: s0 = s1 = sin(pi/4) / sin(pi/2) = sqrt(2)/2, on the unnormalised tensors
    half = math.sqrt(2) / 2
    assert torch.allclose(state["weight"], torch.tensor([[3 * half, 4 * half], [0.0, 0.0]]), rtol=0, atol=1e-6)
    # the chord's midpoint would be [[1.5, 2]] (norm 2.5); the arc's keeps the geometry: norm 5 * sqrt(2)/2
    assert state["weight"].norm() == pytest.approx(5 * half, abs=1e-6)
    # theta = pi/3, t = 1/2: s0 = s1 = sin(pi/6) / sin(pi/3) = 1/sqrt(3)
    s = 1 / math.sqrt(3)
    expected_bias = [s * 2.0 + s * 2.5, s * 5 * math.sqrt(3) / 2]
    assert torch.allclose(state["bias"], torch.tensor(expected_bias), rtol=0, atol=1e-6)
    # t = 1/4 on the biases: s0 = sin(pi/4) / sin(pi/3), s1 = sin(pi/12) / sin(pi/3)
    s0, s1 = math.sin(math.pi / 4) / math.sin(math.pi / 3), math.sin(math.pi / 12) / math.sin(math.pi / 3)
    out = slerp(0.25, a.bias.detach(), b.bias.detach())
    assert torch.allclose(out, torch.tensor([s0 * 2.0 + s1 * 2.5, s1 * 5 * math.sqrt(3) / 2]), rtol=0, atol=1e-6)
    assert out.dtype == torch.float32
    assert SLERP(t=0.5).fit([a, b], VAL).lerp_ == []


@pytest.mark.parametrize("t,which", [(0.0, 0), (1.0, 1)])
def test_t_zero_is_member_zero_and_t_one_member_one_bit_for_bit(t, which):
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)) for _ in range(2)]
    for m in members:
        set_init_id(m, "start")
    val = [(torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))]
    state = fused_state(SLERP(t=t), members, val)
    assert all(torch.equal(v, members[which].state_dict()[k]) for k, v in state.items())


def test_colinear_tensors_are_interpolated_linearly():
    w = [[1.0, -2.0], [0.5, 3.0]]
    a = linear(w, [1.0, 1.0])
    b = linear((2.5 * torch.tensor(w)).tolist(), [-1.0, -1.0])  # weight: same direction; bias: opposite (cos -1)
    strategy = SLERP(t=0.3)
    state = fused_state(strategy, [a, b])
    assert torch.allclose(state["weight"], 0.7 * a.weight + 0.3 * b.weight, rtol=0, atol=1e-6)
    assert torch.allclose(state["bias"], torch.tensor([0.4, 0.4]), rtol=0, atol=1e-6)  # 0.7 * 1 + 0.3 * (-1)
    assert strategy.lerp_ == ["weight", "bias"] and strategy.stats() == {"fuse/t": 0.3, "fuse/lerp_tensors": 2.0}
    # just inside the threshold: the sine formula, which is close to the linear one there
    angle = math.acos(DOT_THRESHOLD) * 1.1
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([math.cos(angle), math.sin(angle)])
    expected = np_slerp(0.3, v0.numpy(), v1.numpy())
    assert torch.allclose(slerp(0.3, v0, v1).double(), torch.from_numpy(expected), rtol=0, atol=1e-7)


def test_integer_buffers_come_from_member_zero_and_floating_ones_are_interpolated():
    def net(seed: int, batches: int) -> nn.Module:
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].num_batches_tracked.fill_(batches)
        set_init_id(m, "start")
        return m

    a, b = net(0, 5), net(1, 7)
    val = [(torch.ones(4, 2), torch.zeros(4, dtype=torch.long))]
    state = fused_state(SLERP(t=0.6), [a, b], val)
    assert state["1.num_batches_tracked"].dtype == torch.long and int(state["1.num_batches_tracked"]) == 5
    for k in ("0.weight", "1.running_mean", "1.running_var"):
        expected = np_slerp(0.6, a.state_dict()[k].numpy(), b.state_dict()[k].numpy())
        assert torch.allclose(state[k].double(), torch.from_numpy(expected), rtol=0, atol=1e-6), k
    assert (state["1.running_var"] > 0).all()


def test_t_per_tensor_by_the_first_filter_a_name_contains():
    a, b = linear([[3.0, 0.0], [0.0, 0.0]], [2.0, 0.0]), linear([[0.0, 4.0], [0.0, 0.0]], [0.0, 1.0])
    strategy = SLERP(t={"bias": 0.0, "b": 1.0, "default": 1.0})  # `bias` first: the bias keeps member 0's
    state = fused_state(strategy, [a, b])
    assert torch.equal(state["bias"], a.bias.detach()) and torch.equal(state["weight"], b.weight.detach())
    assert strategy.t_for("weight") == 1.0 and strategy.t_for("0.bias") == 0.0
    assert strategy.stats() == {"fuse/lerp_tensors": 0.0}  # no single t to log


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["fuse.t=1.5"], "fuse.t"),
        (["fuse.t=-0.1"], "fuse.t"),
        (["fuse.t=true"], "fuse.t"),
        (["fuse.t=nan"], "fuse.t"),
        (["fuse.t={mlp:0.3}"], "fuse.t"),  # no default
        (["fuse.t={mlp:1.2,default:0.5}"], "fuse.t.mlp"),
    ],
)
def test_bad_t_fails_at_build_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        build(compose_config(["fuse=slerp", *overrides]).fuse, "fuse")
    assert info.value.key == key
    assert ("default" if key == "fuse.t" and "{" in overrides[0] else "[0, 1]") in str(info.value)


def test_members_must_be_two_of_one_architecture_and_start_and_filters_must_match():
    a, b, c = (linear([[1.0, float(i)], [0.0, 1.0]], [0.0, 0.0]) for i in range(3))
    with pytest.raises(ConfigError) as info:
        SLERP().check_members([a, b, c])
    assert info.value.key == "ensemble" and info.value.value == "3 member(s)" and "exactly 2" in str(info.value)
    with pytest.raises(ConfigError, match="exactly 2"):
        SLERP().check_members([a])
    with pytest.raises(ConfigError, match="exactly 2"):
        SLERP().fit([a, b, c], VAL)
    wide = nn.Linear(2, 3)
    set_init_id(wide, "start")
    with pytest.raises(ConfigError, match="architecture"):
        SLERP().check_members([a, wide])
    set_init_id(b, "other")
    with pytest.raises(ConfigError) as info:
        SLERP().check_members([a, b])
    assert info.value.key.startswith("ensemble.shared_init") and "SLERP" in str(info.value)
    set_init_id(b, "start")
    with pytest.raises(ConfigError) as info:
        SLERP(t={"attn": 0.3, "default": 0.5}).check_members([a, b])
    assert info.value.key == "fuse.t.attn" and "weight" in str(info.value)


def test_three_members_are_refused_before_training(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(runner.members, "train_classifier", lambda *a, **k: trained.append(a))
    cfg = compose_config(["model=mlp", "ensemble=soup5", "ensemble.seeds=[0,1,2]", "fuse=slerp"], tmp_path)
    with pytest.raises(ConfigError, match=r"ensemble='3 member\(s\)'.*exactly 2"):
        runner.pipeline.run(cfg)
    assert not trained


def test_a_job_with_fuse_slerp_fuses_its_members_weights_by_slerp(tmp_path, monkeypatch):
    """Two MLPs fine-tuned from one pre-trained start, fused by fuse=slerp fuse.t=0.3 in a real job: the
    fused network's weights are the SLERP of the two trained members' weights, computed here."""
    seen = []
    fit = SLERP.fit

    def recording_fit(self, members, val):
        out = fit(self, members, val)
        seen.append((self, [{k: v.clone() for k, v in m.state_dict().items()} for m in members]))
        return out

    monkeypatch.setattr(SLERP, "fit", recording_fit)
    cfg = compose_config(
        [
            "model=mlp",
            "ensemble=soup5",
            "ensemble.seeds=[0,1]",
            "ensemble.pretrain_epochs=1",
            "fuse=slerp",
            "fuse.t=0.3",
        ],
        tmp_path,
    )
    results = runner.pipeline.run(cfg)
    [(strategy, (first, second))] = seen
    fused = strategy.soup_.state_dict()
    assert set(fused) == set(first)
    moved = 0
    for k, v in fused.items():
        if not v.is_floating_point():
            assert torch.equal(v, first[k]), k
            continue
        expected = np_slerp(0.3, first[k].numpy(), second[k].numpy())
        assert np.allclose(v.double().numpy(), expected, rtol=0, atol=1e-6), k
        moved += not torch.equal(first[k], second[k])
    assert moved > 0  # the members differ: fine-tuned with their own data order
    assert results["fused/fuse/t"] == 0.3 and results["fused/params"] == results["member/mlp-s0/params"]
    assert results["fused/test/acc"] > 0.15  # above chance (0.1) for 10 classes
