"""Model analysis: what can be pruned (dimensions, blocks, ops)."""

from .analyze import analyze
from .errors import AnalysisError
from .space import DEFAULT_STEPS, Block, Dimension, Op, PruningSpace, Seg, TensorAxes

__all__ = ["DEFAULT_STEPS", "AnalysisError", "Block", "Dimension", "Op", "PruningSpace", "Seg", "TensorAxes",
           "analyze"]
