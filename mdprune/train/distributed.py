"""Running under ``torchrun``: process group, all-reduce, broadcast of the plan, one writer of artifacts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> Dist:
    """Join the process group when started by torchrun (gloo on CPU, nccl on CUDA); else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}" if use_cuda else "cpu") if device in ("auto", "cuda") else torch.device(device)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank, world, local, dev)


def all_reduce_sum_(tensors: dict[str, torch.Tensor], d: Dist) -> None:
    """Sum every tensor over all processes, in place."""
    if d.enabled:
        for t in tensors.values():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast(obj: Any, d: Dist, src: int = 0) -> Any:
    """``obj`` of process ``src`` on every process (pickled; for small things such as a plan)."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
