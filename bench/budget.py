"""Does a pruned model run at the latency it was asked for? (issue 14: budget adherence)

Prunes two models, a CNN (small_resnet18) and a ViT (small_vit), to 10 latency budgets each (30% to 75% of the
dense model's measured latency) with ``mdprune.prune`` and its measured check, then re-measures every result in
a fresh process, timed alternately with the dense model (:func:`mdprune.latency.measure_models_ratio`: the
measured check's ratio statistic with its 95% interval). Writes each result's ``measured_over_target`` (the re-measured
fraction of the dense latency over the budget's fraction, with its interval) to bench/results/budget.json.

Targets: measured / target in [0.97, 1.03] for every budget on a quiet machine; with one core kept busy by
another process (``--busy``), every result's interval reaching the target, and none below 0.90.

Run it alone on the machine: ``python bench/budget.py`` (``--busy`` to load one core meanwhile; ``--quick`` for a
smoke run: 2 budgets, small tables, short time caps; ``--backend flops`` to run without a clock). ``--spread 0.35 0.5``
instead re-measures the kept plans at those budgets several times, in the pruning process and in fresh ones, to
tell a process effect from the spread between measurements (bench/results/budget-spread.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import mdprune
from mdprune.importance import estimate
from mdprune.latency import LatencySettings, RatioSettings, TimingSettings, measure_models_ratio

RESULTS = Path(__file__).parent / "results"
LUT = Path.home() / ".cache" / "mdprune" / "bench-budget"
MODELS = {"small_resnet18": (1, 1, 28, 28), "small_vit": (1, 1, 28, 28)}  # name -> example input shape
BUDGETS = [0.30, 0.35, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def settings_of(spec: dict[str, Any]) -> LatencySettings:
    timing = TimingSettings(**spec.get("timing", {}))
    return LatencySettings(device=spec["device"], batch=spec["batch"], threads=spec["threads"], dtype=spec["dtype"],
                           backend=spec["backend"], grid_points=spec["grid_points"], timing=timing)


def model_and_space(name: str, shape: tuple[int, ...]) -> tuple[torch.nn.Module, torch.Tensor, mdprune.PruningSpace]:
    """The model (weights seeded: latency does not depend on them) and its pruning space."""
    torch.manual_seed(0)
    model = mdprune.create_model(name, num_classes=10).eval()
    x = torch.randn(shape)
    return model, x, mdprune.analyze(model, x)


def scores_of(model: torch.nn.Module, space: mdprune.PruningSpace, shape: tuple[int, ...]) -> dict:
    """Importance from a few random batches: this benchmark is about latency, not accuracy."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, *shape[1:], generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(4)]
    return estimate(space, model, batches)


def remeasure(spec: dict[str, Any]) -> dict[str, Any]:
    """In this (fresh) process: the pruned model's latency over the dense model's, timed alternately."""
    _, _, space = model_and_space(spec["model"], tuple(spec["shape"]))
    settings = settings_of(spec["settings"])
    pruned = mdprune.slim(space, mdprune.Plan.from_dict(spec["plan"]))
    dense = mdprune.slim(space, mdprune.Plan())
    r = measure_models_ratio(pruned, dense, space, settings, RatioSettings(**spec["ratio"]))
    return r.to_dict()


