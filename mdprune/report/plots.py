"""The report's plots, one function per PNG: each takes a run result and a path, and returns the path written
(or None when the result has nothing to plot)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .data import number, removed_block_names, width_rows  # noqa: E402

DPI = 110
KIND_COLOURS = {"channel": "tab:blue", "linear": "tab:orange", "embed": "tab:green", "heads": "tab:red",
                "qk": "tab:purple", "v": "tab:brown", "mlp": "tab:pink"}
OTHER_KIND_COLOUR = "tab:olive"
REMOVED_FACE, REMOVED_EDGE, REMOVED_HATCH = "0.88", "0.5", "///"
KEPT_BLOCK_COLOUR, REMOVED_BLOCK_COLOUR = "tab:green", "tab:red"
NAN = float("nan")


def _save(fig: Figure, path: Path) -> Path:
    try:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _numbers(values: list[Any]) -> list[float]:
    """Numbers with NaN for missing entries, so that lines simply break there."""
    return [NAN if number(v) is None else float(v) for v in values]


def _index(value: Any, default: int) -> int:
    """A step or epoch number, or its position when the entry has none."""
    v = number(value)
    return default if v is None else int(v)


def _widen_single_point(ax: Any, xs: list[float]) -> None:
    """Integer ticks, and a sensible x range even when there is a single step or epoch."""
    if not xs:
        return
    ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    steps = sorted(set(xs))
    if len(steps) <= 20:
        ax.set_xticks(steps)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_widths(result: dict[str, Any], path: Path) -> Path | None:
    """Horizontal bars per dimension in network order: original width light, kept width dark, coloured by kind;
    dimensions inside removed blocks hatched grey."""
    rows = width_rows(result)
    if not rows:
        return None
    n = len(rows)
    font = 9 if n <= 20 else 7 if n <= 60 else 5
    fig, ax = plt.subplots(figsize=(9, max(2.8, 0.2 * n + 1.4)))
    y = list(range(n))
    colours = [KIND_COLOURS.get(r.kind, OTHER_KIND_COLOUR) for r in rows]
    light = [REMOVED_FACE if r.removed else to_rgba(c, 0.25) for r, c in zip(rows, colours, strict=True)]
    originals = ax.barh(y, [r.size for r in rows], height=0.8, color=light)
    for bar, row in zip(originals, rows, strict=True):
        if row.removed:
            bar.set_hatch(REMOVED_HATCH)
            bar.set_edgecolor(REMOVED_EDGE)
            bar.set_linewidth(0.5)
    ax.barh(y, [0 if r.removed else r.kept for r in rows], height=0.8, color=colours)
    largest = max(r.size for r in rows) or 1
    for i, row in enumerate(rows):
        text = "removed" if row.removed else f"{row.kept}/{row.size}"
        ax.text(row.size + 0.01 * largest, i, text, va="center", fontsize=font - 1)
    ax.set_xlim(0, largest * 1.15)
    ax.set_yticks(y, [r.name for r in rows], fontsize=font)
    ax.set_ylim(n - 0.5, -0.5)  # network order from top to bottom
    ax.set_xlabel("width (channels, features or heads, by kind)")
    ax.set_ylabel("prunable dimension (network order)")
    removed = sum(r.removed for r in rows)
    ax.set_title(f"Kept vs original width per dimension ({n} dimensions, {removed} in removed blocks)")
    kinds = list(dict.fromkeys(r.kind for r in rows))
    handles = [Patch(color=KIND_COLOURS.get(k, OTHER_KIND_COLOUR), label=f"kind: {k}") for k in kinds]
    handles += [Patch(color=to_rgba("0.3", 0.25), label="original width (light)"),
                Patch(color="0.3", label="kept width (dark)"),
                Patch(facecolor=REMOVED_FACE, edgecolor=REMOVED_EDGE, hatch=REMOVED_HATCH, label="in removed block")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_blocks(result: dict[str, Any], path: Path) -> Path | None:
    """A strip of cells, one per removable residual block in network order, green if kept, red if removed."""
    removed = set(removed_block_names(result))
    blocks = dict(result.get("blocks") or {}) or {name: False for name in sorted(removed)}
    if not blocks:
        return None
    names = list(blocks)
    kept = [bool(blocks[name]) and name not in removed for name in names]
    n = len(names)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.32 * n + 2.0), 2.4))
    cells = ax.bar(range(n), 1, width=0.92, edgecolor="white",
                   color=[KEPT_BLOCK_COLOUR if k else REMOVED_BLOCK_COLOUR for k in kept])
    for cell, is_kept in zip(cells, kept, strict=True):
        if not is_kept:
            cell.set_hatch("xx")
    ax.set_xticks(range(n), names, rotation=90, fontsize=8 if n <= 40 else 6)
    ax.set_yticks([])
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0, 1)
    ax.set_xlabel("removable residual block (network order)")
    ax.set_title(f"Residual blocks: {sum(kept)} of {n} kept, {n - sum(kept)} removed")
    ax.legend(handles=[Patch(color=KEPT_BLOCK_COLOUR, label="kept"),
                       Patch(facecolor=REMOVED_BLOCK_COLOUR, hatch="xx", edgecolor="white", label="removed")],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


def plot_latency(result: dict[str, Any], path: Path) -> Path | None:
    """Bars in ms: dense (calibration and measured), target, predicted and measured pruned latency; the relative
    measurement noise as error bars on the measured bars."""
    # (label, key, colour, noisy): only the end-of-run measurements share the noise figure; the calibration ran
    # at the start, so it gets no error bar.
    candidates = [("dense\n(calibration)", "dense_ms_calibration", "0.65", False),
                  ("dense\n(measured)", "measured_dense_ms", "0.4", True),
                  ("target", "target_ms", "tab:red", False),
                  ("predicted\n(latency model)", "predicted_ms", "tab:orange", False),
                  ("pruned\n(measured)", "measured_ms", "tab:blue", True)]
    bars = [(label, number(result.get(key)), colour, noisy) for label, key, colour, noisy in candidates]
    bars = [b for b in bars if b[1] is not None]
    if not bars:
        return None
    noise = number(result.get("measured_noise"))
    errors = [noise * value if noise and noisy else 0.0 for _, value, _, noisy in bars]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.bar(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars], width=0.65,
           yerr=errors if any(errors) else None, capsize=5, error_kw={"elinewidth": 1.2})
    top = max(b[1] + e for b, e in zip(bars, errors, strict=True))
    for x, ((_, value, _, _), error) in enumerate(zip(bars, errors, strict=True)):
        ax.text(x, value + error + 0.015 * top, f"{value:.3f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, top * 1.2)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=9)
    ax.set_ylabel("latency (ms)")
    handles = []
    target = number(result.get("target_ms"))
    if target is not None:
        ax.axhline(target, color="tab:red", linestyle="--", linewidth=1)
        handles.append(Line2D([], [], color="tab:red", linestyle="--", label=f"target {target:.3f} ms"))
    if any(errors):
        handles.append(Line2D([], [], color="black", linestyle="none", marker="|", markersize=12,
                              label=f"±{100 * noise:.1f}% measurement noise"))
    if handles:
        ax.legend(handles=handles, loc="best", fontsize=8)
    speedup = number(result.get("speedup"))
    ax.set_title("Latency" + (f" (measured speedup {speedup:.2f}x)" if speedup else ""))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_budget_path(result: dict[str, Any], path: Path) -> Path | None:
    """The latency budget of each pruning step and the predicted latency of the plan each step chose."""
    history = result.get("history") or []
    budgets = result.get("budgets") or [h.get("budget_ms") for h in history]
    budget_values = _numbers(list(budgets))
    predicted = _numbers([h.get("predicted_ms") for h in history])
    steps = [_index(h.get("step"), i) for i, h in enumerate(history)]
    if all(v != v for v in budget_values + predicted):  # all NaN or empty
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    budget_steps = list(range(len(budget_values)))
    ax.plot(budget_steps, budget_values, "o-", color="tab:blue", label="step budget")
    if history:
        ax.plot(steps, predicted, "s--", color="tab:orange", label="predicted latency of the step's plan")
    target = number(result.get("target_ms"))
    if target is not None:
        ax.axhline(target, color="tab:red", linestyle=":", linewidth=1.2, label=f"target {target:.3f} ms")
    dense = number(result.get("dense_ms_calibration"))
    if dense is not None:
        ax.axhline(dense, color="0.5", linestyle=":", linewidth=1.2, label=f"dense {dense:.3f} ms (calibration)")
    _widen_single_point(ax, budget_steps + steps)
    ax.set_xlabel("pruning step")
    ax.set_ylabel("latency (ms)")
    n = max(len(budget_values), len(steps))
    ax.set_title(f"Budget path ({result.get('schedule') or 'unknown'} schedule, {n} step{'s' if n != 1 else ''})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_accuracy(result: dict[str, Any], path: Path) -> Path | None:
    """Dense / after slimming / final accuracy bars in %, and the fine-tuning curve in a second panel if any."""
    stages = [("dense", result.get("dense_accuracy"), "0.45"),
              ("after slimming\n(+ BN recalibration)", result.get("pruned_accuracy"), "tab:orange"),
              ("final\n(fine-tuned)", result.get("accuracy"), "tab:blue")]
    values = [number(v) for _, v, _ in stages]
    curve = [c for c in result.get("curve") or [] if isinstance(c, dict)]
    if all(v is None for v in values) and not curve:
        return None
    fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(11 if curve else 5.5, 4.2), squeeze=False)
    ax = axes[0][0]
    heights = [0.0 if v is None else 100 * v for v in values]
    drawn = ax.bar(range(3), heights, color=[c for _, _, c in stages], width=0.6)
    ax.bar_label(drawn, labels=["n/a" if v is None else f"{100 * v:.2f}%" for v in values], padding=2, fontsize=9)
    ax.set_xticks(range(3), [s[0] for s in stages], fontsize=9)
    ax.set_ylim(0, 110)
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Accuracy by stage")
    ax.grid(axis="y", alpha=0.3)
    if curve:
        _plot_curve(axes[0][1], curve, values[0])
    fig.tight_layout()
    return _save(fig, path)


def _plot_curve(ax: Any, curve: list[dict[str, Any]], dense: float | None) -> None:
    epochs = [_index(c.get("epoch"), i) for i, c in enumerate(curve)]
    accuracy = [100 * v for v in _numbers([c.get("accuracy") for c in curve])]
    ax.plot(epochs, accuracy, "o-", color="tab:blue", label="validation accuracy")
    if dense is not None:
        ax.axhline(100 * dense, color="0.45", linestyle="--", linewidth=1, label=f"dense {100 * dense:.2f}%")
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Fine-tuning curve")
    ax.grid(alpha=0.3)
    _widen_single_point(ax, epochs)
    handles, labels = ax.get_legend_handles_labels()
    losses = _numbers([c.get("loss") for c in curve])
    if any(v == v for v in losses):
        twin = ax.twinx()
        twin.plot(epochs, losses, "x:", color="tab:gray", label="training loss")
        twin.set_ylabel("training loss")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=len(handles),
              frameon=False)


PlotFunction = Callable[[dict[str, Any], Path], Path | None]
PLOTS: dict[str, PlotFunction] = {"latency": plot_latency, "accuracy": plot_accuracy, "budget_path": plot_budget_path,
                                  "blocks": plot_blocks, "widths": plot_widths}


def write_plots(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write every plot the result has data for into ``out_dir`` as ``<name>.png``; return name -> path."""
    written = {}
    for name, plot in PLOTS.items():
        path = plot(result, out_dir / f"{name}.png")
        if path is not None:
            written[name] = path
    return written
