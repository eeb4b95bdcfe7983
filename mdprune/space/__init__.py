"""Model analysis: what can be pruned (dimensions, blocks, ops), and the Plan that says what is kept."""

from .analyze import analyze
from .errors import AnalysisError
from .plan import Plan, PlanError
from .space import DEFAULT_STEPS, MAX_CHOICES, Block, Dimension, Op, PruningSpace, Seg, TensorAxes, default_step

__all__ = ["DEFAULT_STEPS", "MAX_CHOICES", "AnalysisError", "Block", "Dimension", "Op", "Plan", "PlanError",
           "PruningSpace", "Seg", "TensorAxes", "analyze", "default_step"]
