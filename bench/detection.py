"""At 70, 50 and 30% of a detector's measured latency, does MDP keep more mAP than uniform channel pruning?

On this CPU, offline, with the generated detection set (Fashion-MNIST items, or scikit-learn's digits where the
Debian package is missing, pasted on canvases; mdprune.detection.data.GeneratedDetection, from a seed):
- ssdlite320_mobilenet_v3_large at --image-size (default 128; random init, no download) trained dense once
  (``--redraw``: on fresh canvases every epoch, as the fine-tuning below, so that it cannot learn --train images
  by heart);
- per budget: MDP (channels + blocks, latency-table model, whole-detector end-to-end latency, checked on the
  measured latency) and uniform channel pruning (the same fraction of every prunable dimension, the
  highest-importance channels kept) at the ratio whose *measured* end-to-end latency is nearest MDP's measured
  latency without exceeding it (bisection, each candidate measured against the dense detector in one run, with the
  dense detector's detections as MDP's check times its plans: mdprune.detection.latency.with_dense_detections);
- every latency measurement (MDP's tables' calibration and check, the bisection, the final figures) runs the
  detectors on the first --batch validation images (``--random-timing``: random images, on which a trained
  detector scores far more boxes than on real ones, so post-processing is not timed as deployed);
- both get the same BatchNorm recalibration and fine-tuning recipe (``--ft-seeds N``: N times each, with other
  data orders, for the spread of mAP); mAP@[.5:.95] and mAP@.5 (pycocotools via
  torchmetrics) on the validation draw, and the end-to-end latency of MDP and of uniform each timed alternately
  with the dense detector (a ratio with its interval, as the bisection's steps are), each fine-tuned detector
  with its own detections. Each row's "verdict" compares the mean mAPs: "ahead"/"behind" when the difference is
  over twice its standard error over the seeds, "tie" otherwise.
Targets: MDP's mAP at or above uniform's at every budget; MDP's measured latency within 3% of each budget.
Prints a table and writes bench/results/detection.json.

Run it alone on the machine: ``python bench/detection.py`` (``--smoke`` for a seconds-long dry run on the flops
latency backend, which checks the plumbing only; ``--floor 128 256 320`` for the lowest latency any plan reaches
at those image sizes: the part the tables do not see sets it; with ``--fit``, the floor the calibrated latency
model predicts too).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mdprune import Plan
from mdprune.detection import (
    GeneratedDetection,
    analyze_detector,
    create_detector,
    detection_importance,
    evaluate_map,
    finetune,
    prune_detector,
    recalibrate_bn,
    slim_detector,
)
from mdprune.detection import detection_loader as loader
from mdprune.detection.latency import measure_detector_ratio, timed_detector, timing_images, with_dense_detections
from mdprune.latency import (
    LatencyModel,
    LatencySettings,
    RatioSettings,
    TimingSettings,
    build,
    calibration_plans,
    open_table,
)
from mdprune.search.calibrate import reference_fractions
from mdprune.solve import InfeasibleBudget

RESULTS = Path(__file__).parent / "results"
CACHE = Path.home() / ".cache" / "mdprune" / "bench"  # the trained dense detector, keyed by its recipe


def settings_for(args: argparse.Namespace) -> LatencySettings:
    if args.smoke:
        return LatencySettings(batch=args.batch, backend="flops", grid_points=2, grid_points_3d=2,
                               timing=TimingSettings(warmup=1, reps=1, rounds=1, min_sample_ms=0.0))
    return LatencySettings(batch=args.batch, threads=args.threads)


def uniform_plan(space, ratio: float, scores) -> Plan:  # noqa: ANN001
    """The same fraction of every prunable dimension (rounded to its step), the highest-scored elements kept."""
    sizes = {}
    for d in space.prunable_dims():
        widths = d.widths()
        sizes[d.name] = min(widths, key=lambda w: abs(w - ratio * d.size))
    return Plan.from_sizes(space, sizes, scores)


#: the bisection's measurements and the final ones: each detector timed alternately with the dense one (the
#: measured check's ratio statistic), never absolute ms from separate measurements
SEARCH = RatioSettings(tolerance=0.04, min_seconds=4.0, time_cap=8.0)
FINAL = RatioSettings(tolerance=0.02, time_cap=30.0)


def measured_fraction(dense, other, images, settings, how: RatioSettings = SEARCH):  # noqa: ANN001, ANN201
    """``other``'s end-to-end latency as a fraction of ``dense``'s, timed alternately on ``images`` (None: random
    ones)."""
    size = dense.transform.min_size[0]
    return measure_detector_ratio(other, dense, size, settings, how, images)


def bench_timing_images(args: argparse.Namespace, size: int) -> torch.Tensor | None:
    """What every latency measurement runs the detectors on: the first --batch validation images (None with
    --random-timing: random images, where a trained detector scores far more boxes than on real ones)."""
    if args.random_timing:
        return None
    val = GeneratedDetection(n=args.batch, size=size, classes=args.classes, seed=args.seed + 1, train=False)
    return timing_images(loader(val, args.batch)(), args.batch, size)


def uniform_at(dense, space, scores, fraction: float, settings, iters: int, images) -> tuple[Plan, float, float]:  # noqa: ANN001
    """Bisection on the uniform ratio until its measured fraction of the dense latency matches ``fraction``.

    Returns the candidate measured nearest ``fraction`` without exceeding it (the rule MDP's measured check keeps
    its plan by), or the nearest one when every candidate measured over it.
    """
    lo, hi, seen = 0.05, 1.0, []
    for _ in range(iters):
        mid = (lo + hi) / 2
        plan = uniform_plan(space, mid, scores)
        candidate = with_dense_detections(slim_detector(space, plan, dense), dense)  # as MDP's check times it
        f = measured_fraction(dense, candidate, images, settings).ratio
        seen.append((plan, mid, f))
        if f > fraction:
            hi = mid
        else:
            lo = mid
    under = [c for c in seen if c[2] <= fraction]
    return max(under, key=lambda c: c[2]) if under else min(seen, key=lambda c: abs(c[2] - fraction))


def finetuned_maps(model, train, args, val_batches, teacher) -> tuple[torch.nn.Module, list[dict]]:  # noqa: ANN001
    """``model`` fine-tuned alike once per fine-tuning seed (``--ft-seeds``: the data order and the random state
    differ), each copy's mAP; returns the first seed's model and every seed's mAP."""
    maps, first = [], None
    for k in range(args.ft_seeds):
        torch.manual_seed(args.seed + 1000 * k)
        tuned = model if k == args.ft_seeds - 1 else copy.deepcopy(model)
        data = loader(train, args.batch_size, shuffle=True, seed=args.seed + 1000 * k, redraw=args.redraw)
        finetune(tuned, data, args.ft_epochs, args.lr, max_batches=args.max_batches, teacher=teacher,
                 distill=args.distill)
        maps.append(evaluate_map(tuned, val_batches()))
        if first is None:
            first = tuned
    assert first is not None
    return first, maps


