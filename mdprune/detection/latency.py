"""Latency of the whole detector: transform, backbone, neck, heads and post-processing, measured end to end.

The latency tables time the core's ops (convolutions of backbone, neck and heads) as for a classifier. What the
core does not run (image transform, anchor generation, box decoding, NMS, proposal selection, RoI pooling) is the
*fixed cost*: the latency model's constant, calibrated on end-to-end measurements of the whole detector (the
dense one and reference plans, in one run), absorbs it, so predicted and measured latencies are the
detector's. The detector is measured on a batch of transformed-size images as one tensor (torchvision detectors
take an (N, 3, H, W) tensor as a batch of images).

The cost of box decoding and NMS grows with the boxes scored above the threshold, so what is timed decides it:
- Detectors are timed on real images where there are any (:func:`timing_images`, :func:`on_images`): on random
  ones, a trained detector scores boxes as it never does on images (measured, ssdlite320_mobilenet_v3_large
  trained on the generated set at 160 px: 160-260 detections per random image, 1-8 per real one), and the
  post-processing timed is not the deployed one.
- A pruned detector is timed with the dense detector's detections (:func:`with_dense_detections`): a detector just
  pruned, not yet fine-tuned, scores many more boxes than it will once fine-tuned.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..apply import slim
from ..latency import (
    LatencyModel,
    LatencySettings,
    LatencyTable,
    Measurement,
    Ratio,
    RatioSettings,
    Validation,
    build,
    calibration_plans,
    measure_models,
    measure_models_ratio,
)
from ..latency.build import random_inputs
from ..search.calibrate import reference_fractions
from ..space import Plan, PruningSpace
from .implant import implant
from .wrap import family_of


def timing_images(batches: Iterable[Any], batch: int, image_size: int) -> torch.Tensor:
    """A ``(batch, 3, S, S)`` tensor of the first ``batch`` images of ``batches`` (``(images, targets)`` pairs in
    torchvision's format, or bare lists of images), each resized to ``image_size`` square where it is not; read
    again from the first image when there are fewer."""
    images: list[torch.Tensor] = []
    for b in batches:
        for x in (b[0] if isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[0], (list, tuple)) else b):
            if x.shape[-2:] != (image_size, image_size):
                x = nn.functional.interpolate(x[None].float(), size=(image_size, image_size), mode="bilinear",
                                              align_corners=False)[0]
            images.append(x.float())
            if len(images) == batch:
                return torch.stack(images)
    if not images:
        raise ValueError("no images to time the detector on: the data gave none")
    return torch.stack([images[i % len(images)] for i in range(batch)])


def check_timing_images(images: torch.Tensor, batch: int, image_size: int) -> torch.Tensor:
    """``images``, if they are the ``(batch, 3, S, S)`` tensor the latency settings time; else a ``ValueError``."""
    if tuple(images.shape) != (batch, 3, image_size, image_size):
        raise ValueError(f"timing images of shape {tuple(images.shape)}: the latency batch and image size give "
                         f"{(batch, 3, image_size, image_size)}")
    return images


def on_images(detector: nn.Module, images: torch.Tensor | None) -> nn.Module:
    """``detector`` (hooked in place and returned) run on ``images`` whenever it is called in eval mode with a
    tensor batch of their shape, whatever that tensor holds: the timing code's random inputs become real images
    (on the inputs' device, dtype and memory format), before the detector's other forward pre-hooks see them.
    ``None``: left as it is."""
    if images is None:
        return detector
    seen: dict[tuple[Any, ...], torch.Tensor] = {}

    def swap(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0] if args else None
        if module.training or not isinstance(x, torch.Tensor) or x.shape != images.shape:
            return None
        layout = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous() else torch.contiguous_format
        key = (x.device, x.dtype, layout)
        if key not in seen:  # one tensor per kind: with_dense_detections keys its cache on the tensor's identity
            seen[key] = images.to(device=x.device, dtype=x.dtype).contiguous(memory_format=layout)
        return (seen[key], *args[1:])

    detector.register_forward_pre_hook(swap, prepend=True)  # before any other hook (with_dense_detections's)
    return detector


def with_dense_detections(pruned: nn.Module, dense: nn.Module) -> nn.Module:
    """``pruned`` (the dense detector with a masked or slim core; hooked in place and returned) set up to be
    timed as it will run once fine-tuned: its raw outputs (its family's ``raw`` modules: scores and box
    regressions before decoding) are computed and then replaced by the dense detector's for the same images, so
    that box decoding, NMS and the second stage handle as many boxes as the dense detector's do.

    Why: before fine-tuning, a pruned detector scores many boxes low but above the score threshold, and its
    post-processing takes longer than after. Measured (bench/detection.py, ssdlite320_mobilenet_v3_large at 160 px,
    batch 8): a plan measured at 69.2% of the dense latency when checked, 58.0% once fine-tuned.

    Training mode and families without ``raw`` modules are left as they are."""
    paths = family_of(dense).raw
    if not paths:
        return pruned
    state: dict[str, Any] = {"key": None, "outs": {}}

    def before(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        images = [x] if isinstance(x, torch.Tensor) else list(x) if isinstance(x, (list, tuple)) else []
        if module.training or not images or not all(isinstance(t, torch.Tensor) for t in images):
            state["key"] = None
            return
        # timing runs the same images again and again: the dense outputs once. The key holds the tensors
        # themselves (compared by identity and version), so a new tensor cannot take a freed one's place
        key = tuple((t, t._version) for t in images)
        old = state["key"]
        same = old is not None and len(old) == len(key) and all(
            a is b and u == v for (a, u), (b, v) in zip(old, key, strict=True))
        if not same:
            state["outs"], state["key"] = dense_raw_outputs(dense, x, paths), key

    def swap(path: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            return state["outs"].get(path, out) if state["key"] is not None else out
        return hook

    pruned.register_forward_pre_hook(before)
    for path in paths:
        pruned.get_submodule(path).register_forward_hook(swap(path))
    return pruned


@torch.no_grad()
def dense_raw_outputs(dense: nn.Module, images: torch.Tensor | list[torch.Tensor], paths: tuple[str, ...]
                      ) -> dict[str, Any]:
    """The outputs of ``dense``'s modules at ``paths`` for ``images`` (a batch tensor or a list of images; eval
    mode, on the images' device and dtype)."""
    p, first = next(dense.parameters()), images if isinstance(images, torch.Tensor) else images[0]
    ref = dense if (p.device, p.dtype) == (first.device, first.dtype) else \
        copy.deepcopy(dense).to(device=first.device, dtype=first.dtype)
    outs: dict[str, Any] = {}
    handles = [ref.get_submodule(path).register_forward_hook(
        lambda m, a, o, path=path: outs.__setitem__(path, o)) for path in paths]
    was = ref.training
    ref.eval()
    try:
        ref(images)
    finally:
        ref.train(was)
        for h in handles:
            h.remove()
    return outs


def timed_detector(detector: nn.Module, space: PruningSpace, images: torch.Tensor | None = None
                   ) -> Callable[[nn.Module], nn.Module]:
    """``core -> what is timed``: the dense ``detector`` running ``core`` (a masked or slim core of ``space``),
    on ``images`` (:func:`on_images`; ``None``: the timing code's random inputs), with the dense detector's
    detections (:func:`with_dense_detections`)."""
    return lambda core: with_dense_detections(on_images(implant(detector, core, space), images), detector)


def measure_detector_ratio(pruned: nn.Module, dense: nn.Module, image_size: int, settings: LatencySettings,
                           ratio: RatioSettings | None = None, images: torch.Tensor | None = None) -> Ratio:
    """``pruned``'s end-to-end latency as a fraction of ``dense``'s, timed alternately in one run on ``images``
    (a ``(batch, 3, S, S)`` tensor, :func:`timing_images`; ``None``: random ones), each detector with its own
    detections: the figure for a fine-tuned detector as it will run (a detector only just pruned is timed with
    the dense detector's detections instead, see :func:`with_dense_detections`)."""
    inputs = random_inputs([(1, 3, image_size, image_size)], settings)
    if images is None:
        return measure_models_ratio(pruned, dense, None, settings, ratio, inputs=inputs)
    check_timing_images(images, settings.batch, image_size)
    return measure_models_ratio(on_images(copy.deepcopy(pruned), images), on_images(copy.deepcopy(dense), images),
                                None, settings, ratio, inputs=inputs)


def measure_detectors(detector: nn.Module, space: PruningSpace, plans: dict[str, Plan], settings: LatencySettings,
                      progress: bool = False, images: torch.Tensor | None = None) -> dict[str, Measurement]:
    """End-to-end latency of the detector slimmed to each plan, measured interleaved in one run (on ``images``,
    see :func:`timed_detector`)."""
    timed = timed_detector(detector, space, images)
    return measure_models({k: timed(slim(space, p)) for k, p in plans.items()}, space, settings, progress=progress)


def calibrated_detector_model(detector: nn.Module, space: PruningSpace, table: LatencyTable,
                              settings: LatencySettings, mode: str = "table", references: bool = True,
                              progress: bool = False, images: torch.Tensor | None = None
                              ) -> tuple[LatencyModel, dict[str, float]]:
    """Measure what ``table`` lacks for the core, then calibrate on the whole detector's measured latency (timed on
    ``images``: :func:`timed_detector`).

    Returns the model and ``{"ms": the dense detector's latency, "noise": its spread, "fixed_ms": the part of
    it the tables do not see (the model's constant: transform, post-processing, ...)}``.
    """
    build(space, table, settings, progress=progress, calibrate=False)
    # the floor among the references: fitted on the middle of the range alone, the line through them predicted
    # ssdlite320's floor at 128 px at 54.9% of dense where the smallest plan measured 51.6%; with it, 52.2%
    # (bench/results/detection-floor-fit.json)
    refs = calibration_plans(space, smallest=True) if references else []
    measured = measure_detectors(detector, space, {"dense": Plan.identity()}, settings, progress, images)
    # each reference timed alternately with the dense detector: separate measurements of whole detectors could
    # show a smaller plan as slower, and the fitted scale collapsed ("nothing reachable")
    fractions = reference_fractions(space, settings, refs, timed=timed_detector(detector, space, images))
    lm = LatencyModel(space, table, mode, settings.grid_points, settings.grid_points_3d)
    lm.calibrate(measured["dense"].ms, [(p, f * measured["dense"].ms) for p, f in zip(refs, fractions, strict=True)])
    return lm, {"ms": measured["dense"].ms, "noise": measured["dense"].noise, "fixed_ms": lm.constant}


def validate_detector(detector: nn.Module, space: PruningSpace, table: LatencyTable, settings: LatencySettings,
                      plans: list[Plan], progress: bool = False, calibrate_scale: bool = True,
                      images: torch.Tensor | None = None) -> Validation:
    """Predicted against measured end-to-end latency of the whole detector slimmed to random ``plans``: the
    figures of :func:`mdprune.latency.validate` (each detector measured twice, models calibrated on the dense
    detector and reference plans of the same run, never on the plans checked), timed on ``images``
    (:func:`timed_detector`)."""
    build(space, table, settings, progress=progress, calibrate=False)
    references = calibration_plans(space, smallest=True)
    named = {"dense": Plan.identity()} | {f"ref{i}": p for i, p in enumerate(references)} \
        | {f"plan{i}": p for i, p in enumerate(plans)}
    timed = timed_detector(detector, space, images)
    dets = {k: timed(slim(space, p)) for k, p in named.items()}
    measured = measure_models({(k, r): d for k, d in dets.items() for r in (0, 1)}, space, settings,
                              progress=progress)
    best = {k: min(measured[(k, 0)].ms, measured[(k, 1)].ms) for k in named}
    refs = [(p, best[f"ref{i}"]) for i, p in enumerate(references)] if calibrate_scale else None
    models = {m: LatencyModel(space, table, m, settings.grid_points, settings.grid_points_3d)
              for m in ("table", "linear")}
    for lm in models.values():
        lm.calibrate(best["dense"], refs)
    out = Validation(dense_ms=best["dense"], scale={m: lm.scale for m, lm in models.items()})
    for i, p in enumerate(plans):
        out.rows.append({"plan": i, "removed_blocks": len(p.removed),
                         "params": space.count_params(p.sizes(space), set(p.removed)), "measured": best[f"plan{i}"],
                         "table": models["table"].predict_plan(p), "linear": models["linear"].predict_plan(p),
                         "noise": measured[(f"plan{i}", 0)].noise})
    out.noise_floor = statistics.median(abs(measured[(k, 0)].ms - measured[(k, 1)].ms)
                                        / min(measured[(k, 0)].ms, measured[(k, 1)].ms) for k in named)
    out.fixed_ms = models["table"].constant  # type: ignore[attr-defined]
    return out
