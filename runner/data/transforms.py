"""Per-sample augmentations that need no extra package (torchvision is optional here).

Used as `data.train_transforms: [{_target_: runner.data.RandomShift, max_shift: 2}]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runner.errors import check


class RandomShift:
    """Translate one sample (C, L) or (C, H, W) by up to `max_shift` positions along each spatial
    axis, filling with zeros (the channel mean once the data are standardized): pad, then crop at
    a random offset. Uses torch's global RNG, so it follows the member's seed."""

    def __init__(self, max_shift: int = 2) -> None:
        check(
            isinstance(max_shift, int) and max_shift >= 0,
            "data.train_transforms[].max_shift",
            max_shift,
            "an integer >= 0",
        )
        self.max_shift = max_shift

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        check(
            x.dim() in (2, 3),
            "data.train_transforms[] (RandomShift)",
            tuple(x.shape),
            "samples of shape (C, L) or (C, H, W)",
        )
        s = self.max_shift
        if s == 0:
            return x
        spatial = x.shape[1:]
        padded = F.pad(x, [s, s] * len(spatial))
        offsets = torch.randint(0, 2 * s + 1, (len(spatial),)).tolist()
        index = (slice(None),) + tuple(slice(o, o + n) for o, n in zip(offsets, spatial))
        return padded[index]

    def __repr__(self) -> str:
        return f"RandomShift(max_shift={self.max_shift})"
