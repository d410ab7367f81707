"""Classifier networks. Each splits into `forward_features(x)` and `forward_head(features)`.

The split is what feature-level fusion and feature distillation build on; `forward` is always
`forward_head(forward_features(x))`. Inputs are (batch, num_features) float tensors.
Architectures follow the MNIST-1D paper's published code (Greydanus 2020).
"""

from __future__ import annotations

import torch
from torch import nn

from runner.errors import check


def seeded_head(in_features: int, num_classes: int, seed: int | None) -> nn.Linear:
    """A new classifier layer, initialised from its own seed (None: torch's global RNG). Fine-tunes of one
    pretrained model then share one start (encoder and head): every member of any job, whatever its
    seed, starts from the same weights, as weight averaging needs and the member cache can reuse."""
    if seed is None:
        return nn.Linear(in_features, num_classes)
    check(
        isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0,
        "model.head_seed",
        seed,
        "null (the member's seed) or an integer >= 0",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(in_features, num_classes)


class Net(nn.Module):
    """Base class: `feature_dim` is the width of forward_features' output."""

    feature_dim: int

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        check(
            isinstance(in_features, int) and in_features >= 1,
            "model.in_features",
            in_features,
            "an integer >= 1 (${data.num_features}: inputs with one shape, not token ids)",
        )
        check(isinstance(num_classes, int) and num_classes >= 2, "model.num_classes", num_classes, "an integer >= 2")
        self.in_features, self.num_classes = in_features, num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class LogReg(Net):
    """Multinomial logistic regression: the features are the raw inputs."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(in_features, num_classes)
        self.feature_dim = in_features
        self.head = nn.Linear(in_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class MLP(Net):
    """in -> hidden -> hidden -> classes with ReLU (the paper's MLPBase uses hidden=100)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 100, depth: int = 2) -> None:
        super().__init__(in_features, num_classes)
        check(hidden >= 1, "model.hidden", hidden, "an integer >= 1")
        check(depth >= 1, "model.depth", depth, "an integer >= 1")
        widths = [in_features] + [hidden] * depth
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.feature_dim = hidden
        self.head = nn.Linear(hidden, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))


class CNN1D(Net):
    """Three strided Conv1d layers (kernels 5/3/3, stride 2, padding 1) and a linear head."""

    def __init__(self, in_features: int, num_classes: int, channels: int = 25) -> None:
        super().__init__(in_features, num_classes)
        check(channels >= 1, "model.channels", channels, "an integer >= 1")
        check(in_features >= 8, "model.in_features", in_features, "an integer >= 8 for cnn1d")
        self.body = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            self.feature_dim = self.body(torch.zeros(1, 1, in_features)).shape[1]
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(x.shape[0], 1, -1))


class GRU(Net):
    """A GRU reading the input as a sequence of scalars; features are all hidden states, flattened."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 6, bidirectional: bool = True) -> None:
        super().__init__(in_features, num_classes)
        check(hidden >= 1, "model.hidden", hidden, "an integer >= 1")
        self.rnn = nn.GRU(1, hidden, batch_first=True, bidirectional=bidirectional)
        self.feature_dim = hidden * (2 if bidirectional else 1) * in_features
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        states, _ = self.rnn(x.reshape(x.shape[0], -1, 1))
        return states.flatten(1)
