"""The latency model: predicted latency of any plan from the lookup tables.

``predict(plan) = constant + scale * sum over ops in kept blocks of T_op(widths the plan gives the op)``,
where ``T_op`` interpolates (multilinearly) the table on a grid of each role's reachable widths, and
``constant`` (and optionally ``scale``) are calibrated on end-to-end measurements so that the dense
prediction equals the dense model's measured latency.

``mode="linear"`` is HALP's model, kept as a baseline: every op's input width frozen at its current value (the
dense one, or those of :meth:`LatencyModel.frozen_at` while pruning iteratively), so an op's latency depends
only on its own output-side dimensions.

Ops driven by more dimensions than one solver term takes (``MAX_TERM_DIMS``; a convolution reading the
concatenation of many channel groups, as in DenseNet and Inception, or a norm or pool over it) are *split*: the
role whose width is the sum of the most dimensions (``W = sum_s w_s`` over its segments) is linearised,
``T(W, r) = a(r) + b(r) * (W - W_min)``, with ``a`` and ``b >= 0`` fitted by least squares over the measured grid
of ``W`` (real total widths, from ``W_min`` to ``W_max``) at each grid point of the other roles ``r`` (the output
width). The latency is then a sum of small terms: ``a`` over the other roles' dimensions, and per segment
``b(r) * (w_s - w_s,min)`` over that segment's dimensions and the other roles' ones. Prediction and the solver
use this same form, so they agree exactly; its error against the table is the curvature of ``T`` in ``W``
(blocking steps of the kernels) that a line through the grid cannot follow, reported per op as the largest
relative residual on the grid (:meth:`LatencyModel.split_errors`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..space import Op, Plan, PruningSpace, Seg
from .ops import ROLES
from .regimes import OFFDIAG, attention_ms, diagonal_points, regime_signature, split_values
from .table import LatencyTable, signature

MAX_COMBINATIONS = 200_000
MAX_TERM_DIMS = 3  # the most dimensions one solver cost term may depend on


def in_is_out(op: Op) -> bool:
    """An op whose input width is its output width (a depthwise convolution, 1d or 2d): measured at in == out."""
    return bool(op.fixed.get("depthwise")) and set(op.roles) == {"in", "out"}


class IncompleteTable(RuntimeError):
    """The table lacks points the model needs: build it (``mdprune lut build``) to fill them in."""


@dataclass
class OpGrid:
    """The grid an op is measured and interpolated on: sorted widths per role."""

    op: Op
    sig: str
    roles: tuple[str, ...]
    axes: list[np.ndarray]  # per role, sorted grid widths
    frozen: dict[str, int]  # roles held at their dense width (linear mode)
    split: str | None = None  # the role linearised in its total width (see the module docstring)
    tied: tuple[str, ...] = ()  # roles whose width always equals the split role's (a depthwise conv's in and out)

    def points(self) -> list[tuple[int, ...]]:
        return list(itertools.product(*[[int(w) for w in a] for a in self.axes]))


def role_widths(space: PruningSpace, segs: tuple[Seg, ...]) -> list[int]:
    """Every width a role made of ``segs`` can take, over the allowed widths of its dimensions.

    Segments that share no dimension vary independently: their reachable widths are added as sets (no
    cartesian product over all dimensions, which a concatenation of many channel groups would make huge).
    """
    totals = {0}
    for group in _components(segs):
        dims = sorted({d for s in group for d in s.dims})
        choices = [space.dims[d].widths() for d in dims]
        if math.prod(len(c) for c in choices) > MAX_COMBINATIONS:
            raise ValueError(f"too many width combinations for dims {dims}")
        part = set()
        for combo in itertools.product(*choices):
            sizes = dict(zip(dims, combo, strict=True))
            part.add(sum(math.prod(sizes[d] for d in s.dims) * s.inner for s in group))
        totals = {t + p for t in totals for p in part}
    return sorted(totals)


def _components(segs: tuple[Seg, ...]) -> list[list[Seg]]:
    """Segments grouped so that no dimension appears in two groups."""
    groups: list[tuple[set[str], list[Seg]]] = []
    for s in segs:
        dims, members = set(s.dims), [s]
        for g in [g for g in groups if g[0] & dims]:
            groups.remove(g)
            dims |= g[0]
            members = g[1] + members
        groups.append((dims, members))
    return [m for _, m in groups]


def pick(widths: list[int], n: int) -> np.ndarray:
    """At most ``n`` of ``widths``, evenly spread by index, always the smallest and the largest."""
    if len(widths) <= n:
        return np.asarray(widths)
    idx = np.unique(np.round(np.linspace(0, len(widths) - 1, n)).astype(int))
    return np.asarray([widths[i] for i in idx])


def interpolate(axes: list[np.ndarray], values: np.ndarray, query: list[np.ndarray]) -> np.ndarray:
    """Multilinear interpolation of ``values`` (on the product grid ``axes``) at broadcastable ``query``."""
    query = np.broadcast_arrays(*[np.asarray(q, dtype=np.float64) for q in query])
    out = np.zeros(query[0].shape)
    lows, ts = [], []
    for a, q in zip(axes, query, strict=True):
        if len(a) == 1:
            lows.append(np.zeros(q.shape, dtype=int))
            ts.append(np.zeros(q.shape))
            continue
        i = np.clip(np.searchsorted(a, q, side="right") - 1, 0, len(a) - 2)
        lows.append(i)
        ts.append(np.clip((q - a[i]) / (a[i + 1] - a[i]), 0.0, 1.0))
    for corner in itertools.product((0, 1), repeat=len(axes)):
        weight = np.ones(out.shape)
        index = []
        for c, i, t, a in zip(corner, lows, ts, axes, strict=True):
            if len(a) == 1:
                if c:
                    weight = weight * 0.0
                index.append(np.zeros_like(i))
                continue
            weight = weight * (t if c else 1.0 - t)
            index.append(i + c)
        out += weight * values[tuple(index)]
    return out


class LatencyModel:
    """Predicts the latency of plans of ``space`` from ``table``.

    Args:
        grid_points: grid widths per role for ops with two roles (convolutions, linear layers);
        grid_points_3d: per role for ops with three (attention); every reachable width when larger.
    """

    def __init__(self, space: PruningSpace, table: LatencyTable, mode: str = "table", grid_points: int = 16,
                 grid_points_3d: int = 5, frozen_sizes: dict[str, int] | None = None):
        if mode not in ("table", "linear"):
            raise ValueError("mode is 'table' or 'linear'")
        self.space, self.table, self.mode = space, table, mode
        self.grid_points, self.grid_points_3d = grid_points, grid_points_3d
        self.frozen_sizes = dict(frozen_sizes or space.dense_sizes())
        self.constant = 0.0
        self.scale = 1.0
        self.calibrated = False
        self.calibration_error: float | None = None  # set by calibrate() when reference plans were measured
        self.grids = [self._grid(op, grid_points, grid_points_3d) for op in space.ops]
        self._values: list[np.ndarray] | None = None
        self._regimes: dict[int, tuple] = {}
        self._fits: dict[int, _Fit] = {}

    def frozen_at(self, sizes: dict[str, int]) -> LatencyModel:
        """The same model with input widths frozen at ``sizes`` (HALP's "current" widths while pruning)."""
        lm = LatencyModel(self.space, self.table, self.mode, self.grid_points, self.grid_points_3d, sizes)
        lm.constant, lm.scale, lm.calibrated, lm._values = self.constant, self.scale, self.calibrated, self._values
        lm.calibration_error = self.calibration_error
        lm._regimes = self._regimes
        return lm

    def _grid(self, op: Op, n2: int, n3: int) -> OpGrid:
        roles = ROLES[op.kind]
        n = n2 if len(roles) <= 2 else n3
        frozen = {}
        if self.mode == "linear" and "in" in op.roles:
            in_dims = {d for s in op.roles["in"] for d in s.dims}
            out_dims = {d for s in op.roles["out"] for d in s.dims}
            if not in_dims & out_dims:  # a depthwise conv's input is its output: not frozen
                frozen["in"] = op.widths(self.frozen_sizes)["in"]
        axes = []
        for r in roles:
            if in_is_out(op) and r == "out":
                axes.append(axes[0])  # in == out
            else:
                axes.append(pick(role_widths(self.space, op.roles[r]), n))
        split, tied = self._split_role(op, roles, frozen)
        return OpGrid(op, signature(op), roles, axes, frozen, split, tied)

    def _live(self, segs: tuple[Seg, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(d for s in segs for d in s.dims if self.space.dims[d].prunable))

    def _split_role(self, op: Op, roles: tuple[str, ...], frozen: dict[str, int]) -> tuple[str | None, tuple[str, ...]]:
        """The role to linearise when the op depends on more dimensions than one term takes (else None)."""
        live = {r: self._live(op.roles[r]) for r in roles if r not in frozen}
        if len({d for ds in live.values() for d in ds}) <= MAX_TERM_DIMS:
            return None, ()
        split = max(live, key=lambda r: len(live[r]))
        tied = tuple(r for r in live if r != split and op.roles[r] == op.roles[split])
        rest = {d for r in live if r != split and r not in tied for d in live[r]}
        for seg in op.roles[split]:
            if len(set(self._live((seg,))) | rest) > MAX_TERM_DIMS:
                raise ValueError(f"op {op.name}: its {split!r} segment {seg.dims} and its other roles' dimensions "
                                 f"{sorted(rest)} make more than {MAX_TERM_DIMS} dimensions in one term")
        return split, tied

    # ---- what must be measured ---------------------------------------------------------------------------
    def needed(self) -> list[tuple[Op, tuple[int, ...]]]:
        """Every (op, point) the model needs, one per distinct signature and point."""
        seen, out = set(), []
        for g in self.grids:
            for p in g.points():
                if in_is_out(g.op) and p[0] != p[1]:
                    continue
                if (g.sig, p) not in seen:
                    seen.add((g.sig, p))
                    out.append((g.op, p))
        return out

    def missing(self) -> list[tuple[Op, tuple[int, ...]]]:
        return [(op, p) for op, p in self.needed() if self.table.get(signature(op), p) is None]

    # ---- prediction --------------------------------------------------------------------------------------
    def _grid_values(self) -> list[np.ndarray]:
        if self._values is None:
            missing = self.missing()
            if missing:
                raise IncompleteTable(f"the latency table lacks {len(missing)} points (e.g. {missing[0][0].name} "
                                      f"at {missing[0][1]}); build it to measure them")
            vals = []
            for g in self.grids:
                shape = tuple(len(a) for a in g.axes)
                v = np.zeros(shape)
                for idx in itertools.product(*[range(s) for s in shape]):
                    p = tuple(int(g.axes[k][i]) for k, i in enumerate(idx))
                    if in_is_out(g.op):
                        p = (p[1], p[1])
                    v[idx] = self.table.get(g.sig, p)
                vals.append(v)
            self._regimes = {}  # attention ops measured off their fast diagonal too (see .regimes)
            for i, g in enumerate(self.grids):
                if g.op.kind == "attention" and g.split is None:
                    key = regime_signature(g.sig, OFFDIAG)
                    got = {p: self.table.get(key, p) for p in diagonal_points(g.axes)}
                    r = split_values(g.axes, vals[i], {p: v for p, v in got.items() if v is not None})
                    if r is not None:
                        self._regimes[i] = r
            self._values = vals
        return self._values

    def _interp(self, i: int, q: list[np.ndarray]) -> np.ndarray:
        """Op ``i``'s table interpolated at ``q`` (two surfaces for attention with kernel regimes)."""
        vals = self._grid_values()
        r = self._regimes.get(i)
        return interpolate(self.grids[i].axes, vals[i], q) if r is None else attention_ms(self.grids[i].axes, *r, q)

    def op_ms(self, i: int, sizes: dict[str, int]) -> float:
        """Latency of op ``i`` when every dimension keeps ``sizes[d]`` elements."""
        g = self.grids[i]
        w = g.op.widths(sizes)
        if g.split is not None:
            f = self._fit(i)
            q = [np.asarray(w[r]) for r in f.others]
            return float(_at(f.axes, f.a, q) + _at(f.axes, f.b, q) * (w[g.split] - f.w_min))
        q = [np.asarray(g.frozen.get(r, w[r])) for r in g.roles]
        if in_is_out(g.op):
            q[0] = q[1]
        return float(self._interp(i, q))

    def ops_ms(self, sizes: dict[str, int], removed: set[str] | frozenset = frozenset()) -> float:
        return sum(self.op_ms(i, sizes) for i, op in enumerate(self.space.ops) if op.block not in removed)

    def predict(self, sizes: dict[str, int], removed: set[str] | frozenset = frozenset()) -> float:
        """Predicted latency (ms) of the model with dimensions at ``sizes`` and ``removed`` blocks gone."""
        return self.constant + self.scale * self.ops_ms(sizes, removed)

    def predict_plan(self, plan: Plan) -> float:
        return self.predict(plan.sizes(self.space), set(plan.removed))

    def calibrate(self, dense_ms: float, references: list[tuple[Plan, float]] | None = None) -> None:
        """Fit the part of the latency the tables do not see, from end-to-end measurements of this run.

        The constant is set so that the dense prediction equals ``dense_ms``. With ``references`` (smaller
        plans and their latencies, measured in the same run as ``dense_ms``), a scale on the table entries is
        fitted too, by least squares on relative errors through the dense point: the tables may have been
        measured hours ago under another load (a shared machine drifts 10-40% between runs), and a network
        runs its ops slower than they run alone (cold weights, irregular widths).
        """
        ops_dense = self.ops_ms(self.space.dense_sizes())
        self.scale = 1.0
        num = den = 0.0
        for plan, ms in references or []:
            d_ops = ops_dense - self.ops_ms(plan.sizes(self.space), set(plan.removed))
            w = 1.0 / ms ** 2
            num += w * (dense_ms - ms) * d_ops
            den += w * d_ops * d_ops
        if den > 0:
            self.scale = max(num / den, 1e-3)
        # the untabled part cannot be negative: noisy references may ask for it; then tables take it all
        self.scale = min(self.scale, dense_ms / ops_dense) if ops_dense > 0 else self.scale
        self.constant = dense_ms - self.scale * ops_dense
        self.calibrated = True
        # the largest relative error left on the references: how far a correction may move a solver budget
        errors = [abs(ms / self.predict_plan(plan) - 1.0) for plan, ms in references or [] if ms > 0]
        self.calibration_error = max(errors, default=None)

    # ---- for the solver ----------------------------------------------------------------------------------
    def terms(self, i: int) -> list[tuple[str, tuple[str, ...], np.ndarray]]:
        """Op ``i``'s latency as solver terms: (label, dims, table over every choice of dims), summed.

        One term for most ops; a split op (see the module docstring) gives its intercept over the other roles'
        dimensions and one slope term per group of segments of the linearised role.
        """
        g = self.grids[i]
        if g.split is None:
            return [("", *self.term(i))]
        f = self._fit(i)
        rest = tuple(dict.fromkeys(d for r in f.others for d in self._live(g.op.roles[r])))
        env = self._env(rest)
        q = [np.asarray(_width(g.op.roles[r], env, self.space)) for r in f.others]
        out = [("", rest, self.scale * np.broadcast_to(_at(f.axes, f.a, q), _shape(env, rest)).astype(np.float64))]
        slopes: dict[tuple[str, ...], np.ndarray] = {}
        for seg in g.op.roles[g.split]:
            own = self._live((seg,))
            if not own:
                continue  # a fixed segment: in W_min
            dims = tuple(dict.fromkeys(own + rest))
            env = self._env(dims)
            q = [np.asarray(_width(g.op.roles[r], env, self.space)) for r in f.others]
            smallest = _width((seg,), {d: self.space.dims[d].widths()[0] for d in own}, self.space)
            part = _at(f.axes, f.b, q) * (_width((seg,), env, self.space) - smallest)
            slopes[dims] = slopes.get(dims, 0) + np.broadcast_to(part, _shape(env, dims))
        return out + [(f"[{','.join(d)}]", d, self.scale * np.asarray(t, dtype=np.float64)) for d, t in slopes.items()]

    def term(self, i: int) -> tuple[tuple[str, ...], np.ndarray]:
        """Op ``i``'s latency over every choice of the dimensions that drive it: (dims, table).

        For ops that are not split; :meth:`terms` covers every op.
        """
        g = self.grids[i]
        if g.split is not None:
            raise ValueError(f"op {g.op.name} is split into several terms: use terms()")
        dims = tuple(d for d in g.op.dims() if not self._frozen_dim(g, d) and self.space.dims[d].prunable)
        env = self._env(dims)
        q = [np.asarray(g.frozen[r]) if r in g.frozen else np.asarray(_width(g.op.roles[r], env, self.space))
             for r in g.roles]
        if in_is_out(g.op):
            q[0] = q[1]
        return dims, self.scale * np.asarray(self._interp(i, q))

    def _env(self, dims: tuple[str, ...]) -> dict[str, np.ndarray]:
        widths = [np.asarray(self.space.dims[d].widths()) for d in dims]
        return dict(zip(dims, np.meshgrid(*widths, indexing="ij"), strict=True)) if dims else {}

    def _frozen_dim(self, g: OpGrid, d: str) -> bool:
        frozen_dims = {x for r in g.frozen for s in g.op.roles[r] for x in s.dims}
        live = {x for r in g.roles if r not in g.frozen for s in g.op.roles[r] for x in s.dims}
        return d in frozen_dims and d not in live

    # ---- split ops ---------------------------------------------------------------------------------------
    def _fit(self, i: int) -> _Fit:
        """The line ``a + b * (W - W_min)`` through op ``i``'s table along its split role, per other-role point."""
        if i in self._fits:
            return self._fits[i]
        g = self.grids[i]
        others = tuple(r for r in g.roles if r != g.split and r not in g.tied and r not in g.frozen)
        axes = [g.axes[g.roles.index(r)] for r in others]
        total = g.axes[g.roles.index(g.split)].astype(np.float64)
        mesh = np.meshgrid(total, *axes, indexing="ij")
        q = [mesh[0] if r == g.split or r in g.tied else
             np.asarray(g.frozen[r]) if r in g.frozen else mesh[1 + others.index(r)] for r in g.roles]
        t = np.broadcast_to(interpolate(g.axes, self._grid_values()[i], q), mesh[0].shape)
        x = (total - total[0]).reshape((-1,) + (1,) * len(axes))
        if len(total) > 1:
            xc = x - x.mean()
            b = np.maximum((xc * (t - t.mean(axis=0))).sum(axis=0) / (xc * xc).sum(), 0.0)
        else:
            b = np.zeros(t.shape[1:])
        a = np.maximum(t.mean(axis=0) - b * x.mean(), 0.0)
        err = float(np.max(np.abs(a + b * x - t) / np.maximum(np.abs(t), 1e-12)))
        self._fits[i] = _Fit(others, axes, a, b, float(total[0]), err)
        return self._fits[i]

    def split_errors(self) -> dict[str, float]:
        """Split ops and the largest relative error of their linear form against the table on its grid."""
        return {g.op.name: self._fit(i).error for i, g in enumerate(self.grids) if g.split is not None}


@dataclass
class _Fit:
    others: tuple[str, ...]  # the roles the coefficients vary over
    axes: list[np.ndarray]  # their grid widths
    a: np.ndarray  # latency at W_min, on the grid of ``axes``
    b: np.ndarray  # latency per unit of the split role's width (>= 0)
    w_min: float
    error: float


def _at(axes: list[np.ndarray], values: np.ndarray, query: list[np.ndarray]) -> np.ndarray:
    """``interpolate`` that also takes no axes (a scalar)."""
    return interpolate(axes, values, query) if axes else np.asarray(values, dtype=np.float64)


def _width(segs: tuple[Seg, ...], env: dict[str, Any], space: PruningSpace) -> Any:
    """Width of a role made of ``segs``, dims in ``env`` at its (array) widths, the others at their size."""
    total: Any = 0
    for s in segs:
        prod: Any = s.inner
        for d in s.dims:
            prod = prod * env.get(d, space.dims[d].size)
        total = total + prod
    return total


def _shape(env: dict[str, np.ndarray], dims: tuple[str, ...]) -> tuple[int, ...]:
    return env[dims[0]].shape if dims else ()
