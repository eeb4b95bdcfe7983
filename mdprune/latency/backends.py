"""Runtimes a latency is measured in. A table is only valid for the runtime it was measured in.

A backend turns a module into a callable (``runner``) and measures a set of runners together (``measure``).
Passing a backend object in :class:`~mdprune.latency.LatencySettings` (``backend=...``) replaces every
measurement mdprune takes: :class:`FlopsBackend` gives deterministic "latencies" for tests and dry runs.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .timing import Measurement, TimingSettings, measure_many


@runtime_checkable
class Backend(Protocol):
    """Turns a module and its inputs into a callable that runs one forward pass, and measures such callables."""

    name: str

    def runner(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]: ...

    def measure(self, runners: Mapping[Hashable, Callable[[], Any]], timing: TimingSettings,
                on_round: Callable[[int], None] | None = None) -> dict[Hashable, Measurement]: ...


class TimedBackend:
    """A backend whose runners are timed on the wall clock (see :func:`mdprune.latency.measure_many`)."""

    name = "timed"

    def measure(self, runners: Mapping[Hashable, Callable[[], Any]], timing: TimingSettings,
                on_round: Callable[[int], None] | None = None) -> dict[Hashable, Measurement]:
        return measure_many(runners, timing, on_round=on_round)


class EagerBackend(TimedBackend):
    """Eager PyTorch (the default)."""

    name = "eager"

    def runner(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
        module.eval()
        return lambda: module(*inputs)


class OnnxRuntimeBackend(TimedBackend):
    """ONNX Runtime: the module is exported (TorchScript exporter) and run by an InferenceSession.

    On the CPU with the CPU provider. With ``device="cuda[:N]"`` with the CUDA provider only (never a silent
    fallback to the CPU provider, whose times would fill a "cuda" table), inputs and outputs bound on the GPU,
    timed on the host clock (ONNX Runtime synchronises its stream at the end of each run; CUDA events on
    PyTorch's stream would time nothing). Needs ``onnxruntime-gpu`` for CUDA: refused without it.
    """

    name = "onnxruntime"

    def __init__(self, threads: int = 1, device: str = "cpu"):
        self.threads = threads
        self.device = torch.device(device)
        if self.device.type == "cuda":
            require_cuda_provider()
        elif self.device.type != "cpu":
            raise ValueError(f"the onnxruntime backend runs on cpu or cuda, not {device!r}")

    def runner(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
        ort = _onnxruntime()
        buf = io.BytesIO()
        with torch.no_grad():
            torch.onnx.export(module.eval().cpu(), tuple(x.cpu() for x in inputs), buf, dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        if self.device.type == "cuda":
            return self._cuda_runner(ort, buf.getvalue(), opts, inputs)
        sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        feeds = {i.name: x.cpu().numpy() for i, x in zip(sess.get_inputs(), inputs, strict=False)}
        return lambda: sess.run(None, feeds)

    def _cuda_runner(self, ort: Any, model: bytes, opts: Any, inputs: tuple[torch.Tensor, ...]
                     ) -> Callable[[], Any]:
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        sess = ort.InferenceSession(model, opts, providers=[("CUDAExecutionProvider", {"device_id": index})])
        if "CUDAExecutionProvider" not in sess.get_providers():
            raise RuntimeError("onnxruntime could not start its CUDA provider (CUDA or cuDNN libraries missing?): "
                               "refusing to time the CPU provider for a cuda table")
        held = [x.to(f"cuda:{index}").contiguous() for x in inputs]
        binding = sess.io_binding()
        for i, x in zip(sess.get_inputs(), held, strict=False):
            binding.bind_input(i.name, "cuda", index, _NUMPY[x.dtype], tuple(x.shape), x.data_ptr())
        for o in sess.get_outputs():
            binding.bind_output(o.name, "cuda", index)

        return _Bound(sess, binding, held)

    def measure(self, runners: Mapping[Hashable, Callable[[], Any]], timing: TimingSettings,
                on_round: Callable[[int], None] | None = None) -> dict[Hashable, Measurement]:
        if self.device.type == "cuda":  # host clock, no descheduling filter: the thread waits on the GPU
            timing = dataclasses.replace(timing, device="cpu", min_busy=0.0)
        return measure_many(runners, timing, on_round=on_round)


class _Bound:
    """One ONNX Runtime run on inputs bound on the GPU (which it keeps alive)."""

    def __init__(self, sess: Any, binding: Any, inputs: list[torch.Tensor]):
        self.sess, self.binding, self.inputs = sess, binding, inputs

    def __call__(self) -> None:
        self.sess.run_with_iobinding(self.binding)


_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int64: np.int64}


def _onnxruntime() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RuntimeError("the onnxruntime backend needs `pip install mdprune[onnx]`") from e
    return ort


def require_cuda_provider() -> None:
    """Refuse ONNX Runtime on CUDA unless its CUDA provider is installed (``onnxruntime-gpu``)."""
    ort = _onnxruntime()
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise ValueError("the onnxruntime backend on cuda needs ONNX Runtime's CUDA provider (pip install "
                         f"onnxruntime-gpu); this onnxruntime has {available}: measure with --backend eager, or "
                         "measure onnxruntime on --device cpu")


class _Counted:
    """A runner of :class:`FlopsBackend`: runs the module once when made, and carries its modelled cost."""

    def __init__(self, ms: float):
        self.ms = ms

    def __call__(self) -> None:
        return None


class FlopsBackend:
    """Deterministic latencies from operation counts, with no clock: for tests and dry runs.

    A module's "latency" is ``overhead_ms + ms_per_gflop * FLOPs / 1e9 + ms_per_melement * elements / 1e6``
    (elements: the sizes of its inputs and outputs, so memory-bound ops cost something too). Counts come from
    PyTorch's ``FlopCounterMode``; every measurement is exact, with zero noise. ``scale`` maps a runner's
    key or label to a factor, to model a runtime that does not match the counts (a noisy dense measurement, a
    slower pruned model).
    """

    name = "flops"

    def __init__(self, ms_per_gflop: float = 1.0, ms_per_melement: float = 1.0, overhead_ms: float = 1e-3,
                 scale: Callable[[Hashable, int], float] | None = None):
        self.ms_per_gflop = ms_per_gflop
        self.ms_per_melement = ms_per_melement
        self.overhead_ms = overhead_ms
        self.scale = scale
        self.calls = 0  # measure() calls so far (a scale function may depend on it)

    def runner(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
        module.eval()
        flops, out = count_flops(module, inputs)
        elements = sum(x.numel() for x in inputs) + sum(t.numel() for t in tensors_in(out))
        ms = self.overhead_ms + self.ms_per_gflop * flops / 1e9 \
            + self.ms_per_melement * elements / 1e6
        return _Counted(ms)

    def measure(self, runners: Mapping[Hashable, Callable[[], Any]], timing: TimingSettings,
                on_round: Callable[[int], None] | None = None) -> dict[Hashable, Measurement]:
        self.calls += 1
        out = {}
        for k, r in runners.items():
            if not isinstance(r, _Counted):
                raise TypeError("FlopsBackend measures only the runners it made")
            ms = r.ms * (self.scale(k, self.calls) if self.scale is not None else 1.0)
            out[k] = Measurement(ms, 0.0, [ms] * max(1, timing.rounds))
        for r in range(timing.rounds):
            if on_round is not None:
                on_round(r)
        return out


def count_flops(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[int, Any]:
    """FLOPs of one forward pass by PyTorch's ``FlopCounterMode``, and the output. Parameters are frozen for the
    count: under ``no_grad`` the counter's module tracker fails on a parameter a submodule reads directly
    (timm's attention pooling hands its latent query, expanded, to a linear layer). A first, uncounted pass
    warms up, as timing does: work done once and cached (a timed detector's dense detections) is not counted."""
    frozen = [p for p in module.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            module(*inputs)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = module(*inputs)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return counter.get_total_flops(), out


def tensors_in(x: Any) -> list[torch.Tensor]:
    """Every tensor in ``x`` (a tensor, or lists, tuples and dicts of them, nested)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in tensors_in(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in tensors_in(v)]
    return []


def get_backend(backend: str | Backend, threads: int = 1, device: str = "cpu") -> Backend:
    """The backend named ``backend`` (``eager``, ``onnxruntime``, ``flops``) for ``device``, or ``backend``
    itself."""
    if not isinstance(backend, str):
        return backend
    if backend == "eager":
        return EagerBackend()
    if backend == "onnxruntime":
        return OnnxRuntimeBackend(threads, device)
    if backend == "flops":
        return FlopsBackend()
    raise ValueError(f"unknown latency backend {backend!r}; choose eager, onnxruntime or flops")


def backend_name(backend: str | Backend) -> str:
    return backend if isinstance(backend, str) else backend.name