def remeasure_in_fresh_process(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        out = subprocess.run([sys.executable, __file__, "--remeasure", f.name], capture_output=True, text=True,
                             check=True)
    finally:
        os.unlink(f.name)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_model(name: str, shape: tuple[int, ...], budgets: list[float], spec: dict[str, Any], ratio: dict[str, Any],
              lut: Path) -> list[dict[str, Any]]:
    model, x, space = model_and_space(name, shape)
    scores = scores_of(model, space, shape)
    settings = settings_of(spec)
    rows = []
    for b in budgets:
        t = time.monotonic()
        said: list[str] = []
        _, report = mdprune.prune(model, x, f"{100 * b:g}%", scores=scores, lut=lut, settings=settings, space=space,
                                  log=said.append)
        kept = next(c for c in report.checks if c["kept"])
        again = remeasure_in_fresh_process({"model": name, "shape": list(shape), "plan": report.plan,
                                            "settings": spec, "ratio": ratio})
        row = {"model": name, "budget": b, "target_fraction": kept["target_fraction"],
               "measured_over_target": again["ratio"] / b, "measured_over_target_low": again["low"] / b,
               "measured_over_target_high": again["high"] / b, "remeasured": again,
               "check": {k: kept[k] for k in ("fraction", "fraction_low", "fraction_high", "rounds", "converged",
                                              "budget_ms", "predicted_ms")},
               "solves": len(report.checks), "corrections": [c["correction"] for c in report.checks],
               "plan": report.plan,
               "seconds": time.monotonic() - t}
        rows.append(row)
        log(f"{name} at {100 * b:.0f}%: re-measured {100 * again['ratio']:.1f}% of dense "
            f"[{100 * again['low']:.1f}, {100 * again['high']:.1f}] ({again['rounds']} pairs"
            f"{'' if again['converged'] else ', time cap'}): measured / target {row['measured_over_target']:.3f} "
            f"[{row['measured_over_target_low']:.3f}, {row['measured_over_target_high']:.3f}]; "
            f"{len(report.checks)} solve(s)")
    return rows


def spread(name: str, shape: tuple[int, ...], budgets: list[float], spec: dict[str, Any], ratio: dict[str, Any],
           lut: Path, repeats: int) -> list[dict[str, Any]]:
    """Is a re-measurement's miss a property of the process or of the time it ran? Each budget's kept plan is
    measured ``repeats`` times in the pruning process and ``repeats`` times in fresh processes, alternately."""
    model, x, space = model_and_space(name, shape)
    scores = scores_of(model, space, shape)
    settings = settings_of(spec)
    rows = []
    for b in budgets:
        _, report = mdprune.prune(model, x, f"{100 * b:g}%", scores=scores, lut=lut, settings=settings, space=space)
        kept = next(c for c in report.checks if c["kept"])
        job = {"model": name, "shape": list(shape), "plan": report.plan, "settings": spec, "ratio": ratio}
        here, fresh = [], []
        for _ in range(repeats):
            here.append(remeasure(job)["ratio"])
            fresh.append(remeasure_in_fresh_process(job)["ratio"])
        both = here + fresh
        mean = sum(both) / len(both)
        sd = (sum((v - mean) ** 2 for v in both) / (len(both) - 1)) ** 0.5
        rows.append({"model": name, "budget": b, "check": kept["fraction"], "check_low": kept["fraction_low"],
                     "check_high": kept["fraction_high"], "in_process": here, "fresh_process": fresh,
                     "mean": mean, "sd_relative": sd / mean, "check_over_mean": kept["fraction"] / mean})
        def pct(vs: list[float]) -> str:
            return ", ".join(f"{100 * v:.1f}" for v in vs)
        log(f"{name} at {100 * b:.0f}%: check {100 * kept['fraction']:.1f}%; again in this process {pct(here)}%; "
            f"in fresh processes {pct(fresh)}% (sd {100 * sd / mean:.1f}% of the mean)")
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        mot = [r["measured_over_target"] for r in mine]
        out[name] = {
            "min": min(mot), "max": max(mot),
            "in_0.97_1.03": sum(0.97 <= m <= 1.03 for m in mot), "results": len(mine),
            "target_in_interval": sum(r["measured_over_target_low"] <= 1 <= r["measured_over_target_high"]
                                      for r in mine),
            "below_0.90": sum(m < 0.90 for m in mot),
        }
    return out


def busy_core() -> subprocess.Popen:
    """Another process keeping one core busy (the loaded-machine scenario)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 budgets, small tables, short time caps")
    ap.add_argument("--backend", default="eager", help="eager (default), onnxruntime or flops (no clock)")
    ap.add_argument("--busy", action="store_true", help="keep one core busy with another process meanwhile")
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--lut", type=Path, default=LUT)
    ap.add_argument("--out", type=Path, help="default: bench/results/budget.json (budget-busy.json with --busy)")
    ap.add_argument("--spread", nargs="*", type=float, metavar="BUDGET",
                    help="instead: re-measure the kept plans at these budgets (fractions) repeatedly, in this process "
                         "and in fresh ones, to bench/results/budget-spread.json")
    ap.add_argument("--repeats", type=int, default=4, help="with --spread: measurements per process kind")
    ap.add_argument("--remeasure", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out = args.out or RESULTS / ("budget-busy.json" if args.busy else "budget.json")
    if args.remeasure is not None:
        print(json.dumps(remeasure(json.loads(args.remeasure.read_text()))))
        return
    budgets = [0.5, 0.7] if args.quick else BUDGETS
    spec = {"device": "cpu", "batch": 1, "threads": 1, "dtype": "float32", "backend": args.backend,
            "grid_points": 4 if args.quick else 16}
    ratio = {"tolerance": 0.02, "time_cap": 5.0 if args.quick else 30.0, "statistic": RatioSettings().statistic}
    if args.spread:
        out = [r for name in args.models
               for r in spread(name, MODELS[name], args.spread, spec, ratio, args.lut, args.repeats)]
        path = args.out.with_name("budget-spread.json")
        path.write_text(json.dumps({"meta": {"settings": spec, "remeasure": ratio, "loadavg": os.getloadavg()},
                                    "results": out}, indent=1))
        log(f"wrote {path}")
        return
    busy = busy_core() if args.busy else None
    t0 = time.monotonic()
    rows: list[dict[str, Any]] = []
    try:
        for name in args.models:
            rows += run_model(name, MODELS[name], budgets, spec, ratio, args.lut)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    result = {"meta": {"quick": args.quick, "busy": args.busy, "settings": spec, "remeasure": ratio,
                       "loadavg": os.getloadavg(), "torch": torch.__version__, "cpus": os.cpu_count(),
                       "seconds": time.monotonic() - t0},
              "summary": summary(rows), "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name, s in result["summary"].items():
        log(f"{name}: measured / target {s['min']:.3f}-{s['max']:.3f}; {s['in_0.97_1.03']}/{s['results']} in "
            f"[0.97, 1.03]; target within the interval in {s['target_in_interval']}/{s['results']}; "
            f"{s['below_0.90']} below 0.90")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
