"""The pruning optimisation problem: data classes, validation and exact evaluation of a configuration."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

#: a configuration uses at most ``budget + BUDGET_RTOL * |budget|`` of a resource
BUDGET_RTOL = 1e-9


@dataclass
class DimChoice:
    """A prunable dimension: one width index k in ``range(len(widths))`` is chosen."""

    name: str
    widths: list[int]
    value: np.ndarray
    block: str | None = None


@dataclass
class CostTerm:
    """A cost table indexed by the choices of 0 to 3 dimensions; costs 0 when its block is removed."""

    name: str
    dims: tuple[str, ...]
    table: np.ndarray
    block: str | None = None


@dataclass
class Resource:
    """An additive budget: ``constant + sum of selected term entries <= budget``."""

    name: str
    terms: list[CostTerm]
    constant: float
    budget: float


@dataclass
class Problem:
    """Choose a width per dim and keep/remove each block to maximise kept value within every budget."""

    dims: list[DimChoice]
    blocks: list[str]
    resources: list[Resource]
    block_value: dict[str, float] = field(default_factory=dict)
    min_blocks_kept: int = 0


@dataclass
class Solution:
    """A chosen configuration with its proven bound and how it was found."""

    choice: dict[str, int]
    widths: dict[str, int]
    removed: list[str]
    objective: float
    bound: float
    gap: float
    status: str
    usage: dict[str, float]
    seconds: float
    method: str


class InfeasibleBudget(ValueError):
    """A budget is below the smallest use of its resource that any configuration reaches."""

    def __init__(self, resource: str, budget: float, minimum: float, detail: str = "") -> None:
        self.resource = resource
        self.budget = budget
        self.minimum = minimum
        self.detail = detail
        super().__init__(
            f"budget {budget:.6g} for resource {resource!r} is below the smallest reachable use {minimum:.6g}"
            + (f" ({detail})" if detail else "")
        )

    def __reduce__(self) -> tuple:  # picklable: under DDP rank 0's error reaches the other ranks as it is
        return (type(self), (self.resource, self.budget, self.minimum, self.detail))


def within_budget(used: float, budget: float) -> bool:
    """Whether ``used`` respects ``budget`` up to the relative tolerance BUDGET_RTOL."""
    return used <= budget + BUDGET_RTOL * abs(budget)


def _finite_array(a: object, what: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} has non-finite entries")
    return arr


def validate(problem: Problem) -> None:
    """Check names, shapes, signs and the block structure; raise ValueError with a clear message."""
    blocks = list(problem.blocks)
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"duplicate block names in {blocks}")
    block_set = set(blocks)
    dims: dict[str, DimChoice] = {}
    for d in problem.dims:
        if d.name in dims:
            raise ValueError(f"duplicate dim name {d.name!r}")
        dims[d.name] = d
        if len(d.widths) == 0:
            raise ValueError(f"dim {d.name!r} has no widths")
        ascending = all(a < b for a, b in zip(d.widths, d.widths[1:], strict=False))
        if any(int(w) != w or w <= 0 for w in d.widths) or not ascending:
            raise ValueError(f"dim {d.name!r}: widths must be positive integers in ascending order, got {d.widths}")
        value = _finite_array(d.value, f"value of dim {d.name!r}")
        if value.shape != (len(d.widths),):
            raise ValueError(f"dim {d.name!r}: value has shape {value.shape}, expected ({len(d.widths)},)")
        if np.any(value < 0) or np.any(np.diff(value) < 0):
            raise ValueError(f"dim {d.name!r}: value must be >= 0 and nondecreasing in the width index")
        if d.block is not None and d.block not in block_set:
            raise ValueError(f"dim {d.name!r} names unknown block {d.block!r}")
    for name, v in problem.block_value.items():
        if name not in block_set:
            raise ValueError(f"block_value names unknown block {name!r}")
        if not np.isfinite(v):
            raise ValueError(f"block_value of {name!r} is not finite")
    if not 0 <= problem.min_blocks_kept <= len(blocks):
        raise ValueError(f"min_blocks_kept={problem.min_blocks_kept} must lie in [0, {len(blocks)}]")
    if not problem.resources:
        raise ValueError("a problem needs at least one resource (the first is the latency)")
    names = [r.name for r in problem.resources]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate resource names in {names}")
    for r in problem.resources:
        if not (np.isfinite(r.constant) and np.isfinite(r.budget)):
            raise ValueError(f"resource {r.name!r}: constant and budget must be finite")
        for t in r.terms:
            _validate_term(t, r.name, dims, block_set)


def _validate_term(t: CostTerm, resource: str, dims: Mapping[str, DimChoice], block_set: set[str]) -> None:
    where = f"term {t.name!r} of resource {resource!r}"
    if len(t.dims) > 3:
        raise ValueError(f"{where} uses {len(t.dims)} dims; at most 3 are supported")
    if len(set(t.dims)) != len(t.dims):
        raise ValueError(f"{where} repeats a dim: {t.dims}")
    if t.block is not None and t.block not in block_set:
        raise ValueError(f"{where} names unknown block {t.block!r}")
    for name in t.dims:
        if name not in dims:
            raise ValueError(f"{where} uses unknown dim {name!r}")
        owner = dims[name].block
        if owner is not None and owner != t.block:
            raise ValueError(
                f"{where} (block {t.block!r}) uses dim {name!r} of block {owner!r}; "
                "dims inside a block may only be used by terms of that block"
            )
    table = _finite_array(t.table, where)
    expected = tuple(len(dims[name].widths) for name in t.dims)
    if table.shape != expected:
        raise ValueError(f"{where}: table has shape {table.shape}, expected {expected} from dims {t.dims}")
    if np.any(table < 0):
        raise ValueError(f"{where}: table has negative entries")


def evaluate(
    problem: Problem, choice: Mapping[str, int], removed: Iterable[str] = ()
) -> tuple[float, dict[str, float]]:
    """Objective and usage of each resource for a configuration (choices of removed blocks' dims are ignored)."""
    removed_set = set(removed)
    unknown = removed_set - set(problem.blocks)
    if unknown:
        raise ValueError(f"removed names unknown blocks {sorted(unknown)}")
    index: dict[str, int] = {}
    objective = 0.0
    for d in problem.dims:
        if d.block in removed_set:
            continue
        if d.name not in choice:
            raise ValueError(f"no choice given for dim {d.name!r}")
        k = int(choice[d.name])
        if not 0 <= k < len(d.widths):
            raise ValueError(f"choice {k} for dim {d.name!r} is outside range({len(d.widths)})")
        index[d.name] = k
        objective += float(np.asarray(d.value, dtype=np.float64)[k])
    objective += sum(float(v) for b, v in problem.block_value.items() if b not in removed_set)
    usage: dict[str, float] = {}
    for r in problem.resources:
        used = float(r.constant)
        for t in r.terms:
            if t.block in removed_set:
                continue
            used += float(np.asarray(t.table, dtype=np.float64)[tuple(index[name] for name in t.dims)])
        usage[r.name] = used
    return objective, usage