def with_spread(row: dict, name: str, maps: list[dict]) -> None:
    """``row[name + '_map']``: the first fine-tuning seed's mAP; with several seeds, each seed's mAP@[.5:.95],
    their mean and spread too."""
    row[f"{name}_map"] = maps[0]
    values = [m["map"] for m in maps]
    row[f"{name}_map_seeds"] = values
    row[f"{name}_map_mean"] = statistics.fmean(values)
    row[f"{name}_map_std"] = statistics.pstdev(values)


def verdict(row: dict) -> str:
    """MDP against uniform on the mean mAP over the fine-tuning seeds: "ahead" or "behind" when the difference is
    over twice its standard error (sample spreads of both sides), "tie" otherwise or with a single seed."""
    a, b = row["mdp_map_seeds"], row["uniform_map_seeds"]
    diff = row["mdp_map_mean"] - row["uniform_map_mean"]
    if min(len(a), len(b)) < 2:
        return "tie" if diff == 0 else ("ahead" if diff > 0 else "behind") + " (one seed)"
    se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    return "tie" if abs(diff) <= 2 * se else ("ahead" if diff > 0 else "behind")


def dense_cache(args: argparse.Namespace, size: int, source: str) -> Path:
    """Where the trained dense detector of this recipe is kept."""
    fresh = "-redraw" if args.redraw else ""
    return CACHE / (f"{args.model}-{size}px-{source}-{args.train}{fresh}-{args.classes}cls-{args.dense_epochs}ep-"
                    f"{args.max_batches}-seed{args.seed}.pt")


