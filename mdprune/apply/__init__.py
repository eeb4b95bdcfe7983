"""Applying a plan: masks during training, a slim model after."""

from ..space import Plan, PlanError
from .attention import PrunedAttention
from .mask import MaskedLayerNorm, apply_masks_, masked, prepare_masked, tensor_masks, zero_pruned_
from .slim import slim

__all__ = ["MaskedLayerNorm", "Plan", "PlanError", "PrunedAttention", "apply_masks_", "masked",
           "prepare_masked", "slim", "tensor_masks", "zero_pruned_"]
