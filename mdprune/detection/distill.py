"""Distillation from the dense detector while a pruned one fine-tunes: its raw head outputs are matched.

The student (the pruned detector, training on its loss dict) and the teacher (the dense detector, eval mode,
no gradients) see the same transformed images; the outputs of the family's ``distil`` modules (one value per
anchor or location: SSD's and RetinaNet's class logits and box regressions, Faster R-CNN's RPN) are compared by
mean squared error, summed over the outputs, times ``weight``, and added to the detection loss.

Why the raw outputs and not the detections: they are what post-processing reads, and matching them carries the
dense detector's confidence to the pruned one, background included. A pruned detector fine-tuned on its loss
alone stays unsure about the background: in bench/detection.py (ssdlite320_mobilenet_v3_large, 160 px, 30%)
it kept 132-283 boxes above the 0.01 score threshold per real image, the dense detector 1-5, and its NMS made
it measure 41% of the dense latency instead of 30%.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .wrap import DetectorCore, family_of


def _tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a module's output, in a fixed order (dict values by key, sequences in order)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _tensors(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def check_weight(weight: float) -> None:
    """Refuse a negative distillation weight (0 turns distillation off)."""
    if weight < 0:
        raise ValueError(f"the distillation weight must be >= 0, got {weight}")


class RawDistiller:
    """Hooks on a student detector that record its raw outputs; :meth:`loss` compares them with the teacher's
    on the same transformed images. Use as a context manager around training (the hooks go when it exits).

    Args:
        student: the detector being fine-tuned (the pruned one).
        teacher: the dense detector (run in eval mode without gradients; its mode is restored on close).
        weight: factor of the matching term (0: none).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, weight: float = 1.0):
        check_weight(weight)
        fam = family_of(teacher)
        if type(student) is not type(teacher):
            raise ValueError(f"student {type(student).__name__} and teacher {type(teacher).__name__} differ")
        if not fam.distil:
            raise ValueError(f"the detector family {fam.name!r} names no modules to distil (DetectorFamily.distil)")
        if not isinstance(getattr(student, "transform", None), nn.Module):
            raise ValueError(f"{type(student).__name__} has no `transform` module: the distiller reads the images "
                             "the student's heads saw from its output")
        self.paths = fam.distil
        self.weight = float(weight)
        # the teacher runs under no_grad: its parameters' flags are left alone (a later importance pass on the
        # dense detector reads their gradients)
        self.teacher, self._was_training = teacher, teacher.training
        self._core = DetectorCore(teacher, fam)
        self._images: torch.Tensor | None = None
        self._student: dict[str, list[torch.Tensor]] = {}
        self._handles = [student.transform.register_forward_hook(self._on_transform)]
        for path in self.paths:
            self._handles.append(student.get_submodule(path).register_forward_hook(self._keeper(path, self._student)))

    def _on_transform(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        image_list = out[0] if isinstance(out, tuple) else out
        self._images = image_list.tensors
        self._student.clear()

    @staticmethod
    def _keeper(path: str, into: dict[str, list[torch.Tensor]]):  # noqa: ANN205 - a hook factory
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            into[path] = _tensors(out)
        return hook

    @torch.no_grad()
    def _teacher_outputs(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        got: dict[str, list[torch.Tensor]] = {}
        handles = [self.teacher.get_submodule(p).register_forward_hook(self._keeper(p, got)) for p in self.paths]
        try:
            self._core.eval()
            self._core(images)
        finally:
            for h in handles:
                h.remove()
        return got

    def loss(self) -> torch.Tensor:
        """The matching term for the student's last forward pass (a zero tensor when ``weight`` is 0)."""
        if self._images is None or not self._student:
            raise RuntimeError("the student detector has not run since the distiller was set up")
        if self.weight == 0.0:
            return self._images.new_zeros(())
        teacher = self._teacher_outputs(self._images.detach())
        terms = []
        for path in self.paths:
            s, t = self._student.get(path, []), teacher.get(path, [])
            if len(s) != len(t) or any(a.shape != b.shape for a, b in zip(s, t, strict=False)):
                raise ValueError(f"{path}: the pruned and dense detectors' outputs differ in shape "
                                 f"({[tuple(a.shape) for a in s]} vs {[tuple(b.shape) for b in t]}); only modules "
                                 "with one output per anchor or location can be distilled")
            terms += [F.mse_loss(a.float(), b.float()) for a, b in zip(s, t, strict=True)]
        return self.weight * torch.stack(terms).sum()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.teacher.train(self._was_training)

    def __enter__(self) -> RawDistiller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
