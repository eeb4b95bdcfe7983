"""Analyse, mask and slim a detector through its traceable core."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..apply import masked, slim
from ..space import AnalysisError, Plan, PruningSpace, analyze
from .implant import implant
from .wrap import PREFIX, DetectorCore, DetectorFamily


def analyze_detector(detector: nn.Module, images: torch.Tensor, *, family: DetectorFamily | None = None,
                     steps: Mapping[str, int] | None = None, ignored_layers: Iterable[str] = (),
                     unsupported: str = "error", source: Mapping[str, Any] | None = None) -> PruningSpace:
    """The pruning space of ``detector``'s core (backbone, neck, heads) for transformed ``images`` (N, 3, H, W).

    Layer names are core paths: ``detector.`` + the detector's own (``ignored_layers`` may be given either way).
    Raises AnalysisError if some layer of the detector outside the core would read pruned channels.
    """
    core = DetectorCore(detector, family, example=images)
    ignored = [n if n.startswith(PREFIX) else PREFIX + n for n in ignored_layers]
    space = analyze(core, images, steps=steps, ignored_layers=ignored, unsupported=unsupported, source=source)
    _check_covered(detector, space)
    return space


def _check_covered(detector: nn.Module, space: PruningSpace) -> None:
    """Every parameter of the detector must be run by the core: a layer outside it (a mask head) would read
    channels the core prunes."""
    used = {n.target for n in space.module.graph.nodes if n.op in ("call_module", "get_attr")}
    missing = sorted({name.rpartition(".")[0] for name, _ in detector.named_parameters()
                      if not any((PREFIX + name).startswith(u + ".") or PREFIX + name == u for u in used)})
    if missing:
        raise AnalysisError(f"layers of {type(detector).__name__} outside its traced core: {missing[:5]}; their "
                            "channels cannot be followed (register a detector family whose heads run them)")


def slim_detector(space: PruningSpace, plan: Plan, detector: nn.Module, model: nn.Module | None = None) -> nn.Module:
    """The full detector with the slim core of ``plan`` (weights from ``model``, a core or detector, if given)."""
    return implant(detector, slim(space, plan, _core_weights(model)), space)


def masked_detector(space: PruningSpace, plan: Plan, detector: nn.Module, model: nn.Module | None = None
                    ) -> tuple[nn.Module, nn.Module]:
    """The full detector running the masked core of ``plan``, and that masked core (they share weights)."""
    core = masked(space, plan, _core_weights(model))
    return implant(detector, core, space), core


def _core_weights(model: nn.Module | None) -> nn.Module | None:
    """A detector's weights under core names (a core, or a masked core, is taken as it is)."""
    if model is None or isinstance(model, (DetectorCore, torch.fx.GraphModule)):
        return model
    wrapper = nn.Module()
    wrapper.detector = model
    return wrapper
