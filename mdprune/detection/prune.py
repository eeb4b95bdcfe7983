"""Prune a detector to a whole-detector latency budget: importance from its own loss, one-shot or iterative.

Importance: the detector in training mode returns its loss dict; the sum is back-propagated through the full
detector running the masked core (weights shared with it), and each element's gate gradient is read from the
core's parameters (:class:`mdprune.importance.ImportanceAccumulator`), as for a classifier's cross-entropy.
One-shot: importance over N batches, one solve (checked on the measured latency of the whole detector), slim.
Iterative: K steps, each training the masked detector for P batches (importance accumulated meanwhile), then
solving at the next budget on the path ``L0 * (T / L0) ** ((t + 1) / K)``, widths never growing back.
BatchNorm statistics are recalibrated after slimming where the detector has BatchNorm (FrozenBatchNorm2d holds
fixed statistics and is left alone).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..apply.mask import apply_masks_
from ..importance import ImportanceAccumulator
from ..latency import LatencySettings, LatencyTable, open_table
from ..search import Search, check_budget, parse_budget, solve_within_measured_budget
from ..space import Plan, PruningSpace
from .core import analyze_detector, masked_detector, slim_detector
from .distill import RawDistiller, check_weight
from .latency import calibrated_detector_model, check_timing_images, timed_detector, timing_images

Batch = tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]


def detection_loss(detector: nn.Module, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
                   ) -> torch.Tensor:
    """The sum of the detector's loss dict (training mode)."""
    missing = required_targets(detector) - set(targets[0]) if targets else set()
    if missing:
        from ..train.data import DataError

        raise DataError(f"{type(detector).__name__} trains on {sorted(missing)} in its targets, which this data "
                        "lacks: give COCO-format data with segmentations (masks) or person keypoints (keypoints); "
                        "the generated set has masks")
    losses = detector(images, targets)
    return sum(losses.values())


def required_targets(detector: nn.Module) -> set[str]:
    """What a detector's training targets need beyond boxes and labels: ``masks`` (Mask R-CNN), ``keypoints``
    (Keypoint R-CNN)."""
    heads = getattr(detector, "roi_heads", None)
    need = set()
    if heads is not None and getattr(heads, "mask_head", None) is not None:
        need.add("masks")
    if heads is not None and getattr(heads, "keypoint_head", None) is not None:
        need.add("keypoints")
    return need


def _to(batch: Batch, device: torch.device | str) -> Batch:
    images, targets = batch
    return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def _take(batches: Iterable[Batch], n: int | None) -> Iterator[Batch]:
    for i, b in enumerate(batches):
        if n is not None and i >= n:
            return
        yield b


def detection_importance(space: PruningSpace, detector: nn.Module, batches: Iterable[Batch], max_batches: int = 8,
                         device: str | torch.device = "cpu", plan: Plan | None = None,
                         model: nn.Module | None = None) -> dict[str, np.ndarray]:
    """Importance of every element of ``space`` from the detector's own loss over ``max_batches`` batches.

    Runs a copy (the masked detector of ``plan``, default: nothing pruned, with the weights of ``model``, a
    core, if given); ``detector`` is left as it was.
    """
    det, core = masked_detector(space, plan or Plan.identity(), detector, model)
    det.to(device).train()
    acc = ImportanceAccumulator(space, core)
    try:
        for batch in _take(batches, max_batches):
            core.zero_grad(set_to_none=True)
            detection_loss(det, *_to(batch, device)).backward()
            acc.step()
    finally:
        acc.close()
    return acc.scores()


