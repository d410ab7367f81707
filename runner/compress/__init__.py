"""Model compression: recipes (ordered steps from conf/compress/) applied to trained members."""

from runner.compress.base import CompressContext, Recipe, Step, build_recipe, compression_report, weight_bytes
from runner.compress.distill import Distill
from runner.compress.distill_lm import DistillLM
from runner.compress.prune import FineTune, GradualPrune, MagnitudePrune
from runner.compress.quantize import DynamicQuantize, QATQuantize, StaticQuantize
from runner.compress.requirements import is_quantized
from runner.compress.structured import StructuredPrune
from runner.compress.wanda import Wanda
from runner.compress.weight_only import WeightOnlyQuantize

__all__ = [
    "CompressContext",
    "Recipe",
    "Step",
    "build_recipe",
    "compression_report",
    "weight_bytes",
    "MagnitudePrune",
    "GradualPrune",
    "StructuredPrune",
    "Wanda",
    "FineTune",
    "DynamicQuantize",
    "StaticQuantize",
    "QATQuantize",
    "WeightOnlyQuantize",
    "is_quantized",
    "Distill",
    "DistillLM",
]
