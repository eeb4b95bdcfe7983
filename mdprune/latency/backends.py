"""Runtimes a latency is measured in. A table is only valid for the runtime it was measured in."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn


class Backend(Protocol):
    """Turns a module and its inputs into a callable that runs one forward pass in some runtime."""

    name: str

    def runner(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]: ...


class EagerBackend:
    """Eager PyTorch (the default)."""

    name = "eager"

    def runner(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
        module.eval()
        return lambda: module(*inputs)


class OnnxRuntimeBackend:
    """ONNX Runtime on the CPU: the module is exported (TorchScript exporter) and run by an InferenceSession."""

    name = "onnxruntime"

    def __init__(self, threads: int = 1):
        self.threads = threads

    def runner(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeError("the onnxruntime backend needs `pip install mdprune[onnx]`") from e
        buf = io.BytesIO()
        with torch.no_grad():
            torch.onnx.export(module.eval().cpu(), tuple(x.cpu() for x in inputs), buf, dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        feeds = {i.name: x.cpu().numpy() for i, x in zip(sess.get_inputs(), inputs, strict=False)}
        return lambda: sess.run(None, feeds)


def get_backend(name: str, threads: int = 1) -> Backend:
    if name == "eager":
        return EagerBackend()
    if name == "onnxruntime":
        return OnnxRuntimeBackend(threads)
    raise ValueError(f"unknown latency backend {name!r}; choose eager or onnxruntime")
