"""Greedy ensemble selection (Caruana et al. 2004)."""

from __future__ import annotations

import torch
from torch import Tensor

from runner.errors import check
from runner.fuse.averaging import weighted_mean
from runner.fuse.base import OutputFusion

METRICS = ("nll", "acc")


class CaruanaSelection(OutputFusion):
    """Forward selection of members (with replacement) into an averaged bag, on validation.

    Each round adds the member whose inclusion gives the best val score of the bag's mean
    probabilities (metric "nll", or "acc" with NLL breaking ties); the bag with the best score
    over all rounds is kept. Weights are how often each member was picked.
    """

    def __init__(self, metric: str = "nll", rounds: int = 25, replacement: bool = True) -> None:
        check(metric in METRICS, "fuse.metric", metric, list(METRICS))
        check(rounds >= 1, "fuse.rounds", rounds, "an integer >= 1")
        self.metric, self.rounds, self.replacement = metric, rounds, replacement

    def _score(self, probs: Tensor, y: Tensor) -> tuple[float, ...]:
        nll = float(-probs[torch.arange(len(y)), y].clamp_min(1e-12).log().mean())
        return (nll,) if self.metric == "nll" else (-float((probs.argmax(1) == y).float().mean()), nll)

    def _fit_outputs(self, member_probs: Tensor, y: Tensor) -> None:
        n = len(member_probs)
        counts, total = torch.zeros(n), torch.zeros_like(member_probs[0])
        best, best_counts, self.trajectory_ = None, None, []
        for step in range(1, self.rounds + 1):
            candidates = [m for m in range(n) if self.replacement or counts[m] == 0]
            if not candidates:
                break
            scores = {m: self._score((total + member_probs[m]) / step, y) for m in candidates}
            pick = min(scores, key=scores.get)
            counts[pick] += 1
            total += member_probs[pick]
            self.trajectory_.append(scores[pick][0] if self.metric == "nll" else -scores[pick][0])
            if best is None or scores[pick] < best:
                best, best_counts = scores[pick], counts.clone()
        self.counts_ = best_counts
        self.weights_ = best_counts / best_counts.sum()

    def _combine(self, member_probs: Tensor) -> Tensor:
        return weighted_mean(member_probs, self.weights_)
