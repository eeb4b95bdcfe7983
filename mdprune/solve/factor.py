"""Exact max-sum variable elimination over small discrete factor graphs (numpy tensors).

A factor is a pair (variables, table) with one table axis per variable, variables in ascending order.
Entries may be -inf (forbidden). ``eliminate`` maximises out every variable not kept, choosing a greedy order
that keeps intermediate tables small, and returns the table over the kept variables plus what ``decode``
needs to recover a maximising assignment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Factor = tuple[tuple[int, ...], np.ndarray]

#: refuse to build intermediate tables larger than this many entries
MAX_TABLE = 1 << 23


class TooLarge(RuntimeError):
    """Elimination would build a table above MAX_TABLE entries."""


@dataclass
class Step:
    """One eliminated variable and the factors it was maximised over (to recover its best value)."""

    var: int
    factors: list[Factor]


def expand(factor: Factor, target: tuple[int, ...]) -> np.ndarray:
    """View of a factor's table broadcastable against a table over ``target`` (ascending variables)."""
    variables, table = factor
    shape = [1] * len(target)
    for v, n in zip(variables, table.shape, strict=True):
        shape[target.index(v)] = n
    return table.reshape(shape)


def combine(factors: list[Factor], target: tuple[int, ...], sizes: list[int]) -> np.ndarray:
    """Sum of factors as a dense table over ``target``."""
    total = np.zeros(tuple(sizes[v] for v in target))
    for f in factors:
        total += expand(f, target)
    return total


_ORDERS: dict[tuple, tuple[list[int], int]] = {}


def plan_order(scopes: list[tuple[int, ...]], sizes: list[int], keep: set[int]) -> tuple[list[int], int]:
    """Greedy min-size elimination order of the non-kept variables, and the largest table it builds (cached)."""
    key = (tuple(scopes), tuple(sizes[v] for s in scopes for v in s), tuple(sorted(keep)))
    if key not in _ORDERS:
        if len(_ORDERS) > 4096:
            _ORDERS.clear()
        _ORDERS[key] = _greedy_order(scopes, sizes, keep)
    return _ORDERS[key]


def _greedy_order(scopes: list[tuple[int, ...]], sizes: list[int], keep: set[int]) -> tuple[list[int], int]:
    scopes = [frozenset(s) for s in scopes]
    todo = {v for s in scopes for v in s} - keep
    order, largest = [], 1
    while todo:
        best_v, best_size, best_union = -1, None, frozenset()
        for v in sorted(todo):
            union = frozenset().union(*(s for s in scopes if v in s))
            size = int(np.prod([sizes[u] for u in union], dtype=np.float64))
            if best_size is None or size < best_size:
                best_v, best_size, best_union = v, size, union
        order.append(best_v)
        largest = max(largest, best_size)
        scopes = [s for s in scopes if best_v not in s] + [best_union - {best_v}]
        todo.discard(best_v)
    return order, largest


def eliminate(factors: list[Factor], sizes: list[int], keep: set[int] | tuple[int, ...] = ()) -> tuple[
    Factor, list[Step]
]:
    """Maximise out all variables not in ``keep``; return the factor over the kept ones and the steps taken."""
    keep = set(keep)
    order, largest = plan_order([f[0] for f in factors], sizes, keep)
    if largest > MAX_TABLE:
        raise TooLarge(f"variable elimination needs a table of {largest} entries")
    pool = list(factors)
    steps: list[Step] = []
    for v in order:
        touching = [f for f in pool if v in f[0]]
        pool = [f for f in pool if v not in f[0]]
        union = tuple(sorted({u for f in touching for u in f[0]}))
        table = combine(touching, union, sizes)
        axis = union.index(v)
        steps.append(Step(v, touching))
        pool.append((union[:axis] + union[axis + 1 :], np.max(table, axis=axis)))
    kept = tuple(sorted(keep))
    for f in pool:
        if not set(f[0]) <= keep:
            raise AssertionError("elimination left a factor over an eliminated variable")
    return (kept, combine(pool, kept, sizes)), steps


def decode(steps: list[Step], assignment: dict[int, int], sizes: list[int]) -> dict[int, int]:
    """Fill ``assignment`` (holding the kept variables) with maximising values of the eliminated ones."""
    for step in reversed(steps):
        score = np.zeros(sizes[step.var])
        for variables, table in step.factors:
            score = score + table[tuple(slice(None) if u == step.var else assignment[u] for u in variables)]
        assignment[step.var] = int(np.argmax(score))
    return assignment
