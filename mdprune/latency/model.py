"""The latency model: predicted latency of any plan from the lookup tables.

``predict(plan) = constant + scale * sum over ops in kept blocks of T_op(widths the plan gives the op)``,
where ``T_op`` interpolates (multilinearly) the table on a grid of each role's reachable widths, and
``constant`` (and optionally ``scale``) are calibrated on end-to-end measurements so that the dense
prediction equals the dense model's measured latency.

``mode="linear"`` is HALP's model, kept as a baseline: every op's input width frozen at its current value (the
dense one, or those of :meth:`LatencyModel.frozen_at` while pruning iteratively), so an op's latency depends
only on its own output-side dimensions.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from ..apply import Plan
from ..space import Op, PruningSpace, Seg
from .ops import ROLES
from .table import LatencyTable, signature

MAX_COMBINATIONS = 200_000


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

    def points(self) -> list[tuple[int, ...]]:
        return list(itertools.product(*[[int(w) for w in a] for a in self.axes]))


def role_widths(space: PruningSpace, segs: tuple[Seg, ...]) -> list[int]:
    """Every width a role made of ``segs`` can take, over the allowed widths of its dimensions."""
    dims = sorted({d for s in segs for d in s.dims})
    choices = [space.dims[d].widths() for d in dims]
    if math.prod(len(c) for c in choices) > MAX_COMBINATIONS:
        raise ValueError(f"too many width combinations for dims {dims}")
    out = set()
    for combo in itertools.product(*choices):
        sizes = dict(zip(dims, combo, strict=True))
        out.add(sum(math.prod(sizes[d] for d in s.dims) * s.inner for s in segs))
    return sorted(out)


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
        self.grids = [self._grid(op, grid_points, grid_points_3d) for op in space.ops]
        self._values: list[np.ndarray] | None = None

    def frozen_at(self, sizes: dict[str, int]) -> LatencyModel:
        """The same model with input widths frozen at ``sizes`` (HALP's "current" widths while pruning)."""
        lm = LatencyModel(self.space, self.table, self.mode, self.grid_points, self.grid_points_3d, sizes)
        lm.constant, lm.scale, lm.calibrated, lm._values = self.constant, self.scale, self.calibrated, self._values
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
            if op.kind == "conv2d" and op.fixed["depthwise"] and r == "out":
                axes.append(axes[0])  # in == out
            else:
                axes.append(pick(role_widths(self.space, op.roles[r]), n))
        return OpGrid(op, signature(op), roles, axes, frozen)

    # ---- what must be measured ---------------------------------------------------------------------------
    def needed(self) -> list[tuple[Op, tuple[int, ...]]]:
        """Every (op, point) the model needs, one per distinct signature and point."""
        seen, out = set(), []
        for g in self.grids:
            for p in g.points():
                if g.op.kind == "conv2d" and g.op.fixed["depthwise"] and p[0] != p[1]:
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
                    if g.op.kind == "conv2d" and g.op.fixed["depthwise"]:
                        p = (p[1], p[1])
                    v[idx] = self.table.get(g.sig, p)
                vals.append(v)
            self._values = vals
        return self._values

    def op_ms(self, i: int, sizes: dict[str, int]) -> float:
        """Latency of op ``i`` when every dimension keeps ``sizes[d]`` elements."""
        g = self.grids[i]
        w = g.op.widths(sizes)
        q = [np.asarray(g.frozen.get(r, w[r])) for r in g.roles]
        if g.op.kind == "conv2d" and g.op.fixed["depthwise"]:
            q[0] = q[1]
        return float(interpolate(g.axes, self._grid_values()[i], q))

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

    # ---- for the solver ----------------------------------------------------------------------------------
    def term(self, i: int) -> tuple[tuple[str, ...], np.ndarray]:
        """Op ``i``'s latency over every choice of the dimensions that drive it: (dims, table)."""
        g = self.grids[i]
        dims = tuple(d for d in g.op.dims() if not self._frozen_dim(g, d) and self.space.dims[d].prunable)
        widths = [np.asarray(self.space.dims[d].widths()) for d in dims]
        grids = np.meshgrid(*widths, indexing="ij") if widths else []
        sizes = self.space.dense_sizes()
        env = {d: grids[k] for k, d in enumerate(dims)}
        q = []
        for r in g.roles:
            if r in g.frozen:
                q.append(np.asarray(g.frozen[r]))
                continue
            total = 0
            for s in g.op.roles[r]:
                prod = s.inner
                for d in s.dims:
                    prod = prod * env.get(d, sizes[d])
                total = total + prod
            q.append(np.asarray(total))
        if g.op.kind == "conv2d" and g.op.fixed["depthwise"]:
            q[0] = q[1]
        return dims, self.scale * np.asarray(interpolate(g.axes, self._grid_values()[i], q))

    def _frozen_dim(self, g: OpGrid, d: str) -> bool:
        frozen_dims = {x for r in g.frozen for s in g.op.roles[r] for x in s.dims}
        live = {x for r in g.roles if r not in g.frozen for s in g.op.roles[r] for x in s.dims}
        return d in frozen_dims and d not in live