def floor(args: argparse.Namespace) -> dict:
    """How low can a plan take the whole detector, per image size? The smallest plan (every prunable dimension at
    its smallest width, every removable block removed) timed alternately with the dense detector (random
    weights: latency does not depend on them)."""
    torch.set_num_threads(args.threads)
    settings = settings_for(args)
    rows = []
    for size in args.floor:
        torch.manual_seed(args.seed)
        dense = create_detector(args.model, num_classes=args.classes + 1, image_size=size, score_thresh=0.01).eval()
        if args.trained:  # the benchmark's trained detector (its detections set the post-processing's cost)
            source = GeneratedDetection(n=1, size=size, classes=args.classes, seed=args.seed, train=True).source
            dense.load_state_dict(torch.load(dense_cache(args, size, source), weights_only=True))
        space = analyze_detector(dense, torch.randn(1, 3, size, size))
        smallest = with_dense_detections(slim_detector(space, Plan.smallest(space), dense), dense)
        images = bench_timing_images(args, size)
        r = measured_fraction(dense, smallest, images, settings, FINAL)
        rows.append({"image_size": size, "trained": args.trained, "dense_ms": r.b_ms, "smallest_ms": r.a_ms,
                     "floor": r.ratio, "interval": [r.low, r.high]})
        print(f"{size} px: dense {r.b_ms:.2f} ms, smallest plan {r.a_ms:.2f} ms: the floor is {100 * r.ratio:.1f}% "
              f"[{100 * r.low:.1f}-{100 * r.high:.1f}] of dense")
        if args.fit:
            rows[-1] |= floor_fit(dense, space, settings, args.lut or tempfile.mkdtemp(prefix="mdprune-det-lut-"),
                                  images)
    return {"model": args.model, "batch": args.batch, "threads": args.threads, "rows": rows}