def finetune(detector: nn.Module, batches: Callable[[], Iterable[Batch]], epochs: int = 1, lr: float = 0.01,
             device: str | torch.device = "cpu", after_step: Callable[[], None] | None = None,
             max_batches: int | None = None, log: Callable[[str], None] | None = None,
             teacher: nn.Module | None = None, distill: float = 0.0) -> nn.Module:
    """Train ``detector`` on its loss dict (SGD with momentum, cosine learning rate), ``epochs`` passes over
    ``batches()``; ``after_step`` runs after each optimizer step (to hold pruned weights at zero).

    With ``teacher`` (the dense detector) and ``distill`` > 0, the loss also holds ``distill`` times the mean
    squared error between the two detectors' raw head outputs on the same images
    (:class:`~mdprune.detection.distill.RawDistiller`)."""
    params = [p for p in detector.parameters() if p.requires_grad]
    if not params or epochs <= 0:
        return detector
    check_weight(distill)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    total = epochs * (max_batches or _count(batches()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + np.cos(np.pi * min(i / max(total, 1), 1))))
    detector.to(device).train()
    distiller = None
    if teacher is not None and distill > 0:
        distiller = RawDistiller(detector, teacher.to(device), distill)
    try:
        for epoch in range(epochs):
            running, kd, n = 0.0, 0.0, 0
            for batch in _take(batches(), max_batches):
                loss = detection_loss(detector, *_to(batch, device))
                if distiller is not None:
                    term = distiller.loss()
                    kd += term.item()
                    loss = loss + term
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the detection loss is {loss.item()} at epoch {epoch}: lower the "
                                             "learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 10.0)
                opt.step()
                sched.step()
                if after_step is not None:
                    after_step()
                running, n = running + loss.item(), n + 1
            if log is not None:
                extra = f" (distillation {kd / max(n, 1):.4f})" if distiller is not None else ""
                log(f"epoch {epoch + 1}/{epochs}: loss {running / max(n, 1):.4f}{extra}")
    finally:
        if distiller is not None:
            distiller.close()
    return detector.eval()


def _count(it: Iterable[Any]) -> int:
    try:
        return len(it)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in it)


