"""mdprune: make a vision model meet a latency budget with multidimensional, latency-aware pruning.

The pipeline, one stage per subpackage: ``space`` (what can be pruned) -> ``importance`` -> ``latency`` ->
``solve`` -> ``apply`` (masks, slim models) -> ``train`` (schedules, fine-tuning); ``prune`` is the one call.

The public names below are imported on first use, so ``import mdprune`` (and ``mdprune --help``) does not pay
for PyTorch, torchvision and timm until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Plan": ".space", "PlanError": ".space", "PrunedAttention": ".apply", "masked": ".apply", "slim": ".apply",
    "export_onnx": ".apply.io", "load": ".apply.io", "save": ".apply.io",
    "create_model": ".models", "default_input_size": ".models", "register_layer": ".layers",
    "PruneReport": ".one_call", "prune": ".one_call", "Pruner": ".train", "PruneSchedule": ".train",
    "InfeasibleBudget": ".solve",
    "AnalysisError": ".space", "Block": ".space", "Dimension": ".space", "Op": ".space", "PruningSpace": ".space",
    "analyze": ".space",
}
__all__ = [
    "AnalysisError", "Block", "Dimension", "InfeasibleBudget", "Op", "Plan", "PlanError", "PruneReport",
    "PruneSchedule", "PrunedAttention", "Pruner", "PruningSpace", "analyze", "create_model", "default_input_size",
    "export_onnx", "load", "masked", "prune", "register_layer", "save", "slim",
]

if TYPE_CHECKING:
    from .apply import PrunedAttention, masked, slim
    from .apply.io import export_onnx, load, save
    from .layers import register_layer
    from .models import create_model, default_input_size
    from .one_call import PruneReport, prune
    from .solve import InfeasibleBudget
    from .space import AnalysisError, Block, Dimension, Op, Plan, PlanError, PruningSpace, analyze
    from .train import Pruner, PruneSchedule


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mdprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
