"""Reference models (LeNets, CIFAR ResNets), Hugging Face and text classifiers, timm/torchvision
wrappers, and the conf/model YAMLs that build them."""

import copy
import importlib.abc
import socket
import sys

import pytest
import torch
from helpers import ROOT
from omegaconf import OmegaConf

from runner.errors import ConfigError
from runner.models import BagOfEmbeddings, HuggingFace, LeNet5, LeNet300, ResNetCIFAR, timm_model, torchvision_model
from runner.models.adapter import build_model as build_net

CONF_MODEL = ROOT / "conf" / "model"
VIT = {
    "model_type": "vit",
    "image_size": 28,
    "num_channels": 1,
    "patch_size": 4,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}
BERT = {
    "model_type": "bert",
    "vocab_size": 100,
    "max_position_embeddings": 16,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture
def offline(monkeypatch):
    """No network: the hub is offline and any socket connection fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def text_batch(vocab: int = 100, batch: int = 3, length: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0  # a padded row
    ids[0, 10:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# --- reference models --------------------------------------------------------------------------


def test_published_parameter_counts():
    assert n_params(LeNet300(784, 10)) == 266_610
    assert n_params(LeNet5([1, 28, 28], 10)) == 431_080
    # option B (projection) shortcuts: option A's 269,722 / 853,018 plus two 1x1 conv + BN each
    assert n_params(ResNetCIFAR(20, 10, [3, 32, 32])) == 272_474
    assert n_params(ResNetCIFAR(56, 10, [3, 32, 32])) == 855_770


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: LeNet300(784, 10), (1, 28, 28)),
        (lambda: LeNet300(3 * 32 * 32, 10), (3, 32, 32)),
        (lambda: LeNet5([1, 28, 28], 10), (1, 28, 28)),
        (lambda: LeNet5([3, 32, 32], 10), (3, 32, 32)),
        (lambda: ResNetCIFAR(20, 10, [1, 28, 28]), (1, 28, 28)),
        (lambda: ResNetCIFAR(20, 10, [3, 32, 32], width=8), (3, 32, 32)),
    ],
)
def test_image_models_shapes_and_feature_head_split(make, shape):
    torch.manual_seed(0)
    net = make().eval()
    x = torch.randn(4, *shape)
    features = net.forward_features(x)
    assert features.shape == (4, net.feature_dim)
    logits = net(x)
    assert logits.shape == (4, 10)
    assert torch.equal(logits, net.forward_head(features))
    assert torch.allclose(net(x.flatten(1)), logits)  # flat rows are the same images
    assert net.in_features == x[0].numel() and net.num_classes == 10


def test_feature_dims_and_structure():
    assert LeNet5([1, 28, 28], 10).feature_dim == 500
    assert ResNetCIFAR(20, 10, [3, 32, 32], width=32).feature_dim == 128
    net = ResNetCIFAR(20, 10, [3, 32, 32])
    projections = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    assert [(p.in_channels, p.out_channels, p.stride) for p in projections] == [(16, 32, (2, 2)), (32, 64, (2, 2))]
    lenet = LeNet300(784, 10)
    assert isinstance(lenet.body, torch.nn.Sequential) and isinstance(lenet.head, torch.nn.Linear)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: ResNetCIFAR(21, 10, [3, 32, 32]), r"model.depth=21; allowed: 6n\+2, e.g. 20, 32, 44, 56, 110"),
        (lambda: ResNetCIFAR(2, 10, [3, 32, 32]), r"model.depth=2"),
        (lambda: ResNetCIFAR(20, 10, [3, 32]), r"model.input_shape=\[3, 32\]"),
        (lambda: LeNet5([1, 12, 12], 10), r"model.input_shape=\[1, 12, 12\].*>= 16"),
        (lambda: LeNet5([1, 28, 28], 10, hidden=0), r"model.hidden=0"),
        (lambda: LeNet5([1, 28, 28], 1), r"model.num_classes=1"),
        (lambda: LeNet300(0, 10), r"model.in_features=0"),
    ],
)
def test_bad_arguments_name_the_key(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


# --- Hugging Face ------------------------------------------------------------------------------


def test_vit_tiny_from_config_offline(offline):
    torch.manual_seed(0)
    net = HuggingFace("image", 10, config=VIT).eval()
    assert net.head_name == "model.classifier" and net.num_classes == 10
    assert net.get_submodule(net.head_name).out_features == 10
    x = torch.randn(2, 1, 28, 28)
    assert net(x).shape == (2, 10)
    assert torch.allclose(net(x.flatten(1)), net(x))
    with pytest.raises(TypeError, match="image model takes a float tensor"):
        net({"input_ids": torch.zeros(2, 4, dtype=torch.long)})


def test_bert_tiny_from_config_offline(offline):
    torch.manual_seed(0)
    net = HuggingFace("text", 3, config=BERT).eval()
    assert net.head_name == "model.classifier"
    batch = text_batch()
    logits = net(batch)
    assert logits.shape == (3, 3)
    # keys the model does not take are dropped; token_type_ids are taken
    extra = dict(batch, token_type_ids=torch.zeros_like(batch["input_ids"]), lengths=torch.ones(3))
    assert torch.allclose(net(extra), logits)
    with pytest.raises(TypeError, match="text model takes a dict"):
        net(torch.randn(3, 16))


@pytest.mark.parametrize("task,config", [("image", VIT), ("text", BERT)])
def test_hf_state_dict_round_trip_and_deepcopy(task, config, offline):
    torch.manual_seed(0)
    net = HuggingFace(task, 4, config=config).eval()
    x = torch.randn(2, 1, 28, 28) if task == "image" else text_batch()
    torch.manual_seed(1)  # another initialisation, overwritten by the loaded state
    fresh = HuggingFace(task, 4, config=config).eval()
    fresh.load_state_dict(net.state_dict())
    assert torch.equal(fresh(x), net(x))
    assert torch.equal(copy.deepcopy(net)(x), net(x))


def test_hf_pretrained_local_folder_gets_a_new_head(tmp_path, offline):
    torch.manual_seed(0)
    source = HuggingFace("image", 10, config=VIT)
    source.model.save_pretrained(tmp_path)
    net = HuggingFace("image", 3, pretrained=str(tmp_path)).eval()
    assert net.get_submodule(net.head_name).out_features == 3 and net.num_classes == 3
    loaded, original = net.state_dict(), source.state_dict()
    body = [k for k in original if not k.startswith(net.head_name + ".")]
    assert body and all(torch.equal(loaded[k], original[k]) for k in body)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 3)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"task": "audio", "config": VIT}, "model.task"),
        ({"task": "image", "config": None}, "model.config"),
        ({"task": "image", "config": {"hidden_size": 64}}, "model.config"),
        ({"task": "image", "config": {"model_type": "no_such_model"}}, "model.config.model_type"),
    ],
)
def test_hf_bad_config_names_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=rf"{key}="):
        HuggingFace(num_classes=10, **kwargs)


# --- text ----------------------------------------------------------------------------------------


def test_bag_of_embeddings_ignores_padding():
    torch.manual_seed(0)
    net = BagOfEmbeddings(100, 2, dim=8).eval()
    batch = text_batch()
    logits = net(batch)
    assert logits.shape == (3, 2) and net.feature_dim == 8 and net.in_features == 100
    assert torch.equal(net.forward_head(net.forward_features(batch)), logits)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, 10:] = 7  # ids under mask == 0 are ignored
    assert torch.equal(net(changed), logits)
    changed["input_ids"][0, 0] = 7  # a real token is not
    assert not torch.equal(net(changed), logits)
    # the mean over tokens: a row of one repeated token has that token's embedding as features
    one = {"input_ids": torch.tensor([[5, 5, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    assert torch.allclose(net.forward_features(one), net.embedding.weight[5:6])
    with pytest.raises(ConfigError, match="model.dim=0"):
        BagOfEmbeddings(100, 2, dim=0)


# --- timm / torchvision --------------------------------------------------------------------------


class _BrokenImport(importlib.abc.MetaPathFinder):
    """Imports of `name` fail the way a CUDA torchvision next to a CPU torch does."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname, path, target=None):
        if fullname == self.name:
            raise RuntimeError("operator torchvision::nms does not exist")
        return None


@pytest.mark.parametrize(
    "build_model,library",
    [
        (lambda: timm_model("resnet18", 10), "timm"),
        (lambda: torchvision_model("resnet18", 10), "torchvision"),
    ],
)
@pytest.mark.parametrize("failure", ["missing", "broken"])
def test_zoo_without_the_library_names_model_name(build_model, library, failure, monkeypatch):
    if failure == "missing":
        monkeypatch.setitem(sys.modules, library, None)  # `import library` raises ImportError
    else:
        monkeypatch.delitem(sys.modules, library, raising=False)
        monkeypatch.setattr(sys, "meta_path", [_BrokenImport(library)] + sys.meta_path)
    with pytest.raises(
        ConfigError,
        match=rf"model.name='resnet18'; allowed: {library} is not installed: "
        r"pip install -e '\.\[vision\]'",
    ):
        build_model()


# --- conf/model YAMLs ----------------------------------------------------------------------------

IMAGE_DATA = {"num_classes": 10, "num_features": 784, "input_shape": [1, 28, 28]}
TEXT_DATA = {"num_classes": 2, "vocab_size": 100, "max_length": 16}
NEW_YAMLS = ["lenet300", "lenet5", "resnet20", "resnet56", "vit_tiny", "bert_tiny", "text_bow", "timm", "torchvision"]


@pytest.mark.parametrize("name", NEW_YAMLS)
def test_model_yamls_build_on_mnist_sized_data(name, offline):
    node = OmegaConf.load(CONF_MODEL / f"{name}.yaml")
    text = "vocab_size" in OmegaConf.to_yaml(node)
    cfg = OmegaConf.create({"data": TEXT_DATA if text else IMAGE_DATA, "model": node})
    if name in ("timm", "torchvision"):
        try:
            importlib.import_module(name)
        except (ImportError, RuntimeError):
            with pytest.raises(ConfigError, match=f"model.name='resnet18'; allowed: {name} is not installed"):
                build_net(cfg.model, "model")
            return
    torch.manual_seed(0)
    net = build_net(cfg.model, "model").eval()
    x = text_batch() if text else torch.randn(2, 1, 28, 28)
    assert net(x).shape == (len(x["input_ids"]) if text else 2, cfg.data.num_classes)
    if name in ("vit_tiny", "bert_tiny"):
        assert net.head_name == "model.classifier"
    if name == "vit_tiny":
        assert n_params(net) == 72_074
    if name == "bert_tiny":
        assert n_params(net) == 72_514 + 64 * 100
