"""Accumulate importance over training batches, and turn scores into the value of keeping k elements.

Per batch, each element's gate gradient ``dL/dg`` is read from its probes (see :mod:`.probes`). Criteria:
- ``taylor``: ``|dL/dg|`` averaged over batches (first-order Taylor; HALP/MDP for channels);
- ``fisher``: ``(dL/dg)^2 / 2`` averaged over batches (diagonal Fisher/Hessian estimate; MDP for transformer
  dimensions).
Both estimate the loss increase from removing the element. Defaults: ``taylor`` for ``channel`` and ``linear``
dimensions, ``fisher`` for ``embed``, ``heads``, ``qk``, ``v`` and ``mlp``. ``criterion`` takes a name for every
kind (``"taylor"``, ``"fisher"``, ``"l1"``, ``"l2"`` or a registered one), a criterion object, or a mapping from
kinds to either; magnitude (``l1``/``l2``) and user criteria are described in :mod:`.criteria`.

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

Blocks' shares of shared dimensions, under ``share_key(block, dim)`` (an array over ``dim``'s elements): the part of
``dim``'s score that comes from the removable block's own parameters, where ``dim`` is not inside the block (the
residual stream a ResNet block's last BatchNorm, or a transformer block's output projection, writes into). The
solver drops that part from the objective when it removes the block (MDP's block semantics). Gate criteria: a
dimension's gate gradient is a sum over its probes (:mod:`.probes`); per batch, the probes are summed per source
(each removable block, and the rest of the network together), and ``dim``'s score is split in proportion to each
source's mean ``|dL/dg|``: non-negative, summing over blocks to at most the score, whatever the criterion (the
same split for ``taylor``, ``fisher`` and a user's gate criterion). Model criteria give their own shares (see
:mod:`.criteria`: ``l1``/``l2`` exactly, a user's criterion where it returns them, else none). Shares take their
dimension's normalisation. ``block_shares=False`` emits none (the objective keeps a shared dimension's whole
score whatever the blocks).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..progress import progress_bar
from ..space import PruningSpace
from .blocks import BlockProbe, GateHooks, block_probes
from .criteria import ModelContext, is_gate, model_context, per_batch, resolve
from .keys import BLOCK_PREFIX, SHARE_PREFIX, block_key, share_key, share_parts
from .probes import per_element, probes

_SOURCE_PREFIX = "source:"  # running sums of |dL/dg| per source of a shared dimension (see the module docstring)
DEFAULT_CRITERION = {"channel": "taylor", "linear": "taylor", "input": "taylor", "embed": "fisher",
                     "heads": "fisher", "qk": "fisher", "v": "fisher", "mlp": "fisher"}


def _source_key(block: str | None, dim: str) -> str:
    return f"{_SOURCE_PREFIX}{block or ''}|{dim}"


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
    """Call :meth:`step` after each ``loss.backward()``; :meth:`scores` gives per-element importance, one value
    per removable block (under :func:`block_key`), and the blocks' shares of shared dimensions (under
    :func:`share_key`).

    ``blocks``: the blocks to score (default: every removable block). Blocks whose gate gradient cannot be read
    from ``model`` (see :mod:`.blocks`) raise ValueError: run on the masked model (``mdprune.masked``), which
    gates every branch; :func:`estimate` does so by itself. ``block_params=False`` reads every block through a
    gate even where the parameter form applies. ``block_shares=False``: no blocks' shares of shared dimensions
    (:func:`share_key`, module docstring). Call :meth:`close` to remove the gate hooks.
    """

    def __init__(self, space: PruningSpace, model: nn.Module, criterion: Any = None,
                 dims: list[str] | None = None, blocks: list[str] | None = None, block_params: bool = True,
                 block_shares: bool = True):
        self.space = space
        self.model = model
        self.criterion, self.criteria = _criteria(criterion)
        names = dims if dims is not None else [d.name for d in space.prunable_dims()]
        block_names = blocks if blocks is not None else [b.name for b in space.removable_blocks()]
        # tensor -> the removable block holding it, for the blocks whose shares are wanted
        self.owners = {t: b for b in block_names for t in space.blocks[b].tensors} if block_shares else {}
        gate_dims = [n for n in names if is_gate(self._of(space.dims[n].kind))]
        self.probes = probes(space, gate_dims)
        self.sources = self._sources()
        self.contexts = self._contexts(names)
        named = dict(model.named_parameters()) | dict(model.named_buffers())
        bound = {s.tensor for c in self.contexts.values() for ss in c.slices.values() for s in ss}
        missing = sorted(({p.tensor for p in self.probes} | bound) - set(named))
        if missing:
            raise ValueError(f"the model has no parameters named {missing[:3]}...: is it the analysed model?")
        self.params = {p.tensor: named[p.tensor] for p in self.probes}
        device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        self.sums = {n: torch.zeros(space.dims[n].size, dtype=torch.float64, device=device) for n in names}
        for d, owners in self.sources.items():  # |dL/dg| per source: the rest of the network (""), each block
            for b in ("", *owners):
                self.sums[_source_key(b, d)] = torch.zeros(space.dims[d].size, dtype=torch.float64, device=device)
        self.model_shares = self._model_shares(names)
        for d, owners in self.model_shares.items():  # shares a model criterion may give
            for b in owners:
                self.sums[share_key(b, d)] = torch.zeros(space.dims[d].size, dtype=torch.float64, device=device)
        self.model_blocks = [b for b in block_names if not is_gate(self._of(block_kind(space, b)))]
        for b in self.model_blocks:
            self.sums[block_key(b)] = torch.zeros(1, dtype=torch.float64, device=device)
        found = block_probes(space, model, [b for b in block_names if b not in self.model_blocks], block_params)
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
        self.scored_blocks: set[str] = set()  # block and share keys a per-batch model criterion scored
        self.batches = 0

    def _of(self, kind: str) -> Any:
        """The criterion object scoring dimensions of ``kind``."""
        return self.criteria[self.criterion[kind]]

    def _contexts(self, names: list[str]) -> dict[str, ModelContext]:
        """Per model-form criterion in use, the context of the dims it scores."""
        by_name: dict[str, list[str]] = defaultdict(list)
        for n in names:
            if not is_gate(self._of(self.space.dims[n].kind)):
                by_name[self.criterion[self.space.dims[n].kind]].append(n)
        return {c: model_context(self.space, ds, probes(self.space, ds), self.owners) for c, ds in by_name.items()}

    def _owner(self, tensor: str, dim: str) -> str:
        """The removable block whose share of ``dim`` a tensor counts in ("" for the rest of the network)."""
        b = self.owners.get(tensor, "")
        return "" if b == self.space.dims[dim].block else b

    def _sources(self) -> dict[str, list[str]]:
        """Gate-scored dims that removable blocks write into from outside: dim -> those blocks."""
        out: dict[str, list[str]] = defaultdict(list)
        for p in self.probes:
            b = self._owner(p.tensor, p.dim)
            if b and b not in out[p.dim]:
                out[p.dim].append(b)
        return {d: bs for d, bs in out.items() if bs}

    def _model_shares(self, names: list[str]) -> dict[str, list[str]]:
        """Model-scored dims that removable blocks' own parameters touch from outside: dim -> those blocks."""
        out: dict[str, list[str]] = {}
        for ctx in self.contexts.values():
            for d in ctx.dims:
                bs = [b for b in dict.fromkeys(self._owner(s.tensor, d) for s in ctx.slices.get(d, [])) if b]
                if bs:
                    out[d] = bs
        return out

    @torch.no_grad()
    def step(self, batch: Any = None) -> None:
        """Add the current gradients' contribution (one mini-batch); ``batch`` goes to per-batch model criteria."""
        for name, ctx in self.contexts.items():
            if per_batch(self.criteria[name]):
                for k, v in self._checked(name, ctx, self.criteria[name].from_model(self.model, batch, ctx)).items():
                    self.sums[k] += v.to(self.sums[k])
                    if k.startswith((BLOCK_PREFIX, SHARE_PREFIX)):
                        self.scored_blocks.add(k)
        grads: dict[str, torch.Tensor] = defaultdict(lambda: 0)  # dim -> dL/dg for this batch
        parts: dict[tuple[str, str], torch.Tensor] = {}  # (dim, source) -> that source's part of dL/dg
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
            g = per_element(vec, p, self.space)
            grads[p.dim] = grads[p.dim] + g
            if p.dim in self.sources:
                key = (p.dim, self._owner(p.tensor, p.dim))
                parts[key] = parts[key] + g if key in parts else g
        for name, g in grads.items():
            if isinstance(g, torch.Tensor):
                self._add(name, g, self.space.dims[name].kind)
        for (d, b), g in parts.items():
            self.sums[_source_key(b, d)] += g.abs()
        for p in self.block_probes:
            g = self._block_gradient(p)
            if g is not None:
                self._add(block_key(p.block), g.double().reshape(1), self.block_kinds[p.block])
        self.batches += 1

    def _add(self, key: str, g: torch.Tensor, kind: str) -> None:
        self.sums[key] += torch.as_tensor(self._of(kind).from_gate_gradients(g)).to(self.sums[key])

    def _checked(self, name: str, ctx: ModelContext, out: Any) -> dict[str, torch.Tensor]:
        """A model criterion's scores (float64, CPU) of its dims, and of its blocks and blocks' shares where it
        gives them."""
        checked = {}
        for d in ctx.dims:
            if d not in out:
                raise ValueError(f"criterion {name!r} gave no scores for dimension {d!r}")
            checked[d] = _vector(out[d], name, d, self.space.dims[d].size)
            shares = {k: _vector(out[k], name, k, self.space.dims[d].size)
                      for k in (share_key(b, d) for b in self.model_shares.get(d, [])) if k in out}
            if shares and (min(float(v.min()) for v in shares.values()) < 0 or bool(torch.any(
                    sum(shares.values()) > checked[d] + 1e-9 * (1.0 + checked[d].abs())))):
                raise ValueError(f"criterion {name!r} gave blocks' shares of {d!r} that are negative or sum to more "
                                 "than its scores")
            checked |= shares
        for b in self.model_blocks:
            if block_key(b) in out and self.criterion[block_kind(self.space, b)] == name:
                checked[block_key(b)] = torch.as_tensor(out[block_key(b)]).detach().reshape(1).to("cpu", torch.float64)
        return checked

    def _shares(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Gate-scored dims' shares from the running sums: the score split in proportion to each source's mean
        ``|dL/dg|`` (module docstring); the sums of the sources leave ``raw``."""
        mags = {k: raw.pop(k) for k in [k for k in raw if k.startswith(_SOURCE_PREFIX)]}
        out = {}
        for d, owners in self.sources.items():
            if _source_key("", d) not in mags or d not in raw:
                continue
            total = mags[_source_key("", d)] + sum(mags[_source_key(b, d)] for b in owners)
            safe = np.where(total > 0, total, 1.0)
            for b in owners:
                out[share_key(b, d)] = np.where(total > 0, raw[d] * mags[_source_key(b, d)] / safe, 0.0)
        return out

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
        """The running sums (to all-reduce across processes, or to checkpoint), the batch count with them on
        the sums' device (NCCL reduces device tensors only)."""
        device = next(iter(self.sums.values())).device if self.sums else torch.device("cpu")
        return {**self.sums, "__batches__": torch.tensor(float(self.batches), dtype=torch.float64, device=device)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take sums (and the batch count) from :meth:`state`, moved to this accumulator's device."""
        for k, v in state.items():
            if k == "__batches__":
                self.batches = int(round(float(v.item())))
            elif k not in self.sums and k.startswith((_SOURCE_PREFIX, SHARE_PREFIX)):
                continue  # saved with blocks' shares, read without: dropped
            else:
                self.sums[k] = v.to(self.sums[k])

    def scores(self, normalize: str = "criterion") -> dict[str, np.ndarray]:
        """Mean importance per element of every dimension (see the module docstring for ``normalize``)."""
        needs_batches = bool(self.probes or self.block_probes) or any(
            per_batch(self.criteria[name]) for name in self.contexts)
        if self.batches == 0 and needs_batches:
            raise RuntimeError("no batches accumulated: call step() after backward()")
        raw = {n: (s / max(self.batches, 1)).cpu().numpy() for n, s in self.sums.items()}
        raw |= self._shares(raw)
        given = set(self.scored_blocks)
        for name, ctx in self.contexts.items():
            if not per_batch(self.criteria[name]):
                checked = self._checked(name, ctx, self.criteria[name].from_model(self.model, None, ctx))
                raw.update({k: v.numpy() for k, v in checked.items()})
                given |= set(checked)
        for b in self.model_blocks:  # no score of its own: the sum of its own dimensions' scores
            if block_key(b) not in given:
                own = [raw[d] for d in raw if d in self.space.dims and self.space.dims[d].block == b]
                raw[block_key(b)] = np.array([float(sum(v.sum() for v in own))])
        for d, owners in self.model_shares.items():  # shares no model criterion gave: none (not zeros)
            for b in owners:
                if share_key(b, d) not in given:
                    raw.pop(share_key(b, d), None)
        if raw and not any(np.any(v != 0) for v in raw.values()):
            raise ValueError(
                f"every importance score is zero after {self.batches} batch(es): the loss does not change with any "
                "prunable element, so any plan would look as good as any other. Is the model untrained (a "
                "zero-initialised classifier, such as torchvision's ViT head, passes no gradient back) or the "
                "loss constant? Load trained weights (--checkpoint) or train the model first.")
        return normalize_scores(self.space, raw, normalize, self.criterion)


def _vector(value: Any, criterion: str, key: str, size: int) -> torch.Tensor:
    """A criterion's scores under ``key`` as a float64 CPU vector of ``size`` elements."""
    v = torch.as_tensor(value).detach().reshape(-1).to("cpu", torch.float64)
    if v.numel() != size:
        raise ValueError(f"criterion {criterion!r} gave {v.numel()} scores for {key!r} of size {size}")
    return v


def normalize_scores(space: PruningSpace, raw: dict[str, np.ndarray], how: str,
                     criterion: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Scale scores so kinds compare: by criterion group (default), by kind, or not at all.

    Block scores (keys of :func:`block_key`) are divided by the mean of their kind's group over dimension
    elements; by the mean of the group's blocks where the group has no prunable dimension. Blocks' shares (keys of
    :func:`share_key`) are divided by what their dimension is divided by (and count in no mean).
    """
    if how == "none":
        return raw
    if how not in ("criterion", "kind"):
        raise ValueError("normalize is 'criterion', 'kind' or 'none'")
    criterion = {**DEFAULT_CRITERION, **(criterion or {})}
    kind = {n: _kind_of(space, n) for n in raw}
    group = {n: criterion[k] if how == "criterion" else k for n, k in kind.items()}
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    block_totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for n, s in raw.items():
        if n.startswith(SHARE_PREFIX):
            continue
        t = block_totals if n.startswith(BLOCK_PREFIX) else totals
        t[group[n]][0] += float(s.sum())
        t[group[n]][1] += s.size
    mean = {g: t / c for g, (t, c) in block_totals.items() if t > 0}
    mean |= {g: t / c for g, (t, c) in totals.items() if t > 0}
    return {n: s / mean.get(group[n], 1.0) for n, s in raw.items()}


def _kind_of(space: PruningSpace, key: str) -> str:
    """The kind whose normalisation a key of a scores mapping takes (a block's: its stream's)."""
    if key.startswith(BLOCK_PREFIX):
        return block_kind(space, key[len(BLOCK_PREFIX):])
    if key.startswith(SHARE_PREFIX):
        return space.dims[share_parts(key)[1]].kind
    return space.dims[key].kind


def estimate(space: PruningSpace, model: nn.Module, batches: Iterable[Any],
             loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, max_batches: int | None = None,
             device: str | torch.device | None = None, criterion: Any = None,
             normalize: str = "criterion", progress: bool = False, block_shares: bool = True
             ) -> dict[str, np.ndarray]:
    """Importance of every element of every prunable dimension, of every removable block, and the blocks' shares
    of shared dimensions (``block_shares=False``: none), from ``(inputs, targets)`` batches.

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
    acc = ImportanceAccumulator(space, model, criterion, block_shares=block_shares)
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
                acc.step((inputs, targets))
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


def _criteria(criterion: Any) -> tuple[dict[str, str], dict[str, Any]]:
    """(kind -> criterion name, name -> criterion object) from None, a name or object for every kind, or a
    mapping from kinds to names or objects (kinds not named keep their default)."""
    if criterion is None or isinstance(criterion, Mapping):
        chosen = {**DEFAULT_CRITERION, **(criterion or {})}
    else:
        chosen = dict.fromkeys(DEFAULT_CRITERION, criterion)
    names, objects = {}, {}
    for kind, c in chosen.items():
        name, obj = resolve(c)
        if objects.get(name, obj) is not obj:
            raise ValueError(f"two different criteria are both named {name!r}: register one under another name")
        names[kind], objects[name] = name, obj
    return names, objects
