"""Budgets and constraints as users write them: ``"50%"`` of the dense model, ``"12ms"``, ``"2G"``, ``"500k"``.

A constraint set is a mapping over ``latency`` (percent of the dense latency measured here, or milliseconds),
``params`` and ``macs`` (percent of the dense count, or an absolute count with an optional k/M/G suffix).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

Budget = str | float

UNITS = {"latency": "ms", "params": "parameters", "macs": "MACs"}


def read_budget(budget: Budget, unit: str = "ms") -> tuple[float, bool]:
    """``(value, is a percentage)`` of a budget; refuses what cannot be read, is not positive, or is >= 100%."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise ValueError(f"cannot read budget {budget!r}: use '50%' or a number of {unit}")
    if isinstance(budget, (int, float)):
        value, percent = float(budget), False
    else:
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(%|ms|k|m|g)?", budget.strip().lower())
        if not m:
            raise ValueError(f"cannot read budget {budget!r}: use '50%' or a number of {unit}")
        scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(m.group(2) or "", 1.0)
        value, percent = float(m.group(1)) * scale, m.group(2) == "%"
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"budget {budget!r} must be positive: use '50%' or a number of {unit}")
    if percent and value >= 100:
        raise ValueError(f"budget {budget!r} is at or above the dense model: nothing would be pruned; ask for less "
                         "than 100%")
    return value, percent


def check_budget(budget: Budget, what: str = "latency") -> None:
    """Refuse a budget that cannot be read or makes no sense, before anything is measured."""
    read_budget(budget, UNITS.get(what, what))


def parse_budget(budget: Budget, reference: float, unit: str = "ms") -> float:
    """The absolute budget: ``"50%"`` of ``reference``, or ``"12ms"`` / ``12.0`` / ``"2G"`` / ``"500k"`` as given."""
    value, percent = read_budget(budget, unit)
    return value / 100.0 * reference if percent else value


def read_constraints(constraints: Mapping[str, Budget] | None = None, **named: Budget | None) -> dict[str, Budget]:
    """Check a constraint set (``{"latency": "50%", "params": "60%", "macs": "2G"}``, any subset) before anything
    is measured; keyword arguments that are not ``None`` join it (the older ``budget=``/``params=``/``macs=``)."""
    merged: dict[str, Budget] = {}
    for source in (dict(constraints or {}), {k: v for k, v in named.items() if v is not None}):
        for key, value in source.items():
            name = {"flops": "macs", "budget": "latency"}.get(key.lower(), key.lower())
            if name not in UNITS:
                raise ValueError(f"unknown constraint {key!r}: use {', '.join(sorted(UNITS))}")
            if name in merged and merged[name] != value:
                raise ValueError(f"constraint {name!r} given twice ({merged[name]!r} and {value!r})")
            check_budget(value, name)
            merged[name] = value
    if not merged:
        raise ValueError("no constraint given: use constraints={'latency': '50%'} (or params / macs)")
    return merged


def parse_constraints_text(items: list[str] | None) -> dict[str, str]:
    """``["latency=50%", "macs=2G"]`` (the CLI's ``--constraint``) as a mapping."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"cannot read constraint {item!r}: write NAME=VALUE, e.g. latency=50% or macs=2G")
        out[key.strip()] = value.strip()
    return out
