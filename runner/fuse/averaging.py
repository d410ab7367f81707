"""Averaging and voting over member probabilities."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import Tensor

from runner.errors import check
from runner.fuse.base import OutputFusion

WEIGHT_SOURCES = ("acc", "nll", "optimize")


def _fixed_weights(weights: Sequence[float] | None) -> list[float] | None:
    if weights is None:
        return None
    weights = [float(w) for w in weights]
    check(
        all(w >= 0 for w in weights) and sum(weights) > 0,
        "fuse.weights",
        weights,
        "null or non-negative numbers, one per member, with a positive sum",
    )
    return weights


def _check_count(weights: list[float] | None, n_members: int) -> Tensor:
    if weights is None:
        return torch.full((n_members,), 1.0 / n_members)
    check(len(weights) == n_members, "fuse.weights", weights, f"{n_members} numbers (one per member)")
    w = torch.tensor(weights)
    return w / w.sum()


def weighted_mean(member_probs: Tensor, weights: Tensor) -> Tensor:
    return torch.einsum("m,mnc->nc", weights.to(member_probs), member_probs)


class SoftVoting(OutputFusion):
    """The (optionally weighted) average of member probabilities; predicts its argmax.

    `weights` are fixed numbers from the config (scikit-learn's VotingClassifier(voting="soft")).
    """

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        self.weights = _fixed_weights(weights)

    def _fit_outputs(self, member_probs: Tensor, y: Tensor) -> None:
        self.weights_ = _check_count(self.weights, len(member_probs))

    def _combine(self, member_probs: Tensor) -> Tensor:
        return weighted_mean(member_probs, self.weights_)


class ProbabilityMean(SoftVoting):
    """The plain mean of member probabilities (soft voting with equal weights)."""

    def __init__(self) -> None:
        super().__init__(weights=None)


class HardVoting(OutputFusion):
    """Majority vote of member argmaxes; ties go to the lowest class index (as in scikit-learn).

    predict_proba returns the (weighted) vote shares smoothed by `smoothing` uniform pseudo-members
    of a member's weight each: (shares + s/(M*C)) / (1 + s/M). The argmax (the vote) is unchanged;
    without smoothing (0) a unanimous wrong vote has probability 0 and the NLL is infinite.
    """

    def __init__(self, weights: Sequence[float] | None = None, smoothing: float = 1.0) -> None:
        self.weights = _fixed_weights(weights)
        check(smoothing >= 0, "fuse.smoothing", smoothing, "a float >= 0 (uniform pseudo-members; 0: raw shares)")
        self.smoothing = float(smoothing)

    def _fit_outputs(self, member_probs: Tensor, y: Tensor) -> None:
        self.weights_ = _check_count(self.weights, len(member_probs))

    def _combine(self, member_probs: Tensor) -> Tensor:
        m, c = member_probs.shape[0], member_probs.shape[2]
        votes = F.one_hot(member_probs.argmax(2), c).to(member_probs)
        pseudo = self.smoothing / m
        return (weighted_mean(votes, self.weights_) + pseudo / c) / (1 + pseudo)


def _softmax(theta: np.ndarray) -> np.ndarray:
    w = np.exp(theta - theta.max())
    return w / w.sum()


def mixture_nll(theta: np.ndarray, p_true: np.ndarray) -> tuple[float, np.ndarray]:
    """The val NLL of the mixture with weights softmax(theta) and its gradient in theta; p_true (N, M):
    each member's probability of each row's true class."""
    w = _softmax(theta)
    mix = np.maximum(p_true @ w, 1e-12)
    grad_w = -(p_true / mix[:, None]).mean(0)
    return float(-np.log(mix).mean()), w * (grad_w - w @ grad_w)  # chain rule through softmax


class WeightedAverage(OutputFusion):
    """A weighted average of member probabilities with weights learnt on validation.

    source="acc": weights proportional to val accuracy ** power;
    source="nll": weights proportional to (1 / val NLL) ** power;
    source="optimize": weights minimising val NLL of the average, over the simplex
    (softmax parametrisation, L-BFGS from uniform weights; the objective is convex in the weights).
    """

    def __init__(self, source: str = "optimize", power: float = 1.0, maxiter: int = 200) -> None:
        check(source in WEIGHT_SOURCES, "fuse.source", source, list(WEIGHT_SOURCES))
        check(power > 0, "fuse.power", power, "a float > 0")
        check(maxiter >= 1, "fuse.maxiter", maxiter, "an integer >= 1")
        self.source, self.power, self.maxiter = source, power, maxiter

    def _fit_outputs(self, member_probs: Tensor, y: Tensor) -> None:
        p_true = member_probs[:, torch.arange(len(y)), y].double()  # (M, N)
        if self.source == "acc":
            score = (member_probs.argmax(2) == y).double().mean(1).clamp_min(1e-12)
        elif self.source == "nll":
            nll = -p_true.clamp_min(1e-12).log().mean(1)
            score = 1.0 / nll.clamp_min(1e-12)
        else:
            score = torch.from_numpy(self._optimize(p_true.T.numpy()))
            self.val_nll_ = float(-(p_true.T @ score).clamp_min(1e-12).log().mean())
        w = score ** (self.power if self.source != "optimize" else 1.0)
        self.weights_ = (w / w.sum()).float()

    def _optimize(self, p_true: np.ndarray) -> np.ndarray:
        result = minimize(
            mixture_nll,
            np.zeros(p_true.shape[1]),
            args=(p_true,),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": self.maxiter},
        )
        return _softmax(result.x)

    def _combine(self, member_probs: Tensor) -> Tensor:
        return weighted_mean(member_probs, self.weights_)
