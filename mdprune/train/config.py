"""What defines a pruning run (saved as config.json), and the data, model and latency settings it implies."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..latency import LatencySettings, TimingSettings
from ..models import create_model, create_model_for_size, default_input_size
from ..search import Budget, read_constraints
from .data import DataSpec, builtin, fashion_mnist_dir, image_folder, image_folder_classes
from .loop import TrainConfig
from .schedule import PruneSchedule


@dataclass
class RunConfig:
    """Everything that defines a run (saved as config.json; a resumed run must match it)."""

    model: str = "small_resnet18"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    data: str = "builtin"  # "builtin" (Fashion-MNIST, else digits) or an ImageFolder root with train/ and val/
    input_size: int | None = None  # ImageFolder image size (default: the model's)
    train_limit: int | None = None  # use a fixed random subset of the training set
    val_limit: int | None = None
    constraints: dict[str, str] = field(default_factory=dict)  # {"latency": "50%", "params": "60%", "macs": "2G"}
    budget: str | None = None  # older names of the constraints (still read): latency, parameters, MACs
    params_budget: str | None = None
    macs_budget: str | None = None
    importance: Any = None  # the importance criterion (see mdprune.importance.ImportanceAccumulator)
    mode: str = "table"
    blocks: bool = True
    min_blocks_kept: int = 0
    schedule: PruneSchedule = field(default_factory=PruneSchedule)
    train: TrainConfig = field(default_factory=TrainConfig)
    latency: dict[str, Any] = field(default_factory=dict)  # LatencySettings fields (device, batch, threads ...)
    lut: str | None = None
    steps: dict[str, int] = field(default_factory=dict)
    ignored_layers: list[str] = field(default_factory=list)
    unsupported: str = "error"  # "keep": modules mdprune cannot analyse are kept whole (mdprune.analyze)
    bn_batches: int = 50
    solver_time_limit: float = 60.0
    verify_rounds: int = 3  # re-solves while the final plan's measured latency misses the budget (-1: no check)
    workers: int = 0
    device: str = "auto"
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def constraint_set(self) -> dict[str, Budget]:
        """The run's constraints, checked (``constraints`` with the older ``budget``/``params_budget``/
        ``macs_budget`` joined); a latency budget of 50% when none is given."""
        named = {"budget": self.budget, "params": self.params_budget, "macs": self.macs_budget}
        if not self.constraints and all(v is None for v in named.values()):
            named["budget"] = "50%"
        return read_constraints(self.constraints, **named)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d)
        d["schedule"] = PruneSchedule(**d.get("schedule", {}))
        d["train"] = TrainConfig(**d.get("train", {}))
        return cls(**d)


def latency_settings(cfg: RunConfig, device: torch.device | None = None) -> LatencySettings:
    """Latency settings of a run: measured on the run's device unless the config names another."""
    lat = dict(cfg.latency)
    timing = TimingSettings(**lat.pop("timing", {}))
    if device is not None:
        lat.setdefault("device", str(device))
    return LatencySettings(timing=timing, **lat)


def run_data(cfg: RunConfig, model: nn.Module, train: bool) -> tuple[Any, DataSpec]:
    """The run's training or validation set; ImageFolder images at ``--input-size``, else the model's size."""
    if cfg.data == "builtin":
        return builtin(train, cfg.train_limit if train else cfg.val_limit, cfg.seed)
    size = cfg.input_size or default_input_size(model)[1]
    ds, spec = image_folder(cfg.data, "train" if train else "val", size, train)
    limit = cfg.train_limit if train else cfg.val_limit
    if limit is not None and limit < len(ds):
        ds = torch.utils.data.Subset(ds, torch.randperm(len(ds), generator=torch.Generator().manual_seed(
            cfg.seed))[:limit].tolist())
    return ds, spec


def data_spec(cfg: RunConfig) -> DataSpec:
    """What the run's data looks like (classes, channels), without loading it: to build the model first."""
    if cfg.data == "builtin":
        return DataSpec("fashion-mnist" if fashion_mnist_dir() else "digits", 10, 1, 28)
    return DataSpec(cfg.data, image_folder_classes(cfg.data), 3, cfg.input_size or 0)


def run_model(name: str, kwargs: dict[str, Any], spec: DataSpec, size: int | None = None) -> nn.Module:
    """The model, taking the data's channels (``in_chans`` where the constructor has it: timm, the zoo), built
    for ``size`` x ``size`` images when given (``--input-size``; else the model's own size, which the data
    then takes, as in ``finetune`` and ``eval``)."""
    def build(**kw: Any) -> nn.Module:
        return create_model_for_size(name, size, **kw) if size else create_model(name, **kw)

    try:
        return build(**{**kwargs, "in_chans": spec.channels}) if "in_chans" not in kwargs else build(**kwargs)
    except TypeError as e:
        if "in_chans" not in str(e):
            raise
        if spec.channels != 3:
            raise ValueError(f"{name} takes 3-channel images but the data has {spec.channels}; use a model "
                             "that accepts in_chans (timm, mdprune.zoo) or RGB data") from None
        return build(**kwargs)
