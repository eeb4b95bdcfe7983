"""Build the MDP program from a pruning space, importance scores and a latency model; read back a plan.

Switches for the paper's ablation: ``blocks=False`` (channels only: no block decisions) and a latency model in
``mode="linear"`` (HALP). Extra budgets on parameters and MACs are additive terms over the same choices.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..importance import BLOCK_PREFIX, block_key, kept_value, share_key
from ..latency import LatencyModel
from ..layers.registry import latency_op
from ..solve import CostTerm, DimChoice, Problem, Resource, Solution, minimum_usage, solve
from ..space import Plan, PruningSpace, Seg, TensorAxes


def build_problem(space: PruningSpace, scores: Mapping[str, np.ndarray], latency: LatencyModel,
                  budget_ms: float, *, blocks: bool = True, params: float | None = None,
                  macs: float | None = None, min_blocks_kept: int = 0, current: Plan | None = None) -> Problem:
    """The program: maximise kept importance with predicted latency <= ``budget_ms`` (and the optional
    parameter and MAC budgets, as absolute counts).

    A kept block is worth the value of the dimensions inside it (MDP) plus its own score, ``scores[block_key(b)]``
    (the gate on its branch output, see :mod:`mdprune.importance`). Added, not instead: the gate estimates the
    loss increase of removing the whole branch, the inner dimensions' scores that of removing their elements
    one by one; a first-order gate on a large change sees little of what the inner scores see (their signed
    contributions cancel in its sum), so the gate alone would make removing a block cheaper than pruning its
    channels. Added, removing a block never costs less than in MDP, and a block with nothing prunable inside
    (grouped convolutions kept whole, ignored layers) is no longer removed for free. Scores without block keys
    (given by hand) value blocks by their dimensions only; a mapping with some block keys must have them all.

    MDP's block semantics on a dimension a removable block shares with the rest of the network (a ResNet
    stage's channels, which each block's last BatchNorm writes into): the part of its score that comes from the
    block's own parameters, ``scores[share_key(block, dim)]`` (per element, at most the dimension's score), leaves
    the objective with the block. Exactly: a copy of the dimension inside the block carries that part's value, and
    a zero budget ties the copy's width to the dimension's while the block is kept (see :func:`share_key`).
    Scores without share keys keep the whole score of a shared dimension whatever the blocks, as before.

    With ``current`` (iterative pruning), no dimension grows beyond its current width and removed blocks stay
    removed: their dimensions and terms leave the program, and so do their shares of shared dimensions.
    """
    gone = set(current.removed) if current is not None else set()
    removable = {b.name for b in space.removable_blocks() if b.name not in gone} if blocks else set()
    now = current.sizes(space) if current is not None else space.dense_sizes()

    def blk(b: str | None) -> str | None:
        return b if b in removable else None

    dims = []
    ties = []
    for d in space.prunable_dims():
        if d.block in gone:
            continue
        if d.name not in scores:
            raise ValueError(f"no importance scores for dimension {d.name!r}")
        widths = [w for w in d.widths() if w <= now[d.name]]
        shares = _shares(scores, d.name, d.block, removable | gone)
        if not shares:
            dims.append(DimChoice(d.name, widths, kept_value(scores[d.name], widths), blk(d.block)))
            continue
        order = _ranking(space, scores, d.name, current)
        rest = np.asarray(scores[d.name], dtype=np.float64) - sum(shares.values())
        dims.append(DimChoice(d.name, widths, _value(np.maximum(rest, 0.0), order, widths), blk(d.block)))
        for b, share in shares.items():
            if b in gone:
                continue
            copy = f"{d.name}{SHARE_COPY}{b}"
            dims.append(DimChoice(copy, widths, _value(share, order, widths), b))
            ties.append(CostTerm(f"tie {copy}", (d.name, copy), 1.0 - np.eye(len(widths)), b))
    resources = [_latency(space, latency, budget_ms, blk, gone)]
    if params is not None:
        resources.append(_counted("params", _param_terms(space), params, blk, gone))
    if macs is not None:
        resources.append(_counted("macs", _mac_terms(space), macs, blk, gone))
    if current is not None:
        resources = [_restrict(r, space, dims, gone) for r in resources]
    if ties:
        resources.append(Resource("block shares tie", ties, 0.0, 0.0))
    return Problem(dims, sorted(removable), resources, block_value=_block_values(scores, removable),
                   min_blocks_kept=max(0, min_blocks_kept - len(gone)))


#: separates a shared dimension's name from its block's in the name of the copy that carries the block's share
SHARE_COPY = "@share:"


def _shares(scores: Mapping[str, np.ndarray], dim: str, owner: str | None, blocks: set[str]) -> dict[str, np.ndarray]:
    """The shares of ``dim``'s scores given for removable (or already removed) blocks other than its owner."""
    if owner is not None:  # a dimension inside a block goes with it whole
        return {}
    return {b: np.asarray(scores[share_key(b, dim)], dtype=np.float64) for b in sorted(blocks)
            if share_key(b, dim) in scores}


