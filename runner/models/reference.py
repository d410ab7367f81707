"""Reference networks of the compression literature: LeNet-300-100, LeNet-5 and CIFAR ResNets.

LeNet-300-100 and the Caffe LeNet-5 are the models Han et al. (2015, 2016: "Learning both weights
and connections", "Deep Compression") prune and quantize on MNIST; ResNet-20/56 (He et al. 2016)
are the CIFAR-10 baselines of most pruning papers since. Like every Net they split into
`forward_features` and a Linear `head`. Image models take (batch, C, H, W) tensors or their
flattened (batch, C*H*W) form, so they also run on data served as flat features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from runner.errors import check
from runner.models.nets import Net

SHAPE_ALLOWED = "[channels, height, width]: three integers >= 1"


def image_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """`input_shape` ([C, H, W], a list or an OmegaConf ListConfig from the config) as a tuple."""
    ok = (
        isinstance(input_shape, Sequence)
        and not isinstance(input_shape, str)
        and len(input_shape) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in input_shape)
    )
    check(ok, "model.input_shape", input_shape, SHAPE_ALLOWED)
    c, h, w = (int(v) for v in input_shape)
    return c, h, w


def as_images(x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, H, W) images, also from flat (B, C*H*W) rows. No branch on the input's rank, so
    torch.fx can trace the model (static int8 quantization needs that)."""
    return x.reshape(x.shape[0], *shape)


class LeNet300(Net):
    """LeNet-300-100: in -> 300 -> 100 -> classes with ReLU (266,610 parameters on 784 -> 10).

    The hidden layers are a Sequential `body` feeding a Linear `head` (as for MLP)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(in_features, num_classes)
        self.body = nn.Sequential(nn.Linear(in_features, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU())
        self.feature_dim = 100
        self.head = nn.Linear(100, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))


def _lenet5_side(n: int) -> int:
    """Height or width of LeNet-5's last feature map: twice a 5x5 valid conv (-4) then a 2x2
    pool (halving, rounding down)."""
    return ((n - 4) // 2 - 4) // 2


class LeNet5(Net):
    """Caffe's LeNet-5 as in Deep Compression: conv5x5(C->20) -> ReLU -> maxpool2 -> conv5x5(20->50)
    -> ReLU -> maxpool2 -> flatten -> Linear(->500) -> ReLU -> head (431,080 parameters on 1x28x28,
    10 classes). Convolutions are unpadded, so height and width must be at least 16."""

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (20, 50), hidden: int = 500
    ) -> None:
        c, h, w = image_shape(input_shape)
        super().__init__(c * h * w, num_classes)
        self.input_shape = (c, h, w)
        ok = (
            isinstance(channels, Sequence)
            and len(channels) == 2
            and all(isinstance(v, int) and v >= 1 for v in channels)
        )
        check(ok, "model.channels", channels, "two integers >= 1 (the two conv layers' widths)")
        check(isinstance(hidden, int) and hidden >= 1, "model.hidden", hidden, "an integer >= 1")
        fh, fw = _lenet5_side(h), _lenet5_side(w)
        check(
            fh >= 1 and fw >= 1,
            "model.input_shape",
            list(input_shape),
            "height and width >= 16 for lenet5 (two unpadded 5x5 convs and two 2x2 pools)",
        )
        c1, c2 = channels
        # one Sequential, so pruning and feature hooks see every layer in order
        self.body = nn.Sequential(
            nn.Conv2d(c, c1, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * fh * fw, hidden),
            nn.ReLU(),
        )
        self.feature_dim = hidden
        self.head = nn.Linear(hidden, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(as_images(x, self.input_shape))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection (He et al. 2016, CIFAR variant).

    Where the shape changes the shortcut is a projection (1x1 conv + BN, the paper's option B)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def init_convs(model: nn.Module) -> None:
    """Kaiming normal (fan_out) for 2-d convolutions (He et al. 2015), BatchNorm weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNetCIFAR(Net):
    """He et al. 2016's CIFAR ResNet of depth 6n+2 (ResNet-20: n=3, ResNet-56: n=9).

    conv3x3(C->w) + BN + ReLU, three stages of n BasicBlocks (w, 2w, 4w channels, stride 2 at the
    start of stages 2 and 3), global average pooling, Linear head; w = `width` (16 in the paper).
    The shortcuts that change shape are 1x1 conv + BN projections (option B) rather than the
    paper's parameter-free zero-padding (option A): channel pruning with a dependency graph (e.g.
    torch-pruning) can shrink a projection together with the layers it joins, but not a
    zero-padding shortcut, whose output channels are fixed by slicing. Option B costs a little
    more: 272,474 parameters for ResNet-20 on 3x32x32 / 10 classes against option A's 0.27M.
    """

    def __init__(self, depth: int, num_classes: int, input_shape: Sequence[int], width: int = 16) -> None:
        c, h, w = image_shape(input_shape)
        super().__init__(c * h * w, num_classes)
        self.input_shape = (c, h, w)
        check(
            isinstance(depth, int) and depth >= 8 and (depth - 2) % 6 == 0,
            "model.depth",
            depth,
            "6n+2, e.g. 20, 32, 44, 56, 110",
        )
        check(isinstance(width, int) and width >= 1, "model.width", width, "an integer >= 1")
        n = (depth - 2) // 6
        self.depth, self.width = depth, width
        self.stem = nn.Sequential(nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, channels = [], width
        for stage in range(3):
            out = width * 2**stage
            blocks = [
                BasicBlock(channels if i == 0 else out, out, stride=2 if stage and i == 0 else 1) for i in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = 4 * width
        self.head = nn.Linear(self.feature_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        init_convs(self)  # as the paper trains from scratch

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(as_images(x, self.input_shape))))
