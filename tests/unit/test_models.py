import pytest
import torch

from runner.errors import ConfigError
from runner.models import CNN1D, GRU, MLP, LogReg

MODELS = {"logreg": LogReg, "mlp": MLP, "cnn1d": CNN1D, "gru": GRU}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("in_features,num_classes", [(40, 10), (13, 3), (64, 10)])
def test_shapes_and_feature_head_split(name, in_features, num_classes):
    torch.manual_seed(0)
    net = MODELS[name](in_features, num_classes).eval()
    x = torch.randn(7, in_features)
    features = net.forward_features(x)
    assert features.shape == (7, net.feature_dim)
    logits = net(x)
    assert logits.shape == (7, num_classes)
    assert torch.allclose(logits, net.forward_head(features))


def test_published_mnist1d_architectures():
    assert CNN1D(40, 10).feature_dim == 125  # 25 channels x length 5, as in the paper's code
    assert GRU(40, 10).feature_dim == 2 * 6 * 40
    assert sum(p.numel() for p in MLP(40, 10).parameters()) == 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10


def test_bad_model_arguments():
    with pytest.raises(ConfigError, match="model.hidden=0"):
        MLP(40, 10, hidden=0)
    with pytest.raises(ConfigError, match="model.num_classes=1"):
        LogReg(40, 1)
