"""mdprune: make a vision model meet a latency budget with multidimensional, latency-aware pruning.

The pipeline, one stage per subpackage: ``space`` (what can be pruned) -> ``importance`` -> ``latency`` ->
``solve`` -> ``apply`` (masks, slim models) -> ``train`` (schedules, fine-tuning); ``prune`` is the one call.
"""

from .apply import Plan, PlanError, PrunedAttention, masked, slim
from .apply.io import export_onnx, load, save
from .models import create_model
from .prune import PruneReport, prune
from .solve import InfeasibleBudget
from .space import AnalysisError, Block, Dimension, Op, PruningSpace, analyze

__version__ = "0.1.0"
__all__ = [
    "AnalysisError", "Block", "Dimension", "InfeasibleBudget", "Op", "Plan", "PlanError", "PruneReport",
    "PrunedAttention", "PruningSpace", "analyze", "create_model", "export_onnx", "load", "masked", "prune", "save",
    "slim",
]
