"""Model analysis: what can be pruned (dimensions, blocks, ops)."""

from .analyze import analyze
from .errors import AnalysisError
from .space import DEFAULT_STEPS, MAX_CHOICES, Block, Dimension, Op, PruningSpace, Seg, TensorAxes, default_step

__all__ = ["DEFAULT_STEPS", "MAX_CHOICES", "AnalysisError", "Block", "Dimension", "Op", "PruningSpace", "Seg",
           "TensorAxes", "analyze", "default_step"]
