"""Gather bench/gpu.sh's figures into OUT_DIR/summary.json: per model, the table (points, seconds), the
validation (predicted against measured latency of random plans) and the pruning run (each measured check's
ratio to the dense model with its 95% interval, and the final one)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

MODELS = ("resnet50", "deit_base_patch16_224")


def table_figures(log: Path) -> dict:
    text = log.read_text() if log.exists() else ""
    m = re.search(r"measured (\d+) points, (\d+) already cached, (\d+) left.*?\(([\d.]+) s\) -> (\S+)", text)
    d = re.search(r"dense model: ([\d.]+) ms measured end to end; ops sum ([\d.]+) ms", text)
    out = {}
    if m:
        out.update(points=int(m[1]), cached=int(m[2]), left=int(m[3]), seconds=float(m[4]), file=Path(m[5]).name)
    if d:
        out.update(dense_ms=float(d[1]), ops_sum_ms=float(d[2]))
    return out


def prune_figures(result: Path) -> dict:
    if not result.exists():
        return {}
    r = json.loads(result.read_text())
    checks = [{k: c[k] for k in ("fraction", "fraction_low", "fraction_high", "predicted_ms", "significant", "kept",
                                 "rounds", "seconds") if k in c}
              for h in r.get("history", []) for c in h.get("checks", [])]
    return {k: r.get(k) for k in ("target_ms", "predicted_ms", "measured_dense_ms", "measured_ms", "speedup",
                                  "measured_fraction", "measured_fraction_interval", "fingerprint")} | {
        "checks": checks, "removed_blocks": len(r.get("removed_blocks", []))}


def main(out_dir: str) -> None:
    out = Path(out_dir)
    parts = [json.loads(line) for line in (out / "parts.jsonl").read_text().splitlines() if line.strip()]
    summary: dict = {"parts": parts, "models": {}}
    for model in MODELS:
        validate = out / f"validate_{model}.json"
        summary["models"][model] = {
            "table": table_figures(out / f"lut_build_{model}.log"),
            "validate": json.loads(validate.read_text())["summary"] if validate.exists() else {},
            "prune": prune_figures(out / "runs" / model / "result.json"),
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for model, s in summary["models"].items():
        v, p = s["validate"], s["prune"]
        line = f"{model}: table {s['table'].get('points')} points in {s['table'].get('seconds')} s"
        if v:
            line += (f"; validate: table model median |err| {v['table_median_pct']:.1f}%"
                     f" (max {v['table_max_pct']:.1f}%), linear {v['linear_median_pct']:.1f}%,"
                     f" noise floor {v['noise_floor_pct']:.1f}%")
        if p.get("measured_fraction") is not None:
            lo, hi = p["measured_fraction_interval"]
            line += (f"; pruned to 50%: measured {100 * p['measured_fraction']:.1f}% [{100 * lo:.1f}-{100 * hi:.1f}]"
                     f" of {p['measured_dense_ms']:.2f} ms dense, {len(p['checks'])} check(s)")
        print(line)


if __name__ == "__main__":
    main(sys.argv[1])
