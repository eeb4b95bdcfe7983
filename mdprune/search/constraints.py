"""Constraints resolved against the dense model, and the table of what each one can reach before solving.

Like a reachable-range table printed before a search: for every constraint, its dense value, the smallest value
any plan reaches (each constraint on its own), the target, and whether the target is satisfiable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from .budgets import UNITS, Budget, parse_budget


@dataclass
class ConstraintRow:
    """One constraint: as written, and in absolute units (ms, parameters, MACs)."""

    name: str
    asked: str
    dense: float
    smallest: float
    target: float

    @property
    def satisfiable(self) -> bool:
        return self.target >= self.smallest * (1 - 1e-9)

    @property
    def unit(self) -> str:
        return UNITS[self.name]

    def to_dict(self) -> dict[str, float | str | bool]:
        return {**asdict(self), "unit": self.unit, "satisfiable": self.satisfiable}


def resolve(constraints: Mapping[str, Budget], dense: Mapping[str, float]) -> dict[str, float]:
    """Absolute targets: percentages of ``dense[name]`` (ms, parameter and MAC counts), other values as given."""
    return {name: parse_budget(value, dense[name], UNITS[name]) for name, value in constraints.items()}


def _fmt(name: str, value: float) -> str:
    if name == "latency":
        return f"{value:.3f} ms"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3f}{suffix}"
    return f"{value:.0f}"


def format_table(rows: list[ConstraintRow]) -> str:
    """The constraint table as aligned text (printed, logged and written to the report)."""
    head = ["constraint", "asked", "dense", "smallest reachable", "target", ""]
    body = [[r.name, r.asked, _fmt(r.name, r.dense),
             f"{_fmt(r.name, r.smallest)} ({100 * r.smallest / r.dense:.1f}%)",
             f"{_fmt(r.name, r.target)} ({100 * r.target / r.dense:.1f}%)",
             "satisfiable" if r.satisfiable else "NOT satisfiable"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
                     for line in [head, *body])
