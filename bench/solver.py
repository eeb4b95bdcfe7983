"""How fast does the exact optimiser prove the optimum on network-sized problems? (stage: mdprune.solve)

Synthetic problems at real sizes (mdprune/solve/synthetic.py): ResNet-50 and ResNet-101 (every bottleneck
block removable, 64 choices at most per dim) and ViT-Base (embedding 48 choices, per block heads 12, q/k 32,
v 32, MLP 96, attention and MLP sub-blocks removable), each at several latency budgets (fraction of the dense
latency) and seeds; DeiT-Base with tables laid out as the MDP authors' V100 tables (embedding 48, heads 6,
q/k and v 8, MLP 192 choices; GEMM-staircase latencies, heavy-tailed values, sub-block scores). Extras:
ResNet-50 with a second budget on parameters, and ViT-Base with
min_blocks_kept=20. A cross-check solves small instances by the decomposition and by the monolithic MILP and
compares the optima. Prints one summary line per case and writes every figure to bench/results/solver.json.

Run: ``python bench/solver.py`` (about a minute; ``--full-cross-check`` adds the full-size ResNet-50 solved by
the monolithic MILP too, a minute more). Targets: ResNet-50/101 proven optimal with median <= 0.5 s;
ViT-Base and DeiT-Base proven optimal <= 5 s (DeiT-Base at a 20-25% budget under 2 s).
``--threads`` sets HiGHS's threads (default 1, as ``solve``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from mdprune.solve import (
    compile_problem,
    deit_v100_problem,
    milp_size,
    minimum_usage,
    resnet_problem,
    solve,
    vit_problem,
)

CASES = {
    "resnet50": lambda seed, b: resnet_problem((3, 4, 6, 3), seed, b),
    "resnet101": lambda seed, b: resnet_problem((3, 4, 23, 3), seed, b),
    "vit_base": lambda seed, b: vit_problem(12, seed, b),
    "deit_base_v100": lambda seed, b: deit_v100_problem(seed, b),
}
EXTRAS = {
    "resnet50+params50%": lambda seed, b: resnet_problem((3, 4, 6, 3), seed, b, params_budget=0.5),
    "vit_base+min20blocks": lambda seed, b: vit_problem(12, seed, b, min_blocks_kept=20),
}
SMALL = {  # small enough for the monolithic MILP to prove in seconds
    "resnet-(2,2)x16": lambda seed, b: resnet_problem((2, 2), seed, b, max_choices=16),
    "vit-3blocks": lambda seed, b: vit_problem(3, seed, b, embed=192, heads=4, head_dim=32, mlp=768,
                                               steps=(16, 1, 4, 32)),
    "vit-12blocks-coarse": lambda seed, b: vit_problem(12, seed, b, steps=(64, 1, 8, 256)),
}
FULL = {  # the monolithic MILP needs 10-20 s here: only with --full-cross-check
    "resnet50": CASES["resnet50"],
}


def describe(problem) -> dict:
    cm = compile_problem(problem)
    dense = [r.constant + sum(float(np.max(t.table)) for t in r.terms) for r in problem.resources]
    return {
        "dims": len(problem.dims), "blocks": len(problem.blocks),
        "terms": sum(len(r.terms) for r in problem.resources),
        "choices_max": max(len(d.widths) for d in problem.dims),
        "milp_columns_full": milp_size(cm), "dense": dict(zip([r.name for r in problem.resources], dense, strict=True)),
    }


def run(name: str, build, seed: int, fraction: float, time_limit: float, threads: int = 1) -> dict:
    problem = build(seed, fraction)
    record = {"case": name, "seed": seed, "budget_fraction": fraction, **describe(problem)}
    record["budget"] = {r.name: r.budget for r in problem.resources}
    sol = solve(problem, time_limit=time_limit, threads=threads)
    record.update(status=sol.status, objective=sol.objective, bound=sol.bound, gap=sol.gap, seconds=sol.seconds,
                  method=sol.method, usage=sol.usage, removed=len(sol.removed))
    print(f"{name:22s} budget {fraction:.0%} seed {seed}: {sol.status:10s} gap {sol.gap:.1e} "
          f"{sol.seconds:7.3f} s  {sol.method}  removed {len(sol.removed)}", flush=True)
    return record


def cross_check(name: str, build, seed: int, fraction: float, time_limit: float) -> dict:
    problem = build(seed, 1.0)
    low = minimum_usage(problem, "latency")
    problem.resources[0].budget = low + fraction * (describe(problem)["dense"]["latency"] - low)
    out = {"case": name, "seed": seed, "budget_fraction_above_minimum": fraction, **describe(problem)}
    for method in ("decomposition", "milp"):
        sol = solve(problem, method=method, time_limit=time_limit)
        out[method] = {"status": sol.status, "objective": sol.objective, "seconds": sol.seconds, "gap": sol.gap}
    a, b = out["decomposition"], out["milp"]
    out["agree"] = bool(abs(a["objective"] - b["objective"]) <= 1e-9 * abs(b["objective"]))
    print(f"cross-check {name:19s} seed {seed} at {fraction:.0%}: decomposition {a['status']} {a['seconds']:.3f} s, "
          f"milp {b['status']} {b['seconds']:.3f} s, optima agree: {out['agree']}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.25, 0.3, 0.5, 0.7])
    parser.add_argument("--cases", nargs="+", default=[*CASES, *EXTRAS])
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=1, help="HiGHS threads (solve's default: 1)")
    parser.add_argument("--no-cross-check", action="store_true")
    parser.add_argument("--full-cross-check", action="store_true", help="also the full-size ResNet-50 by the MILP")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "solver.json")
    args = parser.parse_args()
    builders = {**CASES, **EXTRAS}
    started = time.time()
    runs = [run(name, builders[name], seed, b, args.time_limit, args.threads)
            for name in args.cases for b in args.budgets for seed in range(args.seeds)]
    checks = [] if args.no_cross_check else [
        cross_check(name, build, seed, f, args.time_limit)
        for name, build in SMALL.items() for seed in range(2) for f in (0.1, 0.4)
        if not (name == "vit-12blocks-coarse" and (seed, f) != (0, 0.4))
    ]
    if args.full_cross_check:
        checks += [cross_check(name, build, seed, f, 600.0) for name, build in FULL.items() for seed, f in
                   ((0, 0.2), (1, 0.5))]
    summary = {}
    print("\nsummary (proven optimal / runs, median and max seconds):")
    for name in args.cases:
        rows = [r for r in runs if r["case"] == name]
        secs = [r["seconds"] for r in rows]
        summary[name] = {"runs": len(rows), "optimal": sum(r["status"] == "optimal" for r in rows),
                         "median_seconds": statistics.median(secs), "max_seconds": max(secs)}
        s = summary[name]
        print(f"  {name:22s} {s['optimal']}/{s['runs']} optimal, median {s['median_seconds']:.3f} s, "
              f"max {s['max_seconds']:.3f} s")
    if checks:
        print(f"  cross-checks: {sum(c['agree'] for c in checks)}/{len(checks)} optima agree")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "numpy": np.__version__, "highspy": version("highspy"),
            "command": " ".join(["python bench/solver.py", *sys.argv[1:]]), "wall_seconds": time.time() - started,
            "time_limit": args.time_limit, "threads": args.threads}
    args.out.write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs, "cross_checks": checks},
                                   indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
