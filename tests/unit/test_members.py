"""runner/members.py on its own: what a member's cache key holds and what a cache hit gives back."""

from __future__ import annotations

import types

import pytest
from conftest import compose_config
from torch import nn

import runner.members
from runner.cache import MemberCache
from runner.errors import ConfigError
from runner.members import Member, member_key, plan_members, train_member
from runner.models.facts import set_init_id

DATA, TRAINER, OPTIM = {"name": "mnist1d"}, {"max_epochs": 1}, {"name": "adam", "lr": 0.01}


def test_the_key_names_the_model_class_even_where_no_source_file_tells_them_apart():
    """Two classes made at run time (no file for the code digest to read): only their names differ."""
    home = types.ModuleType("made_at_run_time")  # a module without __file__
    keys = []
    for name in ("Wide", "Deep"):
        cls = type(name, (nn.Linear,), {"__module__": home.__name__})
        net = cls(4, 2)
        set_init_id(net, "same start")
        keys.append(member_key(Member("m-s0", 0, net), None, TRAINER, OPTIM, DATA))
    assert keys[0] != keys[1]


class Curves:
    """What train_member reads of a tracking logger: the epochs it logged, and replay on a cache hit."""

    def __init__(self, history: list) -> None:
        self.history, self.replayed = history, []

    def replay(self, history: list) -> None:
        self.replayed.append(history)


def test_a_cache_hit_replays_the_learning_curves_the_member_logged_when_it_trained(tmp_path, monkeypatch):
    monkeypatch.setattr(runner.members, "train_classifier", lambda *args, **kwargs: None)  # the curves are given
    cache, curves = MemberCache(str(tmp_path)), [({"val/acc": 0.5, "train/loss": 1.25}, 0), ({"val/acc": 0.75}, 1)]

    def member() -> Member:
        net = nn.Linear(4, 2)
        set_init_id(net, "same start")
        return Member("m-s0", 0, net)

    first, again = Curves(curves), Curves([])
    assert train_member(member(), None, TRAINER, OPTIM, DATA, cache, first) is False
    assert train_member(member(), None, TRAINER, OPTIM, DATA, cache, again) is True
    assert first.replayed == [] and again.replayed == [[[m, e] for m, e in curves]]  # as stored (JSON)


@pytest.mark.parametrize("lr", [-0.1, 0, "fast"])
def test_a_bad_finetune_lr_is_refused_before_anything_trains(lr):
    with pytest.raises(ConfigError) as e:
        plan_members(compose_config(["model=mlp", "ensemble=soup5", f"ensemble.finetune_lr={lr}"]))
    assert (e.value.key, e.value.value) == ("ensemble.finetune_lr", lr)
