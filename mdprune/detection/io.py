"""Save and load pruned detectors (base detector + plan + weights, no pickled code); ONNX export of the core."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..apply.io import read_tensors_file
from ..models import ModelError
from ..space import Plan
from .core import analyze_detector, slim_detector
from .models import create_detector
from .wrap import DetectorCore

FORMAT = "mdprune-detector/1"


def detector_info(detector: nn.Module) -> dict[str, Any] | None:
    """What mdprune recorded about a pruned detector (source, plan, image size), or None."""
    return getattr(detector, "_mdprune_detection", None)


def save_detector(detector: nn.Module, path: str | Path) -> None:
    """Save a detector made by :func:`mdprune.detection.prune_detector`: how to rebuild it (detector name and
    arguments, image size, plan) and its state_dict; :func:`load_detector` rebuilds it without unpickling code."""
    info = detector_info(detector)
    if info is None or not info.get("source"):
        raise ValueError("save_detector takes detectors pruned by mdprune from a detector built with "
                         "mdprune.detection.create_detector (it must know how to rebuild the base detector)")
    torch.save({"format": FORMAT, "info": info, "state_dict": detector.state_dict()}, Path(path))


def load_detector(path: str | Path, map_location: str | torch.device = "cpu", trust_code: bool = False) -> nn.Module:
    """Rebuild a detector saved by :func:`save_detector` (read with ``weights_only=True``). A file naming a
    ``package.module:function`` builder needs ``trust_code=True``: rebuilding it runs that code."""
    ckpt = read_tensors_file(path, map_location, what="an mdprune detector file")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not an mdprune detector file ({FORMAT}); save detectors with save_detector")
    info = ckpt["info"]
    src = dict(info["source"])
    name = str(src["name"])
    prefix, sep, _ = name.partition(":")
    if sep and prefix != "torchvision" and not trust_code:
        raise ModelError(f"the file names the detector builder {name!r}: rebuilding it would import and run that "
                         "code. If you trust the file, load it with trust_code=True (command line: --trust-code)")
    kwargs = {k: v for k, v in dict(src.get("kwargs", {})).items() if k not in ("weights", "weights_backbone")}
    det = create_detector(name, image_size=src.get("image_size"), score_thresh=src.get("score_thresh"), **kwargs)
    size = int(info["image_size"])
    space = analyze_detector(det.eval(), torch.zeros(1, 3, size, size), ignored_layers=info.get("ignored_layers", ()))
    out = slim_detector(space, Plan.from_dict(info["plan"]), det)
    out.load_state_dict(ckpt["state_dict"])
    out._mdprune_detection = info
    return out.to(map_location).eval()


def export_detector_onnx(detector: nn.Module, image_size: int, path: str | Path, batch: int = 1,
                         opset: int = 18) -> Path:
    """Export the detector's core (transformed images -> the heads' raw outputs) to ONNX.

    The post-processing (anchor generation, box decoding, score threshold, NMS) is not in the file: run it
    from the raw outputs as the torchvision detector does (see docs/detection.md).
    """
    core = DetectorCore(detector).eval()
    x = torch.randn(batch, 3, image_size, image_size)
    torch.onnx.export(core, (x,), str(path), opset_version=opset, dynamo=True, external_data=False)
    return Path(path)
