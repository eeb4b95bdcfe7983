"""mAP@[.5:.95] and mAP@.5, by torchmetrics' ``MeanAveragePrecision`` with the pycocotools backend.

Why: pycocotools is the reference COCO evaluation (101-point interpolated precision over IoU 0.5:0.05:0.95,
the figures papers report), and torchmetrics wraps it for tensors in torchvision's box format, so no
annotation file or format conversion is needed and the numbers are the official COCO ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .data import Target


@torch.no_grad()
def evaluate_map(detector: nn.Module, batches: Iterable[tuple[list[torch.Tensor], list[Target]]],
                 device: str | torch.device = "cpu", max_batches: int | None = None) -> dict[str, float]:
    """``{"map": mAP@[.5:.95], "map_50": mAP@.5, "images": n}`` of ``detector`` (eval mode) on ``batches``.

    COCO's protocol scores the 100 highest-scored detections of each image (pycocotools' ``maxDets``); the rest
    are left out without a warning per image (torchvision's detectors keep up to 300 by default).
    """
    try:
        from torchmetrics.detection import MeanAveragePrecision
    except ImportError as e:
        raise ImportError("mAP needs torchmetrics and pycocotools: pip install 'mdprune[detection]'") from e
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    metric.warn_on_many_detections = False  # the 100-per-image cap is the protocol, said once in the docstring
    was = detector.training
    detector.eval().to(device)
    n = 0
    for i, (images, targets) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        out = detector([im.to(device) for im in images])
        metric.update([{k: v.cpu() for k, v in o.items() if k in ("boxes", "scores", "labels")} for o in out],
                      [{k: v.cpu() for k, v in t.items()} for t in targets])
        n += len(images)
    detector.train(was)
    result: dict[str, Any] = metric.compute()
    return {"map": float(result["map"]), "map_50": float(result["map_50"]), "images": n}
