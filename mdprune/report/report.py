"""Turn a pruning run's result (:class:`~mdprune.train.RunResult`, result.json) into report.md, report.json and
PNG plots."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..train.result import PruneReport, RunResult, as_result
from .data import format_count, format_ms, format_percent, number, pair, removed_block_names, width_rows
from .plots import write_plots

PLOT_TITLES = {"latency": "Latency", "accuracy": "Accuracy", "budget_path": "Budget path",
               "blocks": "Residual blocks", "widths": "Widths per dimension"}


def write_report(result: RunResult | PruneReport | Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.json and PNG plots into out_dir (created if needed); return name -> path.

    ``result``: a run's result, a :class:`~mdprune.PruneReport` (``Pruner.finish``, ``mdprune.prune``), or a
    ``result.json`` as read. Names are ``markdown``, ``json`` and one per plot written (``latency``,
    ``accuracy``, ``budget_path``, ``blocks``, ``widths``); a plot is left out when the result has no data for it.
    """
    result = as_result(result).to_dict()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = write_plots(result, out)
    markdown = render_markdown(result, {name: p.name for name, p in files.items()})
    files["markdown"] = out / "report.md"
    files["markdown"].write_text(markdown)
    files["json"] = out / "report.json"
    record = {**_json_safe(result), "files": {name: p.name for name, p in files.items()}}
    files["json"].write_text(json.dumps(record, indent=1, allow_nan=False))
    return files


def _json_safe(value: Any) -> Any:
    """A copy that strict JSON accepts: NaN/inf become None, tuples lists, unknown objects strings."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return number(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows] + [""]


def _plot(files: dict[str, str], name: str) -> list[str]:
    return [f"![{PLOT_TITLES[name]}]({files[name]})", ""] if name in files else []


def _dense_to_pruned(values: Any) -> str:
    dense, pruned = pair(values)
    if dense is None and pruned is None:
        return "n/a"
    share = f" ({100 * pruned / dense:.1f}% of dense)" if dense and pruned is not None else ""
    return f"{format_count(dense)} -> {format_count(pruned)}{share}"


def _summary(result: dict[str, Any]) -> list[str]:
    target, measured = number(result.get("target_ms")), number(result.get("measured_ms"))
    noise, speedup = number(result.get("measured_noise")), number(result.get("speedup"))
    measured_dense = number(result.get("measured_dense_ms"))
    if speedup is None and measured and measured_dense is not None:
        speedup = measured_dense / measured
    measured_text = format_ms(measured)
    if measured is not None and not result.get("measured_fraction_interval"):
        measured_text += f" ± {100 * noise:.1f}%" if noise is not None else ""
    dense_at_start_ms = number(result.get("dense_ms_calibration"))
    fractions = []
    if measured is not None and measured_dense and target and dense_at_start_ms:
        got, goal = number(result.get("measured_fraction")) or measured / measured_dense, target / dense_at_start_ms
        interval = result.get("measured_fraction_interval")
        between = f", 95% interval {100 * interval[0]:.1f}-{100 * interval[1]:.1f}%" if interval else ""
        measured_text += f" ({100 * got:.1f}% of the dense latency beside it{between}; target {100 * goal:.1f}%)"
        fractions = [f"The budget is held as a fraction of the dense latency measured in the same run, not in "
                     f"absolute milliseconds (those drift between runs on a busy machine): the pruned model measured "
                     f"{100 * got:.1f}% of the dense model timed beside it, for a target of {100 * goal:.1f}%.", ""]
    accuracy = (f"{format_percent(result.get('dense_accuracy'))} -> {format_percent(result.get('pruned_accuracy'))}"
                f" (after slimming) -> {format_percent(result.get('accuracy'))} (final)")
    dense_at_start = format_ms(result.get("dense_ms_calibration"))
    reference = f"budget {result.get('budget') or 'n/a'}; dense {dense_at_start} at start"
    rows = [["Latency target", f"{format_ms(target)} ({reference})"],
            ["Latency predicted", format_ms(result.get("predicted_ms"))],
            ["Latency measured (pruned)", measured_text],
            ["Latency measured (dense, same run)", format_ms(measured_dense)],
            ["Measured speedup", "n/a" if speedup is None else f"{speedup:.2f}x"],
            ["Accuracy: dense -> after slimming -> final", accuracy],
            ["Parameters: dense -> pruned", _dense_to_pruned(result.get("params"))],
            ["MACs: dense -> pruned", _dense_to_pruned(result.get("macs"))]]
    return ["## Summary", ""] + _table(["Figure", "Value"], rows) + fractions


def _solver_steps(history: list[dict[str, Any]]) -> list[str]:
    lines = ["## Pruning steps", ""]
    if not history:
        return lines + ["No solver steps recorded.", ""]
    rows = []
    for i, step in enumerate(history):
        gap, seconds = number(step.get("gap")), number(step.get("seconds"))
        removed = ", ".join(map(str, step.get("removed") or [])) or "-"
        digest = f"`{step['plan_digest']}`" if step.get("plan_digest") else "-"
        rows.append([step.get("step", i), format_ms(step.get("budget_ms")), format_ms(step.get("predicted_ms")),
                     format_count(step.get("params")), format_count(step.get("macs")), step.get("status", "n/a"),
                     "n/a" if gap is None else f"{100 * gap:.2f}%",
                     step.get("method", "n/a"), "n/a" if seconds is None else f"{seconds:.2f}",
                     removed, digest])
    header = ["Step", "Budget", "Predicted", "Params", "MACs", "Status", "Gap", "Method", "Solve time (s)",
              "Removed blocks", "Plan"]
    notes = [f"Step {step.get('step', i)}: its {name} budget {_amount(name, u.get('budget'))} was below the "
             f"smallest {name} reachable from the plan before it, {_amount(name, u.get('smallest'))}; the smallest "
             "reachable plan was taken." for i, step in enumerate(history) for name, u in _unreachable(step)]
    notes = [n for note in notes for n in (note, "")]
    return lines + _table(header, rows) + notes + _budget_checks(history)


def _unreachable(step: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The step's budgets no plan reached from the one before: (resource, {"budget", "smallest"})."""
    u = step.get("unreachable") or {}
    if "budget_ms" in u:  # results written before constraints: latency only
        return [("latency", {"budget": u.get("budget_ms"), "smallest": u.get("smallest_ms")})]
    return [(name, v) for name, v in u.items() if isinstance(v, dict)]


