"""``mdprune lut build | show | validate``: latency lookup tables on this device."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import add_deployment_args, add_model_args, build_model_and_space, deployment_settings, human

if TYPE_CHECKING:
    from torch import nn

    from ..latency import LatencySettings
    from ..space import PruningSpace


def add_latency_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("latency measurement")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    g.add_argument("--threads", type=int, default=1, help="CPU threads while measuring (default 1)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    g.add_argument("--backend", default="eager", choices=["eager", "onnxruntime", "flops"],
                   help="runtime measured in; flops: deterministic counts instead of timing (dry runs, tests)")
    g.add_argument("--cache", default=None, metavar="DIR",
                   help="table cache (default $MDPRUNE_CACHE/lut, else ~/.cache/mdprune/lut)")
    g.add_argument("--grid-points", type=int, default=16, help="grid widths per role, 2-role ops (default 16)")
    g.add_argument("--grid-points-3d", type=int, default=5, help="grid widths per role, attention (default 5)")
    g.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    g.add_argument("--reps", type=int, default=5, help="timed samples per round (default 5)")
    add_deployment_args(p.add_argument_group("deployment (how the measured model runs)"))


def settings_from(args: argparse.Namespace) -> LatencySettings:
    from ..latency import LatencySettings, TimingSettings

    if args.dtype != "float32" and not args.device.startswith("cuda"):
        raise ValueError("float16/bfloat16 latency tables are for cuda devices")
    return LatencySettings(device=args.device, batch=args.batch, threads=args.threads, dtype=args.dtype,
                           backend=args.backend, grid_points=args.grid_points, grid_points_3d=args.grid_points_3d,
                           timing=TimingSettings(rounds=args.rounds, reps=args.reps), **deployment_settings(args))


def analysed(args: argparse.Namespace) -> tuple[nn.Module, PruningSpace]:
    """The model and its space, analysed at batch 1 whatever the latency batch: op signatures do not depend
    on the batch (the table's batch is in its fingerprint), so `prune` finds what `lut build` measured, and a
    large --batch costs no analysis time."""
    return build_model_and_space(argparse.Namespace(**{**vars(args), "batch": 1}))


def add_parser(sub: argparse._SubParsersAction) -> None:
    for name in ("lut", "latency"):
        hidden = name == "latency"
        p = sub.add_parser(name, help="same as lut" if hidden else "latency lookup tables: build, show, validate",
                           description="Latency lookup tables measured on this device.")
        lsub = p.add_subparsers(dest="lut_command", required=True, metavar="ACTION")

        b = lsub.add_parser("build", help="measure the ops of a model (resumable; cached per device)")
        add_model_args(b)
        add_latency_args(b)
        b.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                       help="stop after about this long; run again to continue")
        b.set_defaults(func=run_build)

        s = lsub.add_parser("show", help="list cached tables, or describe one")
        s.add_argument("path", nargs="?", default=None, help="a table file (default: list the cache)")
        s.add_argument("--cache", default=None, metavar="DIR")
        s.set_defaults(func=run_show)

        v = lsub.add_parser("validate", help="predicted against measured latency of random slim models")
        add_model_args(v)
        add_latency_args(v)
        v.add_argument("--samples", type=int, default=10, help="random plans (default 10)")
        v.add_argument("--seed", type=int, default=0)
        v.add_argument("--block-prob", type=float, default=0.2, help="chance a block is removed (default 0.2)")
        v.add_argument("--json", default=None, metavar="PATH", help="write every figure as JSON")
        v.add_argument("--task", choices=["classification", "detection"], default="classification",
                       help="detection: MODEL is a torchvision detector, measured end to end (transform, "
                            "backbone, neck, heads, post-processing) at --input-size (default 320)")
        v.set_defaults(func=run_validate)


def run_build(args: argparse.Namespace) -> int:
    from ..latency import build, latency_model, open_table

    _, space = analysed(args)
    settings = settings_from(args)
    table = open_table(settings, args.cache)
    report = build(space, table, settings, time_budget=args.time_budget, progress=sys.stderr.isatty())
    print(f"measured {report.measured} points, {report.skipped} already cached, {report.remaining} left, "
          f"{report.rechecked} suspect points measured again ({report.seconds:.0f} s) -> {report.path}")
    if report.worst_slowdown > 0.25:
        print(f"note: the machine was busy during the build (a reference op ran up to "
              f"{100 * report.worst_slowdown:.0f}% slower than its best); points measured then were re-checked")
    if report.remaining:
        print("time budget reached: run the same command again to continue")
        return 0
    lm = latency_model(space, table, settings)
    print(f"dense model: {lm.predict(space.dense_sizes()):.3f} ms measured end to end; ops sum "
          f"{lm.ops_ms(space.dense_sizes()):.3f} ms")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from ..latency import LatencyTable, default_cache_dir

    if args.path:
        t = LatencyTable.load(args.path)
        print(json.dumps(t.fingerprint, indent=1))
        for sig, e in t.ops.items():
            print(f"{len(e['points']):5d} points  {sig}")
        for k, m in t.models.items():
            print(f"dense {k}: {m['ms']:.3f} ms")
        return 0
    cache = Path(args.cache) if args.cache else default_cache_dir()
    files = sorted(cache.glob("lut-*.json"))
    if not files:
        print(f"no tables in {cache}")
    for f in files:
        try:
            t = LatencyTable.load(f)
        except ValueError as e:
            print(f"{f.name}: BAD: {e}")
            continue
        fp = t.fingerprint
        print(f"{f.name}: {fp['device']} {fp.get('gpu') or fp['processor']}, batch {fp['batch']}, "
              f"threads {fp.get('threads')}, {fp['dtype']}, {fp['backend']}; {len(t.ops)} op signatures, "
              f"{len(t)} points, {len(t.models)} calibrated models")
    return 0


def _validate_detector(args: argparse.Namespace, settings: LatencySettings) -> Any:
    """``lut validate --task detection``: random slim detectors measured end to end (the fixed cost of the
    transform and post-processing included) against the calibrated model's predictions."""
    import torch

    from ..detection import analyze_detector, create_detector, validate_detector
    from ..latency import open_table, random_plans
    from ..models import load_checkpoint

    size = args.input_size or 320
    det = create_detector(args.model, num_classes=args.num_classes or 91, image_size=size, **dict(args.model_arg))
    if args.checkpoint:
        load_checkpoint(det, args.checkpoint)
    space = analyze_detector(det.eval(), torch.zeros(1, 3, size, size), ignored_layers=args.ignore)
    plans = random_plans(space, args.samples, args.seed, args.block_prob)
    v = validate_detector(det, space, open_table(settings, args.cache), settings, plans,
                          progress=sys.stderr.isatty())
    print(f"fixed cost (transform, anchors, decoding, NMS and what the tables do not see): {v.fixed_ms:.3f} ms")
    return v


def run_validate(args: argparse.Namespace) -> int:
    from ..latency import build, open_table, random_plans, validate

    settings = settings_from(args)
    if args.task == "detection":
        v = _validate_detector(args, settings)
    else:
        _, space = analysed(args)
        table = open_table(settings, args.cache)
        build(space, table, settings, progress=sys.stderr.isatty(), calibrate=False)
        plans = random_plans(space, args.samples, args.seed, args.block_prob)
        v = validate(space, table, settings, plans, progress=sys.stderr.isatty())
    print(f"{'plan':>4} {'blocks':>6} {'params':>8} {'measured':>9} {'table':>9} {'err%':>6} {'linear':>9} "
          f"{'err%':>6}")
    for r in v.rows:
        et = 100 * (r["table"] - r["measured"]) / r["measured"]
        el = 100 * (r["linear"] - r["measured"]) / r["measured"]
        print(f"{r['plan']:>4} {r['removed_blocks']:>6} {human(r['params']):>8} {r['measured']:9.3f} "
              f"{r['table']:9.3f} {et:+6.1f} {r['linear']:9.3f} {el:+6.1f}")
    s = v.summary()
    print(f"dense {s['dense_ms']:.3f} ms; noise floor (same model twice) {s['noise_floor_pct']:.1f}%")
    print(f"table model:  median |err| {s['table_median_pct']:.1f}%, max {s['table_max_pct']:.1f}%")
    print(f"linear model: median |err| {s['linear_median_pct']:.1f}%, max {s['linear_max_pct']:.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": s, "rows": v.rows, "scale": v.scale}, indent=1))
    return 0
