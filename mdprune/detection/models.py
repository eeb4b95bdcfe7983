"""Detectors by name, with random weights (nothing downloaded), sized for the user's images."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..models import ModelError, create_model

# the torchvision detectors whose families mdprune knows (others of these classes work too)
KNOWN = ("ssdlite320_mobilenet_v3_large", "ssd300_vgg16", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2",
         "fcos_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn",
         "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2")


def create_detector(name: str, num_classes: int = 91, image_size: int | None = None, score_thresh: float | None = None,
                    **kwargs: Any) -> nn.Module:
    """Build detector ``name`` (a torchvision name or ``package.module:function``) with random weights.

    ``image_size``: the transform keeps square images of this size as they are (no resizing to 800 or 320), so
    the latency measured is the one at the user's size. ``score_thresh``: the detector's score threshold, where
    it has one (a low one shows boxes of an untrained detector). The model remembers how it was built.
    """
    kw = dict(kwargs)
    prefix, sep, rest = name.partition(":")
    if not sep or prefix == "torchvision":
        kw.setdefault("weights_backbone", None)  # (create_model passes weights=None)
    try:
        model = create_model(name, num_classes=num_classes, **kw)
    except TypeError as e:
        raise ModelError(f"cannot build detector {name!r}: {e}") from e
    set_image_size(model, image_size)
    if score_thresh is not None:
        set_score_thresh(model, score_thresh)
    model._mdprune_source = {"name": name, "kwargs": {"num_classes": num_classes, **kw},
                             "image_size": image_size, "score_thresh": score_thresh}
    return model


def set_image_size(model: nn.Module, size: int | None) -> None:
    """Make the detector's transform keep ``size`` x ``size`` images as they are."""
    t = getattr(model, "transform", None)
    if size is None or t is None:
        return
    t.min_size, t.max_size = (size,), size
    if getattr(t, "fixed_size", None) is not None:
        t.fixed_size = (size, size)


def set_score_thresh(model: nn.Module, thresh: float) -> None:
    for owner in (model, getattr(model, "roi_heads", None)):
        if owner is not None and hasattr(owner, "score_thresh"):
            owner.score_thresh = thresh
