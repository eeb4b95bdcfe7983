"""A whole pruning run: measure, prune (one-shot or iterative), slim, recalibrate, fine-tune, report.

Runs alone or under ``torchrun`` (DDP): importance is all-reduced, the plan is solved once on rank 0 and
broadcast, every rank applies the same masks, and only rank 0 writes the run directory. A checkpoint is
written every epoch; ``resume=True`` continues from it with the result an uninterrupted run would have had.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..apply import slim
from ..apply.io import save
from ..importance import ImportanceAccumulator
from ..latency import Backend, LatencyModel, measure_models, open_table
from ..models import load_checkpoint
from ..progress import progress_bar
from ..search import (
    calibrated_model,
    check_budget,
    parse_budget,
    smallest_latency,
    solve_plan,
    solve_within_measured_budget,
)
from ..solve import InfeasibleBudget
from ..space import Plan, PruningSpace, analyze
from . import distributed as dist
from .bn import recalibrate_bn
from .config import RunConfig, data_spec, latency_settings, run_data, run_model
from .data import DataError, loader
from .loop import NaNLoss, TrainConfig, evaluate, make_optimizer, make_scheduler, train_epoch
from .masking import Masker
from .rundir import RunDir, seed_everything
from .schedule import budget_path

__all__ = ["PruneRun", "RunConfig", "plan_digest"]


def plan_digest(plan: Plan) -> str:
    return hashlib.sha1(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


class PruneRun:
    """One run of ``mdprune prune``. Call :meth:`run`; artifacts land in ``run_dir``."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = False,
                 backend: Backend | None = None):
        """``backend`` replaces the configured latency backend for every measurement (a deterministic
        :class:`~mdprune.latency.FlopsBackend` in tests, say); the config keeps its name."""
        self.cfg = cfg
        self.backend = backend
        self.d = dist.init(cfg.device)
        self.dir = RunDir(run_dir, writer=self.d.main)
        self.resume = resume
        self.progress = progress

    def log(self, msg: str) -> None:
        if self.d.main:
            self.dir.log(msg)

    # ---- setup -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        check_budget(cfg.budget, "latency")  # before anything is built or measured
        for text, what in ((cfg.params_budget, "parameters"), (cfg.macs_budget, "MACs")):
            if text is not None:
                check_budget(text, what)
        seed_everything(cfg.seed)
        opened = None
        if self.d.main:
            try:
                opened = (self.dir.open(cfg.to_dict(), self.resume), None)
            except Exception as e:  # noqa: BLE001 - every rank must stop, not only rank 0
                opened = (False, e)
        self.resuming, error = dist.broadcast(opened, self.d)
        if error is not None:
            raise error
        kwargs = dict(cfg.model_kwargs)
        spec = data_spec(cfg)
        kwargs.setdefault("num_classes", spec.num_classes)
        self.model = run_model(cfg.model, kwargs, spec)  # first: ImageFolder images take the model's size
        self.train_ds, _ = run_data(cfg, self.model, True)
        self.val_ds, _ = run_data(cfg, self.model, False)
        if cfg.checkpoint:
            load_checkpoint(self.model, cfg.checkpoint)
        self.model.to(self.d.device)
        x = self.train_ds[0][0].unsqueeze(0).to(self.d.device)
        self.space: PruningSpace = analyze(self.model, x, steps=cfg.steps, ignored_layers=cfg.ignored_layers,
                                           unsupported=cfg.unsupported)
        self.train_loader = loader(self.train_ds, cfg.train.batch_size, True, cfg.workers, cfg.seed,
                                   self.d.enabled)
        if len(self.train_loader) == 0:  # training drops the last partial batch
            raise DataError(f"the training set has {len(self.train_ds)} images, fewer than one batch of "
                            f"{cfg.train.batch_size} per process: lower --batch-size or use more data")
        self.val_loader = loader(self.val_ds, 256, False, cfg.workers)
        self.settings = latency_settings(cfg, self.d.device)
        if self.backend is not None:
            self.settings.backend = self.backend

    def _epoch_order(self, epoch: int) -> None:
        """Data order is a function of (seed, epoch): a resumed run sees what an uninterrupted one would."""
        sampler = self.train_loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        else:
            self.train_loader.generator.manual_seed(self.cfg.seed * 100_003 + epoch)

    def _bar(self, text: str) -> progress_bar:
        n = len(self.train_loader)
        return progress_bar(self.progress and self.d.main, min(n, self.cfg.train.max_iterations or n), text)

    # ---- the run -----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        try:
            self.setup()
            state = None
            if self.d.main:
                state = self.dir.load_checkpoint() if self.resuming else self._start()
            state = dist.broadcast(state, self.d)
            if self.resuming:
                changed = f"; changed settings: {self.dir.changed}" if self.d.main and self.dir.changed else ""
                self.log(f"resuming: phase {state['phase']}, epoch {state['epoch']}{changed}")
            self.lm = LatencyModel(self.space, open_table(self.settings, self.cfg.lut), self.cfg.mode,
                                   self.settings.grid_points, self.settings.grid_points_3d)
            self.lm.scale, self.lm.constant = state["latency"]["scale"], state["latency"]["constant"]
            self.state_latency = state["latency"]
            if state["phase"] == "prune":
                state = self._prune_phase(state)
            state = self._finetune_phase(state)
            return self._finish(state)
        finally:
            dist.shutdown(self.d)

    def _start(self) -> dict[str, Any]:
        """Measure the dense model, calibrate the latency model, evaluate the dense model (rank 0)."""
        cfg = self.cfg
        self.log(f"analysed {cfg.model}: {self.space.summary()}")
        table = open_table(self.settings, cfg.lut)
        lm, dense = calibrated_model(self.space, table, self.settings, cfg.mode, True, self.progress)
        target = parse_budget(cfg.budget, dense["ms"])
        if target >= dense["ms"]:
            raise ValueError(f"the budget {cfg.budget} ({target:.3f} ms) is at or above the dense model's measured "
                             f"latency, {dense['ms']:.3f} ms: nothing would be pruned. Ask for less, e.g. --budget 50%")
        self.log(f"dense latency {dense['ms']:.3f} ms (noise {100 * dense['noise']:.1f}%); target {target:.3f} ms")
        floor = smallest_latency(self.space, lm.frozen_at(self.space.dense_sizes()) if cfg.mode == "linear" else lm,
                                 **self._problem_options())
        if target < floor:  # before any training: the final step could never reach it
            raise InfeasibleBudget("latency", target, floor, (
                f"the target is {target:.3f} ms, {100 * target / dense['ms']:.1f}% of the dense {dense['ms']:.3f} ms; "
                f"the smallest reachable latency is {floor:.3f} ms, {100 * floor / dense['ms']:.1f}% of dense: "
                "raise the budget to at least that"))
        acc = evaluate(self.model, self.val_loader, self.d.device)
        self.log(f"dense accuracy {100 * acc['accuracy']:.2f}%")
        budgets = budget_path(dense["ms"], target, cfg.schedule.steps)
        return {"phase": "prune", "epoch": 0, "iteration": 0, "step": 0, "plan": Plan().to_dict(),
                "latency": {"scale": lm.scale, "constant": lm.constant, "dense_ms": dense["ms"],
                            "noise": dense["noise"], "target_ms": target, "budgets": budgets},
                "dense_accuracy": acc["accuracy"], "history": []}

    def _problem_options(self) -> dict[str, Any]:
        """The program's options besides the latency budget: blocks, parameter and MAC budgets, depth."""
        cfg = self.cfg
        params = None if cfg.params_budget is None else parse_budget(cfg.params_budget, self.space.count_params())
        macs = None if cfg.macs_budget is None else parse_budget(cfg.macs_budget, self.space.count_macs())
        return {"blocks": cfg.blocks, "params": params, "macs": macs, "min_blocks_kept": cfg.min_blocks_kept}

    def _solve(self, scores: dict[str, Any], budget: float, current: Plan, final: bool = False
               ) -> tuple[Plan, dict[str, Any]]:
        """Rank 0 solves; every rank gets the same plan. The final step's plan is held to its budget on
        measured latency (see :mod:`mdprune.search.measured`). A step whose budget is below the smallest latency
        reachable from the current plan takes the smallest reachable plan, and says so."""
        cfg = self.cfg
        out = None
        if self.d.main:
            try:
                options = self._problem_options()
                lm = self.lm.frozen_at(current.sizes(self.space)) if cfg.mode == "linear" else self.lm

                def solve_at(ms: float) -> tuple[Plan, Any]:
                    return solve_plan(self.space, scores, lm, ms, current=current, time_limit=cfg.solver_time_limit,
                                      **options)

                unreachable = None
                try:
                    plan, sol = solve_at(budget)
                except InfeasibleBudget as e:
                    if e.resource != "latency":
                        raise
                    unreachable = {"budget_ms": budget, "smallest_ms": e.minimum}
                    self.log(f"the step's budget {budget:.3f} ms is below the smallest latency reachable from the "
                             f"current plan, {e.minimum:.3f} ms: taking the smallest reachable plan")
                    plan, sol = solve_at(e.minimum * (1 + 1e-9))
                checks: list[dict[str, float]] = []
                if final and cfg.verify_rounds >= 0:
                    lat = self.state_latency
                    target = lat["target_ms"] if unreachable is None else unreachable["smallest_ms"] * (1 + 1e-9)
                    plan, sol, checks = solve_within_measured_budget(
                        self.space, self.lm, self.settings, solve_at, target, lat["dense_ms"],
                        rounds=cfg.verify_rounds if unreachable is None else 0, log=self.log)
                info = {"budget_ms": budget, "predicted_ms": self.lm.predict_plan(plan), "status": sol.status,
                        "gap": sol.gap, "seconds": sol.seconds, "method": sol.method, "removed": plan.removed,
                        "checks": checks, "unreachable": unreachable}
                out = (plan.to_dict(), info, None)
            except Exception as e:  # noqa: BLE001 - every rank must stop, not only rank 0
                out = (None, None, e)
        plan_d, info, error = dist.broadcast(out, self.d)
        if error is not None:
            raise error
        return Plan.from_dict(plan_d), info

    def _importance(self, acc: ImportanceAccumulator) -> dict[str, Any]:
        sums = acc.state()
        dist.all_reduce_sum_(sums, self.d)
        acc.load_state(sums)
        return acc.scores()

    def _prune_phase(self, state: dict[str, Any]) -> dict[str, Any]:
        cfg, sched = self.cfg, self.cfg.schedule
        budgets = state["latency"]["budgets"]
        masker = Masker(self.space, self.model)
        if "model" in state:
            masker.model.load_state_dict(state["model"])
        masker.set_plan(Plan.from_dict(state["plan"]))
        net = masker.model.to(self.d.device)
        acc = ImportanceAccumulator(self.space, net)
        if "importance" in state:
            acc.load_state(state["importance"])
        if sched.kind == "oneshot":
            self._oneshot_importance(net, acc)
            plan, info = self._solve(self._importance(acc), budgets[0], Plan(), final=True)
            self._record(state, 0, plan, info)
            return self._to_finetune(state, plan, masker)

        ddp = DDP(net) if self.d.enabled else net
        opt = make_optimizer(net, cfg.train)
        constant = TrainConfig(**{**asdict(cfg.train), "epochs": 10**6})  # flat LR (after warm-up) while pruning
        sch = make_scheduler(opt, constant, max(1, len(self.train_loader)))
        if "optimizer" in state:
            opt.load_state_dict(state["optimizer"])
            sch.load_state_dict(state["scheduler"])
        masker.hold(opt)
        done = False
        while not done:
            epoch = state["epoch"]
            self._epoch_order(epoch)

            def after_backward() -> None:
                acc.step()
                masker.hold_gradients()

            def after_step(i: int) -> bool:
                nonlocal done
                masker.hold(opt)
                it = state["iteration"]
                state["iteration"] += 1
                t = sched.step_at(it)
                if t is None:
                    return False
                plan, info = self._solve(self._importance(acc), budgets[t], masker.plan, final=t == sched.steps - 1)
                masker.set_plan(plan, opt)
                acc.load_state({k: torch.zeros_like(v) for k, v in acc.state().items()})
                self._record(state, t, plan, info)
                done = t == sched.steps - 1
                return done

            with self._bar(f"prune epoch {epoch}") as bar:
                stats = train_epoch(ddp, self.train_loader, opt, sch, cfg.train, self.d.device,
                                    after_backward=after_backward, after_step=after_step, progress=bar)
            self.log(f"prune epoch {epoch}: loss {stats['loss']:.4f}, train accuracy {100 * stats['accuracy']:.2f}%")
            state["epoch"] = epoch + 1
            if not done:
                self.dir.save_checkpoint({**state, "model": net.state_dict(), "optimizer": opt.state_dict(),
                                          "scheduler": sch.state_dict(), "importance": acc.state()})
        return self._to_finetune(state, masker.plan, masker)

    def _oneshot_importance(self, net: nn.Module, acc: ImportanceAccumulator) -> None:
        net.train()
        buffers = {k: v.clone() for k, v in net.state_dict().items()}
        self._epoch_order(0)
        for i, (x, y) in enumerate(self.train_loader):
            if i >= self.cfg.schedule.importance_batches:
                break
            net.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x.to(self.d.device)), y.to(self.d.device)).backward()
            acc.step()
        net.zero_grad(set_to_none=True)
        net.load_state_dict(buffers)

    def _record(self, state: dict[str, Any], t: int, plan: Plan, info: dict[str, Any]) -> None:
        state["plan"] = plan.to_dict()
        state["step"] = t + 1
        state["history"].append({"step": t, "plan_digest": plan_digest(plan), **info})
        sys.stdout.write(f"rank {self.d.rank}: pruning step {t} plan {plan_digest(plan)}\n")  # one atomic write
        sys.stdout.flush()
        self.log(f"pruning step {t}: budget {info['budget_ms']:.3f} ms, predicted {info['predicted_ms']:.3f} ms, "
                 f"{len(plan.removed)} blocks removed, solver {info['status']} ({info['seconds']:.2f} s)")
        if info.get("checks"):
            c = next(c for c in info["checks"] if c.get("kept", 1.0))
            self.log(f"measured {100 * c['fraction']:.1f}% of the dense latency "
                     f"(target {100 * c['target_fraction']:.1f}%) after {len(info['checks'])} measurement(s); "
                     f"solver budget {c['budget_ms']:.3f} ms")

    def _to_finetune(self, state: dict[str, Any], plan: Plan, masker: Masker) -> dict[str, Any]:
        model = slim(self.space, plan, masker.model).to(self.d.device)
        self._epoch_order(10**6)
        n = recalibrate_bn(model, self.train_loader, self.cfg.bn_batches, self.d.device)
        acc = evaluate(model, self.val_loader, self.d.device)
        self.log(f"slimmed; BatchNorm recalibrated on {n} batches; accuracy before fine-tuning "
                 f"{100 * acc['accuracy']:.2f}%")
        state = {k: v for k, v in state.items() if k not in ("model", "optimizer", "scheduler", "importance")}
        state.update({"phase": "finetune", "epoch": 0, "model": model.state_dict(), "pruned_accuracy": acc["accuracy"]})
        self.dir.save_checkpoint(state)
        self.dir.write_json("plan.json", state["plan"])
        return state

    def _finetune_phase(self, state: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        model = slim(self.space, Plan.from_dict(state["plan"])).to(self.d.device)
        model.load_state_dict(state["model"])
        ddp = DDP(model) if self.d.enabled else model
        opt = make_optimizer(model, cfg.train)
        per_epoch = cfg.train.max_iterations or len(self.train_loader)
        sch = make_scheduler(opt, cfg.train, min(per_epoch, len(self.train_loader)))  # cosine over fine-tuning
        if "optimizer" in state:
            opt.load_state_dict(state["optimizer"])
            sch.load_state_dict(state["scheduler"])
        curve = state.setdefault("curve", [])
        for epoch in range(state["epoch"], cfg.train.epochs):
            self._epoch_order(1000 + epoch)
            try:
                with self._bar(f"fine-tune epoch {epoch}") as bar:
                    stats = train_epoch(ddp, self.train_loader, opt, sch, cfg.train, self.d.device, progress=bar)
            except NaNLoss as e:
                raise NaNLoss(f"{e} (fine-tuning epoch {epoch}); the last good checkpoint is kept in "
                              f"{self.dir.checkpoint}: continue from it with the same command and --resume, with "
                              "a lower --lr for instance (training settings may change on resume)") from e
            acc = evaluate(model, self.val_loader, self.d.device) if self.d.main else {"accuracy": float("nan")}
            curve.append({"epoch": epoch, "loss": stats["loss"], "accuracy": acc["accuracy"]})
            self.log(f"fine-tune epoch {epoch}: loss {stats['loss']:.4f}, accuracy {100 * acc['accuracy']:.2f}%")
            state.update({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sch.state_dict()})
            self.dir.save_checkpoint(state)
        state["model"] = model.state_dict()
        self.final_model = model
        return state

    def _finish(self, state: dict[str, Any]) -> dict[str, Any]:
        model = self.final_model
        if not self.d.main:
            return {}
        plan = Plan.from_dict(state["plan"])
        acc = evaluate(model, self.val_loader, self.d.device)
        m = measure_models({"dense": slim(self.space, Plan()), "pruned": model}, self.space, self.settings)
        sizes, removed = plan.sizes(self.space), set(plan.removed)
        lat = state["latency"]
        result = {
            "model": self.cfg.model, "budget": self.cfg.budget, "schedule": self.cfg.schedule.kind,
            "target_ms": lat["target_ms"], "predicted_ms": self.lm.predict(sizes, removed),
            "dense_ms_calibration": lat["dense_ms"], "measured_dense_ms": m["dense"].ms,
            "measured_ms": m["pruned"].ms, "measured_noise": max(m["dense"].noise, m["pruned"].noise),
            "speedup": m["dense"].ms / m["pruned"].ms,
            "dense_accuracy": state["dense_accuracy"], "pruned_accuracy": state.get("pruned_accuracy"),
            "accuracy": acc["accuracy"], "params": [self.space.count_params(), self.space.count_params(sizes, removed)],
            "macs": [self.space.count_macs(), self.space.count_macs(sizes, removed)],
            "widths": {d.name: [sizes[d.name], d.size, d.kind, d.block] for d in self.space.prunable_dims()},
            "blocks": {b.name: b.name not in removed for b in self.space.removable_blocks()},
            "removed_blocks": sorted(removed), "history": state["history"], "curve": state.get("curve", []),
            "coverage": self.space.coverage(),
            "budgets": lat["budgets"], "latency_model": {"mode": self.cfg.mode, "scale": lat["scale"],
                                                        "constant": lat["constant"]},
            "fingerprint": self.settings.fingerprint(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        save(model.cpu(), self.dir.path / "model.pt")
        self.dir.write_json("result.json", result)
        self.log(f"done: {100 * result['accuracy']:.2f}% accuracy (dense {100 * result['dense_accuracy']:.2f}%), "
                 f"{result['measured_ms']:.3f} ms vs dense {result['measured_dense_ms']:.3f} ms measured "
                 f"({result['speedup']:.2f}x), target {result['target_ms']:.3f} ms")
        return result
