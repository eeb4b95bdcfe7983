"""What a pruning produces, one schema for whoever writes it and whoever reads it.

:class:`PruneReport` is what :class:`~mdprune.train.Pruner` and :func:`mdprune.prune` return; :class:`RunResult`
is a whole run's ``result.json`` (the report of the pruning plus accuracies, fine-tuning curve and the final
measurement), written by :class:`~mdprune.train.PruneRun` and read by :mod:`mdprune.report`. Both are plain data
(numbers, strings, lists, dicts), so they travel as JSON. Records inside them are typed dicts.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict


class _CheckCore(TypedDict):
    budget_ms: float  # the solver's latency budget for this solve
    predicted_ms: float
    measured_ms: float
    measured_dense_ms: float
    fraction: float  # measured / measured dense, same run (mdprune.latency.measure_models_ratio)
    target_fraction: float
    kept: float  # 1.0 for the plan kept


class Check(_CheckCore, total=False):
    """The final plan measured beside the dense model, once per solve (see :mod:`mdprune.search.measured`)."""

    fraction_low: float  # the 95% interval of the ratio
    fraction_high: float
    rounds: int  # interleaved (plan, dense) pairs timed
    seconds: float
    converged: bool  # False: the time cap stopped the measurement before the interval was narrow enough
    significant: bool  # the interval lies wholly on one side of the target
    correction: float
    capped: bool  # the correction was cut to the model's error range


class Step(TypedDict, total=False):
    """One pruning step: the targets it solved for, the plan it chose, the solver's figures."""

    step: int
    plan_digest: str
    budget_ms: float | None  # the step's latency budget (None without a latency constraint)
    targets: dict[str, float]  # every constraint's budget at this step (absolute), as solved
    predicted_ms: float
    params: int
    macs: int
    status: str
    objective: float
    bound: float
    gap: float
    seconds: float
    method: str
    removed: list[str]
    checks: list[Check]
    measured: dict[str, float] | None  # {"ms", "dense_ms"}: the final plan measured beside the dense model
    unreachable: dict[str, dict[str, float]] | None  # resource -> {"budget", "smallest"}: taken at its floor


class Epoch(TypedDict):
    """One fine-tuning epoch."""

    epoch: int
    loss: float
    accuracy: float


@dataclass
class PruneReport:
    """What was asked, what was predicted and what was measured (:func:`mdprune.prune`, ``Pruner.finish``)."""

    target_ms: float | None  # the latency target (None without a latency constraint)
    predicted_ms: float
    dense_ms: float  # the dense model, measured with the calibration models (the budget's reference)
    measured_ms: float | None  # the slim model, measured interleaved with the dense one ...
    measured_dense_ms: float | None  # ... which measured this in that same run
    noise: float | None  # spread of the dense model's timing rounds (a noise figure)
    widths: dict[str, tuple[int, int]]  # dimension -> (kept, size)
    removed_blocks: list[str]
    solver: dict[str, Any]
    params: tuple[int, int]  # (dense, pruned)
    macs: tuple[int, int]
    latency_model: dict[str, Any]
    plan: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)  # measured against the budget, per solve
    constraints: list[dict[str, Any]] = field(default_factory=list)  # the table: ConstraintRow.to_dict() each
    history: list[Step] = field(default_factory=list)  # every pruning step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def measured_speedup(self) -> float | None:
        """Dense over pruned latency, both measured in the same run."""
        if self.measured_ms is None or self.measured_dense_ms is None:
            return None
        return self.measured_dense_ms / self.measured_ms

    def summary(self) -> str:
        m = (f"{self.measured_ms:.3f} ms measured (dense {self.measured_dense_ms:.3f} ms in the same run, "
             f"{self.measured_speedup:.2f}x)" if self.measured_ms is not None else "not measured")
        target = f"target {self.target_ms:.3f} ms" if self.target_ms is not None else "no latency target"
        return (f"{target} (dense {self.dense_ms:.3f} ms), predicted {self.predicted_ms:.3f} ms, {m}; params "
                f"{self.params[1]:,} of {self.params[0]:,}; MACs {self.macs[1]:,} of {self.macs[0]:,}; "
                f"{len(self.removed_blocks)} blocks removed; solver {self.solver['status']} "
                f"(gap {self.solver['gap']:.2e}, {self.solver['seconds']:.2f} s)")


