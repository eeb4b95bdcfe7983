"""A pruning plan: which elements of every dimension are kept, and which blocks are removed."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .space import PruningSpace


class PlanError(ValueError):
    """A plan that does not fit its pruning space."""


@dataclass
class Plan:
    """Kept element indices per dimension (absent: all kept) and the names of removed blocks."""

    keep: dict[str, list[int]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def identity(cls) -> Plan:
        """Keep everything."""
        return cls()

    @classmethod
    def from_sizes(cls, space: PruningSpace, sizes: Mapping[str, int], scores: Mapping[str, Any] | None = None,
                   removed: Iterable[str] = ()) -> Plan:
        """Keep ``sizes[d]`` elements of each dimension: the highest ``scores[d]``, or the first ones."""
        keep = {}
        for name, k in sizes.items():
            d = space.dims[name]
            if k == d.size:
                continue
            if scores is not None and name in scores:
                order = np.argsort(-np.asarray(scores[name], dtype=np.float64), kind="stable")[:k]
            else:
                order = np.arange(k)
            keep[name] = sorted(int(i) for i in order)
        return cls(keep, sorted(removed))

    @classmethod
    def uniform(cls, space: PruningSpace, ratio: float) -> Plan:
        """Every prunable dimension keeps the allowed width closest to ``ratio`` of its size (first elements)."""
        sizes = {d.name: min(d.widths(), key=lambda w: abs(w - ratio * d.size)) for d in space.prunable_dims()}
        return cls.from_sizes(space, sizes)

    @classmethod
    def smallest(cls, space: PruningSpace) -> Plan:
        """The floor: every prunable dimension at its smallest allowed width, every removable block removed."""
        return cls.from_sizes(space, {d.name: min(d.widths()) for d in space.prunable_dims()},
                              removed=[b.name for b in space.removable_blocks()])

    @classmethod
    def random(cls, space: PruningSpace, seed: int = 0, block_prob: float = 0.3) -> Plan:
        """A random plan: random allowed width and random elements per dimension, random removed blocks."""
        rng = np.random.default_rng(seed)
        keep = {}
        for d in space.prunable_dims():
            k = int(rng.choice(d.widths()))
            if k < d.size:
                keep[d.name] = sorted(int(i) for i in rng.choice(d.size, size=k, replace=False))
        removed = [b.name for b in space.removable_blocks() if rng.random() < block_prob]
        return cls(keep, removed)

    # ---- queries -----------------------------------------------------------------------------------------
    def sizes(self, space: PruningSpace) -> dict[str, int]:
        """Kept size of every dimension of ``space``."""
        return {n: len(self.keep[n]) if n in self.keep else d.size for n, d in space.dims.items()}

    def kept(self, space: PruningSpace) -> dict[str, list[int]]:
        """Kept indices of every dimension of ``space``."""
        return {n: self.keep.get(n, list(range(d.size))) for n, d in space.dims.items()}

    def validate(self, space: PruningSpace, strict_widths: bool = True) -> None:
        """Raise :class:`PlanError` if the plan does not fit ``space``."""
        for name, idx in self.keep.items():
            d = space.dims.get(name)
            if d is None:
                raise PlanError(f"plan keeps elements of unknown dimension {name!r}")
            if sorted(set(idx)) != list(idx) or (idx and (idx[0] < 0 or idx[-1] >= d.size)):
                raise PlanError(f"dimension {name!r}: kept indices must be sorted, unique and in [0, {d.size})")
            if len(idx) < d.size and d.protected:
                raise PlanError(f"dimension {name!r} is protected ({d.protected}) and cannot be pruned")
            if not idx:
                raise PlanError(f"dimension {name!r} keeps nothing; remove its block instead")
            if strict_widths and len(idx) not in d.widths():
                raise PlanError(f"dimension {name!r} keeps {len(idx)} of {d.size}; allowed widths are "
                                f"multiples of its step {d.step} (or {d.size})")
        for b in self.removed:
            blk = space.blocks.get(b)
            if blk is None:
                raise PlanError(f"plan removes unknown block {b!r}")
            if not blk.removable:
                raise PlanError(f"block {b!r} is protected ({blk.protected})")

    def is_identity(self, space: PruningSpace) -> bool:
        return not self.removed and all(len(v) == space.dims[k].size for k, v in self.keep.items())

    # ---- serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"keep": {k: list(v) for k, v in self.keep.items()}, "removed": list(self.removed)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        return cls({k: [int(i) for i in v] for k, v in d.get("keep", {}).items()},
                   [str(b) for b in d.get("removed", [])])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_json(Path(path).read_text())
