"""mdprune: make a vision model meet a latency budget with multidimensional, latency-aware pruning.

The pipeline, one stage per subpackage: ``space`` (what can be pruned) -> ``apply`` (masks, slim models).
"""

from .apply import Plan, PlanError, PrunedAttention, masked, slim
from .apply.io import export_onnx, load, save
from .models import create_model
from .space import AnalysisError, Block, Dimension, Op, PruningSpace, analyze

__version__ = "0.1.0"
__all__ = [
    "AnalysisError", "Block", "Dimension", "Op", "Plan", "PlanError", "PrunedAttention", "PruningSpace",
    "analyze", "create_model", "export_onnx", "load", "masked", "save", "slim",
]