def _amount(name: str, value: Any) -> str:
    return format_ms(value) if name == "latency" else format_count(value)


def _constraints(rows: list[dict[str, Any]]) -> list[str]:
    """The constraint table checked before solving: dense value, smallest reachable, target."""
    if not rows:
        return []

    def share(r: dict[str, Any], key: str) -> str:
        value, dense = number(r.get(key)), number(r.get("dense"))
        return _amount(r.get("name", ""), value) + (f" ({100 * value / dense:.1f}%)" if value and dense else "")

    table = [[r.get("name"), r.get("asked"), _amount(r.get("name", ""), r.get("dense")), share(r, "smallest"),
              share(r, "target"), "yes" if r.get("satisfiable") else "no"] for r in rows]
    return ["## Constraints", "", "Checked before any training: the smallest value any plan reaches (each "
            "constraint on its own) against the target.", ""] + _table(
        ["Constraint", "Asked", "Dense", "Smallest reachable", "Target", "Satisfiable"], table)


def _budget_checks(history: list[dict[str, Any]]) -> list[str]:
    """The final plan measured against its budget, once per solve (see ``mdprune.search.measured``)."""
    checks = [c for step in history for c in step.get("checks") or []]
    if not checks:
        return []
    rows = [[i, format_ms(c.get("budget_ms")), format_ms(c.get("predicted_ms")), format_ms(c.get("measured_ms")),
             format_ms(c.get("measured_dense_ms")), _fraction(c), f"{100 * c['target_fraction']:.1f}%",
             _verdict(c), "yes" if c.get("kept", 1.0) else "-"]
            for i, c in enumerate(checks)]
    header = ["Solve", "Solver budget", "Predicted", "Measured", "Dense (same run)", "Measured / dense [95%]",
              "Target", "Verdict", "Kept"]
    return ["The final plan measured beside the dense model; solved again at a corrected budget only when the "
            "interval of its ratio lies wholly above the target (or wholly well below it). What was compared: "
            "each plan's slim model and the dense model timed alternately in the same run (the trimmed mean of the "
            "per-pair ratios, with its 95% interval), not absolute ms from different runs.", ""] \
        + _table(header, rows)


def _fraction(c: dict[str, Any]) -> str:
    text = f"{100 * c['fraction']:.1f}%"
    if c.get("fraction_low") is not None and c.get("fraction_high") is not None:
        text += f" [{100 * c['fraction_low']:.1f}-{100 * c['fraction_high']:.1f}%]"
    if c.get("rounds"):
        text += f", {int(c['rounds'])} pairs" + ("" if c.get("converged", True) else ", time cap")
    return text


