"""``mdprune inspect``: what can be pruned in a model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from .common import add_model_args, build_model_and_space, human

if TYPE_CHECKING:
    from ..space import PruningSpace


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show what can be pruned in a model: dimensions, blocks and ops",
                       description="Analyse a model (random weights unless --checkpoint) and print its "
                                   "prunable dimensions, removable blocks and compute ops.")
    add_model_args(p)
    p.add_argument("--ops", action="store_true", help="also list every op with its signature")
    p.add_argument("--kept", type=int, default=10, metavar="N", help="modules kept whole to list (default 10)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the whole description as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    _, space = build_model_and_space(args)
    console = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False)
    s = space.summary()
    shape = "x".join(str(v) for v in space.input_shapes[0])
    kinds = ", ".join(f"{k} {v}" for k, v in s["prunable_by_kind"].items()) or "none"
    console.print(f"[bold]{args.model}[/bold]  input {shape}  params {human(s['params'])}  "
                  f"MACs {human(s['macs'])}")
    console.print(f"{s['prunable_dimensions']} prunable dimensions ({kinds}) of {s['dimensions']}; "
                  f"{s['removable_blocks']} removable blocks of {s['blocks']}; {s['ops']} ops")
    cov = space.coverage()
    console.print(f"a plan can change {100 * cov['params']['share']:.1f}% of the parameters and "
                  f"{100 * cov['macs']['share']:.1f}% of the MACs (through widths alone "
                  f"{100 * cov['params']['widths_share']:.1f}% and {100 * cov['macs']['widths_share']:.1f}%; "
                  "the rest only by removing blocks)")

    t = Table(title="Dimensions")
    for col in ("name", "kind", "size", "step", "choices", "block", "protected"):
        t.add_column(col)
    for d in space.dims.values():
        t.add_row(d.name, d.kind, str(d.size), str(d.step), str(len(d.widths())), d.block or "",
                  d.protected or "")
    console.print(t)

    t = Table(title="Blocks")
    for col in ("name", "shortcut", "modules", "params", "protected"):
        t.add_column(col)
    params = dict(space.module.named_parameters())
    for b in space.blocks.values():
        n = sum(params[x].numel() for x in b.tensors if x in params)
        t.add_row(b.name, b.shortcut, str(len(b.modules)), human(n), b.protected or "")
    console.print(t)

    if cov["kept_whole"]:
        t = Table(title="Kept whole (largest first)")
        for col in ("module", "params", "why"):
            t.add_column(col)
        for k in cov["kept_whole"][:args.kept]:
            t.add_row(k["module"], human(k["params"]), "; ".join(k["reasons"]))
        if len(cov["kept_whole"]) > args.kept:
            t.add_row(f"... {len(cov['kept_whole']) - args.kept} more (--kept N, --json)", "", "")
        console.print(t)

    if args.ops:
        t = Table(title="Ops")
        for col in ("name", "kind", "dimensions", "signature", "MACs", "block"):
            t.add_column(col)
        dense = space.dense_sizes()
        for op in space.ops:
            sig = ", ".join(f"{k}={v}" for k, v in op.fixed.items())
            t.add_row(op.name, op.kind, " | ".join(op.dims()), sig, human(op.macs(dense)), op.block or "")
        console.print(t)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(space_to_dict(space), f, indent=1, default=str)
        console.print(f"wrote {args.json}")
    return 0


def space_to_dict(space: PruningSpace) -> dict[str, Any]:
    """A JSON-friendly description of a pruning space."""
    dense = space.dense_sizes()
    return {
        "summary": space.summary(),
        "coverage": space.coverage(),
        "input_shapes": space.input_shapes,
        "dimensions": [{"name": d.name, "kind": d.kind, "size": d.size, "step": d.step, "block": d.block,
                        "protected": d.protected} for d in space.dims.values()],
        "blocks": [{"name": b.name, "shortcut": b.shortcut, "modules": b.modules, "protected": b.protected}
                   for b in space.blocks.values()],
        "ops": [{"name": o.name, "kind": o.kind, "dims": o.dims(), "fixed": o.fixed, "block": o.block,
                 "macs": o.macs(dense)} for o in space.ops],
    }


