"""The phases of a run: pruning (one-shot importance, or iterative masked training), then slimming and
BatchNorm recalibration, then fine-tuning. Each takes the run and its state, and returns the next state."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..apply import slim
from ..space import Plan
from .bn import recalibrate_bn
from .distill import Distiller
from .loop import NaNLoss, TrainConfig, evaluate, grad_scaler, make_optimizer, make_scheduler, train_epoch

if TYPE_CHECKING:
    from .run import PruneRun

__all__ = ["finetune_phase", "prune_phase", "to_finetune"]


def _wrap(run: PruneRun, net: nn.Module) -> nn.Module:
    """DDP under torchrun (pinned to this rank's GPU under NCCL), the model itself alone."""
    if not run.d.enabled:
        return net
    return DDP(net, device_ids=[run.d.device.index]) if run.d.backend == "nccl" else DDP(net)


def _optimizer_state(run: PruneRun, opt: Any, sch: Any) -> dict[str, Any]:
    """What a checkpoint keeps of the optimisation: optimizer, LR schedule and, with AMP, the loss scale."""
    out = {"optimizer": opt.state_dict(), "scheduler": sch.state_dict()}
    if run.cfg.train.amp and run.d.device.type == "cuda":
        out["scaler"] = grad_scaler(opt, run.d.device).state_dict()
    return out


def _restore_optimizer(run: PruneRun, state: dict[str, Any], opt: Any, sch: Any) -> None:
    if "optimizer" in state:
        opt.load_state_dict(state["optimizer"])
        sch.load_state_dict(state["scheduler"])
    if "scaler" in state and run.cfg.train.amp and run.d.device.type == "cuda":
        grad_scaler(opt, run.d.device).load_state_dict(state["scaler"])


def _distiller(run: PruneRun) -> Distiller | None:
    """Soft targets of the dense model while fine-tuning (``train.distill`` > 0), else None."""
    t = run.cfg.train
    if t.distill <= 0:
        return None
    teacher = slim(run.space, Plan()).to(run.d.device)  # the dense model, as analysed
    return Distiller(teacher, weight=t.distill, temperature=t.distill_temperature,
                     label_smoothing=t.label_smoothing)


def prune_phase(run: PruneRun, state: dict[str, Any]) -> dict[str, Any]:
    """Prune on the schedule: one-shot (importance over a few batches, one step) or iterative (train the masked
    model, a pruning step every ``every`` iterations); checkpoint after every iterative epoch."""
    cfg, pruner = run.cfg, run.pruner
    net = pruner.model
    if "model" in state:
        net.load_state_dict(state["model"])
    if cfg.schedule.kind == "oneshot":
        run.epoch_order(0)
        pruner.accumulate(run.train_loader, max_batches=cfg.schedule.importance_batches)
        run.announce(pruner.prune())
        return to_finetune(run, state)

    ddp = _wrap(run, net)
    opt = make_optimizer(net, cfg.train)
    constant = TrainConfig(**{**asdict(cfg.train), "epochs": 10**6})  # flat LR (after warm-up) while pruning
    sch = make_scheduler(opt, constant, max(1, len(run.train_loader)))
    _restore_optimizer(run, state, opt, sch)
    pruner.hold(opt)

    def after_step(i: int) -> bool:
        record = pruner.step(opt)
        if record is not None:
            run.announce(record)
        return pruner.done

    while not pruner.done:
        epoch = state["epoch"]
        run.epoch_order(epoch)
        with run.bar(f"prune epoch {epoch}") as bar:
            stats = train_epoch(ddp, run.train_loader, opt, sch, cfg.train, run.d.device,
                                after_backward=pruner.after_backward, after_step=after_step, progress=bar)
        run.log(f"prune epoch {epoch}: loss {stats['loss']:.4f}, train accuracy {100 * stats['accuracy']:.2f}%")
        state["epoch"] = epoch + 1
        if not pruner.done:
            run.dir.save_checkpoint({**state, "pruner": pruner.state_dict(), "model": net.state_dict(),
                                     **_optimizer_state(run, opt, sch)})
    return to_finetune(run, state)


def to_finetune(run: PruneRun, state: dict[str, Any]) -> dict[str, Any]:
    """Slim the pruned model, recalibrate its BatchNorm statistics, evaluate it; checkpoint the fine-tuning start."""
    pruner = run.pruner
    model, _ = pruner.finish()
    run.epoch_order(10**6)
    n = recalibrate_bn(model, run.train_loader, run.cfg.bn_batches, run.d.device)
    acc = evaluate(model, run.val_loader, run.d.device)
    run.log(f"slimmed; BatchNorm recalibrated on {n} batches; accuracy before fine-tuning "
            f"{100 * acc['accuracy']:.2f}%")
    state = {k: v for k, v in state.items() if k not in ("model", "optimizer", "scheduler", "scaler")}
    state.update({"phase": "finetune", "epoch": 0, "model": model.state_dict(), "pruned_accuracy": acc["accuracy"],
                  "pruner": pruner.state_dict()})
    run.dir.save_checkpoint(state)
    run.dir.write_json("plan.json", pruner.plan.to_dict())
    return state


def finetune_phase(run: PruneRun, state: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune the slim model (cosine schedule, distilling the dense model if asked), evaluating and
    checkpointing every epoch."""
    cfg = run.cfg
    model = slim(run.space, run.pruner.plan).to(run.d.device)
    model.load_state_dict(state["model"])
    ddp = _wrap(run, model)
    opt = make_optimizer(model, cfg.train)
    per_epoch = cfg.train.max_iterations or len(run.train_loader)
    sch = make_scheduler(opt, cfg.train, min(per_epoch, len(run.train_loader)))  # cosine over fine-tuning
    _restore_optimizer(run, state, opt, sch)
    distiller = _distiller(run) if cfg.train.epochs > state["epoch"] else None
    curve = state.setdefault("curve", [])
    for epoch in range(state["epoch"], cfg.train.epochs):
        run.epoch_order(1000 + epoch)
        try:
            with run.bar(f"fine-tune epoch {epoch}") as bar:
                stats = train_epoch(ddp, run.train_loader, opt, sch, cfg.train, run.d.device, progress=bar,
                                    loss_fn=distiller)
        except NaNLoss as e:
            raise NaNLoss(f"{e} (fine-tuning epoch {epoch}); the last good checkpoint is kept in "
                          f"{run.dir.checkpoint}: continue from it with the same command and --resume, with "
                          "a lower --lr for instance (training settings may change on resume)") from e
        acc = evaluate(model, run.val_loader, run.d.device) if run.d.main else {"accuracy": float("nan")}
        curve.append({"epoch": epoch, "loss": stats["loss"], "accuracy": acc["accuracy"]})
        run.log(f"fine-tune epoch {epoch}: loss {stats['loss']:.4f}, accuracy {100 * acc['accuracy']:.2f}%")
        state.update({"epoch": epoch + 1, "model": model.state_dict(), **_optimizer_state(run, opt, sch)})
        run.dir.save_checkpoint(state)
    state["model"] = model.state_dict()
    run.final_model = model
    return state
