"""A whole pruning run: measure, prune (one-shot or iterative), slim, recalibrate, fine-tune, report.

Runs alone or under ``torchrun`` (DDP): the pruning goes through :class:`~mdprune.train.Pruner` (importance
all-reduced, the plan solved once on rank 0 and broadcast, every rank applying the same masks), and only rank 0
writes the run directory. A checkpoint is written every epoch; ``resume=True`` continues from it with the result
an uninterrupted run would have had. The phases live in :mod:`.phases`, the result in :mod:`.finish`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..latency import Backend
from ..models import load_checkpoint
from ..progress import progress_bar
from ..space import PruningSpace, analyze
from . import distributed as dist
from .config import RunConfig, data_spec, latency_settings, run_data, run_model
from .data import DataError, loader
from .finish import finish
from .loop import evaluate
from .phases import finetune_phase, prune_phase
from .pruner import Pruner, plan_digest
from .result import RunResult, Step
from .rundir import RunDir, seed_everything

__all__ = ["PruneRun", "RunConfig", "plan_digest"]


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

    # ---- setup: the directory, data, model, analysis ---------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.constraints = cfg.constraint_set()  # before anything is built or measured
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
        size = cfg.input_size if cfg.data != "builtin" else None
        self.model = run_model(cfg.model, kwargs, spec, size)  # first: ImageFolder images take the model's size
        self.train_ds, _ = run_data(cfg, self.model, True)
        self.val_ds, _ = run_data(cfg, self.model, False)
        if cfg.checkpoint:
            load_checkpoint(self.model, cfg.checkpoint)
        self.model.to(self.d.device)
        self.example = self.train_ds[0][0].unsqueeze(0).to(self.d.device)
        self.space: PruningSpace = analyze(self.model, self.example, steps=cfg.steps,
                                           ignored_layers=cfg.ignored_layers, unsupported=cfg.unsupported)
        self.train_loader = loader(self.train_ds, cfg.train.batch_size, True, cfg.workers, cfg.seed,
                                   self.d.enabled)
        if len(self.train_loader) == 0:  # training drops the last partial batch
            raise DataError(f"the training set has {len(self.train_ds)} images, fewer than one batch of "
                            f"{cfg.train.batch_size} per process: lower --batch-size or use more data")
        self.val_loader = loader(self.val_ds, 256, False, cfg.workers)
        self.settings = latency_settings(cfg, self.d.device)
        if self.backend is not None:
            self.settings.backend = self.backend

    def make_pruner(self, state: dict[str, Any] | None = None) -> Pruner:
        """The run's pruning step: measures and checks the constraints when starting, restores ``state`` else."""
        cfg = self.cfg
        return Pruner(self.model, self.example, self.constraints, settings=self.settings, schedule=cfg.schedule,
                      importance=cfg.importance, lut=cfg.lut, space=self.space, mode=cfg.mode, blocks=cfg.blocks,
                      min_blocks_kept=cfg.min_blocks_kept, time_limit=cfg.solver_time_limit,
                      verify_rounds=cfg.verify_rounds, distributed=self.d, state=state, log=self.log,
                      progress=self.progress)

    # ---- helpers of the phases ---------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> None:
        """Data order is a function of (seed, epoch): a resumed run sees what an uninterrupted one would."""
        sampler = self.train_loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        else:
            self.train_loader.generator.manual_seed(self.cfg.seed * 100_003 + epoch)

    def bar(self, text: str) -> progress_bar:
        n = len(self.train_loader)
        return progress_bar(self.progress and self.d.main, min(n, self.cfg.train.max_iterations or n), text)

    def announce(self, record: Step) -> None:
        """Every rank says which plan it applied (one atomic write): ranks can be compared in the output."""
        sys.stdout.write(f"rank {self.d.rank}: pruning step {record['step']} plan {record['plan_digest']}\n")
        sys.stdout.flush()

    # ---- the run -----------------------------------------------------------------------------------------------
    def run(self) -> RunResult | None:
        """The whole run; the result on rank 0 (None on the other ranks)."""
        try:
            self.setup()
            state = None
            if self.resuming:
                state = dist.run_on_main(self.dir.load_checkpoint, self.d)  # its error on every rank
                changed = f"; changed settings: {self.dir.changed}" if self.d.main and self.dir.changed else ""
                self.log(f"resuming: phase {state['phase']}, epoch {state['epoch']}{changed}")
            else:
                self.log(f"analysed {self.cfg.model}: {self.space.summary()}")
            self.pruner = self.make_pruner(state["pruner"] if state else None)
            if state is None:
                acc = dist.run_on_main(lambda: evaluate(self.model, self.val_loader, self.d.device), self.d)
                self.log(f"dense accuracy {100 * acc['accuracy']:.2f}%")
                state = {"phase": "prune", "epoch": 0, "dense_accuracy": acc["accuracy"]}
            if state["phase"] == "prune":
                state = prune_phase(self, state)
            state = finetune_phase(self, state)
            return finish(self, state)
        finally:
            dist.shutdown(self.d)
