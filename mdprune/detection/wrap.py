"""The traceable core of a detector, and the families that know how to cut one out.

A torchvision detector is ``transform -> backbone (+ FPN) -> heads -> anchors, box decoding, NMS``; only the
middle part is a fixed graph that torch.fx can trace. The *core* runs exactly that part: the transformed image
batch in, the heads' raw outputs out. mdprune analyses, masks and slims the core; the slim core's layers are then
put back into the full detector (see :mod:`mdprune.detection.implant`), which still runs end to end.

A :class:`DetectorFamily` says how to run the heads of one kind of detector from its backbone features; register
your own with :func:`register_family` (no edit of mdprune needed).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torchvision.ops import MultiScaleRoIAlign

from ..layers import Chan, LatencyOp, add_op, register_layer
from ..space.errors import AnalysisError, where

HeadsFn = Callable[["DetectorCore", "OrderedDict[str, torch.Tensor]", torch.Tensor], tuple[torch.Tensor, ...]]
PREFIX = "detector."  # where the detector sits inside its core: core paths are PREFIX + detector paths


@dataclass(frozen=True)
class DetectorFamily:
    """How to run one kind of detector's heads from its backbone's features.

    Attributes:
        name: the family's name.
        types: detector classes it covers (subclasses too), or ``"package.module.Class"`` paths.
        heads: ``(core, features, images) -> raw outputs``: the heads on the backbone's features (an ordered
            dict of feature maps); ``core.detector`` is the detector. Only traceable code: no anchors, no NMS.
        outputs: names of the raw outputs, in order (for reports).
        prepare: called once on a new core (e.g. to add modules the heads need, such as a fixed RoI pooling).
        raw: paths of the detector's modules whose outputs the untraced post-processing reads (scores and
            boxes before decoding and NMS); timing a pruned detector hands it the dense detector's outputs of
            these (see :func:`mdprune.detection.latency.with_dense_detections`). Empty: timed as it is.
        distil: paths of the modules whose outputs hold one value per anchor or location, so that a pruned
            and the dense detector's match on the same images; fine-tuning with distillation matches them (see
            :class:`mdprune.detection.distill.RawDistiller`). Not the second stage of an R-CNN: its boxes are
            the detector's own proposals.
    """

    name: str
    types: tuple[type | str, ...]
    heads: HeadsFn
    outputs: tuple[str, ...] = ()
    prepare: Callable[[DetectorCore], None] | None = None
    raw: tuple[str, ...] = ()
    distil: tuple[str, ...] = ()


_FAMILIES: list[DetectorFamily] = []


def register_family(family: DetectorFamily) -> DetectorFamily:
    """Add a detector family (a later registration of the same class wins)."""
    _FAMILIES.append(family)
    return family


def family_of(detector: nn.Module) -> DetectorFamily:
    """The family covering ``detector``'s class (the latest registered). Exact classes only: a subclass may run
    more heads on the features (Mask R-CNN's mask head) that the family does not know."""
    for fam in reversed(_FAMILIES):
        for t in fam.types:
            cls = _import(t) if isinstance(t, str) else t
            if cls is not None and type(detector) is cls:
                return fam
    raise ValueError(f"mdprune knows no detector family for {type(detector).__name__}: register one with "
                     "mdprune.detection.register_family")


def _import(path: str) -> type | None:
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


class DetectorCore(nn.Module):
    """Images (already transformed: normalised, resized, batched) -> the heads' raw outputs, as a tuple."""

    def __init__(self, detector: nn.Module, family: DetectorFamily | None = None,
                 example: torch.Tensor | None = None):
        super().__init__()
        self.detector = detector
        self.family = family or family_of(detector)
        self.example = example  # transformed images the detector will be analysed on (families may read them)
        if self.family.prepare is not None:
            self.family.prepare(self)
        self.example = None
        self.train(detector.training)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.detector.backbone(images)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        return self.family.heads(self, features, images)


# ---- single-stage detectors: SSD, SSDLite, RetinaNet, FCOS ---------------------------------------------------

def _single_stage_heads(core: DetectorCore, features: OrderedDict[str, torch.Tensor], images: torch.Tensor
                        ) -> tuple[torch.Tensor, ...]:
    out = core.detector.head(list(features.values()))
    return tuple(out[k] for k in sorted(out))  # bbox_ctrness, bbox_regression, cls_logits (those present)


register_family(DetectorFamily(
    "single_stage", ("torchvision.models.detection.ssd.SSD", "torchvision.models.detection.retinanet.RetinaNet",
                     "torchvision.models.detection.fcos.FCOS"),
    _single_stage_heads, ("bbox_ctrness", "bbox_regression", "cls_logits"), raw=("head",), distil=("head",)))


# ---- two-stage: Faster R-CNN ---------------------------------------------------------------------------------

class FixedRoIPool(nn.Module):
    """The detector's RoI pooling on a fixed set of boxes (centred, of ``boxes`` sizes), so that the box head
    joins the traced core: its first layer's input channels are the pooled feature maps' channels. Used only
    in the core; the full detector pools its real proposals with its own pooling module. ``boxes`` is the
    number of regions per image the detector's head runs on (see :func:`roi_counts`), so that the latency
    tables time the head at the row count it really has."""

    def __init__(self, pool: nn.Module, boxes: int = 8):
        super().__init__()
        self.pool = pool
        self.boxes = boxes

    def forward(self, features: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        s = torch.linspace(0.15, 1.0, self.boxes, device=images.device).unsqueeze(1)  # box sizes, centred
        c = torch.tensor([w / 2, h / 2, w / 2, h / 2], device=images.device)
        half = torch.tensor([-w / 2, -h / 2, w / 2, h / 2], device=images.device)
        boxes = c + s * half
        return self.pool(features, [boxes] * images.shape[0], [(h, w)] * images.shape[0])


def _roi_channels(prop, node: fx.Node, m: FixedRoIPool) -> Chan:  # noqa: ANN001 - a channel rule
    """The pooled features' channels are those of every level the pooling reads: tied together. torchvision's
    ``MultiScaleRoIAlign`` adds a latency op on that width: its cost follows the channels (on
    fasterrcnn_mobilenet_v3_large_fpn at 128 px, 23.6 ms of a 124 ms dense detector, 1.9 ms at the smallest
    widths), so it cannot sit in the model's constant."""
    feats = node.args[0]
    names = list(getattr(m.pool, "featmap_names", feats))
    values = [prop.value(feats[k]) for k in names if k in feats]
    if not values or not all(isinstance(v, Chan) and v.axis == 1 for v in values):
        raise AnalysisError(f"{where(node)}: cannot find the channels of the pooled feature maps")
    for v in values[1:]:
        prop.unify(values[0].segs, v.segs, node)
    if isinstance(m.pool, MultiScaleRoIAlign):  # it pools the levels it names that the features have
        image = node.args[1].meta["mdp_shape"]
        add_op(prop, node, {"width": values[0]}, {
            "levels": [list(feats[k].meta["mdp_shape"][2:]) for k in names if k in feats], "image": list(image[2:]),
            "output_size": list(m.pool.output_size), "sampling_ratio": m.pool.sampling_ratio,
            "canonical": [m.pool.canonical_scale, m.pool.canonical_level], "boxes": m.boxes, "batch": image[0]})
    return Chan(1, values[0].segs)


class _PoolAlone(nn.Module):
    """A :class:`FixedRoIPool` on feature maps passed as tensors, then the images: what a table entry times."""

    def __init__(self, pool: FixedRoIPool, names: list[str]):
        super().__init__()
        self.pool, self.names = pool, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.pool(OrderedDict(zip(self.names, tensors[:-1], strict=True)), tensors[-1])


def build_roi_pool(fixed: dict[str, Any], w: dict[str, int], batch: int
                   ) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """torchvision's multi-scale RoI Align alone, at ``w["width"]`` channels on every level."""
    names = [str(i) for i in range(len(fixed["levels"]))]
    scale, level = fixed["canonical"]
    pool = MultiScaleRoIAlign(names, fixed["output_size"], fixed["sampling_ratio"], canonical_scale=scale,
                              canonical_level=level)
    feats = tuple(torch.randn(batch, w["width"], *hw) for hw in fixed["levels"])
    images = torch.zeros(batch, 1, *fixed["image"])  # only its shape is read: batch and image size
    return _PoolAlone(FixedRoIPool(pool, fixed["boxes"]), names).eval(), (*feats, images)


register_layer(FixedRoIPool, channels=_roi_channels, subclasses="exact", name="fixed_roi_pool",
               latency=LatencyOp(("width",), build_roi_pool))


@torch.no_grad()
def roi_counts(detector: nn.Module, images: torch.Tensor | None) -> dict[str, int]:
    """Regions per image the second stage runs on, for transformed ``images`` in eval mode: ``box`` (the RPN's
    proposals, which the box head classifies) and ``mask`` / ``keypoint`` (the detections those heads run on).
    Counted, not read from the settings: the RPN keeps at most its ``post_nms_top_n`` but at small image sizes
    has fewer anchors than that, and the score threshold sets how many detections remain. 8 of each without
    images (or when none is found)."""
    if images is None:
        return {"box": 8, "mask": 8, "keypoint": 8}
    was = detector.training
    detector.eval()
    try:
        sizes = [tuple(images.shape[-2:])] * images.shape[0]
        feats = detector.backbone(images)
        if isinstance(feats, torch.Tensor):
            feats = OrderedDict([("0", feats)])
        from torchvision.models.detection.image_list import ImageList

        proposals, _ = detector.rpn(ImageList(images, sizes), feats)
        rh = detector.roi_heads
        boxes, scores, labels = rh.postprocess_detections(*rh.box_predictor(rh.box_head(
            rh.box_roi_pool(feats, proposals, sizes))), proposals, sizes)
    finally:
        detector.train(was)
    per_image = max(1, round(sum(len(p) for p in proposals) / len(proposals)))
    detections = max(1, round(sum(len(b) for b in boxes) / len(boxes)))
    return {"box": per_image, "mask": detections, "keypoint": detections}


def _rcnn_prepare(core: DetectorCore) -> None:
    core.roi_counts = roi_counts(core.detector, core.example)
    core.roi_pool = FixedRoIPool(core.detector.roi_heads.box_roi_pool, core.roi_counts["box"])


def _rcnn_heads(core: DetectorCore, features: OrderedDict[str, torch.Tensor], images: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
    det = core.detector
    objectness, deltas = det.rpn.head(list(features.values()))
    pooled = core.roi_pool(features, images)
    class_logits, box_regression = det.roi_heads.box_predictor(det.roi_heads.box_head(pooled))
    return (*objectness, *deltas, class_logits, box_regression)


register_family(DetectorFamily(
    "two_stage", ("torchvision.models.detection.faster_rcnn.FasterRCNN",), _rcnn_heads,
    ("rpn_objectness", "rpn_deltas", "class_logits", "box_regression"), _rcnn_prepare,
    raw=("rpn.head", "roi_heads.box_predictor"), distil=("rpn.head",)))


# ---- two-stage with a second RoI head: Mask R-CNN (masks), Keypoint R-CNN (keypoints) -------------------------

def _second_head(kind: str) -> tuple[Callable[[DetectorCore], None], HeadsFn]:
    """Faster R-CNN's heads and the ``kind`` head (``mask`` or ``keypoint``): the detector's own RoI pooling of
    that head on the fixed boxes, its convolutions, its predictor."""

    def prepare(core: DetectorCore) -> None:
        _rcnn_prepare(core)
        core.add_module(f"{kind}_pool", FixedRoIPool(getattr(core.detector.roi_heads, f"{kind}_roi_pool"),
                                                     core.roi_counts[kind]))

    def heads(core: DetectorCore, features: OrderedDict[str, torch.Tensor], images: torch.Tensor
              ) -> tuple[torch.Tensor, ...]:
        rh = core.detector.roi_heads
        pooled = getattr(core, f"{kind}_pool")(features, images)
        logits = getattr(rh, f"{kind}_predictor")(getattr(rh, f"{kind}_head")(pooled))
        return (*_rcnn_heads(core, features, images), logits)

    return prepare, heads


_mask_prepare, _mask_heads = _second_head("mask")
register_family(DetectorFamily(
    "mask_rcnn", ("torchvision.models.detection.mask_rcnn.MaskRCNN",), _mask_heads,
    ("rpn_objectness", "rpn_deltas", "class_logits", "box_regression", "mask_logits"), _mask_prepare,
    raw=("rpn.head", "roi_heads.box_predictor"), distil=("rpn.head",)))
_keypoint_prepare, _keypoint_heads = _second_head("keypoint")
register_family(DetectorFamily(
    "keypoint_rcnn", ("torchvision.models.detection.keypoint_rcnn.KeypointRCNN",), _keypoint_heads,
    ("rpn_objectness", "rpn_deltas", "class_logits", "box_regression", "keypoint_logits"), _keypoint_prepare,
    raw=("rpn.head", "roi_heads.box_predictor"), distil=("rpn.head",)))
