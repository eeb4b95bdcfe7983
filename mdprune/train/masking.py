"""Hold a plan's masks during training: weights, gradients, BatchNorm statistics and optimizer state at zero."""

from __future__ import annotations

import torch
from torch import nn

from ..apply import Plan, apply_masks_, prepare_masked, zero_pruned_
from ..space import PruningSpace


class Masker:
    """Owns the masked model of a space and keeps whatever the current plan prunes at zero."""

    def __init__(self, space: PruningSpace, model: nn.Module | None = None):
        self.space = space
        self.model = prepare_masked(space, model)
        self.plan = Plan.identity()
        self.masks: dict[str, dict[int, torch.Tensor]] = {}
        self._named: dict[str, torch.Tensor] = {}

    def set_plan(self, plan: Plan, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Apply ``plan``: zero what it prunes (weights, statistics, optimizer state), gate removed blocks."""
        self.plan = plan
        self.masks = apply_masks_(self.model, self.space, plan)
        self._named = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        if optimizer is not None:
            self._zero_optimizer_state(optimizer)

    @torch.no_grad()
    def hold_gradients(self) -> None:
        """Zero the gradients of pruned slices (call between backward and the optimizer step)."""
        for name, axes in self.masks.items():
            t = self._named[name]
            if isinstance(t, nn.Parameter) and t.grad is not None:
                zero_pruned_(t.grad, axes)

    @torch.no_grad()
    def hold(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Re-zero pruned weights and statistics (call after the optimizer step, which may move them)."""
        for name, axes in self.masks.items():
            zero_pruned_(self._named[name], axes)
        if optimizer is not None:
            self._zero_optimizer_state(optimizer)

    @torch.no_grad()
    def _zero_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        for name, axes in self.masks.items():
            t = self._named[name]
            state = optimizer.state.get(t) if isinstance(t, nn.Parameter) else None
            for v in (state or {}).values():
                if isinstance(v, torch.Tensor) and v.shape == t.shape:
                    zero_pruned_(v, axes)
