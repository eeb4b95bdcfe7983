"""The ``mdprune`` command line."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch

from . import __version__
from .models import ModelError, create_model, default_input_size, load_checkpoint
from .space import AnalysisError, PruningSpace, analyze


def _kv(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="torchvision or timm model name (resnet50, deit_small_patch16_224), "
                                 "or package.module:function")
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the model's)")
    p.add_argument("--input-size", type=int, default=None, help="image height and width (default: the model's)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the example input (default 1)")
    p.add_argument("--model-arg", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="extra constructor argument, e.g. img_size=32 (repeatable)")
    p.add_argument("--checkpoint", default=None, help="weights to load (state_dict file); nothing is downloaded")
    p.add_argument("--step", type=_kv, action="append", default=[], metavar="KIND=N",
                   help="pruning step per dimension kind or name, e.g. channel=16 (repeatable)")
    p.add_argument("--ignore", action="append", default=[], metavar="MODULE",
                   help="module to keep whole (repeatable)")


def build_model_and_space(args: argparse.Namespace) -> tuple[torch.nn.Module, PruningSpace]:
    kwargs = dict(args.model_arg)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.input_size is not None and "img_size" not in kwargs and _is_timm_vit(args.model):
        kwargs["img_size"] = args.input_size
    model = create_model(args.model, **kwargs)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    c, h, w = default_input_size(model)
    if args.input_size is not None:
        h = w = args.input_size
    x = torch.randn(args.batch, c, h, w)
    space = analyze(model, x, steps=dict(args.step), ignored_layers=args.ignore)
    return model, space


def _is_timm_vit(name: str) -> bool:
    n = name.removeprefix("timm:")
    return any(n.startswith(p) for p in ("vit_", "deit", "eva", "beit"))


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    _, space = build_model_and_space(args)
    console = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False)
    s = space.summary()
    shape = "x".join(str(v) for v in space.input_shapes[0])
    kinds = ", ".join(f"{k} {v}" for k, v in s["prunable_by_kind"].items()) or "none"
    console.print(f"[bold]{args.model}[/bold]  input {shape}  params {_human(s['params'])}  "
                  f"MACs {_human(s['macs'])}")
    console.print(f"{s['prunable_dimensions']} prunable dimensions ({kinds}) of {s['dimensions']}; "
                  f"{s['removable_blocks']} removable blocks of {s['blocks']}; {s['ops']} ops")

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
        t.add_row(b.name, b.shortcut, str(len(b.modules)), _human(n), b.protected or "")
    console.print(t)

    if args.ops:
        t = Table(title="Ops")
        for col in ("name", "kind", "dimensions", "signature", "MACs", "block"):
            t.add_column(col)
        dense = space.dense_sizes()
        for op in space.ops:
            sig = ", ".join(f"{k}={v}" for k, v in op.fixed.items())
            t.add_row(op.name, op.kind, " | ".join(op.dims()), sig, _human(op.macs(dense)), op.block or "")
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
        "input_shapes": space.input_shapes,
        "dimensions": [{"name": d.name, "kind": d.kind, "size": d.size, "step": d.step, "block": d.block,
                        "protected": d.protected} for d in space.dims.values()],
        "blocks": [{"name": b.name, "shortcut": b.shortcut, "modules": b.modules, "protected": b.protected}
                   for b in space.blocks.values()],
        "ops": [{"name": o.name, "kind": o.kind, "dims": o.dims(), "fixed": o.fixed, "block": o.block,
                 "macs": o.macs(dense)} for o in space.ops],
    }


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mdprune",
        description="Prune a vision model to a latency budget on your hardware (MDP, CVPR 2025).")
    p.add_argument("--version", action="version", version=f"mdprune {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ins = sub.add_parser("inspect", help="show what can be pruned in a model: dimensions, blocks and ops",
                         description="Analyse a model (random weights unless --checkpoint) and print its "
                                     "prunable dimensions, removable blocks and compute ops.")
    _model_args(ins)
    ins.add_argument("--ops", action="store_true", help="also list every compute op with its signature")
    ins.add_argument("--json", default=None, metavar="PATH", help="write the whole description as JSON")
    ins.set_defaults(func=cmd_inspect)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except (AnalysisError, ModelError, ValueError) as e:
        print(f"mdprune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
