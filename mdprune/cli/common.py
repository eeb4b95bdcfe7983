"""Shared pieces of the command line: model arguments, number formatting."""

from __future__ import annotations

import argparse
import ast
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..space import PruningSpace


def parse_kv(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="torchvision or timm model name (resnet50, deit_small_patch16_224), "
                                 "or package.module:function")
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the model's)")
    p.add_argument("--input-size", type=int, default=None, help="image height and width (default: the model's)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the example input (default 1)")
    p.add_argument("--model-arg", type=parse_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="extra constructor argument, e.g. img_size=32 (repeatable)")
    p.add_argument("--checkpoint", default=None, help="weights to load (state_dict file); nothing is downloaded")
    p.add_argument("--step", type=parse_kv, action="append", default=[], metavar="KIND=N",
                   help="pruning step per dimension kind or name, e.g. channel=16 (repeatable)")
    p.add_argument("--ignore", action="append", default=[], metavar="MODULE",
                   help="module to keep whole (repeatable)")
    p.add_argument("--keep-unsupported", action="store_true",
                   help="keep every module mdprune cannot analyse whole (a warning lists them) instead of stopping")


def build_model_and_space(args: argparse.Namespace) -> tuple[torch.nn.Module, PruningSpace]:
    import torch

    from ..models import create_model, create_model_for_size, default_input_size, load_checkpoint
    from ..space import analyze

    kwargs = dict(args.model_arg)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.input_size is not None:  # the size goes to the keyword the constructor takes, or is refused
        model = create_model_for_size(args.model, args.input_size, **kwargs)
    else:
        model = create_model(args.model, **kwargs)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    c, h, w = default_input_size(model)
    if args.input_size is not None:
        h = w = args.input_size
    x = torch.randn(args.batch, c, h, w)
    space = analyze(model, x, steps=dict(args.step), ignored_layers=args.ignore, unsupported=unsupported(args))
    return model, space


def unsupported(args: argparse.Namespace) -> str:
    """``analyze``'s ``unsupported`` setting from ``--keep-unsupported``."""
    return "keep" if getattr(args, "keep_unsupported", False) else "error"


def add_deployment_args(g: argparse._ArgumentGroup, prefix: str = "") -> None:
    """How the measured model is deployed (applied alike to table ops and end-to-end measurements, recorded in
    the table's fingerprint); ``prefix`` ("latency-") where the name alone would read as a training setting."""
    g.add_argument(f"--{prefix}channels-last", dest="channels_last", action="store_true",
                   help="measure in channels-last (NHWC) layout")
    g.add_argument(f"--{prefix}autocast", dest="autocast", action="store_true",
                   help="reach the half dtype by torch.autocast over float32 weights instead of casting the model")
    g.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false",
                   help="CUDA: do not let cuDNN autotune each shape (default: autotune)")
    g.add_argument("--tf32", choices=["default", "on", "off"], default="default",
                   help="CUDA: TF32 in float32 matmuls and convolutions (default: PyTorch's, convolutions only)")
    g.add_argument("--attention-regimes", choices=["auto", "on", "off"], default="auto",
                   help="measure attention off the q/k == v diagonal too, where the fast kernel does not apply "
                        "(default auto: on CUDA)")


def deployment_settings(args: argparse.Namespace) -> dict[str, Any]:
    """LatencySettings fields of :func:`add_deployment_args`' options that differ from the defaults."""
    out: dict[str, Any] = {}
    if args.channels_last:
        out["channels_last"] = True
    if args.autocast:
        out["autocast"] = True
    if not args.cudnn_benchmark:
        out["cudnn_benchmark"] = False
    if args.tf32 != "default":
        out["tf32"] = args.tf32 == "on"
    if args.attention_regimes != "auto":
        out["attention_regimes"] = args.attention_regimes == "on"
    return out


def human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))
