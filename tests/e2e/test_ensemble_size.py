"""ensemble.size: a sweep over `seed` gives independent ensembles; the seed keys are checked."""

import pytest
from conftest import compose_config

from runner.errors import ConfigError
from runner.members import plan_members


def members(overrides, tmp_path):
    cfg = compose_config(["model=mlp", "data=wine", *overrides], tmp_path)
    cfg.data.num_classes, cfg.data.num_features = 3, 13
    return plan_members(cfg, model_name="mlp")


def test_size_seeds_members_seed_times_size_plus_i(tmp_path):
    one = members(["+ensemble.size=3", "seed=0"], tmp_path)
    two = members(["+ensemble.size=3", "seed=2"], tmp_path)
    assert [m.name for m in one] == ["mlp-s0", "mlp-s1", "mlp-s2"]
    assert [m.seed for m in two] == [6, 7, 8]  # disjoint from seed 0's and seed 1's (3, 4, 5)


def test_pretrained5_gives_five_members_from_one_start(tmp_path):
    cfg = compose_config(["model=mlp", "data=wine", "ensemble=pretrained5", "seed=1"], tmp_path)
    cfg.data.num_classes, cfg.data.num_features = 3, 13
    nets = plan_members(cfg, model_name="mlp")
    assert [m.seed for m in nets] == [5, 6, 7, 8, 9]
    assert len({m.init_id for m in nets}) == 1  # shared_init: one start, what soups and TIES need


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+ensemble.size=0"], "ensemble.size=0; allowed: null or an integer >= 1"),
        (
            ["+ensemble.size=2", "+ensemble.seeds=[0,1]"],
            "ensemble.seeds=[0, 1]; allowed: null when ensemble.size is set",
        ),
        (["+ensemble.seeds=[a,b]"], "ensemble.seeds=['a', 'b']; allowed: a list of integers >= 0"),
        (["+ensemble.seeds=[1,1]"], "ensemble.seeds=[1, 1]; allowed: distinct integers"),
    ],
)
def test_bad_seed_keys_name_the_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as e:
        members(overrides, tmp_path)
    assert message in str(e.value)


def test_a_seed_sweep_beside_one_fixed_ensemble_seeds_list_is_refused():
    """`-m seed=0,1 ensemble=seeds5 'ensemble.seeds=[0,1]'` would train and report the same members twice."""
    from omegaconf import OmegaConf

    from runner.config import check_seed_sweep
    from runner.tracking.sweep import swept_values

    def config(task, params=None, seeds=None):
        return OmegaConf.create(
            {"ensemble": {"seeds": seeds}, "hydra": {"overrides": {"task": task}, "sweeper": {"params": params or {}}}}
        )

    bad = config(["seed=0,1", "ensemble=seeds5", "ensemble.seeds=[0,1]"], seeds=[0, 1])
    assert swept_values(bad)["ensemble.seeds"] == ["[0,1]"] and swept_values(bad)["seed"] == ["0", "1"]
    with pytest.raises(
        ConfigError,
        match=r"^Invalid config: seed='0,1'; allowed: one seed beside "
        r"ensemble.seeds=\[0,1\]",
    ):
        check_seed_sweep(bad.ensemble.seeds, swept_values(bad))
    with pytest.raises(ConfigError, match="seed='0,1,2'"):  # the sweep in the experiment file's params
        check_seed_sweep([0, 1], swept_values(config([], {"seed": "0,1,2"}, seeds=[0, 1])))
    # fine: the seeds swept with the seed, one seed, or members seeded from the seed (ensemble.size)
    check_seed_sweep([0, 10], swept_values(config(["seed=0,1", "ensemble.seeds=[0,10],[1,11]"], seeds=[0, 10])))
    check_seed_sweep([0, 1], swept_values(config(["seed=3", "ensemble.seeds=[0,1]"], seeds=[0, 1])))
    check_seed_sweep(None, swept_values(config(["seed=0,1,2"], seeds=None)))