@dataclass
class RunResult:
    """A run's result (``result.json``); every field may be missing (None, empty) in a partial result."""

    model: str | None = None
    budget: str | None = None  # the latency constraint as written
    constraints: dict[str, str] = field(default_factory=dict)  # every constraint as written
    constraint_table: list[dict[str, Any]] = field(default_factory=list)  # ConstraintRow.to_dict() each
    schedule: str | None = None
    target_ms: float | None = None
    predicted_ms: float | None = None
    dense_ms_calibration: float | None = None  # the dense latency the percentages are of (start of the run)
    measured_dense_ms: float | None = None  # dense and pruned measured side by side at the end
    measured_ms: float | None = None
    measured_noise: float | None = None
    speedup: float | None = None
    measured_fraction: float | None = None  # pruned / dense: median of alternately timed pairs (see latency.ratio)
    measured_fraction_interval: list[float] | None = None  # its 95% interval [low, high]
    dense_accuracy: float | None = None
    pruned_accuracy: float | None = None  # after slimming and BatchNorm recalibration, before fine-tuning
    accuracy: float | None = None  # final
    params: list[int] | None = None  # [dense, pruned]
    macs: list[int] | None = None
    widths: dict[str, list[Any]] = field(default_factory=dict)  # dimension -> [kept, size, kind, block]
    blocks: dict[str, bool] = field(default_factory=dict)  # removable block -> kept
    removed_blocks: list[str] = field(default_factory=list)
    history: list[Step] = field(default_factory=list)
    curve: list[Epoch] = field(default_factory=list)
    coverage: dict[str, Any] | None = None  # PruningSpace.coverage()
    budgets: list[float] = field(default_factory=list)  # the latency budget of each pruning step
    latency_model: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    finished: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunResult:
        """Read a result; keys this version does not know are dropped, missing ones take their defaults."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        # a None where a list or dict belongs reads as empty
        return cls(**{k: v for k, v in d.items() if k in fields and not (
            v is None and fields[k].default_factory is not dataclasses.MISSING)})

    @classmethod
    def from_report(cls, report: PruneReport, **run: Any) -> RunResult:
        """The result of a pruning without a run around it (``run``: model name, accuracies, ...)."""
        sizes = {n: list(w) for n, w in report.widths.items()}
        table = {r["name"]: r for r in report.constraints}
        return cls(**{
            "budget": str(table["latency"]["asked"]) if "latency" in table else None,
            "constraints": {n: str(r["asked"]) for n, r in table.items()}, "constraint_table": report.constraints,
            "target_ms": report.target_ms, "predicted_ms": report.predicted_ms, "dense_ms_calibration": report.dense_ms,
            "measured_dense_ms": report.measured_dense_ms, "measured_ms": report.measured_ms,
            "measured_noise": report.noise, "speedup": report.measured_speedup, "params": list(report.params),
            "macs": list(report.macs), "widths": sizes, "removed_blocks": list(report.removed_blocks),
            "history": report.history, "budgets": [h["budget_ms"] for h in report.history if h.get("budget_ms")],
            "latency_model": {k: v for k, v in report.latency_model.items() if k != "fingerprint"},
            "fingerprint": dict(report.latency_model.get("fingerprint") or {}), **run})


def as_result(result: RunResult | PruneReport | Mapping[str, Any]) -> RunResult:
    """A :class:`RunResult` from a result, a report, or a result's dict (``result.json`` as read)."""
    if isinstance(result, RunResult):
        return result
    if isinstance(result, PruneReport):
        return RunResult.from_report(result)
    return RunResult.from_dict(result)
