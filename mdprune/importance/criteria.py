"""Importance criteria: built-ins (taylor, fisher, l1, l2), the protocol a user's criterion follows, a registry.

A criterion has one of two forms (see :class:`GateCriterion`, :class:`ModelCriterion`):

- gate form, ``from_gate_gradients(grad) -> score``: called once per batch with ``dL/dg`` of every element of a
  dimension (a float64 vector; one value for a block), returns a score per element, averaged over batches.
  ``taylor`` (``|g|``) and ``fisher`` (``g^2 / 2``) are of this form.
- model form, ``from_model(model, batch, context) -> {dim name: scores}``: with ``per_batch = True`` called at
  every :meth:`ImportanceAccumulator.step` with the batch it was given (averaged over batches); with
  ``per_batch = False`` called once when scores are read, with ``batch=None``. ``context``
  (:class:`ModelContext`) names the dims to score and where each element lives in the model's parameters.
  ``l1`` and ``l2`` (magnitude) are of this form and need no data.

Magnitude of an element: the Lp norm of its slice of each parameter it touches (every weight, bias and norm
scale bound to it: rows of a producing layer, columns of a consuming one, its norm's gamma and beta, ...),
summed over those parameters. A block scored by a model criterion takes the score the criterion returns under
its key (``block_key``) if any, else the sum of its own dimensions' element scores (so removing a block costs at
least what pruning every element inside it costs).

Blocks' shares of shared dimensions (``share_key(block, dim)``, see :mod:`.accumulate`): gate criteria get them
from the accumulator (the score split by each source's gate gradient), whatever the criterion. A model criterion
gives them itself, for the blocks ``context.owners`` names (empty when shares are off): ``l1``/``l2`` give the
norms of the block's own parameter slices, exactly the part of the element's score that leaves with the block. A
user's model criterion may return shares (non-negative, summing over blocks to at most the score); where it
returns none, the objective keeps the dimension's whole score whatever the blocks.

``register_criterion(name, criterion)`` makes a criterion usable by name, as ``criterion="name"`` or in a
``{kind: name}`` mapping of :class:`ImportanceAccumulator` and :func:`estimate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..space import PruningSpace
from .keys import share_key
from .probes import Probe, bound_slices, per_element


@runtime_checkable
class GateCriterion(Protocol):
    """Scores from the gate gradients ``dL/dg`` of one batch (a float64 tensor, one entry per element)."""

    def from_gate_gradients(self, grad: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class ModelCriterion(Protocol):
    """Scores from the model (and a batch when ``per_batch``): ``{dim name: tensor of its size}``, optionally
    ``{block_key(block): one-element tensor}`` too."""

    per_batch: bool

    def from_model(self, model: nn.Module, batch: Any, context: ModelContext) -> Mapping[str, torch.Tensor]: ...


Criterion = GateCriterion | ModelCriterion


@dataclass
class ModelContext:
    """What a model criterion needs: the space, the dims it scores, and where their elements live.

    ``slices``: per dim, every parameter slice bound to it (:class:`Probe`: tensor name, axis, start, segment);
    ``probes``: per dim, the slices its gate gradient is read from (a gate right after the layer writing it);
    ``per_element(vector, probe)`` sums a vector along the probe's axis into the dim's elements;
    ``owners``: tensor name -> the removable block holding it, for the blocks whose shares of dims outside them are
    wanted (:meth:`share_owner`); empty when blocks' shares are off.
    """

    space: PruningSpace
    dims: list[str]
    slices: dict[str, list[Probe]] = field(default_factory=dict)
    probes: dict[str, list[Probe]] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)

    def share_owner(self, tensor: str, dim: str) -> str | None:
        """The block whose share of ``dim`` a slice of ``tensor`` counts in: None for the rest of the network
        (and for a dim inside the block itself: it goes with the block whole)."""
        b = self.owners.get(tensor)
        return None if b is None or b == self.space.dims[dim].block else b

    def per_element(self, vector: torch.Tensor, probe: Probe) -> torch.Tensor:
        return per_element(vector, probe, self.space)


class Taylor:
    """``|dL/dg|``: first-order Taylor estimate of the loss change (HALP/MDP for channels)."""

    def from_gate_gradients(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.abs()


class Fisher:
    """``(dL/dg)^2 / 2``: diagonal Fisher estimate of the loss change (MDP for transformer dimensions)."""

    def from_gate_gradients(self, grad: torch.Tensor) -> torch.Tensor:
        return 0.5 * grad * grad


class Magnitude:
    """Lp norm (p = 1 or 2) of each element's slice of every parameter it touches, summed over the parameters;
    a block's share of a dim outside it: the same sum over the block's own parameters."""

    per_batch = False

    def __init__(self, p: int) -> None:
        if p not in (1, 2):
            raise ValueError(f"magnitude norms are L1 or L2, not L{p}")
        self.p = p

    @torch.no_grad()
    def from_model(self, model: nn.Module, batch: Any, context: ModelContext) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        out: dict[str, torch.Tensor] = {}
        for dim in context.dims:
            per_tensor: dict[str, torch.Tensor] = {}
            for s in context.slices.get(dim, []):
                if s.tensor not in params:
                    continue  # buffers (running statistics) are not weights
                t = params[s.tensor].detach().double()
                power = t.abs() if self.p == 1 else t * t
                vec = power.sum(dim=[a for a in range(t.dim()) if a != s.axis]) if t.dim() > 1 else power
                part = per_element(vec, s, context.space)
                per_tensor[s.tensor] = per_tensor.get(s.tensor, 0) + part
            size = context.space.dims[dim].size
            total = torch.zeros(size, dtype=torch.float64)
            for name, v in per_tensor.items():
                norm = v.cpu() if self.p == 1 else v.cpu().sqrt()
                total = total + norm
                b = context.share_owner(name, dim)
                if b is not None:
                    key = share_key(b, dim)
                    out[key] = out.get(key, 0) + norm
            out[dim] = total
        return out


_BUILTIN = {"taylor": Taylor(), "fisher": Fisher(), "l1": Magnitude(1), "l2": Magnitude(2)}
_REGISTRY: dict[str, Any] = dict(_BUILTIN)


def is_gate(criterion: Any) -> bool:
    return callable(getattr(criterion, "from_gate_gradients", None))


def is_model(criterion: Any) -> bool:
    return callable(getattr(criterion, "from_model", None))


def per_batch(criterion: Any) -> bool:
    """Whether a model criterion wants every batch (the default for objects without ``per_batch``)."""
    return bool(getattr(criterion, "per_batch", True))


def register_criterion(name: str, criterion: Any, *, replace: bool = False) -> None:
    """Make ``criterion`` (gate or model form, see the module docstring) usable by ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError("a criterion's name is a non-empty string")
    if not (is_gate(criterion) or is_model(criterion)):
        raise TypeError(f"criterion {name!r} has neither from_gate_gradients(grad) nor from_model(model, batch, "
                        "context)")
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in criterion; choose another name")
    if name in _REGISTRY and not replace:
        raise ValueError(f"criterion {name!r} is already registered (pass replace=True to replace it)")
    _REGISTRY[name] = criterion


