"""``mdprune demo``: the main job end to end on the built-in data and model, in a few minutes on a CPU.

Trains a small ResNet-18 (width 0.25) on Fashion-MNIST (or reuses the checkpoint an earlier demo trained),
builds the CPU latency table, prunes to half the dense latency, fine-tunes briefly, measures and reports.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train, prune to 50%% latency, fine-tune and report on the built-in data",
                       description=__doc__)
    p.add_argument("--budget", default="50%")
    p.add_argument("--train-limit", type=int, default=20000, help="training images used (default 20000)")
    p.add_argument("--dense-epochs", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--cache", default=None, help="where the trained dense checkpoint is kept")
    p.add_argument("--run-dir", default=None, help="default runs/demo-<time>")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _cache_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    return Path(os.environ.get("MDPRUNE_CACHE") or Path.home() / ".cache" / "mdprune") / "demo"


def train_dense(path: Path, train_limit: int, epochs: int, seed: int) -> None:
    """Train the demo's dense model and save its state_dict."""
    import torch

    from ..models import create_model
    from ..train.data import builtin, loader
    from ..train.loop import TrainConfig, evaluate, make_optimizer, make_scheduler, train_epoch

    torch.manual_seed(seed)
    train_ds, spec = builtin(True, train_limit, seed)
    val_ds, _ = builtin(False, 2000, seed)
    model = create_model("small_resnet18", num_classes=spec.num_classes, in_chans=spec.channels)
    cfg = TrainConfig(epochs=epochs, batch_size=128, lr=0.1, weight_decay=5e-4, warmup_epochs=0.2, seed=seed)
    tl, vl = loader(train_ds, cfg.batch_size, True, seed=seed), loader(val_ds, 256, False)
    opt, device = make_optimizer(model, cfg), torch.device("cpu")
    sch = make_scheduler(opt, cfg, len(tl))
    for epoch in range(epochs):
        t = time.monotonic()
        stats = train_epoch(model, tl, opt, sch, cfg, device)
        acc = evaluate(model, vl, device)
        print(f"dense epoch {epoch}: loss {stats['loss']:.3f}, accuracy {100 * acc['accuracy']:.2f}% "
              f"({time.monotonic() - t:.0f} s)", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)


def run(args: argparse.Namespace) -> int:
    from ..train.data import builtin
    from ..train.loop import TrainConfig
    from ..train.run import PruneRun, RunConfig
    from ..train.schedule import PruneSchedule

    t0 = time.monotonic()
    _, spec = builtin(True, 10)
    ckpt = _cache_dir(args.cache) / f"small_resnet18-{spec.name}-{args.train_limit}-{args.dense_epochs}.pt"
    if ckpt.exists():
        print(f"reusing the dense model trained by an earlier demo: {ckpt}")
    else:
        print(f"training the dense model on {spec.name} ({args.train_limit} images, {args.dense_epochs} epochs)")
        train_dense(ckpt, args.train_limit, args.dense_epochs, args.seed)
    cfg = RunConfig(
        model="small_resnet18", checkpoint=str(ckpt), data="builtin", train_limit=args.train_limit,
        val_limit=2000, constraints={"latency": args.budget}, schedule=PruneSchedule("oneshot", importance_batches=32),
        train=TrainConfig(epochs=args.finetune_epochs, batch_size=128, lr=0.02, warmup_epochs=0.1, seed=args.seed),
        latency={"device": "cpu", "threads": 1}, device="cpu", seed=args.seed)
    run_dir = Path(args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    result = PruneRun(cfg, run_dir, progress=sys.stderr.isatty()).run()
    from ..report import write_report

    files = write_report(result, run_dir / "report")
    print("\n=== mdprune demo ===")
    print(f"data: {spec.name}; model: small_resnet18 (width 0.25); budget {args.budget} of the dense latency")
    low, high = result.measured_fraction_interval or (float("nan"), float("nan"))
    print(f"latency (CPU, 1 thread, batch 1), timed alternately with the dense model: pruned "
          f"{100 * result.measured_fraction:.1f}% of dense (95% interval {100 * low:.1f}-{100 * high:.1f}%) for a "
          f"{args.budget} budget; dense {result.measured_dense_ms:.3f} ms -> pruned {result.measured_ms:.3f} ms "
          f"({result.speedup:.2f}x); predicted {result.predicted_ms:.3f} ms for a target of {result.target_ms:.3f} ms")
    print(f"accuracy: dense {100 * result.dense_accuracy:.2f}% -> pruned + fine-tuned {100 * result.accuracy:.2f}%")
    print(f"params {result.params[0]:,} -> {result.params[1]:,}; blocks removed: "
          f"{', '.join(result.removed_blocks) or 'none'}")
    print(f"report: {files['markdown']}  ({time.monotonic() - t0:.0f} s in all)")
    return 0
