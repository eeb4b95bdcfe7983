"""The pruning step of any training loop: importance after backward, pruning on the schedule, masks held, and
at the end the slim model with a report.

``mdprune.prune`` (one shot), :class:`~mdprune.train.PruneRun` (a whole run) and a user's own loop all prune
through :class:`Pruner`, so they measure, check constraints, solve and hold masks the same way::

    pruner = Pruner(model, x, {"latency": "50%"}, schedule=PruneSchedule("iterative", steps=4, every=50))
    opt = torch.optim.SGD(pruner.model.parameters(), lr=0.01)
    for x, y in loader:
        loss = F.cross_entropy(pruner.model(x), y)
        opt.zero_grad()
        loss.backward()
        pruner.after_backward()  # importance; pruned gradients at zero
        opt.step()
        pruner.step(opt)  # masks held (weights, BatchNorm statistics, optimizer state); prunes on the schedule
    slim, report = pruner.finish()

Under ``torch.distributed`` every rank makes the same calls: importance sums are all-reduced, rank 0 measures
and solves alone, and the plan (or its error) is broadcast to every rank.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..apply import slim
from ..importance import ImportanceAccumulator
from ..latency import LatencyModel, LatencySettings, LatencyTable, build, measure_models, open_table
from ..progress import progress_bar
from ..search import (
    Budget,
    ConstraintRow,
    Search,
    calibrated_model,
    format_table,
    read_constraints,
    resolve,
    solve_within_measured_budget,
)
from ..solve import InfeasibleBudget, Solution
from ..space import Plan, PruningSpace, analyze
from . import distributed as dist
from .masking import Masker
from .result import PruneReport, Step
from .schedule import PruneSchedule, budget_path

__all__ = ["Pruner", "plan_digest"]


#: what a LatencyModel learns from its calibration (kept in checkpoints, so a resumed run predicts the same)
LM_STATE = ("scale", "constant", "calibrated", "calibration_error")


def plan_digest(plan: Plan) -> str:
    """A short digest of a plan (equal plans, equal digests: ranks compare theirs in the log)."""
    return hashlib.sha1(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


class Pruner:
    """Prune a model to constraints while it trains (or in one shot), from inside any training loop.

    Args:
        model: the trained model. It is analysed and copied into :attr:`model`, the masked model to train.
        example_inputs: an input batch (sets spatial size / tokens; latency is measured at ``settings.batch``).
        constraints: ``{"latency": "50%", "params": "60%", "macs": "2G"}``, any subset: latency in % of the
            dense latency measured here or in ms (``"12ms"``, ``12.0``); params and MACs in % of the dense count
            or as counts (``"2G"``, ``"500k"``). Checked before anything is measured.
        settings: how and where latency is measured (default: eager PyTorch on the model's device).
        schedule: when to prune (default one-shot: :meth:`finish` prunes once, with the importance gathered).
        importance: the importance criterion, passed to :class:`~mdprune.importance.ImportanceAccumulator`.
        lut: latency table, table file or cache directory (default ``~/.cache/mdprune/lut``).
        space: the analysed model, if already at hand (else ``analyze(model, example_inputs, ...)``).
        mode: ``"table"`` (MDP's tables) or ``"linear"`` (HALP's latency model; ablation).
        blocks: allow removing whole residual blocks (``False``: channels only).
        verify_rounds: re-solves of the final plan while its measured latency misses the target (see
            :mod:`mdprune.search.measured`); ``measure=False`` or ``-1``: the final plan is not measured.
        distributed: the process group (default: the initialised ``torch.distributed`` group, if any).
        state: a :meth:`state_dict` to continue from (nothing is measured again).
        log: where progress lines go (default: printed, on rank 0 only).

    Raises:
        InfeasibleBudget: a constraint is below the smallest value any plan reaches (before any training).
        ValueError: a constraint cannot be read, or no constraint would prune anything.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor | Sequence[torch.Tensor],
        constraints: Mapping[str, Budget],
        *,
        settings: LatencySettings | None = None,
        schedule: PruneSchedule | None = None,
        importance: Any = None,
        lut: str | Path | LatencyTable | None = None,
        space: PruningSpace | None = None,
        steps: Mapping[str, int] | None = None,
        ignored_layers: Iterable[str] = (),
        unsupported: str = "error",
        mode: str = "table",
        blocks: bool = True,
        min_blocks_kept: int = 0,
        time_limit: float = 60.0,
        verify_rounds: int = 3,
        measure: bool = True,
        calibrate_scale: bool = True,
        distributed: dist.Dist | None = None,
        state: Mapping[str, Any] | None = None,
        log: Callable[[str], None] | None = None,
        progress: bool = False,
    ):
        self.asked = read_constraints(constraints)  # before anything is built or measured
        self.device = next(iter(model.parameters()), torch.zeros(())).device
        self.d = distributed or _current_group(self.device)
        self.settings = settings or LatencySettings(device=str(self.device))
        self.schedule = schedule or PruneSchedule()
        self.lut, self.mode, self.progress = lut, mode, progress
        self.verify_rounds = verify_rounds if measure else -1
        self.log = log or (print if self.d.main else _quiet)
        self.seconds: dict[str, float] = {}
        t = time.monotonic()
        if space is None:
            inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
            space = analyze(model, tuple(x.to(self.device) for x in inputs), steps=steps,
                            ignored_layers=ignored_layers, unsupported=unsupported)
        self.space = space
        self.seconds["analyze"] = time.monotonic() - t
        self._masker = Masker(space, model)
        self.model: nn.Module = self._masker.model.to(self.device)  # the masked model: train this one
        criterion = {} if importance is None else {"criterion": importance}
        self._acc = ImportanceAccumulator(space, self.model, **criterion)
        self._options = {"blocks": blocks, "min_blocks_kept": min_blocks_kept, "time_limit": time_limit}
        self.iteration = 0  # optimizer steps seen by step()
        self.steps_taken = 0
        self.history: list[Step] = []
        self.search: Search | None = None  # rank 0 only
        self.lm: LatencyModel | None = None
        t = time.monotonic()
        if state is not None:
            self.calibration = dict(state["calibration"])
            if self.d.main:
                self._restore_search()
            self.load_state_dict(state)
        else:
            self.calibration = dist.run_on_main(lambda: self._calibrate(calibrate_scale), self.d)
        self.seconds["latency"] = time.monotonic() - t

    # ---- what was asked and measured -----------------------------------------------------------------------
    @property
    def targets(self) -> dict[str, float]:
        """The absolute target of each constraint: ``latency`` in ms, ``params`` and ``macs`` as counts."""
        return dict(self.calibration["targets"])

    @property
    def dense(self) -> dict[str, float]:
        """The dense model's latency (ms, measured here), parameter and MAC counts."""
        return dict(self.calibration["dense"])

    @property
    def table(self) -> list[ConstraintRow]:
        """Each constraint's dense value, smallest reachable value and target (checked satisfiable)."""
        return [ConstraintRow(r["name"], r["asked"], r["dense"], r["smallest"], r["target"])
                for r in self.calibration["table"]]

    @property
    def plan(self) -> Plan:
        """The plan the masks hold now."""
        return self._masker.plan

    @property
    def done(self) -> bool:
        """Every pruning step of the schedule has been taken."""
        return self.steps_taken >= self.schedule.steps

    def targets_at(self, t: int) -> dict[str, float]:
        """Step ``t``'s budget of each constraint: ``dense * (target / dense) ** ((t + 1) / steps)``."""
        return {n: budget_path(self.dense[n], v, self.schedule.steps)[t] for n, v in self.targets.items()}

    @property
    def budgets(self) -> list[float]:
        """The latency budget of each step (empty without a latency constraint)."""
        if "latency" not in self.targets:
            return []
        return budget_path(self.dense["latency"], self.targets["latency"], self.schedule.steps)

    def _calibrate(self, references: bool) -> dict[str, Any]:
        """Rank 0: measure and calibrate the latency model, resolve the constraints, refuse unreachable ones."""
        table = open_table(self.settings, self.lut)
        self.lm, measured = calibrated_model(self.space, table, self.settings, self.mode, references, self.progress)
        dense = {"latency": measured["ms"], "params": float(self.space.count_params()),
                 "macs": float(self.space.count_macs())}
        targets = resolve(self.asked, dense)
        self.log(f"dense latency {dense['latency']:.3f} ms (noise {100 * measured['noise']:.1f}%)")
        _refuse_nothing_to_prune(self.asked, targets, dense)
        self.search = Search(self.space, self.lm, targets, asked={k: str(v) for k, v in self.asked.items()},
                             **self._options)
        rows = self.search.table(dense)
        self.log("constraints:\n" + format_table(rows))
        self.search.check(rows)  # before any training: the final step could never reach it
        return {"dense": dense, "targets": targets, "noise": measured["noise"], "mode": self.mode,
                "table": [r.to_dict() for r in rows], "model": {k: getattr(self.lm, k, None) for k in LM_STATE}}

    def _restore_search(self) -> None:
        cal = self.calibration
        table = open_table(self.settings, self.lut)
        build(self.space, table, self.settings, progress=self.progress, calibrate=False)  # what it lacks, if any
        self.lm = LatencyModel(self.space, table, cal["mode"],
                               self.settings.grid_points, self.settings.grid_points_3d)
        for k, v in cal["model"].items():  # the calibration: scale, constant, error seen on the references
            if v is not None:
                setattr(self.lm, k, v)
        self.search = Search(self.space, self.lm, dict(cal["targets"]), asked={k: str(v) for k, v in
                                                                                self.asked.items()}, **self._options)

    # ---- inside the training loop ----------------------------------------------------------------------------
    def after_backward(self) -> None:
        """After ``loss.backward()`` (after ``scaler.unscale_(opt)`` under AMP): accumulate importance while
        pruning steps remain, and zero the gradients of what is pruned."""
        if not self.done:
            self._acc.step()
        self._masker.hold_gradients()

    def hold(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Re-zero what the plan prunes (weights, BatchNorm statistics, ``optimizer``'s state), without counting
        an iteration (:meth:`step` does this too)."""
        self._masker.hold(optimizer)

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> Step | None:
        """After ``optimizer.step()``: hold the masks (weights, BatchNorm statistics and ``optimizer``'s state at
        zero) and take a pruning step when the schedule says. Returns that step's record, or None."""
        self._masker.hold(optimizer)
        it = self.iteration
        self.iteration += 1
        if self.done or self.schedule.step_at(it) is None:
            return None
        return self.prune(optimizer)

    def scores(self) -> dict[str, np.ndarray]:
        """Importance accumulated since the last pruning step, summed over every process."""
        sums = self._acc.state()
        dist.all_reduce_sum_(sums, self.d)
        self._acc.load_state(sums)
        return self._acc.scores()

    def prune(self, optimizer: torch.optim.Optimizer | None = None,
              scores: Mapping[str, np.ndarray] | None = None) -> Step:
        """Take the next pruning step now (``scores``: instead of the importance accumulated)."""
        if self.done:
            raise RuntimeError(f"all {self.schedule.steps} pruning steps of the schedule are taken")
        t = self.steps_taken
        scores = self.scores() if scores is None else scores
        started = time.monotonic()
        plan_d, info = dist.run_on_main(lambda: self._solve(scores, t), self.d)
        plan = Plan.from_dict(plan_d)
        self._masker.set_plan(plan, optimizer)
        self._masker.hold_gradients()  # the gradients left from the last backward, too
        self._acc.load_state({k: torch.zeros_like(v) for k, v in self._acc.state().items()})
        record: Step = {"step": t, "plan_digest": plan_digest(plan), **info}
        self.history.append(record)
        self.steps_taken += 1
        self.seconds["solve"] = self.seconds.get("solve", 0.0) + time.monotonic() - started
        self._log_step(record)
        return record

    def _solve(self, scores: Mapping[str, np.ndarray], t: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Rank 0: the plan of step ``t`` from the current plan; the final step's plan measured."""
        assert self.search is not None and self.lm is not None
        final = t == self.schedule.steps - 1
        current = self.plan
        asked = self.targets_at(t)
        search, unreachable = replace(self.search, targets=asked), {}
        while True:  # a budget no plan reaches from the current one: take the smallest reachable, and say so
            try:
                plan, sol = search.solve(scores, current=current)
                break
            except InfeasibleBudget as e:
                if e.resource not in search.targets or e.resource in unreachable:
                    raise
                unreachable[e.resource] = {"budget": search.targets[e.resource], "smallest": e.minimum}
                self.log(f"the step's {e.resource} budget {e.budget:.6g} is below the smallest reachable from the "
                         f"current plan, {e.minimum:.6g}: taking the smallest reachable plan")
                search = replace(search, targets={**search.targets, e.resource: e.minimum * (1 + 1e-9)})
        checks: list[dict[str, float]] = []
        measured = None
        if final and self.verify_rounds >= 0 and "latency" in search.targets:
            def solve_at(ms: float) -> tuple[Plan, Solution]:
                return search.solve(scores, budget_ms=ms, current=current)

            plan, sol, checks = solve_within_measured_budget(
                self.space, self.lm, self.settings, solve_at, search.targets["latency"], self.dense["latency"],
                rounds=0 if "latency" in unreachable else self.verify_rounds, log=self.log)
            kept = next(c for c in checks if c["kept"])
            measured = {"ms": kept["measured_ms"], "dense_ms": kept["measured_dense_ms"]}
        elif final and self.verify_rounds >= 0:
            m = measure_models({"dense": slim(self.space, Plan()), "pruned": slim(self.space, plan)}, self.space,
                               self.settings)
            measured = {"ms": m["pruned"].ms, "dense_ms": m["dense"].ms}
        sizes, removed = plan.sizes(self.space), set(plan.removed)
        info = {"budget_ms": asked.get("latency"), "targets": search.targets,
                "predicted_ms": self.lm.predict(sizes, removed),
                "params": self.space.count_params(sizes, removed), "macs": self.space.count_macs(sizes, removed),
                "status": sol.status, "objective": sol.objective, "bound": sol.bound, "gap": sol.gap,
                "seconds": sol.seconds, "method": sol.method, "removed": list(plan.removed), "checks": checks,
                "measured": measured, "unreachable": unreachable or None}
        return plan.to_dict(), info

    def _log_step(self, r: Step) -> None:
        budget = f"budget {r['budget_ms']:.3f} ms, " if r.get("budget_ms") is not None else ""
        self.log(f"pruning step {r['step']}: {budget}predicted {r['predicted_ms']:.3f} ms, params {r['params']:,}, "
                 f"MACs {r['macs']:,}, {len(r['removed'])} blocks removed, solver {r['status']} "
                 f"({r['seconds']:.2f} s)")
        if r.get("checks"):
            c = next(c for c in r["checks"] if c.get("kept", 1.0))
            self.log(f"measured {100 * c['fraction']:.1f}% of the dense latency "
                     f"(target {100 * c['target_fraction']:.1f}%) after {len(r['checks'])} measurement(s); "
                     f"solver budget {c['budget_ms']:.3f} ms")

    # ---- one shot ----------------------------------------------------------------------------------------------
    def accumulate(self, batches: Iterable[Any], loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
                   max_batches: int | None = None) -> int:
        """Importance over ``(inputs, targets)`` batches without training: forward and backward in training mode,
        the model's weights and BatchNorm statistics left as they were. Returns the batches used."""
        loss_fn = loss_fn or nn.functional.cross_entropy
        net = self.model
        kept = {k: v.clone() for k, v in net.state_dict().items()}
        was = net.training
        net.train()
        n = 0
        total = max_batches if max_batches is not None else getattr(batches, "__len__", lambda: 0)()
        try:
            with progress_bar(self.progress and self.d.main, total, "importance") as advance:
                for inputs, targets in batches:
                    if max_batches is not None and n >= max_batches:
                        break
                    net.zero_grad(set_to_none=True)
                    loss_fn(net(inputs.to(self.device)), targets.to(self.device)).backward()
                    self.after_backward()
                    n += 1
                    advance(1)
        finally:
            net.zero_grad(set_to_none=True)
            net.load_state_dict(kept)
            net.train(was)
        return n

    # ---- the end -----------------------------------------------------------------------------------------------
    def finish(self, scores: Mapping[str, np.ndarray] | None = None) -> tuple[nn.Module, PruneReport]:
        """The slim model (an ordinary module holding :attr:`model`'s kept weights) and the report.

        Steps the loop did not reach are not taken one by one: the final step is taken at once (one-shot: the
        only step), with the importance accumulated so far (or ``scores``).
        """
        if not self.done:
            if self.steps_taken < self.schedule.steps - 1:
                self.log(f"the loop ended after {self.steps_taken} of {self.schedule.steps} pruning steps: taking "
                         "the final one now")
                self.steps_taken = self.schedule.steps - 1
            self.prune(scores=scores)
        self._acc.close()
        pruned = slim(self.space, self.plan, self.model).to(self.device)
        return pruned, dist.run_on_main(self.report, self.d)

    def report(self) -> PruneReport:
        """The report of the plan held now (rank 0: it holds the latency model)."""
        assert self.lm is not None
        plan, last = self.plan, (self.history[-1] if self.history else {})
        sizes, removed = plan.sizes(self.space), set(plan.removed)
        measured = last.get("measured") or {}
        return PruneReport(
            target_ms=self.targets.get("latency"), predicted_ms=self.lm.predict(sizes, removed),
            dense_ms=self.dense["latency"], measured_ms=measured.get("ms"), measured_dense_ms=measured.get("dense_ms"),
            noise=self.calibration["noise"],
            widths={d.name: (sizes[d.name], d.size) for d in self.space.prunable_dims()},
            removed_blocks=sorted(removed),
            solver={k: last.get(k) for k in ("status", "objective", "bound", "gap", "seconds", "method")},
            params=(self.space.count_params(), self.space.count_params(sizes, removed)),
            macs=(self.space.count_macs(), self.space.count_macs(sizes, removed)),
            latency_model={"mode": self.mode, "scale": self.lm.scale, "constant": self.lm.constant,
                           "blocks": self._options["blocks"], "fingerprint": self.lm.table.fingerprint},
            plan=plan.to_dict(), seconds=dict(self.seconds), checks=list(last.get("checks") or []),
            constraints=[dict(r) for r in self.calibration["table"]], history=list(self.history))

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue (tensors and plain data): give it back as ``Pruner(..., state=)``. The
        masked model's weights and the optimizer's state are the caller's to save."""
        return {"calibration": self.calibration, "plan": self.plan.to_dict(), "iteration": self.iteration,
                "steps_taken": self.steps_taken, "history": self.history, "importance": self._acc.state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._masker.set_plan(Plan.from_dict(state["plan"]))
        self.iteration, self.steps_taken = int(state["iteration"]), int(state["steps_taken"])
        self.history = list(state["history"])
        if "importance" in state:
            self._acc.load_state(state["importance"])


def _refuse_nothing_to_prune(asked: Mapping[str, Budget], targets: Mapping[str, float],
                             dense: Mapping[str, float]) -> None:
    """Refuse constraints that are all at or above the dense model: nothing would be pruned."""
    if any(targets[n] < dense[n] for n in targets):
        return
    what = "; ".join(f"{n} {asked[n]} ({targets[n]:.6g}) is at or above the dense model's "
                     f"{'measured latency, ' if n == 'latency' else ''}{dense[n]:.6g}" for n in targets)
    raise ValueError(f"{what}: nothing would be pruned. Ask for less, e.g. latency=50%")


def _current_group(device: torch.device) -> dist.Dist:
    """The initialised ``torch.distributed`` group (joined with a long-timeout group for waits), else one process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return dist.init(str(device))
    return dist.Dist(device=device)


def _quiet(_: str) -> None:
    pass
