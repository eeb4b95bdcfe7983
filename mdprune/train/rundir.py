"""A run directory: config, log, checkpoints, plan, model and report of one run; never another run's files."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..apply.io import read_tensors_file


class RunDirError(ValueError):
    """The run directory holds a different run (or an unfinished one, without --resume)."""


class RunDir:
    """Files of one run. Checkpoints are written atomically; only the main process writes."""

    def __init__(self, path: str | Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    def open(self, config: dict[str, Any], resume: bool) -> bool:
        """Create the directory for ``config``, or check it holds the same run. Returns True if resuming."""
        cfg_file = self.path / "config.json"
        if cfg_file.exists():
            old = json.loads(cfg_file.read_text())
            if old != json.loads(json.dumps(config)):
                diff = sorted(k for k in set(old) | set(config) if old.get(k) != json.loads(json.dumps(config)).get(k))
                raise RunDirError(f"{self.path} holds a different run (config differs in {diff}); choose another "
                                  "--run-dir")
            if self.checkpoint.exists() and not resume:
                raise RunDirError(f"{self.path} holds an unfinished or finished run of this config; pass --resume "
                                  "to continue it, or choose another --run-dir")
            return self.checkpoint.exists()
        if self.path.exists() and any(self.path.iterdir()):
            raise RunDirError(f"{self.path} exists and is not an mdprune run directory; choose another --run-dir")
        if self.writer:
            self.path.mkdir(parents=True, exist_ok=True)
            cfg_file.write_text(json.dumps(config, indent=1, sort_keys=True))
        return False

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        if self.writer:
            with open(self.path / "log.txt", "a") as f:
                f.write(line + "\n")

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        if not self.writer:
            return
        state = {**state, "rng": rng_state()}
        tmp = self.checkpoint.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint)

    def load_checkpoint(self) -> dict[str, Any]:
        """The last checkpoint, read as tensors and plain data only (a crafted file cannot run code)."""
        state = read_tensors_file(self.checkpoint, what="an mdprune run checkpoint")
        if not isinstance(state, dict) or "phase" not in state or "rng" not in state:
            raise RunDirError(f"{self.checkpoint} is not an mdprune run checkpoint; choose another --run-dir")
        set_rng_state(state["rng"])
        return state

    def write_json(self, name: str, data: Any) -> Path:
        p = self.path / name
        if self.writer:
            p.write_text(json.dumps(data, indent=1, default=str))
        return p


def rng_state() -> dict[str, Any]:
    """Every random generator's state, as tensors and plain data (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
