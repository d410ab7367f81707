"""Fusion strategies: `fit(members, val) -> self`, `predict_proba(x)`, `predict(x)`, `as_module()`.

Output-level strategies (OutputFusion subclasses) also offer `combine(member_probs)` and
`fit_outputs(member_probs, y)` on precomputed member probabilities of shape (M, N, C).
Weight-space merges (Merge subclasses: TaskArithmetic, TIES, DARE) also need the members' shared
start before `fit`: `prepare(members)` before they train, or `set_start(state_dict)`; SLERP
interpolates between exactly two members' weights. Each class
declares what it needs of the members in `requires` (checked by `check_members`). Each class has
YAMLs in conf/fuse/.
"""

from runner.fuse.averaging import HardVoting, ProbabilityMean, SoftVoting, WeightedAverage
from runner.fuse.base import Fusion, OutputFusion, gain_over_best, member_probs
from runner.fuse.features import FeatureFusion, FeatureNet
from runner.fuse.merge import DARE, SLERP, TIES, Merge, TaskArithmetic
from runner.fuse.selection import CaruanaSelection
from runner.fuse.soup import GreedySoup, UniformSoup
from runner.fuse.stacking import Stacking

__all__ = [
    "Fusion",
    "OutputFusion",
    "gain_over_best",
    "member_probs",
    "ProbabilityMean",
    "SoftVoting",
    "HardVoting",
    "WeightedAverage",
    "Stacking",
    "CaruanaSelection",
    "FeatureFusion",
    "FeatureNet",
    "UniformSoup",
    "GreedySoup",
    "Merge",
    "TaskArithmetic",
    "TIES",
    "DARE",
    "SLERP",
]
