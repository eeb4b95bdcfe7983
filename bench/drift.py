"""How far does a latency ratio wander on this machine, and can an interval measured inside one window see it?

Times one pruned plan and its dense model in alternating pairs for ``--seconds`` (the runners and pairs of
:func:`mdprune.latency.measure_models_ratio`, from :func:`mdprune.latency.ratio.model_pairs`) and keeps every pair
with its time. Then, from that one trace:

- **spread**: the ratio (the statistic of ``--statistic``, by default the measured check's) over consecutive
  windows of 1 to 40 s, and its relative sd between windows. If the host's state only added independent noise
  to each pair, the sd would fall as ``1 / sqrt(window)``; where it stops falling, the ratio itself wanders on
  that time scale.
- **replay**: the trace fed, from a start every 5 s, through :func:`mdprune.latency.measure_ratio` with the
  measured check's settings (tolerance 3%, 10-20 s) and ``bench/budget.py``'s re-measurement settings
  (tolerance 2%, 30 s cap), as if measured then. Each interval is scored on whether it holds the whole trace's
  ratio. A 95% interval that held the ratio only half the time says the measurement cannot tell apart misses of
  the size of the wander; ``allowance_for_90pct`` is the wander sd that intervals would have to add (in
  quadrature, at z = 1.96) to hold it in 90% of the runs.

The plans are the ones ``bench/budget.py`` kept (``plan`` in its JSON). Run it alone: ``python bench/drift.py
--model small_vit --budget 0.35`` (``--busy`` keeps one core busy meanwhile; 4 min by default; ``--save-trace``
keeps the pairs). ``--from-trace NPZ`` analyses a kept trace again, with another ``--statistic``, without timing
anything. Rows are merged into bench/results/drift.json by model, budget, load and statistic.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from budget import RESULTS, busy_core, log, model_and_space, settings_of

import mdprune
from mdprune.latency import RatioSettings, measure_ratio
from mdprune.latency.ratio import STATISTICS, log_ratio, model_pairs

WINDOWS = (1, 2, 5, 10, 20, 40)
REPLAYS = {"check": RatioSettings(tolerance=0.03), "remeasure": RatioSettings(tolerance=0.02, time_cap=30.0)}


def record(name: str, plan: dict[str, Any], spec: dict[str, Any], seconds: float) -> dict[str, np.ndarray]:
    """Every pair of ``seconds`` of alternating timing: its end time (s), the plan's and the dense model's ms."""
    _, _, space = model_and_space(name, (1, 1, 28, 28))
    settings = settings_of(spec)
    pruned, dense = mdprune.slim(space, mdprune.Plan.from_dict(plan)), mdprune.slim(space, mdprune.Plan())
    ts, a, b = [], [], []
    with model_pairs(pruned, dense, space, settings) as pair:
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            x, y = pair(len(ts))
            ts.append(time.monotonic() - t0)
            a.append(x)
            b.append(y)
    return {"ts": np.array(ts), "a": np.array(a), "b": np.array(b)}


def ratio_of(a: np.ndarray, b: np.ndarray, settings: RatioSettings) -> float:
    """The ratio of ``settings``' statistic over the paired times ``a``, ``b`` (ms)."""
    return math.exp(log_ratio(np.log(a), np.log(b), settings))


def spread(trace: dict[str, np.ndarray], settings: RatioSettings) -> list[dict[str, float]]:
    """The window statistic's spread between consecutive windows, per window length."""
    ts, a, b = trace["ts"], trace["a"], trace["b"]
    rows = []
    for w in WINDOWS:
        vals = np.array([ratio_of(a[m], b[m], settings) for s in np.arange(0, ts[-1] - w + 1e-9, w)
                         if (m := (ts >= s) & (ts < s + w)).sum() >= 4])
        if len(vals) >= 2:
            rows.append({"window_s": w, "windows": len(vals), "sd_relative": float(np.std(np.log(vals), ddof=1)),
                         "min": float(vals.min()), "max": float(vals.max())})
    return rows


def from_trace(trace: dict[str, np.ndarray], first: int) -> tuple[Any, Any]:
    """``pair(i)`` and ``clock()`` that play the trace from pair ``first`` on, as if measured then."""
    ts, a, b = trace["ts"], trace["a"], trace["b"]
    at = [first]

    def pair(i: int) -> tuple[float, float]:
        at[0] += 1
        return float(a[at[0] - 1]), float(b[at[0] - 1])

    def clock() -> float:
        return float(ts[min(at[0], len(ts) - 1)] - ts[first])
    return pair, clock


