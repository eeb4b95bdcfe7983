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

Removable blocks are scored too, under ``block_key(name)`` (one value each): a gate on the branch output
(:mod:`.blocks`), i.e. a gate shared by every channel the branch adds into the residual stream. So a block takes
the criterion and the normalisation of the kind of that stream (:func:`block_kind`: ``taylor`` for CNN channels,
``fisher`` for a transformer's embedding), divided by the same mean as the dimensions of its group (the mean is
taken over dimension elements only): a block's score and an element's score are the same loss-change estimate
on the same scale. The solver adds a block's score to the value of the dimensions inside it (see
:func:`mdprune.search.build_problem`).
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
from .blocks import BlockProbe, GateHooks, block_probes
from .probes import Probe, probes

BLOCK_PREFIX = "block:"
DEFAULT_CRITERION = {"channel": "taylor", "linear": "taylor", "input": "taylor", "embed": "fisher",
                     "heads": "fisher", "qk": "fisher", "v": "fisher", "mlp": "fisher"}


def block_key(block: str) -> str:
    """The key of a block's score in a scores mapping (beside the dimensions' names)."""
    return BLOCK_PREFIX + block


def block_kind(space: PruningSpace, block: str) -> str:
    """The kind of the dimension a block's branch adds into (its residual stream): ``channel`` if unknown."""
    add = space.blocks[block].add_node
    for op in space.ops:
        if op.kind == "node" and op.name == add:
            dims = [d for s in op.roles["width"] for d in s.dims]
            if dims:
                return space.dims[dims[0]].kind
    return "channel"


class ImportanceAccumulator:
    """Call :meth:`step` after each ``loss.backward()``; :meth:`scores` gives per-element importance, and one
    value per removable block (under :func:`block_key`).

    ``blocks``: the blocks to score (default: every removable block). Blocks whose gate gradient cannot be read
    from ``model`` (see :mod:`.blocks`) raise ValueError: run on the masked model (``mdprune.masked``), which
    gates every branch; :func:`estimate` does so by itself. ``block_params=False`` reads every block through a
    gate even where the parameter form applies. Call :meth:`close` to remove the gate hooks.
    """

    def __init__(self, space: PruningSpace, model: nn.Module, criterion: dict[str, str] | None = None,
                 dims: list[str] | None = None, blocks: list[str] | None = None, block_params: bool = True):
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
        found = block_probes(space, model, blocks, block_params)
        missing = sorted(b for b, p in found.items() if p is None)
        if missing:
            raise ValueError(f"cannot read the gate gradient of blocks {missing[:3]} on this model: pass the masked "
                             "model (mdprune.masked(space, plan)), whose branches carry gates")
        self.block_probes: list[BlockProbe] = [p for p in found.values() if p is not None]
        self.block_kinds = {p.block: block_kind(space, p.block) for p in self.block_probes}
        for p in self.block_probes:
            self.sums[block_key(p.block)] = torch.zeros(1, dtype=torch.float64, device=device)
            if p.how == "params":
                self.params.update({k: named[k] for k in p.names})
        self.hooks = GateHooks(model, self.block_probes)
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
                self._add(name, g, self.space.dims[name].kind)
        for p in self.block_probes:
            g = self._block_gradient(p)
            if g is not None:
                self._add(block_key(p.block), g.double().reshape(1), self.block_kinds[p.block])
        self.batches += 1

    def _add(self, key: str, g: torch.Tensor, kind: str) -> None:
        crit = self.criterion[kind]
        self.sums[key] += g.abs() if crit == "taylor" else 0.5 * g * g

    def _block_gradient(self, p: BlockProbe) -> torch.Tensor | None:
        """``dL/dg`` of the gate on block ``p.block``'s branch output, for the backward passes since the last step."""
        if p.how != "params":
            return self.hooks.take(p.block)
        terms = [(t.detach() * t.grad).sum() for t in (self.params[k] for k in p.names) if t.grad is not None]
        return torch.stack([x.double() for x in terms]).sum() if terms else None

    def close(self) -> None:
        """Remove the gate hooks from the model (scores stay readable)."""
        self.hooks.close()

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
        if raw and not any(np.any(v != 0) for v in raw.values()):
            raise ValueError(
                f"every importance score is zero after {self.batches} batch(es): the loss does not change with any "
                "prunable element, so any plan would look as good as any other. Is the model untrained (a "
                "zero-initialised classifier, such as torchvision's ViT head, passes no gradient back) or the "
                "loss constant? Load trained weights (--checkpoint) or train the model first.")
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
    """Scale scores so kinds compare: by criterion group (default), by kind, or not at all.

    Block scores (keys of :func:`block_key`) are divided by the mean of their kind's group over dimension
    elements; by the mean of the group's blocks where the group has no prunable dimension.
    """
    if how == "none":
        return raw
    if how not in ("criterion", "kind"):
        raise ValueError("normalize is 'criterion', 'kind' or 'none'")
    criterion = {**DEFAULT_CRITERION, **(criterion or {})}
    kind = {n: block_kind(space, n[len(BLOCK_PREFIX):]) if n.startswith(BLOCK_PREFIX) else space.dims[n].kind
            for n in raw}
    group = {n: criterion[k] if how == "criterion" else k for n, k in kind.items()}
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    block_totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for n, s in raw.items():
        t = block_totals if n.startswith(BLOCK_PREFIX) else totals
        t[group[n]][0] += float(s.sum())
        t[group[n]][1] += s.size
    mean = {g: t / c for g, (t, c) in block_totals.items() if t > 0}
    mean |= {g: t / c for g, (t, c) in totals.items() if t > 0}
    return {n: s / mean.get(group[n], 1.0) for n, s in raw.items()}


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
    if any(p is None for p in block_probes(space, model).values()):  # a branch only a gate can read
        from ..apply import prepare_masked
        from ..apply.mask import GATES

        dtype = next(model.parameters()).dtype
        model = prepare_masked(space, model).to(device)
        model.get_submodule(GATES).to(dtype)  # dL/dg in the model's precision
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
        acc.close()
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
