"""Fine-tuning modes (optim.finetune, optim.backbone_lr_factor) and starting any model from a
weights file (model.checkpoint): what trains, by how much, and what a bad file says."""

import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_config
from torch import nn

from runner.data import SklearnDataset
from runner.errors import ConfigError
from runner.members import plan_members
from runner.models import MLP, LitClassifier
from runner.models.adapter import build_model, load_checkpoint
from runner.train import fit

TRAINER = {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


class WithNorm(nn.Module):
    """A backbone with BatchNorm and dropout, and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(13, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.fixture(scope="module")
def wine():
    dm = SklearnDataset("wine", num_features=13, num_classes=3, batch_size=16)
    dm.setup()
    return dm


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class EpochSnapshots(pl.Callback):
    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, module) -> None:
        self.states.append(snapshot(module.net))


def train(dm, net, callbacks=(), trainer=None, **optim):
    pl.seed_everything(0, verbose=False)
    module = LitClassifier(net, **{"optimizer": "adam", "lr": 0.05, **optim})
    fit(module, dm, {**TRAINER, **(trainer or {})}, callbacks=list(callbacks))
    return module


def test_linear_probe_trains_the_head_only_and_keeps_batchnorm_statistics(wine):
    pl.seed_everything(0, verbose=False)
    net = WithNorm()
    before = snapshot(net)
    train(wine, net, finetune="linear_probe")
    after = snapshot(net)
    for name in before:
        if name.startswith("head."):
            assert not torch.equal(before[name], after[name]), name
        else:  # weights and BatchNorm running statistics alike
            assert torch.equal(before[name], after[name]), name
    assert all(p.requires_grad for p in net.parameters())  # what trains next finds every weight trainable


def test_lp_ft_probes_for_probe_epochs_then_trains_everything(wine):
    pl.seed_everything(0, verbose=False)
    net = WithNorm()
    before = snapshot(net)
    epochs = EpochSnapshots()
    train(wine, net, [epochs], trainer={"max_epochs": 3}, finetune="lp_ft", probe_epochs=2)
    body = [k for k in before if k.startswith("body.")]
    for state in epochs.states[:2]:  # the probe: the backbone as it started
        assert all(torch.equal(before[k], state[k]) for k in body)
    assert not torch.equal(before["body.0.weight"], epochs.states[2]["body.0.weight"])
    assert not torch.equal(before["head.weight"], epochs.states[0]["head.weight"])


def test_lp_frozen_head_probes_then_trains_the_backbone_under_the_probes_head(wine):
    pl.seed_everything(0, verbose=False)
    net = WithNorm()
    before = snapshot(net)
    epochs = EpochSnapshots()
    train(wine, net, [epochs], trainer={"max_epochs": 3}, finetune="lp_frozen_head", probe_epochs=1)
    body = [k for k in before if k.startswith("body.")]
    assert all(torch.equal(before[k], epochs.states[0][k]) for k in body)  # the probe: backbone fixed
    assert not torch.equal(before["head.weight"], epochs.states[0]["head.weight"])  # ... head trained
    for state in epochs.states[1:]:  # then the head stays as the probe left it, the backbone trains
        assert torch.equal(state["head.weight"], epochs.states[0]["head.weight"])
        assert torch.equal(state["head.bias"], epochs.states[0]["head.bias"])
    assert not torch.equal(epochs.states[0]["body.0.weight"], epochs.states[2]["body.0.weight"])
    assert all(p.requires_grad for p in net.parameters())


def test_full_fine_tuning_trains_the_backbone_too(wine):
    pl.seed_everything(0, verbose=False)
    net = WithNorm()
    before = snapshot(net)
    train(wine, net)
    assert not torch.equal(before["body.0.weight"], net.state_dict()["body.0.weight"])


def test_backbone_lr_factor_scales_the_backbone_step_only(wine):
    """One plain SGD step: the backbone moves by factor x the step it takes at factor 1, the head alike."""

    def one_step(factor):
        pl.seed_everything(0, verbose=False)
        net = MLP(13, 3, hidden=8)
        start = snapshot(net)
        train(
            wine,
            net,
            trainer={"max_steps": 1, "max_epochs": 1, "steps_per_call": 1},
            optimizer="sgd",
            lr=0.1,
            backbone_lr_factor=factor,
        )
        return {k: net.state_dict()[k] - start[k] for k in start}

    full, tenth = one_step(1.0), one_step(0.1)
    for name in full:
        expected = full[name] if name.startswith("head.") else 0.1 * full[name]
        assert torch.allclose(tenth[name], expected, atol=1e-7), name
        assert full[name].abs().sum() > 0, name


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.finetune=probe", "optim.finetune"),
        ("optim.backbone_lr_factor=0", "optim.backbone_lr_factor"),
        ("optim.probe_epochs=0", "optim.probe_epochs"),
    ],
)
def test_bad_fine_tuning_keys_name_the_key(override, key):
    from runner.config import validate

    with pytest.raises(Exception) as e:
        validate(compose_config([override]))
    assert f"{key}=" in str(e.value) and "allowed" in str(e.value)


def test_lp_ft_needs_more_epochs_than_the_probe():
    from runner.config import validate

    with pytest.raises(ConfigError, match=r"optim.probe_epochs=1; allowed: fewer than trainer.max_epochs \(1\)"):
        validate(compose_config(["optim.finetune=lp_ft", "trainer.max_epochs=1"]))


# --- model.checkpoint: any `_target_` model starts from a weights file -------------------------------


def mlp_node(path=None):
    return {"_target_": "runner.models.MLP", "in_features": 13, "num_classes": 3, "hidden": 8, "checkpoint": path}


def test_checkpoint_loads_the_weights_of_a_file(tmp_path):
    torch.manual_seed(1)
    source = MLP(13, 3, hidden=8)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    net = build_model(mlp_node(str(tmp_path / "w.pt")))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), net.state_dict().values()))
    # a Lightning checkpoint of the training module (keys net.*) loads as well
    torch.save({"state_dict": {f"net.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "l.ckpt")
    net = build_model(mlp_node(str(tmp_path / "l.ckpt")))
    assert torch.equal(net.head.weight, source.head.weight)


def test_a_checkpoint_with_other_keys_or_shapes_lists_them(tmp_path):
    state = MLP(13, 3, hidden=8).state_dict()
    missing = {k: v for k, v in state.items() if k != "head.bias"}
    torch.save({**missing, "extra.weight": torch.zeros(2)}, tmp_path / "keys.pt")
    with pytest.raises(ConfigError) as e:
        build_model(mlp_node(str(tmp_path / "keys.pt")))
    message = str(e.value)
    assert message.startswith(f"Invalid config: model.checkpoint='{tmp_path}/keys.pt'")
    assert "missing keys (1): ['head.bias']" in message and "unexpected keys (1): ['extra.weight']" in message
    torch.save(MLP(13, 4, hidden=8).state_dict(), tmp_path / "shape.pt")
    with pytest.raises(
        ConfigError,
        match=r"shape mismatches \(2\): \['head.bias: \(4,\) in the file, \(3,\) in the "
        r"model', 'head.weight: \(4, 8\) in the file, \(3, 8\) in the model'\]",
    ):
        build_model(mlp_node(str(tmp_path / "shape.pt")))


def test_a_truncated_or_missing_checkpoint_names_the_key(tmp_path):
    torch.save(MLP(13, 3, hidden=8).state_dict(), tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"model.checkpoint=.*cut.pt'; allowed: a readable weights file"):
        build_model(mlp_node(str(tmp_path / "cut.pt")))
    with pytest.raises(ConfigError, match=r"model.checkpoint=.*nope.pt'; allowed: an existing weights file"):
        build_model(mlp_node(str(tmp_path / "nope.pt")))


def test_model_checkpoint_on_the_command_line_starts_the_member_there(tmp_path):
    cfg = compose_config(["model=mlp", "data=wine"], tmp_path)
    cfg.data.num_classes, cfg.data.num_features = 3, 13
    [member] = plan_members(cfg)
    torch.nn.init.constant_(member.net.head.weight, 0.5)
    torch.save(member.net.state_dict(), tmp_path / "start.pt")
    cfg = compose_config(["model=mlp", "data=wine", f"model.checkpoint={tmp_path}/start.pt"], tmp_path)
    cfg.data.num_classes, cfg.data.num_features = 3, 13
    [member] = plan_members(cfg, model_name="mlp")
    assert member.name == "mlp-s0"
    assert torch.equal(member.net.head.weight, torch.full_like(member.net.head.weight, 0.5))


def test_load_checkpoint_is_strict_about_names():
    net = MLP(13, 3, hidden=8)
    with pytest.raises(ConfigError, match="missing keys"):
        load_checkpoint(net, "given", "model.checkpoint", state={"head.weight": net.head.weight})
