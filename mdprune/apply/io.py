"""Save and load slim models (base model + plan + weights, no pickled modules); ONNX export."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..models import rebuild
from ..space import Plan, analyze
from .slim import slim

FORMAT = "mdprune-model/1"


def model_info(model: nn.Module) -> dict[str, Any] | None:
    """What mdprune recorded about a model it built (source, plan, input shapes), or None."""
    return model.meta.get("mdprune") if isinstance(model, fx.GraphModule) else None


def save(model: nn.Module, path: str | Path) -> None:
    """Save a model made by :func:`mdprune.slim` or :func:`mdprune.prune`.

    The file holds how to rebuild the architecture (base model name and arguments, analysis options, plan)
    and the state_dict; :func:`load` rebuilds it without unpickling any module.
    """
    info = model_info(model)
    if info is None:
        raise ValueError("mdprune.save takes models made by mdprune (slim or prune); for any other model "
                         "save its state_dict with torch.save")
    if not info.get("source"):
        raise ValueError("cannot save: mdprune does not know how to rebuild the base model. Build it with "
                         "mdprune.create_model(...), or pass source={'name': 'package.module:function', "
                         "'kwargs': {...}} to mdprune.analyze")
    torch.save({"format": FORMAT, "info": info, "state_dict": model.state_dict()}, Path(path))


def load(path: str | Path, map_location: str | torch.device = "cpu", trust_code: bool = False) -> fx.GraphModule:
    """Rebuild a model saved by :func:`save`.

    Safe by default: the file is read with ``torch.load(..., weights_only=True)`` (tensors and plain data only)
    and only mdprune's, torchvision's and timm's model names are rebuilt. A file naming your own
    ``package.module:function`` builder needs ``trust_code=True``, since rebuilding it runs that code.
    """
    ckpt = read_tensors_file(path, map_location, what="an mdprune model file")
    if isinstance(ckpt, dict) and "phase" in ckpt and "rng" in ckpt:
        raise ValueError(f"{path} is a run's checkpoint, not a model file: load the run's model.pt (written when "
                         "the run finishes), or continue the run with `mdprune prune ... --resume`")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not an mdprune model file ({FORMAT}); save models with mdprune.save")
    info = ckpt["info"]
    base = rebuild(info["source"], trust_code=trust_code)
    inputs = [torch.zeros(s) for s in info["input_shapes"]]
    opts = info.get("options", {})
    space = analyze(base, inputs, steps=opts.get("steps"), ignored_layers=opts.get("ignored_layers", ()),
                    source=info["source"], max_choices=opts.get("max_choices", 16),
                    unsupported=opts.get("unsupported", "error"))
    model = slim(space, Plan.from_dict(info["plan"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(map_location)


def read_tensors_file(path: str | Path, map_location: str | torch.device = "cpu", what: str = "a checkpoint"
                      ) -> Any:
    """``torch.load`` with ``weights_only=True``, its failures turned into errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist (expected {what})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():  # a class or function to import: code
            raise ValueError(f"{path} holds objects other than tensors and plain data, which mdprune never "
                             f"unpickles (it runs code); expected {what}") from e
        raise ValueError(f"{path} cannot be read as {what} (not a PyTorch file)") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} cannot be read as {what} (truncated or not a PyTorch file): {e}") from e


def export_onnx(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], path: str | Path,
                opset: int = 18, dynamic_batch: bool = True) -> Path:
    """Export a (slim) model to ONNX with torch.onnx (the dynamo exporter; needs ``mdprune[onnx]``)."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    model = model.eval()
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic = tuple({0: batch} for _ in inputs)
    torch.onnx.export(model, inputs, str(path), opset_version=opset, dynamo=True, dynamic_shapes=dynamic,
                      external_data=False)
    return Path(path)
