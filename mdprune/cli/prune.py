"""``mdprune prune``: a whole run (measure, prune, slim, fine-tune, report), alone or under torchrun."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .common import add_deployment_args, deployment_settings, parse_kv, unsupported

if TYPE_CHECKING:
    from ..train.loop import TrainConfig
    from ..train.run import RunConfig


def add_train_args(p: argparse.ArgumentParser, epochs: int) -> None:
    g = p.add_argument_group("training (fine-tuning, and the masked training of iterative pruning)")
    g.add_argument("--epochs", type=int, default=epochs, help=f"fine-tuning epochs (default {epochs})")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=0.05)
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--warmup-epochs", type=float, default=0.0)
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    g.add_argument("--max-iterations", type=int, default=None, help="cap iterations per epoch (quick runs)")


def train_config(args: argparse.Namespace) -> TrainConfig:
    from ..train.loop import TrainConfig

    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                       weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                       label_smoothing=args.label_smoothing, amp=args.amp, max_iterations=args.max_iterations,
                       seed=args.seed, distill=getattr(args, "distill", 0.0),
                       distill_temperature=getattr(args, "distill_temperature", 4.0))


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="builtin",
                   help="'builtin' (Fashion-MNIST from the Debian package, else scikit-learn digits) or an "
                        "ImageFolder root with train/ and val/ (default builtin)")
    g.add_argument("--input-size", type=int, default=None, help="ImageFolder image size (default: the model's)")
    g.add_argument("--train-limit", type=int, default=None, help="use a fixed random subset of N training images")
    g.add_argument("--val-limit", type=int, default=None, help="use a fixed random subset of N validation images")
    g.add_argument("--workers", type=int, default=0, help="data loader workers")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune", help="prune a model to a latency budget, fine-tune it, measure it, write a report",
        description="A whole run: measure latency tables on this device, prune to the budget (one-shot or "
                    "iterative), slim, recalibrate BatchNorm, fine-tune, measure and report. Runs under "
                    "`torchrun --nproc_per_node N -m mdprune prune ...` for several GPUs (or CPU processes).")
    p.add_argument("model", help="model name (small_resnet18, resnet50, deit_small_patch16_224, pkg.mod:fn)")
    p.add_argument("--model-arg", type=parse_kv, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--checkpoint", default=None, help="trained weights (state_dict file); nothing is downloaded")
    add_data_args(p)
    g = p.add_argument_group("pruning")
    g.add_argument("--constraint", action="append", default=[], metavar="NAME=VALUE",
                   help="a constraint (repeatable): latency=50%% (of the dense latency measured here) or "
                        "latency=12ms, params=60%% or params=5M, macs=2G; default latency=50%%")
    g.add_argument("--budget", default=None, help="latency budget: '50%%' of the dense latency, or ms "
                                                  "(same as --constraint latency=...)")
    g.add_argument("--schedule", choices=["oneshot", "iterative"], default="oneshot")
    g.add_argument("--steps", type=int, default=1, help="iterative: pruning steps K")
    g.add_argument("--every", type=int, default=50, help="iterative: iterations between steps P")
    g.add_argument("--warmup", type=int, default=0, help="iterative: iterations before the first step")
    g.add_argument("--importance-batches", type=int, default=32, help="one-shot: batches for importance")
    g.add_argument("--importance", default=None, metavar="CRITERION",
                   help="importance criterion for every dimension: taylor, fisher, l1, l2 or a registered name "
                        "(default: taylor for channels, fisher for transformer dimensions)")
    g.add_argument("--latency-model", choices=["table", "linear"], default="table",
                   help="MDP's tables, or HALP's linear model (ablation)")
    g.add_argument("--no-blocks", action="store_true", help="channels only: never remove blocks (ablation)")
    g.add_argument("--params-budget", "--params", default=None,
                   help="also cap parameters ('60%%' or a count; same as --constraint params=...)")
    g.add_argument("--macs-budget", "--macs", default=None,
                   help="also cap MACs ('60%%' or a count such as 2G; same as --constraint macs=...)")
    g.add_argument("--min-blocks-kept", type=int, default=0)
    g.add_argument("--step", type=parse_kv, action="append", default=[], metavar="KIND=N",
                   help="pruning step (alignment) per dimension kind or name, e.g. channel=16")
    g.add_argument("--ignore", action="append", default=[], metavar="MODULE", help="module to keep whole")
    g.add_argument("--keep-unsupported", action="store_true",
                   help="keep every module mdprune cannot analyse whole (a warning lists them) instead of stopping")
    g.add_argument("--solver-time-limit", type=float, default=60.0)
    g.add_argument("--verify-rounds", type=int, default=3,
                   help="re-solves at a corrected budget while the final plan's measured latency (its ratio to "
                        "the dense model's, with a 95%% interval) misses the budget significantly (default 3; -1: "
                        "do not measure)")
    add_train_args(p, epochs=1)
    k = p.add_argument_group("distillation from the dense model while fine-tuning")
    k.add_argument("--distill", type=float, default=0.0, metavar="WEIGHT",
                   help="share of the dense model's soft targets in the fine-tuning loss, 0-1 (default 0: labels only)")
    k.add_argument("--distill-temperature", type=float, default=4.0, help="softmax temperature (default 4)")
    lat = p.add_argument_group("latency measurement")
    lat.add_argument("--latency-device", default=None, help="where latency is measured (default: --device)")
    lat.add_argument("--latency-batch", type=int, default=1, help="batch size latency is measured at (default 1)")
    lat.add_argument("--latency-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                     help="precision latency is measured at (half precision: cuda only)")
    lat.add_argument("--threads", type=int, default=1, help="CPU threads while measuring (default 1)")
    lat.add_argument("--backend", choices=["eager", "onnxruntime", "flops"], default="eager",
                     help="runtime measured in; flops: deterministic counts instead of timing (dry runs, tests)")
    lat.add_argument("--grid-points", type=int, default=16, help="grid widths per role, 2-role ops (default 16)")
    lat.add_argument("--grid-points-3d", type=int, default=5, help="grid widths per role, attention (default 5)")
    lat.add_argument("--timing-rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    lat.add_argument("--timing-reps", type=int, default=5, help="timed samples per round (default 5)")
    lat.add_argument("--lut", default=None, help="latency table file or cache directory (default: the cache)")
    add_deployment_args(lat, prefix="latency-")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    p.add_argument("--run-dir", default=None,
                   help="where the run's files go (default runs/<model>-<constraints>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run_config(args: argparse.Namespace) -> RunConfig:
    from ..search import parse_constraints_text
    from ..train.run import RunConfig
    from ..train.schedule import PruneSchedule

    latency = {"batch": args.latency_batch, "threads": args.threads, "backend": args.backend,
               "dtype": args.latency_dtype,
               "grid_points": args.grid_points, "grid_points_3d": args.grid_points_3d,
               "timing": {"rounds": args.timing_rounds, "reps": args.timing_reps}, **deployment_settings(args)}
    if args.latency_device:
        latency["device"] = args.latency_device
    elif args.device != "auto":
        latency["device"] = args.device
    return RunConfig(
        model=args.model, model_kwargs=dict(args.model_arg), checkpoint=args.checkpoint, data=args.data,
        input_size=args.input_size, train_limit=args.train_limit, val_limit=args.val_limit,
        constraints=parse_constraints_text(args.constraint), budget=args.budget, mode=args.latency_model,
        blocks=not args.no_blocks, params_budget=args.params_budget, macs_budget=args.macs_budget,
        min_blocks_kept=args.min_blocks_kept,
        schedule=PruneSchedule(args.schedule, args.steps, args.every, args.warmup, args.importance_batches),
        train=train_config(args), latency=latency, lut=args.lut, steps=dict(args.step),
        ignored_layers=args.ignore, unsupported=unsupported(args), solver_time_limit=args.solver_time_limit,
        verify_rounds=args.verify_rounds, importance=args.importance,
        workers=args.workers,
        device=args.device, seed=args.seed)


def default_run_dir(model: str, constraints: dict[str, str | float]) -> Path:
    """``runs/<model>-<constraints>``, e.g. ``runs/resnet50-latency50pct-macs2G``."""
    text = "-".join(f"{k}{v}".replace("%", "pct").replace(" ", "") for k, v in constraints.items())
    return Path("runs") / f"{model.replace(':', '_').replace('/', '_')}-{text.replace('/', '_')}"


def run(args: argparse.Namespace) -> int:
    from ..train.run import PruneRun

    cfg = run_config(args)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.model, cfg.constraint_set())
    result = PruneRun(cfg, run_dir, resume=args.resume, progress=sys.stderr.isatty()).run()
    if result is not None:
        from ..report import write_report

        files = write_report(result, run_dir / "report")
        print(f"report: {files['markdown']}")
        print(f"model:  {run_dir / 'model.pt'} (load with mdprune.load)")
    return 0