def _ranking(space: PruningSpace, scores: Mapping[str, np.ndarray], dim: str, current: Plan | None) -> np.ndarray:
    """The order in which :func:`plan_from_solution` keeps ``dim``'s elements (highest score first, among those
    ``current`` still keeps)."""
    s = np.asarray(scores[dim], dtype=np.float64)
    if current is not None:
        masked = np.full(space.dims[dim].size, -np.inf)
        kept = current.kept(space)[dim]
        masked[kept] = s[kept]
        s = masked
    return np.argsort(-s, kind="stable")


def _value(values: np.ndarray, order: np.ndarray, widths: list[int]) -> np.ndarray:
    """The value of keeping each width: the sum of ``values`` over the first ``w`` elements in ``order``."""
    top = np.cumsum(np.asarray(values, dtype=np.float64)[order])
    return np.asarray([top[w - 1] for w in widths])


def _block_values(scores: Mapping[str, np.ndarray], removable: set[str]) -> dict[str, float]:
    """Each removable block's own score (see :func:`build_problem`); none when the scores carry no block."""
    if not any(k.startswith(BLOCK_PREFIX) for k in scores):
        return {}
    missing = sorted(b for b in removable if block_key(b) not in scores)
    if missing:
        raise ValueError(f"no importance score for blocks {missing[:3]} (keys {block_key(missing[0])!r}...)")
    return {b: float(np.sum(scores[block_key(b)])) for b in sorted(removable)}


def _restrict(r: Resource, space: PruningSpace, dims: list[DimChoice], gone: set[str]) -> Resource:
    """Drop terms of removed blocks and cut tables to the widths still allowed."""
    allowed = {d.name: len(d.widths) for d in dims}
    terms = []
    for t in r.terms:
        if t.block in gone or any(d not in allowed for d in t.dims):  # terms of removed blocks
            continue
        cut = tuple(slice(0, allowed[d]) for d in t.dims)
        terms.append(CostTerm(t.name, t.dims, np.array(t.table[cut], dtype=np.float64), t.block))
    return Resource(r.name, terms, r.constant, r.budget)


def _latency(space: PruningSpace, lm: LatencyModel, budget: float, blk, gone: set[str]) -> Resource:
    constant = lm.constant
    terms = []
    for i, op in enumerate(space.ops):
        if op.block in gone:
            continue
        b = blk(op.block)
        for label, dims, table in lm.terms(i):  # several for an op split along a concatenated input
            if not dims and b is None:
                constant += float(table)
            else:
                terms.append(CostTerm(op.name + label, dims, np.asarray(table, dtype=np.float64), b))
    return Resource("latency", terms, constant, budget)


def _counted(name: str, parts: list[tuple[str, tuple[str, ...], np.ndarray, str | None]], budget: float, blk,
             gone: set[str]) -> Resource:
    constant = 0.0
    terms = []
    for label, dims, table, block in parts:
        if block in gone:
            continue
        b = blk(block)
        if not dims and b is None:
            constant += float(table)
        else:
            terms.append(CostTerm(label, dims, table.astype(np.float64), b))
    return Resource(name, terms, constant, budget)


def _grid(space: PruningSpace, dims: tuple[str, ...]) -> dict[str, np.ndarray]:
    widths = [np.asarray(space.dims[d].widths()) for d in dims]
    return dict(zip(dims, np.meshgrid(*widths, indexing="ij"), strict=True)) if dims else {}


