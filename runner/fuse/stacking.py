"""Stacking: a scikit-learn meta-learner fit on the members' validation probabilities."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from torch import Tensor

from runner.errors import check
from runner.fuse.base import OutputFusion


def stack_features(member_probs: Tensor) -> np.ndarray:
    """(M, N, C) -> (N, M*C) in member order, as scikit-learn's StackingClassifier builds them
    (for two classes only the positive-class column of each member)."""
    if member_probs.shape[2] == 2:
        member_probs = member_probs[:, :, 1:]
    return member_probs.permute(1, 0, 2).reshape(member_probs.shape[1], -1).double().cpu().numpy()


class Stacking(OutputFusion):
    """A meta-learner on concatenated member probabilities, fit on validation only.

    The members are never refit (scikit-learn's cv="prefit" / FrozenEstimator semantics).
    `cv=K` cross-fits the meta-learner: K stratified folds of the validation set, one meta-learner
    per fold; predictions average the K meta-learners and `oof_score_` holds the out-of-fold
    validation accuracy and NLL (an honest estimate, since no meta-learner saw those rows).
    """

    def __init__(self, meta_learner: Any = None, cv: int | None = None, seed: int = 0) -> None:
        meta_learner = meta_learner if meta_learner is not None else LogisticRegression(max_iter=1000)
        check(
            hasattr(meta_learner, "fit") and hasattr(meta_learner, "predict_proba"),
            "fuse.meta_learner",
            meta_learner,
            "a scikit-learn classifier with fit and predict_proba (a `_target_` node)",
        )
        check(cv is None or int(cv) >= 2, "fuse.cv", cv, "null (one meta-learner on all of val) or an integer >= 2")
        self.meta_learner, self.cv, self.seed = meta_learner, None if cv is None else int(cv), seed

    def _fit_outputs(self, member_probs: Tensor, y: Tensor) -> None:
        features, target, n_classes = stack_features(member_probs), y.numpy(), member_probs.shape[2]
        if self.cv is None:
            self.meta_learners_ = [clone(self.meta_learner).fit(features, target)]
            return
        folds = StratifiedKFold(self.cv, shuffle=True, random_state=self.seed)
        oof = np.zeros((len(target), n_classes))
        self.meta_learners_ = []
        for train, held_out in folds.split(features, target):
            meta = clone(self.meta_learner).fit(features[train], target[train])
            oof[held_out] = self._proba(meta, features[held_out], n_classes)
            self.meta_learners_.append(meta)
        self.oof_proba_ = torch.from_numpy(oof).float()
        self.oof_score_ = {
            "acc": float((oof.argmax(1) == target).mean()),
            "nll": float(-np.log(np.maximum(oof[np.arange(len(target)), target], 1e-12)).mean()),
        }

    @staticmethod
    def _proba(meta: Any, features: np.ndarray, n_classes: int) -> np.ndarray:
        # A meta-learner fit on a split that lacks a class has fewer columns: put them in place.
        out = np.zeros((len(features), n_classes))
        out[:, np.asarray(meta.classes_, dtype=int)] = meta.predict_proba(features)
        return out

    def _combine(self, member_probs: Tensor) -> Tensor:
        features = stack_features(member_probs)
        probs = np.mean([self._proba(m, features, self.num_classes_) for m in self.meta_learners_], axis=0)
        return torch.as_tensor(probs, dtype=member_probs.dtype, device=member_probs.device)