def criterion_names() -> list[str]:
    """The names of the known criteria (built-in and registered)."""
    return sorted(_REGISTRY)


def resolve(criterion: Any) -> tuple[str, Any]:
    """(name, criterion object) of a name or a criterion object; unknown names are refused with the known ones."""
    if isinstance(criterion, str):
        if criterion not in _REGISTRY:
            raise ValueError(f"unknown importance criterion {criterion!r}; known: {', '.join(criterion_names())} "
                             "(mdprune.importance.register_criterion adds one)")
        return criterion, _REGISTRY[criterion]
    if is_gate(criterion) or is_model(criterion):
        for name, obj in _REGISTRY.items():
            if obj is criterion:
                return name, obj
        return getattr(criterion, "name", None) or type(criterion).__name__, criterion
    raise TypeError(f"an importance criterion is a name ({', '.join(criterion_names())}) or an object with "
                    f"from_gate_gradients(grad) or from_model(model, batch, context), not {criterion!r}")


def model_context(space: PruningSpace, dims: list[str], gate_probes: list[Probe],
                  owners: dict[str, str] | None = None) -> ModelContext:
    slices: dict[str, list[Probe]] = {d: [] for d in dims}
    for s in bound_slices(space, dims):
        slices[s.dim].append(s)
    probes: dict[str, list[Probe]] = {d: [] for d in dims}
    for p in gate_probes:
        if p.dim in probes:
            probes[p.dim].append(p)
    return ModelContext(space, list(dims), slices, probes, dict(owners or {}))