@torch.no_grad()
def recalibrate_bn(detector: nn.Module, batches: Iterable[Batch], max_batches: int = 8,
                   device: str | torch.device = "cpu") -> bool:
    """Re-estimate the running statistics of every BatchNorm (not FrozenBatchNorm2d) on ``batches``: the
    detector runs in training mode (its loss is computed and dropped). Returns whether it had any BatchNorm."""
    bns = [m for m in detector.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return False
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    detector.to(device).train()
    for batch in _take(batches, max_batches):
        detection_loss(detector, *_to(batch, device))
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
    detector.eval()
    return True


@dataclass
class DetectionPruneReport:
    """What was asked, predicted and measured (whole-detector latency, in ms)."""

    target_ms: float
    predicted_ms: float
    dense_ms: float
    fixed_ms: float  # the latency model's constant: what the tables do not see (transform, post-processing)
    measured_ms: float | None
    measured_dense_ms: float | None
    params: tuple[int, int]
    macs: tuple[int, int]
    removed_blocks: list[str]
    widths: dict[str, tuple[int, int]]
    plan: dict[str, Any]
    schedule: str = "oneshot"
    steps: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    timed_on: str = "random images"  # what the latency measurements ran the detectors on

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        m = f", measured {self.measured_ms:.3f} ms (dense {self.measured_dense_ms:.3f} ms in the same run)" \
            if self.measured_ms is not None and self.measured_dense_ms else ""
        return (f"target {self.target_ms:.3f} ms of dense {self.dense_ms:.3f} ms (fixed part {self.fixed_ms:.3f} ms)"
                f", predicted {self.predicted_ms:.3f} ms{m}; params {self.params[1]:,} of {self.params[0]:,}; "
                f"{len(self.removed_blocks)} blocks removed; timed on {self.timed_on}")


def prune_detector(
    detector: nn.Module,
    image_size: int,
    budget: str | float = "50%",
    *,
    data: Callable[[], Iterable[Batch]] | None = None,
    scores: dict[str, np.ndarray] | None = None,
    batch: int = 1,
    settings: LatencySettings | None = None,
    lut: str | Path | LatencyTable | None = None,
    space: PruningSpace | None = None,
    ignored_layers: Iterable[str] = (),
    importance_batches: int = 8,
    schedule: str = "oneshot",
    steps: int = 3,
    every: int = 8,
    lr: float = 0.01,
    distill: float = 0.0,
    blocks: bool = True,
    verify_rounds: int = 3,
    timing_images: torch.Tensor | str = "data",
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
) -> tuple[nn.Module, DetectionPruneReport]:
    """Prune ``detector`` to ``budget`` of its whole end-to-end latency at ``image_size`` and ``batch``.

    Args:
        detector: a torchvision detector (or one of a registered family), trained.
        image_size: square size of the images as the detector's transform hands them to the backbone.
        budget: ``"50%"`` of the dense detector's measured latency, or milliseconds.
        data: a function returning an iterable of ``(images, targets)`` batches in torchvision's format (a new
            pass each call): importance, the iterative schedule's training and BatchNorm recalibration.
        schedule: ``"oneshot"`` or ``"iterative"`` (``steps`` solves, ``every`` training batches before each).
        distill: weight of the dense detector's raw outputs matched while the iterative schedule trains (see
            :func:`finetune`; 0: its loss dict only).
        verify_rounds: re-solves allowed while the measured latency misses the budget significantly
            (see :mod:`mdprune.search.measured`).
        timing_images: what every latency measurement runs the detectors on: ``"data"`` (the first images of
            one pass of ``data``, random ones without data), ``"random"``, or a ``(batch, 3, S, S)`` tensor.
            Post-processing costs what the detections make it cost, and on random images a trained detector
            scores far more boxes than on real ones (:mod:`mdprune.detection.latency`).

    Returns:
        The slim detector (fine-tune it with :func:`finetune`) and a :class:`DetectionPruneReport`.
    """
    check_budget(budget, "latency")
    if schedule not in ("oneshot", "iterative"):
        raise ValueError("schedule is 'oneshot' or 'iterative'")
    check_weight(distill)
    if scores is None and data is None:
        raise ValueError("importance needs data= (a function giving (images, targets) batches), or scores=")
    t0 = time.monotonic()
    seconds: dict[str, float] = {}
    settings = settings or LatencySettings(batch=batch)
    images = _timing_images(timing_images, data, settings.batch, image_size)
    detector = detector.eval()
    if space is None:
        space = analyze_detector(detector, torch.randn(1, 3, image_size, image_size), ignored_layers=ignored_layers)
    seconds["analyze"] = time.monotonic() - t0
    t = time.monotonic()
    lm, dense = calibrated_detector_model(detector, space, open_table(settings, lut), settings, images=images)
    seconds["latency"] = time.monotonic() - t
    target = parse_budget(budget, dense["ms"])
    search = Search(space, lm, {"latency": target}, blocks=blocks)
    rows = search.table({"latency": dense["ms"]})
    search.check(rows)
    say = log or (lambda s: None)
    plan, step_log, trained = Plan.identity(), [], None
    t = time.monotonic()
    if schedule == "iterative":
        assert data is not None
        plan, step_log, trained = _iterative(space, detector, search, data, dense["ms"], target, steps, every, lr,
                                             device, distill, say)
        seconds["iterative"] = time.monotonic() - t
        t = time.monotonic()
    if scores is None:
        assert data is not None
        scores = detection_importance(space, detector, data(), importance_batches, device, plan, trained)
    seconds["importance"] = time.monotonic() - t
    t = time.monotonic()
    current = plan if schedule == "iterative" else None

    def solve_at(ms: float) -> tuple[Plan, Any]:
        return search.solve(scores, ms, current=current)

    plan, _, checks = solve_within_measured_budget(space, lm, settings, solve_at, target, dense["ms"],
                                                   rounds=verify_rounds, log=say,
                                                   timed=timed_detector(detector, space, images))
    seconds["solve"] = time.monotonic() - t
    final = next(c for c in checks if c["kept"])
    pruned = slim_detector(space, plan, detector, trained)
    if data is not None:
        recalibrate_bn(pruned, data(), importance_batches, device)
    sizes, removed = plan.sizes(space), set(plan.removed)
    report = DetectionPruneReport(
        target_ms=target, predicted_ms=lm.predict(sizes, removed), dense_ms=dense["ms"], fixed_ms=dense["fixed_ms"],
        measured_ms=final["measured_ms"], measured_dense_ms=final["measured_dense_ms"],
        params=(space.count_params(), space.count_params(sizes, removed)),
        macs=(space.count_macs(), space.count_macs(sizes, removed)), removed_blocks=sorted(removed),
        widths={d.name: (sizes[d.name], d.size) for d in space.prunable_dims()}, plan=plan.to_dict(),
        schedule=schedule, steps=step_log, checks=checks, seconds=seconds,
        timed_on="random images" if images is None else
        f"the data's first {len(images)} image(s)" if isinstance(timing_images, str) else
        f"{len(images)} given image(s)")
    pruned._mdprune_detection = {"source": getattr(detector, "_mdprune_source", None), "plan": plan.to_dict(),
                                 "image_size": image_size, "ignored_layers": list(space.options["ignored_layers"])}
    return pruned.eval(), report


def _timing_images(how: torch.Tensor | str, data: Callable[[], Iterable[Batch]] | None, batch: int,
                   image_size: int) -> torch.Tensor | None:
    """The images ``prune_detector`` times detectors on (``None``: random ones)."""
    if isinstance(how, torch.Tensor):
        return check_timing_images(how, batch, image_size)
    if how not in ("data", "random"):
        raise ValueError(f"timing_images is 'data', 'random' or a tensor, not {how!r}")
    return timing_images(data(), batch, image_size) if how == "data" and data is not None else None


def _iterative(space: PruningSpace, detector: nn.Module, search: Search, data: Callable[[], Iterable[Batch]],
               dense_ms: float, target: float, steps: int, every: int, lr: float, device: str | torch.device,
               distill: float, say: Callable[[str], None]) -> tuple[Plan, list[dict[str, Any]], nn.Module]:
    """Train the masked detector (with ``distill`` > 0, matching the dense detector's raw outputs too),
    pruning a little more every ``every`` batches (importance read while training); the last step's budget is
    left to the final, measured solve."""
    plan = Plan.identity()
    det, core = masked_detector(space, plan, detector)
    det.to(device).train()
    masks: dict[str, dict[int, torch.Tensor]] = {}
    named = dict(core.named_parameters())

    def hold() -> None:
        with torch.no_grad():
            for name, axes in masks.items():
                if name in named:
                    for axis, keep in axes.items():
                        view = [1] * named[name].dim()
                        view[axis] = -1
                        named[name].mul_(keep.to(named[name]).view(view))

    log: list[dict[str, Any]] = []
    opt = torch.optim.SGD([p for p in det.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    distiller = RawDistiller(det, detector.to(device), distill) if distill > 0 else None
    try:
        for step in range(max(steps - 1, 0)):
            acc = ImportanceAccumulator(space, core)
            try:
                for batch in _take(data(), every):
                    opt.zero_grad(set_to_none=True)
                    loss = detection_loss(det, *_to(batch, device))
                    if distiller is not None:
                        loss = loss + distiller.loss()
                    loss.backward()
                    acc.step()
                    opt.step()
                    hold()
            finally:
                acc.close()
            budget = dense_ms * (target / dense_ms) ** ((step + 1) / steps)
            floor = search.smallest("latency", current=plan)
            plan, sol = search.solve(acc.scores(), max(budget, floor * 1.0001), current=plan)
            masks = apply_masks_(core, space, plan)
            predicted = search.latency.predict_plan(plan)
            say(f"step {step + 1}/{steps}: budget {budget:.3f} ms, predicted {predicted:.3f} ms")
            log.append({"step": step + 1, "budget_ms": budget, "predicted_ms": predicted,
                        "removed_blocks": len(plan.removed), "status": sol.status})
    finally:
        if distiller is not None:
            distiller.close()
    return plan, log, core