def replay(trace: dict[str, np.ndarray], settings: RatioSettings, step: float = 5.0) -> dict[str, float]:
    """``measure_ratio`` run on the trace from a start every ``step`` seconds: how often its interval holds the
    whole trace's ratio, its median relative width, how often it converged, and the spread of its estimates."""
    ts, a, b = trace["ts"], trace["a"], trace["b"]
    truth = ratio_of(a, b, settings)
    held, widths, converged, estimates, misses = 0, [], 0, [], []
    starts = np.arange(0, ts[-1] - settings.time_cap - 1, step)
    if len(starts) < 2:
        return {"runs": len(starts)}
    for s0 in starts:
        pair, clock = from_trace(trace, int(np.searchsorted(ts, s0)))
        r = measure_ratio(pair, settings, clock=clock)
        held += r.low <= truth <= r.high
        widths.append(r.width)
        converged += r.converged
        estimates.append(math.log(r.ratio))
        misses.append((abs(math.log(r.ratio / truth)), math.log(r.high / r.ratio)))  # (miss, half-width), logs
    n = len(starts)
    return {"runs": n, "holds_trace_ratio": held / n, "median_width": float(np.median(widths)),
            "converged": converged / n, "sd_estimates": float(np.std(estimates, ddof=1)), "trace_ratio": truth,
            "allowance_for_90pct": allowance(misses, 0.9)}


def allowance(misses: list[tuple[float, float]], share: float, z: float = 1.96) -> float:
    """The smallest wander sd ``w`` such that intervals widened to ``sqrt(half**2 + (z * w)**2)`` would have held
    the trace's ratio in ``share`` of the runs: what a check would have to add to its interval on this machine."""
    need = sorted(math.sqrt(max(m * m - h * h, 0.0)) / z for m, h in misses)
    return float(need[min(len(need) - 1, math.ceil(share * len(need)) - 1)])


def timed_trace(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """A new trace of ``args.model``'s plan kept at ``args.budget`` (``--plans``) against its dense model."""
    source = json.loads(args.plans.read_text())
    row = next((r for r in source["results"] if r["model"] == args.model and abs(r["budget"] - args.budget) < 1e-9
                and "plan" in r), None)
    if row is None:
        raise SystemExit(f"{args.plans} has no kept plan for {args.model} at {args.budget}")
    busy = busy_core() if args.busy else None
    try:
        log(f"timing {args.model}'s plan kept at {100 * args.budget:g}% against dense for {args.seconds:g} s"
            + (" with one core busy" if busy else ""))
        return record(args.model, row["plan"], source["meta"]["settings"], args.seconds)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small_vit", choices=["small_resnet18", "small_vit"])
    ap.add_argument("--budget", type=float, default=0.35, help="whose kept plan (a fraction, as in the JSON)")
    ap.add_argument("--plans", type=Path, default=RESULTS / "budget-busy.json", help="a bench/budget.py JSON")
    ap.add_argument("--seconds", type=float, default=240.0)
    ap.add_argument("--busy", action="store_true", help="keep one core busy with another process meanwhile")
    ap.add_argument("--out", type=Path, default=RESULTS / "drift.json")
    ap.add_argument("--save-trace", type=Path, metavar="NPZ", help="also keep every pair (numpy .npz: ts, a, b)")
    ap.add_argument("--from-trace", type=Path, metavar="NPZ",
                    help="analyse this kept trace (of --model, --budget, --busy) instead of timing a new one")
    ap.add_argument("--statistic", choices=sorted(STATISTICS), default=RatioSettings().statistic,
                    help="the ratio statistic analysed (default: the measured check's)")
    args = ap.parse_args()
    if args.from_trace is not None:
        trace = dict(np.load(args.from_trace))
        loadavg = None
    else:
        trace = timed_trace(args)
        loadavg = os.getloadavg()
    if args.save_trace is not None:
        np.savez_compressed(args.save_trace, **trace)
    stat = RatioSettings(statistic=args.statistic)
    replays = {k: replace(s, statistic=args.statistic) for k, s in REPLAYS.items()}
    out = {"model": args.model, "budget": args.budget, "busy": args.busy, "statistic": args.statistic,
           "seconds": float(trace["ts"][-1]), "pairs": len(trace["ts"]), "loadavg": loadavg,
           "trace": str(args.from_trace or args.save_trace or ""),
           "dense_ms_median": float(np.median(trace["b"])), "plan_ms_median": float(np.median(trace["a"])),
           "spread": spread(trace, stat), "replay": {k: replay(trace, s) for k, s in replays.items()}}
    for s in out["spread"]:
        log(f"{s['window_s']:>3} s windows ({s['windows']}): ratio sd {100 * s['sd_relative']:.1f}%, "
            f"{s['min'] / args.budget:.3f}-{s['max'] / args.budget:.3f} of the target")
    for k, r in out["replay"].items():
        if r["runs"] < 2:
            log(f"too short to replay as the {k}")
            continue
        log(f"replayed as the {k} ({r['runs']} runs): the 95% interval held the trace's ratio in "
            f"{100 * r['holds_trace_ratio']:.0f}%, median width {100 * r['median_width']:.1f}%, converged "
            f"{100 * r['converged']:.0f}%, estimates' sd {100 * r['sd_estimates']:.1f}%; to hold it in 90%, a "
            f"wander sd of {100 * r['allowance_for_90pct']:.1f}% would have to be added")
    rows = json.loads(args.out.read_text())["results"] if args.out.exists() else []
    key = (args.model, args.budget, args.busy, args.statistic)
    rows = [r for r in rows if (r["model"], r["budget"], r["busy"], r.get("statistic", "quantile")) != key]
    args.out.write_text(json.dumps({"results": rows + [out]}, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
