"""Hold a plan's masks during training: weights, gradients, BatchNorm statistics and optimizer state at zero.

The masks live on the model's device in its dtype (set once per plan), so holding them costs no host-to-device
copy per iteration (they follow the model if it moves).
"""

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
        self._placed: tuple[torch.device, torch.dtype] | None = None

    def set_plan(self, plan: Plan, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Apply ``plan``: zero what it prunes (weights, statistics, optimizer state), gate removed blocks."""
        self.plan = plan
        self.masks = apply_masks_(self.model, self.space, plan)
        self._named = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        # multipliers in each tensor's dtype, on its device: holding them is one in-place multiply, no copy
        self.masks = {name: {a: m.to(self._named[name].dtype) for a, m in axes.items()}
                      for name, axes in self.masks.items()}
        self._placed = self._where()
        if optimizer is not None:
            self._zero_optimizer_state(optimizer)

    def _where(self) -> tuple[torch.device, torch.dtype] | None:
        p = next(self.model.parameters(), None)
        return None if p is None else (p.device, p.dtype)

    def _rehome(self) -> None:
        """Follow the model if it moved (device or dtype) since :meth:`set_plan`: its buffers are new tensors
        then, and the masks must be where the tensors are."""
        if self._where() == self._placed:
            return
        self._named = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        self.masks = {n: {a: k.to(self._named[n].device, self._named[n].dtype) for a, k in axes.items()}
                      for n, axes in self.masks.items()}
        self._placed = self._where()

    @torch.no_grad()
    def hold_gradients(self) -> None:
        """Zero the gradients of pruned slices (call between backward and the optimizer step)."""
        self._rehome()
        for name, axes in self.masks.items():
            t = self._named[name]
            if isinstance(t, nn.Parameter) and t.grad is not None:
                zero_pruned_(t.grad, axes)

    @torch.no_grad()
    def hold(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Re-zero pruned weights and statistics (call after the optimizer step, which may move them)."""
        self._rehome()
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