def _live(space: PruningSpace, segs: tuple[Seg, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(d for s in segs for d in s.dims if space.dims[d].prunable))


def _seg_width(space: PruningSpace, seg: Seg, env: dict[str, np.ndarray]):
    w = seg.inner
    for d in seg.dims:
        w = w * env.get(d, space.dims[d].size)
    return w


def _param_terms(space: PruningSpace) -> list[tuple[str, tuple[str, ...], np.ndarray, str | None]]:
    """Parameter count as terms of at most three dimensions (a tensor's axes expanded segment by segment)."""
    parts = []
    blocks_of = {t: b.name for b in space.blocks.values() for t in b.tensors}
    for name, p in space.module.named_parameters():
        t = space.tensors.get(name)
        if t is None:
            parts.append((name, (), np.asarray(float(p.numel())), blocks_of.get(name)))
            continue
        parts += _tensor_terms(space, t)
    return parts


def _tensor_terms(space: PruningSpace, t: TensorAxes) -> list[tuple[str, tuple[str, ...], np.ndarray, str | None]]:
    axes = sorted(t.axes)
    fixed = math.prod(n for i, n in enumerate(t.shape) if i not in t.axes)
    out = []
    for combo in itertools.product(*[t.axes[a] for a in axes]):  # one segment per pruned axis
        dims = tuple(dict.fromkeys(d for s in combo for d in _live(space, (s,))))
        if len(dims) > 3:
            raise ValueError(f"parameter {t.name} depends on {len(dims)} dimensions jointly; at most 3 supported")
        env = _grid(space, dims)
        table = np.asarray(float(fixed))
        for s in combo:
            table = table * _seg_width(space, s, env)
        out.append((t.name, dims, np.broadcast_to(table, tuple(len(space.dims[d].widths()) for d in dims))
                    .astype(np.float64), t.block))
    return out


def _mac_terms(space: PruningSpace) -> list[tuple[str, tuple[str, ...], np.ndarray, str | None]]:
    parts = []
    for op in space.ops:
        if op.kind == "node":
            continue
        dims = tuple(d for d in op.dims() if space.dims[d].prunable)
        if op.kind == "attention" and len(dims) == 3:  # heads x (qk + v): two terms of two dims
            for role in ("qk", "v"):
                sub = tuple(d for d in dims if d in _live(space, op.roles["heads"] + op.roles[role]))
                parts.append((f"{op.name}.{role}", sub, _op_macs(space, op, sub, only=role), op.block))
            continue
        if len(dims) > 3:
            parts += _split_macs(space, op)
            continue
        parts.append((op.name, dims, _op_macs(space, op, dims), op.block))
    return parts


def _split_macs(space: PruningSpace, op) -> list[tuple[str, tuple[str, ...], np.ndarray, str | None]]:
    """MACs of a convolution or linear layer driven by many dimensions (a concatenated input), as exact terms:
    bilinear in (input width, output width), so one term per pair of segments, over their dimensions."""
    f = op.fixed
    if op.kind == "conv2d":
        kh, kw = f["kernel"]
        per = f["batch"] * f["out_hw"][0] * f["out_hw"][1] * kh * kw
        pairs = [((), s) for s in op.roles["out"]] if f["depthwise"] else \
            list(itertools.product(((s,) for s in op.roles["in"]), op.roles["out"]))
        per = per if f["depthwise"] else per / f["groups"]
    elif op.kind == "linear":
        per = f["batch"] * f["tokens"]
        pairs = list(itertools.product(((s,) for s in op.roles["in"]), op.roles["out"]))
    elif set(op.roles) == {"in", "out"} and (lo := latency_op(op.kind)) is not None and lo.macs is not None:
        per = float(lo.macs(f, {"in": 1, "out": 1}))  # another dense op (registered kinds): bilinear in its widths
        pairs = list(itertools.product(((s,) for s in op.roles["in"]), op.roles["out"]))
    else:
        raise ValueError(f"op {op.name} depends on more than 3 dimensions; at most 3 supported")
    merged: dict[tuple[str, ...], np.ndarray] = {}
    for ins, out in pairs:
        dims = _live(space, (*ins, out))
        if len(dims) > 3:
            raise ValueError(f"op {op.name}: segments {[s.dims for s in (*ins, out)]} span more than 3 dimensions")
        env = _grid(space, dims)
        table = per * _seg_width(space, out, env)
        for s in ins:
            table = table * _seg_width(space, s, env)
        shape = tuple(len(space.dims[d].widths()) for d in dims)
        merged[dims] = merged.get(dims, 0) + np.broadcast_to(np.asarray(table, dtype=np.float64), shape)
    return [(f"{op.name}[{','.join(d)}]", d, np.asarray(t, dtype=np.float64), op.block) for d, t in merged.items()]


def _op_macs(space: PruningSpace, op, dims: tuple[str, ...], only: str | None = None) -> np.ndarray:
    env = _grid(space, dims)
    sizes = {d: env.get(d, space.dims[d].size) for d in space.dims}
    if only is not None:  # attention cost of one part: heads * tokens * tokens_kv * width of that part
        f = op.fixed
        pairs = f["batch"] * f["tokens"] * f.get("tokens_kv", f["tokens"])
        return np.asarray(pairs * _seg_width(space, op.roles["heads"][0], env)
                          * _seg_width(space, op.roles[only][0], env), dtype=np.float64)
    return np.asarray(op.macs(sizes), dtype=np.float64) * np.ones(tuple(len(space.dims[d].widths()) for d in dims))


def plan_from_solution(space: PruningSpace, solution: Solution, scores: Mapping[str, np.ndarray],
                       current: Plan | None = None) -> Plan:
    """The plan of a solution: each dimension keeps its highest-scoring elements at the chosen width (among
    those ``current`` still keeps)."""
    widths = {n: w for n, w in solution.widths.items() if n in space.dims}  # not the copies carrying shares
    if current is None:
        return Plan.from_sizes(space, widths, scores, solution.removed)
    kept = current.kept(space)
    ranked = {}
    for name in widths:
        s = np.full(space.dims[name].size, -np.inf)
        s[kept[name]] = np.asarray(scores[name], dtype=np.float64)[kept[name]]
        ranked[name] = s
    sizes = {**current.sizes(space), **widths}
    sizes = {n: k for n, k in sizes.items() if space.dims[n].prunable}
    keep = Plan.from_sizes(space, sizes, {**{n: _rank_current(kept[n], space.dims[n].size) for n in sizes}, **ranked})
    return Plan(keep.keep, sorted(set(solution.removed) | set(current.removed)))


def solve_plan(space: PruningSpace, scores: Mapping[str, np.ndarray], latency: LatencyModel, budget_ms: float,
               *, current: Plan | None = None, time_limit: float = 60.0, **problem: Any) -> tuple[Plan, Solution]:
    """Build the program at ``budget_ms`` (``problem``: the other arguments of :func:`build_problem`), solve it
    exactly, and return its plan with the solution."""
    sol = solve(build_problem(space, scores, latency, budget_ms, current=current, **problem), time_limit=time_limit)
    return plan_from_solution(space, sol, scores, current), sol


def smallest_usage(space: PruningSpace, latency: LatencyModel, resource: str = "latency", *,
                   current: Plan | None = None, **problem: Any) -> float:
    """The smallest predicted latency (``resource="latency"``), parameter or MAC count any plan reaches, each
    resource on its own (``problem``: the other arguments of :func:`build_problem`; budgets are ignored,
    ``min_blocks_kept`` is honoured)."""
    problem = {k: v for k, v in problem.items() if k not in ("params", "macs")}
    if resource != "latency":
        problem[resource] = 1e30
    scores = {d.name: np.ones(d.size) for d in space.prunable_dims()}
    return minimum_usage(build_problem(space, scores, latency, 1e30, current=current, **problem), resource)


def smallest_latency(space: PruningSpace, latency: LatencyModel, *, current: Plan | None = None,
                     **problem: Any) -> float:
    """The smallest predicted latency any plan reaches (see :func:`smallest_usage`)."""
    return smallest_usage(space, latency, "latency", current=current, **problem)


def _rank_current(kept: list[int], size: int) -> np.ndarray:
    """Scores that prefer exactly the currently kept elements (for dims the program did not decide)."""
    s = np.zeros(size)
    s[kept] = 1.0
    return s