def floor_fit(dense: torch.nn.Module, space, settings: LatencySettings, lut: str,  # noqa: ANN001
              images: torch.Tensor | None) -> dict:
    """The floor the calibrated latency model predicts (what the solver takes as the smallest reachable) when
    fitted on the middle references alone and with the smallest plan among them, against the measured floor."""
    table = open_table(settings, lut)
    build(space, table, settings, progress=True, calibrate=False)
    refs = calibration_plans(space, smallest=True)
    fractions = reference_fractions(space, settings, refs, timed=timed_detector(dense, space, images))
    out = {"reference_fractions": fractions}
    for name, k in (("mid_references", len(refs) - 1), ("with_smallest", len(refs))):
        lm = LatencyModel(space, table, "table", settings.grid_points, settings.grid_points_3d)
        lm.calibrate(1.0, list(zip(refs[:k], fractions[:k], strict=True)))
        out[f"predicted_floor_{name}"] = lm.predict_plan(refs[-1])
        out[f"fixed_part_{name}"] = lm.constant
        print(f"  calibrated on {name.replace('_', ' ')}: fixed part {100 * lm.constant:.1f}%, predicted floor "
              f"{100 * lm.predict_plan(refs[-1]):.1f}% (measured {100 * fractions[-1]:.1f}% in the fit's own run)")
    return out


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    size = args.image_size
    train = GeneratedDetection(n=args.train, size=size, classes=args.classes, seed=args.seed, train=True)
    val = GeneratedDetection(n=args.val, size=size, classes=args.classes, seed=args.seed + 1, train=False)
    data = loader(train, args.batch_size, shuffle=True, seed=args.seed, redraw=args.redraw)
    val_batches = loader(val, args.batch_size)
    settings = settings_for(args)
    lut = args.lut or tempfile.mkdtemp(prefix="mdprune-det-lut-")
    t0 = time.monotonic()
    dense = create_detector(args.model, num_classes=train.num_classes, image_size=size, score_thresh=0.01)
    cache = dense_cache(args, size, train.source)
    if cache.exists() and not args.smoke:
        dense.load_state_dict(torch.load(cache, weights_only=True))
        print(f"dense detector from {cache}")
    else:
        finetune(dense, data, args.dense_epochs, args.lr, max_batches=args.max_batches, log=print)
        if not args.smoke:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(dense.state_dict(), cache)
    dense.eval()
    data = loader(train, args.batch_size, shuffle=True, seed=args.seed)  # the same passes, trained or cached
    dense_map = evaluate_map(dense, val_batches())
    print(f"dense ({train.source}, {time.monotonic() - t0:.0f} s): {dense_map}")
    space = analyze_detector(dense, torch.randn(1, 3, size, size))
    scores = detection_importance(space, dense, data(), args.importance_batches)
    images = bench_timing_images(args, size)
    rows = []
    for budget in args.budgets:
        row: dict = {"budget": budget / 100}
        try:
            slim, report = prune_detector(dense, size, f"{budget}%", data=data, settings=settings, lut=lut,
                                          space=space, importance_batches=args.importance_batches, log=print,
                                          timing_images="random" if images is None else images)
        except InfeasibleBudget as e:  # the fixed part (transform, anchors, post-processing) sets a floor
            row["unreachable"] = str(e)
            rows.append(row)
            print(f"{budget}%: unreachable: {e}")
            continue
        row["mdp_map_slim"] = evaluate_map(slim, val_batches())
        slim, maps = finetuned_maps(slim, train, args, val_batches, dense)
        with_spread(row, "mdp", maps)
        fraction = report.measured_ms / report.measured_dense_ms
        plan, ratio, f = uniform_at(dense, space, scores, fraction, settings, args.bisect, images)
        uni = slim_detector(space, plan, dense)
        recalibrate_bn(uni, data(), args.importance_batches)
        row["uniform_ratio"], row["uniform_fraction_bisect"] = ratio, f
        row["uniform_map_slim"] = evaluate_map(uni, val_batches())
        uni, maps = finetuned_maps(uni, train, args, val_batches, dense)
        with_spread(row, "uniform", maps)
        for name, model in (("mdp", slim), ("uniform", uni)):
            r = measured_fraction(dense, model, images, settings, FINAL)
            row[f"{name}_fraction"], row[f"{name}_interval"] = r.ratio, [r.low, r.high]
            row[f"{name}_ms"], row["dense_ms"] = r.a_ms, r.b_ms
        row["mdp_within_3pct"] = abs(row["mdp_fraction"] / row["budget"] - 1) <= 0.03  # over or under
        row["mdp_map_ge_uniform"] = row["mdp_map_mean"] >= row["uniform_map_mean"]
        row["mdp_minus_uniform"], row["verdict"] = row["mdp_map_mean"] - row["uniform_map_mean"], verdict(row)
        row["mdp_check_fraction"] = fraction  # what MDP's measured check saw, before fine-tuning
        row["fixed_ms"], row["predicted_ms"] = report.fixed_ms, report.predicted_ms
        rows.append(row)
        print(f"{budget}%: MDP mAP {row['mdp_map_mean']:.4f} +- {row['mdp_map_std']:.4f} at "
              f"{100 * row['mdp_fraction']:.1f}% | uniform mAP {row['uniform_map_mean']:.4f} +- "
              f"{row['uniform_map_std']:.4f} at {100 * row['uniform_fraction']:.1f}% "
              f"({args.ft_seeds} fine-tuning seeds: {row['verdict']})")
    out = {"model": args.model, "image_size": size, "batch": args.batch, "data": train.source,
           "train": args.train, "redraw": args.redraw, "val": args.val, "ft_seeds": args.ft_seeds,
           "timed_on": "random images" if images is None else f"the first {args.batch} validation images",
           "ft_epochs": args.ft_epochs,
           "distill": args.distill, "dense_map": dense_map, "rows": rows,
           "smoke": args.smoke,
           "seconds": time.monotonic() - t0}
    print(f"{'budget':>6} {'MDP mAP':>8} {'MDP mAP50':>9} {'MDP lat':>8} {'uni mAP':>8} {'uni mAP50':>9} "
          f"{'uni lat':>8}  verdict")
    for r in rows:
        if "unreachable" in r:
            print(f"{100 * r['budget']:5.0f}% unreachable")
            continue
        print(f"{100 * r['budget']:5.0f}% {r['mdp_map_mean']:8.4f} {r['mdp_map']['map_50']:9.4f} "
              f"{100 * r['mdp_fraction']:7.1f}% {r['uniform_map_mean']:8.4f} {r['uniform_map']['map_50']:9.4f} "
              f"{100 * r['uniform_fraction']:7.1f}%  {r['verdict']}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ssdlite320_mobilenet_v3_large")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--train", type=int, default=1024)
    p.add_argument("--val", type=int, default=256)
    p.add_argument("--random-timing", action="store_true",
                   help="time the detectors on random images instead of the first --batch validation images")
    p.add_argument("--redraw", action="store_true",
                   help="fresh training images every epoch (dense training and fine-tuning), --train per epoch")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=1, help="latency batch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dense-epochs", type=int, default=30)
    p.add_argument("--ft-epochs", type=int, default=5)
    p.add_argument("--ft-seeds", type=int, default=1,
                   help="fine-tune each pruned detector this many times (data order, random state) for the spread")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--distill", type=float, default=1.0,
                   help="weight of the dense detector's raw outputs matched while fine-tuning, MDP and uniform "
                        "alike (0: the loss dict only)")
    p.add_argument("--max-batches", type=int, default=None, help="batches per epoch (default: all)")
    p.add_argument("--importance-batches", type=int, default=16)
    p.add_argument("--budgets", type=int, nargs="+", default=[70, 50, 30])
    p.add_argument("--bisect", type=int, default=7, help="bisection steps of the uniform ratio")
    p.add_argument("--lut", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="result file name under bench/results (default: detection.json)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, flops latency: the plumbing only")
    p.add_argument("--floor", type=int, nargs="*", metavar="SIZE",
                   help="instead: the lowest latency any plan reaches, as a fraction of dense, at these image sizes "
                        "(bench/results/detection-floor.json)")
    p.add_argument("--trained", action="store_true",
                   help="with --floor: time the trained dense detector of this recipe (cached by a full run), not a "
                        "random one")
    p.add_argument("--fit", action="store_true",
                   help="with --floor: also build a table and give the floor the calibrated latency model predicts, "
                        "fitted with and without the smallest plan among its references "
                        "(bench/results/detection-floor-fit.json)")
    args = p.parse_args()
    if args.floor:
        RESULTS.mkdir(exist_ok=True)
        name = f"detection-floor{'-trained' if args.trained else ''}{'-fit' if args.fit else ''}.json"
        (RESULTS / name).write_text(json.dumps(floor(args), indent=1))
        return
    if args.smoke:
        args.train, args.val, args.batch_size, args.dense_epochs, args.ft_epochs = 16, 8, 4, 1, 1
        args.max_batches, args.importance_batches, args.bisect, args.budgets = 2, 1, 2, [50]
        args.image_size = min(args.image_size, 96)
    out = run(args)
    RESULTS.mkdir(exist_ok=True)
    name = "detection_smoke.json" if args.smoke else (args.out or "detection.json")
    (RESULTS / name).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
