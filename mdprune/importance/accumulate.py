"""Accumulate importance over training batches, and turn scores into the value of keeping k elements.

Per batch, each element's gate gradient ``dL/dg`` is read from its probes (see :mod:`.probes`). Criteria:
- ``taylor``: ``|dL/dg|`` averaged over batches (first-order Taylor; HALP/MDP for channels);
- ``fisher``: ``(dL/dg)^2 / 2`` averaged over batches (diagonal Fisher/Hessian estimate; MDP for transformer
  dimensions).
Both estimate the loss increase from removing the element. Defaults: ``taylor`` for ``channel`` and ``linear``
dimensions, ``fisher`` for ``embed``, ``heads``, ``qk``, ``v`` and ``mlp``.

Normalisation makes kinds comparable: with ``normalize="criterion"`` (default) the scores of all dimensions
scored by one criterion are divided by their mean over all elements, so a model mixing the two criteria weighs
each on the same scale; within a criterion, raw loss-change estimates are kept, so kinds compare by their
estimated effect on the loss. ``normalize="kind"`` divides each kind by its own mean; ``"none"`` keeps raw values.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..progress import progress_bar
from ..space import PruningSpace
from .probes import Probe, probes

DEFAULT_CRITERION = {"channel": "taylor", "linear": "taylor", "input": "taylor", "embed": "fisher",
                     "heads": "fisher", "qk": "fisher", "v": "fisher", "mlp": "fisher"}


class ImportanceAccumulator:
    """Call :meth:`step` after each ``loss.backward()``; :meth:`scores` gives per-element importance."""

    def __init__(self, space: PruningSpace, model: nn.Module, criterion: dict[str, str] | None = None,
                 dims: list[str] | None = None):
        self.space = space
        self.criterion = {**DEFAULT_CRITERION, **(criterion or {})}
        self.probes = probes(space, dims)
        names = dims if dims is not None else [d.name for d in space.prunable_dims()]
        named = dict(model.named_parameters()) | dict(model.named_buffers())
        missing = sorted({p.tensor for p in self.probes if p.tensor not in named})
        if missing:
            raise ValueError(f"the model has no parameters named {missing[:3]}...: is it the analysed model?")
        self.params = {p.tensor: named[p.tensor] for p in self.probes}
        device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        self.sums = {n: torch.zeros(space.dims[n].size, dtype=torch.float64, device=device) for n in names}
        self.batches = 0

    @torch.no_grad()
    def step(self) -> None:
        """Add the current gradients' contribution (one mini-batch)."""
        grads: dict[str, torch.Tensor] = defaultdict(lambda: 0)  # dim -> dL/dg for this batch
        cache: dict[tuple[str, int], torch.Tensor] = {}
        for p in self.probes:
            vec = cache.get((p.tensor, p.axis))
            if vec is None:
                t = self.params[p.tensor]
                if t.grad is None:
                    continue
                prod = (t.detach() * t.grad).double()
                vec = prod.sum(dim=[a for a in range(prod.dim()) if a != p.axis]) if prod.dim() > 1 else prod
                cache[(p.tensor, p.axis)] = vec
            grads[p.dim] = grads[p.dim] + _per_element(vec, p, self.space)
        for name, g in grads.items():
            if isinstance(g, torch.Tensor):
                crit = self.criterion[self.space.dims[name].kind]
                self.sums[name] += g.abs() if crit == "taylor" else 0.5 * g * g
        self.batches += 1

    def state(self) -> dict[str, torch.Tensor]:
        """The running sums (to all-reduce across processes, or to checkpoint)."""
        return {**self.sums, "__batches__": torch.tensor(float(self.batches), dtype=torch.float64)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            if k == "__batches__":
                self.batches = int(v.item())
            else:
                self.sums[k] = v.to(self.sums[k])

    def scores(self, normalize: str = "criterion") -> dict[str, np.ndarray]:
        """Mean importance per element of every dimension (see the module docstring for ``normalize``)."""
        if self.batches == 0:
            raise RuntimeError("no batches accumulated: call step() after backward()")
        raw = {n: (s / self.batches).cpu().numpy() for n, s in self.sums.items()}
        return normalize_scores(self.space, raw, normalize, self.criterion)


def _per_element(vec: torch.Tensor, p: Probe, space: PruningSpace) -> torch.Tensor:
    """Sum a vector over one segment's positions into the elements of dimension ``p.dim``."""
    sizes = [space.dims[d].size for d in p.seg.dims]
    width = int(np.prod(sizes)) * p.seg.inner
    block = vec[p.start:p.start + width].reshape(*sizes, p.seg.inner)
    k = p.seg.dims.index(p.dim)
    return block.sum(dim=[a for a in range(block.dim()) if a != k])


def normalize_scores(space: PruningSpace, raw: dict[str, np.ndarray], how: str,
                     criterion: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Scale scores so kinds compare: by criterion group (default), by kind, or not at all."""
    if how == "none":
        return raw
    criterion = {**DEFAULT_CRITERION, **(criterion or {})}
    if how == "criterion":
        group = {n: criterion[space.dims[n].kind] for n in raw}
    elif how == "kind":
        group = {n: space.dims[n].kind for n in raw}
    else:
        raise ValueError("normalize is 'criterion', 'kind' or 'none'")
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for n, s in raw.items():
        totals[group[n]][0] += float(s.sum())
        totals[group[n]][1] += s.size
    mean = {g: (t / c if t > 0 else 1.0) for g, (t, c) in totals.items()}
    return {n: s / mean[group[n]] for n, s in raw.items()}


def estimate(space: PruningSpace, model: nn.Module, batches: Iterable[Any],
             loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, max_batches: int | None = None,
             device: str | torch.device | None = None, criterion: dict[str, str] | None = None,
             normalize: str = "criterion", progress: bool = False) -> dict[str, np.ndarray]:
    """Importance of every element of every prunable dimension, from ``(inputs, targets)`` batches.

    The model runs in training mode (BatchNorm in batch statistics); its weights and buffers (BatchNorm running
    statistics) are left as they were.
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    device = torch.device(device) if device is not None else next(model.parameters()).device
    acc = ImportanceAccumulator(space, model, criterion)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if not isinstance(v, nn.Parameter)}
    was_training = model.training
    model.train()
    seen = 0
    total = max_batches if max_batches is not None else _len(batches)
    try:
        with progress_bar(progress, total or 0, "importance") as advance:
            for inputs, targets in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                model.zero_grad(set_to_none=True)
                loss = loss_fn(model(inputs.to(device)), targets.to(device))
                loss.backward()
                acc.step()
                seen += 1
                advance(1)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        model.load_state_dict(buffers, strict=False)
    return acc.scores(normalize)


def _len(it: Iterable[Any]) -> int | None:
    try:
        return len(it)  # type: ignore[arg-type]
    except TypeError:
        return None


def kept_value(scores: np.ndarray, widths: list[int]) -> np.ndarray:
    """Value of keeping each allowed width: the sum of the top ``w`` scores (``I_d[k]`` of the method)."""
    top = np.cumsum(np.sort(np.asarray(scores, dtype=np.float64))[::-1])
    return np.asarray([top[w - 1] for w in widths])
