"""The ``mdprune`` command line: one module per subcommand."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import __version__
from . import demo, detect, inspect, lut, prune, tools

# Start-up stays fast (`mdprune --help` well under 2 s): the command modules import torch, timm and the pipeline
# inside the functions that run a command, never at module level.


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mdprune",
        description="Prune a vision model to a latency budget on your hardware (MDP, CVPR 2025).")
    p.add_argument("--version", action="version", version=f"mdprune {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect.add_parser(sub)
    lut.add_parser(sub)
    prune.add_parser(sub)
    tools.add_parsers(sub)
    demo.add_parser(sub)
    detect.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if os.getcwd() not in sys.path:  # `pkg.mod:fn` models in the current directory, as `python -m` finds them
        sys.path.insert(0, os.getcwd())
    from ..latency import FingerprintMismatch, IncompleteTable
    from ..models import ModelError
    from ..solve import InfeasibleBudget
    from ..space import AnalysisError
    from ..train.data import DataError
    from ..train.loop import NaNLoss
    from ..train.rundir import RunDirError

    try:
        return args.func(args)
    except (AnalysisError, ModelError, FingerprintMismatch, IncompleteTable, InfeasibleBudget, DataError,
            RunDirError, NaNLoss, ValueError) as e:
        print(f"mdprune: error: {e.for_cli() if isinstance(e, AnalysisError) else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mdprune: interrupted (completed measurements are saved)", file=sys.stderr)
        return 130
    except OSError as e:  # a read-only or full disk, a missing permission: what was saved before stays
        where = f" {e.filename}" if e.filename else ""
        print(f"mdprune: error: cannot read or write{where}: {e.strerror or e}. Measurements and checkpoints "
              "saved before this are kept; free space or fix permissions and run the command again "
              "(--resume for a run)", file=sys.stderr)
        return 2
