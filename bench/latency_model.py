"""How well does the latency model predict measured latency on this CPU? (issue: latency tables)

For each case (model, batch): build the latency table from an empty cache (timed), then draw random plans,
slim them, measure every model end to end twice in one interleaved run, and compare predicted against
measured latency for the table model and HALP's linear model. Prints one summary line per case and writes
every figure to bench/results/latency_model.json.

Run it alone on the machine (no tests or builds beside it): ``python bench/latency_model.py``.
Targets: table model median |error| <= 5% and <= 1.5x the noise floor of the same run; resnet50 table build
at default settings <= 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import mdprune
from mdprune.latency import LatencySettings, build, open_table, random_plans, validate

CASES = {
    "resnet50-b1": ("resnet50", 1),
    "resnet50-b8": ("resnet50", 8),
    "deit_small-b1": ("deit_small_patch16_224", 1),
    "deit_small-b8": ("deit_small_patch16_224", 8),
}


def run_case(name: str, model_name: str, batch: int, samples: int, size: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = mdprune.create_model(model_name).eval()
    space = mdprune.analyze(model, torch.randn(1, 3, size, size))
    settings = LatencySettings(batch=batch)
    with tempfile.TemporaryDirectory() as cache:
        table = open_table(settings, cache)
        t0 = time.monotonic()
        report = build(space, table, settings, progress=False, calibrate=False)
        build_s = time.monotonic() - t0
        plans = random_plans(space, samples, seed=seed)
        t0 = time.monotonic()
        v = validate(space, table, settings, plans, progress=False)
        validate_s = time.monotonic() - t0
    s = v.summary()
    ratio = s["table_median_pct"] / max(s["noise_floor_pct"], 1e-9)
    print(f"{name:14s} dense {s['dense_ms']:8.2f} ms | table median {s['table_median_pct']:5.1f}% "
          f"max {s['table_max_pct']:5.1f}% | linear median {s['linear_median_pct']:5.1f}% "
          f"max {s['linear_max_pct']:5.1f}% | noise floor {s['noise_floor_pct']:4.1f}% "
          f"(table/noise {ratio:.2f}) | build {report.measured} pts {build_s:.0f} s, "
          f"{report.rechecked} re-checked", flush=True)
    return {"model": model_name, "batch": batch, "input": size, "summary": s, "table_over_noise": ratio,
            "scale": v.scale, "build_points": report.measured, "build_seconds": build_s,
            "rechecked_points": report.rechecked, "canary_worst_slowdown": report.worst_slowdown,
            "validate_seconds": validate_s, "rows": v.rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "latency_model.json"))
    args = p.parse_args()
    results = {"machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                           "threads": 1}, "samples": args.samples, "cases": {}}
    for name in args.cases:
        model_name, batch = CASES[name]
        results["cases"][name] = run_case(name, model_name, batch, args.samples, args.input_size, args.seed)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
