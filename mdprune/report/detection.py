"""report.md of a detector pruning run (``mdprune detect prune``): mAP before, after slimming and after
fine-tuning, and the whole-detector latency figures as for classifiers (target, predicted, measured beside the
dense detector, every measured check)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .data import format_count, format_ms
from .report import _budget_checks, _fraction, _json_safe, _table

#: the stages whose mAP a run records, in order
MAP_STAGES = (("dense", "Dense"), ("slim", "After slimming"), ("finetuned", "After fine-tuning"))


def write_detection_report(result: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write report.md and report.json into ``out_dir`` (created if needed); return name -> path.

    ``result``: ``{"model": ..., "budget": ..., "map": {"dense"|"slim"|"finetuned": {"map": ..., "map_50": ...}},
    "prune": DetectionPruneReport.to_dict()}`` (any of the mAP stages may be missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "report.md", "json": out / "report.json"}
    files["markdown"].write_text(render_detection_markdown(result))
    files["json"].write_text(json.dumps(_json_safe(dict(result)), indent=1, allow_nan=False))
    return files


def render_detection_markdown(result: Mapping[str, Any]) -> str:
    """The markdown report of a detector pruning run (see :func:`write_detection_report`)."""
    prune = result.get("prune") or {}
    title = f"# Detection pruning report: {result.get('model') or 'detector'} at {result.get('budget') or 'n/a'}"
    setup = [f"{k}: {result[k]}" for k in ("image_size", "batch", "schedule") if result.get(k) is not None]
    lines = [title, ""] + ([", ".join(setup), ""] if setup else [])
    lines += _accuracy(result.get("map") or {}) + _latency(prune) + _finetuned(result.get("finetuned_latency"))
    lines += _budget_checks([{"checks": prune.get("checks") or []}])
    lines += _steps(prune.get("steps") or []) + _blocks(prune) + _widths(prune.get("widths") or {})
    seconds = prune.get("seconds") or {}
    if seconds:
        lines += ["## Time spent", ""] + _table(["Stage", "Seconds"], [[k, f"{v:.1f}"] for k, v in seconds.items()])
    return "\n".join(lines).rstrip() + "\n"


def _accuracy(maps: Mapping[str, Any]) -> list[str]:
    rows = [[name, f"{m['map']:.4f}", f"{m['map_50']:.4f}"] for key, name in MAP_STAGES
            if (m := maps.get(key)) is not None]
    if not rows:
        return []
    return ["## mAP", "", "COCO-style mAP on the validation data (pycocotools through torchmetrics).", ""] + _table(
        ["Stage", "mAP@[.5:.95]", "mAP@.5"], rows)


def _latency(p: Mapping[str, Any]) -> list[str]:
    if not p:
        return []
    dense = p.get("dense_ms")

    def share(ms: Any) -> str:
        return f"{format_ms(ms)} ({100 * ms / dense:.1f}% of dense)" if ms is not None and dense else format_ms(ms)

    kept = next((c for c in p.get("checks") or [] if c.get("kept", 1.0)), None)
    measured = _fraction(kept) + " of the dense detector, measured in the same run" if kept else "not measured"
    params, macs = p.get("params") or (None, None), p.get("macs") or (None, None)
    rows = [["Target", share(p.get("target_ms"))], ["Predicted", share(p.get("predicted_ms"))],
            ["Measured", measured], ["Dense (latency model's time base)", format_ms(dense)],
            ["Fixed part (transform, anchors, post-processing: not in the tables)", format_ms(p.get("fixed_ms"))],
            ["Parameters", f"{format_count(params[0])} -> {format_count(params[1])}"],
            ["MACs (backbone, neck, heads)", f"{format_count(macs[0])} -> {format_count(macs[1])}"]]
    return ["## Whole-detector latency", "",
            "End to end: image transform, backbone, neck, heads and post-processing, at the run's image size and "
            f"batch, timed on {p.get('timed_on', 'random images')}.", ""] + _table(["", "Value"], rows)


def _finetuned(r: Mapping[str, Any] | None) -> list[str]:
    if not r:
        return []
    return [f"After fine-tuning, with its own detections: {100 * r['fraction']:.1f}% "
            f"[{100 * r['low']:.1f}-{100 * r['high']:.1f}] of the dense detector's latency ({format_ms(r['ms'])} "
            f"against {format_ms(r['dense_ms'])}, timed alternately in one run). Post-processing follows the "
            "detector's confidence: a detector less sure of itself keeps more boxes above the score threshold.", ""]


def _steps(steps: list[Mapping[str, Any]]) -> list[str]:
    if not steps:
        return []
    rows = [[s.get("step"), format_ms(s.get("budget_ms")), format_ms(s.get("predicted_ms")), s.get("removed_blocks"),
             s.get("status")] for s in steps]
    return ["## Iterative steps", ""] + _table(["Step", "Budget", "Predicted", "Blocks removed", "Solver"], rows)


def _blocks(p: Mapping[str, Any]) -> list[str]:
    removed = p.get("removed_blocks") or []
    lines = ["## Removed blocks", ""]
    return lines + ([f"- `{b}`" for b in removed] + [""] if removed else ["None.", ""])


def _widths(widths: Mapping[str, Any]) -> list[str]:
    if not widths:
        return []
    rows = [[f"`{name}`", f"{kept}/{size}", f"{100 * kept / size:.1f}%" if size else "-"]
            for name, (kept, size) in widths.items()]
    return ["## Widths per dimension", ""] + _table(["Dimension", "Kept / size", "Kept %"], rows)
