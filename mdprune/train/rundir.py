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
        self._config: dict[str, Any] = {}
        self.changed: list[str] = []  # config keys a resumed run changed (written with the next checkpoint)

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    # settings a resumed run may change (a NaN stop is continued with a lower learning rate, say)
    RESUMABLE_CHANGES = frozenset({"train"})

    def open(self, config: dict[str, Any], resume: bool) -> bool:
        """Check that the directory is free for ``config`` or holds the same run. Returns True if resuming.

        Nothing is written here: ``config.json`` is written with the first checkpoint (see
        :meth:`save_checkpoint`), so a start that fails early (a bad budget, a table error) never blocks the
        corrected command. A resumed run may change the training settings (``train``); the change is logged.
        """
        self._config = json.loads(json.dumps(config))
        cfg_file = self.path / "config.json"
        if cfg_file.exists():
            old = json.loads(cfg_file.read_text())
            diff = sorted(k for k in set(old) | set(self._config) if old.get(k) != self._config.get(k))
            if diff and not (resume and self.checkpoint.exists() and set(diff) <= self.RESUMABLE_CHANGES):
                hint = " (only the training settings may change on --resume)" if resume else ""
                raise RunDirError(f"{self.path} holds a different run (config differs in {diff}){hint}; choose "
                                  "another --run-dir")
            if self.checkpoint.exists() and not resume:
                raise RunDirError(f"{self.path} holds an unfinished or finished run of this config; pass --resume "
                                  "to continue it, or choose another --run-dir")
            self.changed = diff
            return self.checkpoint.exists()
        if self.path.exists() and any(p.name != "log.txt" for p in self.path.iterdir()):
            raise RunDirError(f"{self.path} exists and is not an mdprune run directory; choose another --run-dir")
        if self.writer:
            self.path.mkdir(parents=True, exist_ok=True)
        self.changed = []
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
        cfg_file = self.path / "config.json"
        if self.changed or not cfg_file.exists():  # the run has started (or resumed with new training settings)
            cfg_file.write_text(json.dumps(self._config, indent=1, sort_keys=True))
            self.changed = []
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
