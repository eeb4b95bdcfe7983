"""How much of a model a plan can change: the share of parameters and MACs in prunable dimensions or removable
blocks, and what is kept whole and why."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .space import PruningSpace


def coverage(space: PruningSpace) -> dict[str, Any]:
    """Changeable parameters and MACs (totals and shares), and the parts kept whole with their reasons.

    A parameter is changeable when one of its axes holds a prunable dimension or it lies in a removable block; an
    op's MACs are changeable when a prunable dimension sets one of its widths or it lies in a removable block.
    ``widths_share`` counts only what a prunable dimension sets (not block removal). ``kept_whole`` lists modules
    whose parameters no plan changes (largest first), each with the reasons of the protected dimensions it
    touches, the ignored layer holding it, or "not in any prunable dimension".
    """
    prunable = {d.name for d in space.prunable_dims()}
    removable = {b.name for b in space.removable_blocks()}
    block_of = {t: b.name for b in space.blocks.values() for t in b.tensors}
    ignored = space.options.get("ignored_layers", [])
    params_total = params_changeable = params_widths = 0
    whole: dict[str, int] = defaultdict(int)
    reasons: dict[str, set[str]] = defaultdict(set)
    for name, p in space.module.named_parameters():
        n = p.numel()
        params_total += n
        t = space.tensors.get(name)
        dims = {d for segs in (t.axes.values() if t else ()) for s in segs for d in s.dims}
        params_widths += n if dims & prunable else 0
        if dims & prunable or block_of.get(name) in removable:
            params_changeable += n
            continue
        module = name.rpartition(".")[0] or name
        whole[module] += n
        why = {space.dims[d].protected for d in dims if space.dims[d].protected}
        why |= {f"ignored layer {i}" for i in ignored if name.startswith(i + ".")}
        reasons[module] |= why or {"not in any prunable dimension"}
    dense = space.dense_sizes()
    macs_total = macs_changeable = macs_widths = 0
    for op in space.ops:
        m = op.macs(dense)
        macs_total += m
        macs_widths += m if set(op.dims()) & prunable else 0
        if set(op.dims()) & prunable or op.block in removable:
            macs_changeable += m
    kept = [{"module": k, "params": v, "reasons": sorted(reasons[k])}
            for k, v in sorted(whole.items(), key=lambda kv: -kv[1])]
    protected_blocks = [{"block": b.name, "reason": b.protected} for b in space.blocks.values() if b.protected]
    return {
        "params": _shares(params_total, params_changeable, params_widths),
        "macs": _shares(macs_total, macs_changeable, macs_widths),
        "kept_whole": kept,
        "protected_blocks": protected_blocks,
    }


def _shares(total: int, changeable: int, widths: int) -> dict[str, Any]:
    return {"total": total, "changeable": changeable, "share": changeable / total if total else 0.0,
            "widths_share": widths / total if total else 0.0}
