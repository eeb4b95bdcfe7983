"""Running under ``torchrun``: process group, all-reduce, broadcast of the plan, one writer of artifacts.

Backends: NCCL where every rank has a GPU of its own; gloo on the CPU, and where ranks share a GPU (NCCL
refuses two ranks on one device: ``--device cuda:0`` under several ranks, or more ranks than GPUs), said on
stderr. Beside the training group, every rank joins a gloo group with a long timeout (:data:`WAIT_TIMEOUT`):
objects are broadcast through it, so ranks can wait there while rank 0 works alone for long (a latency
table build) without tripping NCCL's 10-minute watchdog, and tensors of a broadcast state (a checkpoint on
resume) travel by the training backend, one tensor at a time, not pickled.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
WAIT_TIMEOUT = datetime.timedelta(hours=int(os.environ.get("MDPRUNE_WAIT_HOURS", "24")))


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # of the training group ("nccl" or "gloo"; None alone)
    wait_group: Any = field(default=None, repr=False)  # the long-timeout gloo group (objects, waits)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def rank_device(device: str, local_rank: int) -> torch.device:
    """The device of a rank: ``auto`` and ``cuda`` give each local rank its own GPU (round robin when there
    are fewer GPUs than ranks); an explicit ``cuda:N`` or ``cpu`` is taken as given."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if device not in ("auto", "cuda"):
        return torch.device(device)
    if not use_cuda:
        return torch.device("cpu")
    count = max(1, torch.cuda.device_count())
    return torch.device(f"cuda:{local_rank % count}")


def choose_backend(dev: torch.device, device: str, local_world: int) -> str:
    """``nccl`` when each local rank has a GPU of its own, else ``gloo`` (CPU, or ranks sharing a GPU).
    ``MDPRUNE_DIST_BACKEND`` overrides."""
    forced = os.environ.get("MDPRUNE_DIST_BACKEND")
    if forced:
        return forced
    if dev.type != "cuda":
        return "gloo"
    shared = local_world > 1 and (device not in ("auto", "cuda") or local_world > torch.cuda.device_count())
    return "gloo" if shared else "nccl"


def init(device: str = "auto") -> Dist:
    """Join the process group when started by torchrun; else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = rank_device(device, local)
    backend = None
    wait_group = None
    if world > 1:
        backend = choose_backend(dev, device, local_world)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            if backend == "gloo" and dev.type == "cuda" and local == 0:
                sys.stderr.write(f"mdprune: {local_world} ranks share {dev}: NCCL refuses that, using gloo\n")
            dist.init_process_group(backend)
        else:
            backend = dist.get_backend()
        wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank, world, local, dev, backend, wait_group)


def _comm_device(d: Dist) -> torch.device:
    """Where tensors travel in the training group: the rank's GPU under NCCL, else the CPU."""
    return d.device if d.backend == "nccl" else torch.device("cpu")


def all_reduce_sum_(tensors: dict[str, torch.Tensor], d: Dist) -> None:
    """Sum every tensor over all processes, in place (a CPU tensor under NCCL, which reduces device tensors
    only, is copied to the GPU and back)."""
    if not d.enabled:
        return
    for t in tensors.values():
        if d.backend != "nccl" or t.device.type == "cuda":
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        else:
            moved = t.to(d.device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            t.copy_(moved)


def broadcast(obj: Any, d: Dist, src: int = 0) -> Any:
    """``obj`` of process ``src`` on every process, through the long-timeout gloo group.

    Tensors inside (dicts, lists, tuples) are sent by the training backend one by one, not pickled; other
    ranks receive them on their device. Ranks may wait here for as long as ``src`` needs (a table build).
    """
    if not d.enabled:
        return obj
    tensors: list[torch.Tensor] = []
    skeleton = _strip(obj, tensors) if d.rank == src else None
    box = [skeleton]
    dist.broadcast_object_list(box, src=src, group=d.wait_group)
    if d.rank == src:
        for t in tensors:
            _send(t, d, src)
        return obj
    return _fill(box[0], d, src)


@dataclass
class _TensorSlot:
    shape: tuple[int, ...]
    dtype: torch.dtype


def _strip(obj: Any, out: list[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return _TensorSlot(tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return _like(obj, {k: _strip(v, out) for k, v in obj.items()})
    if type(obj) in (list, tuple):
        return type(obj)(_strip(v, out) for v in obj)
    return obj


def _like(obj: dict[Any, Any], items: dict[Any, Any]) -> dict[Any, Any]:
    """``items`` in a dict of ``obj``'s kind, keeping a state dict's ``_metadata`` (module versions)."""
    try:
        new = type(obj)(items)
    except TypeError:
        new = items
    if hasattr(obj, "_metadata") and hasattr(new, "__dict__"):
        new._metadata = obj._metadata  # type: ignore[attr-defined]
    return new


def _send(t: torch.Tensor, d: Dist, src: int) -> None:
    where = _comm_device(d)
    x = t.detach()
    x = x.to(where) if x.device != where else x
    dist.broadcast(x.contiguous(), src=src)


def _fill(obj: Any, d: Dist, src: int) -> Any:
    if isinstance(obj, _TensorSlot):
        x = torch.empty(obj.shape, dtype=obj.dtype, device=_comm_device(d))
        dist.broadcast(x, src=src)
        return x
    if isinstance(obj, dict):
        return _like(obj, {k: _fill(v, d, src) for k, v in obj.items()})
    if type(obj) in (list, tuple):
        return type(obj)(_fill(v, d, src) for v in obj)
    return obj


def run_on_main(fn: Callable[[], T], d: Dist) -> T:
    """``fn()`` run by rank 0 alone, its result (or its exception) on every rank.

    The other ranks wait in the long-timeout gloo group, so a long ``fn`` (a latency table build, an
    evaluation) never trips the NCCL watchdog; any exception is raised on every rank.
    """
    out: tuple[Any, BaseException | None] = (None, None)
    if d.main:
        try:
            out = (fn(), None)
        except Exception as e:  # noqa: BLE001 - every rank must stop, not only rank 0
            out = (None, e)
    result, error = broadcast(out, d)
    if error is not None:
        raise error
    return result


def barrier(d: Dist) -> None:
    """Wait for every rank (in the long-timeout group: a rank may be busy for long)."""
    if d.enabled:
        dist.barrier(group=d.wait_group)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