def _verdict(c: dict[str, Any]) -> str:
    if c.get("fraction_low") is None:
        return "-"
    if c["fraction_low"] > c["target_fraction"]:
        return "over (significant)"
    if c["fraction_high"] < c["target_fraction"]:
        return "within"
    return "within noise of target"


def _removed_blocks(result: dict[str, Any]) -> list[str]:
    removed, total = removed_block_names(result), len(result.get("blocks") or {})
    lines = ["## Removed blocks", ""]
    if not removed:
        return lines + [f"None ({total} removable blocks, all kept)." if total else "None.", ""]
    of_total = f" of {total}" if total else ""
    return lines + [f"{len(removed)}{of_total} removable blocks removed:", ""] + [f"- `{b}`" for b in removed] + [""]


def _widths(result: dict[str, Any]) -> list[str]:
    rows = width_rows(result)
    lines = ["## Widths per dimension", ""]
    if not rows:
        return lines + ["No prunable dimensions recorded.", ""]
    table = [[f"`{r.name}`", r.kind, f"`{r.block}`" if r.block else "-",
              "removed with block" if r.removed else f"{r.kept}/{r.size}", f"{100 * r.kept_fraction:.1f}%"]
             for r in rows]
    return lines + _table(["Dimension", "Kind", "Block", "Kept / size", "Kept %"], table)


def _details(result: dict[str, Any]) -> list[str]:
    lines = ["## Latency model and measurement setup", ""]
    model = result.get("latency_model") or {}
    if model:
        lines += ["Prediction = constant + scale x (sum of the op latencies of the plan).", ""]
        units = {"constant": "constant (ms)"}
        lines += _table(["Latency model", "Value"], [[units.get(k, k), _format_value(v)] for k, v in model.items()])
    fingerprint = result.get("fingerprint") or {}
    if fingerprint:
        lines += _table(["Fingerprint", "Value"], [[k, _format_value(v)] for k, v in fingerprint.items()])
    if not model and not fingerprint:
        lines += ["Not recorded.", ""]
    return lines


def _format_value(value: Any) -> str:
    v = number(value)
    return f"{v:.4g}" if isinstance(value, float) and v is not None else str(value)


def _coverage(cov: dict[str, Any] | None, top: int = 10) -> list[str]:
    """What the plan could change, and what was kept whole and why (see ``PruningSpace.coverage``)."""
    if not cov:
        return []
    p, m = cov["params"], cov["macs"]
    lines = ["## Coverage", "",
             f"A plan could change {100 * p['share']:.1f}% of the parameters and {100 * m['share']:.1f}% of the "
             f"MACs ({100 * p['widths_share']:.1f}% and {100 * m['widths_share']:.1f}% through widths, the rest "
             "only by removing blocks).", ""]
    kept = cov.get("kept_whole") or []
    if kept:
        rows = [[k["module"], format_count(k["params"]), "; ".join(k["reasons"])] for k in kept[:top]]
        lines += ["Kept whole (largest first):", ""] + _table(["Module", "Parameters", "Why"], rows)
        if len(kept) > top:
            lines += [f"... and {len(kept) - top} more modules (report.json has them all).", ""]
    return lines


def render_markdown(result: RunResult | PruneReport | Mapping[str, Any],
                    plot_files: dict[str, str] | None = None) -> str:
    """The markdown report; ``plot_files`` maps plot name -> file name relative to the report, for embedding."""
    result = as_result(result).to_dict()
    files = plot_files or {}
    asked = ", ".join(f"{k}={v}" for k, v in (result.get("constraints") or {}).items())
    at = asked or f"budget {result.get('budget') or 'n/a'}"
    title = f"# Pruning report: {result.get('model') or 'unknown model'} at {at}"
    meta = [f"{k}: {result[k]}" for k in ("schedule", "finished") if result.get(k)]
    lines = [title, ""] + ([", ".join(meta), ""] if meta else [])
    lines += _summary(result) + _constraints(result.get("constraint_table") or [])
    lines += _plot(files, "latency") + _plot(files, "accuracy")
    lines += _solver_steps(result.get("history") or []) + _plot(files, "budget_path")
    lines += _removed_blocks(result) + _plot(files, "blocks")
    lines += _widths(result) + _plot(files, "widths")
    lines += _coverage(result.get("coverage"))
    lines += _details(result)
    return "\n".join(lines).rstrip() + "\n"
