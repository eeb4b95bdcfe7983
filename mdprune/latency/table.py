"""Latency lookup tables: measured op latencies, cached on disk per device fingerprint.

File format (JSON, ``format: mdprune-lut/1``)::

    {"format": "mdprune-lut/1",
     "fingerprint": {"device": "cpu", "processor": ..., "torch": ..., "threads": 1, "dtype": "float32",
                     "batch": 1, "backend": "eager", ...},
     "timing": {...the TimingSettings used...},
     "ops": {"<signature>": {"kind": "conv2d", "fixed": {...}, "roles": ["in", "out"],
                             "points": {"64x128": [ms, noise, times measured], ...}}},
     "models": {"<model key>": {"ms": ..., "noise": ...}}}

An op *signature* is its kind and fixed parameters (kernel, stride, spatial size, tokens, epilogue ...)
without the batch, which belongs to the fingerprint; a *point* is one width per role (``in x out`` for
convolutions and linear layers, ``heads x qk x v`` for attention), so one table serves every model and budget
that share op signatures. A point measured more than once (a re-check of a suspect value, see
:func:`mdprune.latency.build.suspects`) keeps its fastest measurement: disturbances only ever add time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

from ..space import Op
from .ops import ROLES

FORMAT = "mdprune-lut/1"
# How ops are built and timed; bumped when that changes, so tables measured the old way are not reused.
METHOD = 2


class FingerprintMismatch(ValueError):
    """A table measured on another device or setup than the one asked for."""


def _processor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint(device: str = "cpu", threads: int = 1, dtype: torch.dtype = torch.float32, batch: int = 1,
                backend: str = "eager", deployment: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a latency measurement depends on: hardware, software, threads, dtype, batch and runtime.

    On CUDA also the GPU, its compute capability, the CUDA runtime and driver versions, the NVIDIA driver,
    cuDNN, and every ``deployment`` setting (layout, autocast, cuDNN autotuning, TF32); elsewhere the
    deployment settings that differ from plain eager execution (so existing CPU tables keep their key).
    """
    dev = torch.device(device)
    fp: dict[str, Any] = {
        "device": dev.type, "processor": _processor(), "arch": platform.machine(), "torch": torch.__version__,
        "threads": threads if dev.type == "cpu" else None, "dtype": str(dtype).removeprefix("torch."),
        "batch": batch, "backend": backend, "method": METHOD,
    }
    deployment = dict(deployment or {})
    if dev.type == "cuda":
        fp.update(cuda_fingerprint(dev))
        fp.update(deployment)
    else:
        fp.update({k: v for k, v in deployment.items() if v and k in ("channels_last", "autocast")})
    if backend == "onnxruntime":
        import onnxruntime

        fp["onnxruntime"] = onnxruntime.__version__
    return fp


def cuda_fingerprint(dev: torch.device) -> dict[str, Any]:
    """The GPU and its software: name, compute capability, CUDA runtime and driver API, NVIDIA driver, cuDNN."""
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"gpu": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}", "cuda": torch.version.cuda,
            "cuda_driver": _cuda_driver_api(), "driver": _nvidia_driver(), "cudnn": cudnn}


def _cuda_driver_api() -> int | None:
    """The CUDA driver API version (e.g. 12040), from the driver through PyTorch."""
    try:
        return int(torch._C._cuda_getDriverVersion())  # noqa: SLF001 - no public accessor
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return None


def _nvidia_driver() -> str | None:
    """The NVIDIA kernel driver version (e.g. ``550.54.15``): /proc on Linux, else NVML if installed."""
    try:
        with open(NVIDIA_VERSION_FILE) as f:
            for word in f.readline().split():
                if word.count(".") >= 1 and word.replace(".", "").isdigit():
                    return word
    except OSError:
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001 - NVML absent or failing: the version is unknown, not an error
        return None


NVIDIA_VERSION_FILE = "/proc/driver/nvidia/version"


def _plain(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in sorted(x.items())}
    return x


def unbatched(op: Op) -> dict[str, Any]:
    """An op's fixed parameters without the batch it was analysed at: no ``batch`` entry, and a replayed node's
    batched arguments with their leading size written as ``"B"`` (the builder sets it to the table's batch)."""
    fixed = {k: v for k, v in op.fixed.items() if k != "batch"}
    if op.kind == "node":
        for key in ("args", "kwargs"):
            if key in fixed:
                items = fixed[key].items() if isinstance(fixed[key], dict) else enumerate(fixed[key])
                new = {k: _unbatch_arg(v) for k, v in items}
                fixed[key] = new if isinstance(fixed[key], dict) else list(new.values())
    return _plain(fixed)


def _unbatch_arg(a: Any) -> Any:
    if isinstance(a, dict) and a.get("batched") and a.get("shape"):
        return {**a, "shape": ["B", *list(a["shape"])[1:]]}
    return a


def signature(op: Op) -> str:
    """The table key of an op: its kind and fixed parameters, independent of the batch it was analysed at."""
    return op.kind + ":" + json.dumps(unbatched(op), sort_keys=True, separators=(",", ":"))


def point_key(widths: tuple[int, ...]) -> str:
    return "x".join(str(w) for w in widths)


class LatencyTable:
    """Measured latencies (milliseconds) of op signatures at width points, for one fingerprint."""

    def __init__(self, fp: dict[str, Any], path: Path | None = None, timing: dict[str, Any] | None = None):
        self.fingerprint = fp
        self.path = path
        self.timing = timing or {}
        self.ops: dict[str, dict[str, Any]] = {}
        self.models: dict[str, dict[str, float]] = {}

    # ---- entries -----------------------------------------------------------------------------------------
    def get(self, sig: str, widths: tuple[int, ...]) -> float | None:
        e = self.entry(sig, widths)
        return None if e is None else e[0]

    def entry(self, sig: str, widths: tuple[int, ...]) -> tuple[float, float, int] | None:
        """(ms, noise, times measured) of a point, or None."""
        v = self.ops.get(sig, {}).get("points", {}).get(point_key(widths))
        return None if v is None else (v[0], v[1], v[2] if len(v) > 2 else 1)

    def put(self, op: Op, widths: tuple[int, ...], ms: float, noise: float, regime: str | None = None) -> None:
        """Store a measurement; a point measured before keeps the faster of the two. ``regime``: a kernel regime
        other than the dispatcher's choice (see :mod:`mdprune.latency.regimes`), kept under its own key."""
        if not (math.isfinite(ms) and ms > 0 and math.isfinite(noise)):
            raise ValueError(f"op {op.name} at widths {widths} measured {ms!r} ms (noise {noise!r}): a latency "
                             "must be a positive finite number; the measurement backend is broken")
        sig = signature(op) if regime is None else f"{signature(op)}#{regime}"
        entry = self.ops.setdefault(sig, {"kind": op.kind, "fixed": unbatched(op), "roles": list(ROLES[op.kind]),
                                          "points": {}, **({"regime": regime} if regime else {})})
        old = self.entry(sig, widths)
        if old is None:
            entry["points"][point_key(widths)] = [ms, noise, 1]
        else:
            best = (ms, noise) if ms < old[0] else old[:2]
            entry["points"][point_key(widths)] = [*best, old[2] + 1]

    def __len__(self) -> int:
        return sum(len(e["points"]) for e in self.ops.values())

    # ---- files -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "fingerprint": self.fingerprint, "timing": self.timing, "ops": self.ops,
                "models": self.models}

    def save(self, path: str | Path | None = None) -> Path:
        """Write atomically (a crash mid-write never leaves a broken table)."""
        path = Path(path or self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=0, sort_keys=True))
        os.replace(tmp, path)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path, expect: dict[str, Any] | None = None, force: bool = False) -> LatencyTable:
        """Read a table; refuse one measured under another fingerprint than ``expect`` unless ``force``."""
        path = Path(path)
        rebuild = (f"delete {path} and build the table again (`mdprune lut build MODEL`; a prune run builds what "
                   "it lacks)")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TableError(f"latency table {path} cannot be read ({e}): {rebuild}") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TableError(f"{path} is not an mdprune latency table ({FORMAT}): {rebuild}")
        bad = _bad_entry(data)
        if bad:
            raise TableError(f"latency table {path} is damaged ({bad}): {rebuild}")
        if expect is not None and not force:
            diff = fingerprint_diff(data["fingerprint"], expect)
            if diff:
                raise FingerprintMismatch(
                    f"latency table {path} was measured under another setup: {diff}. A table is only valid "
                    "where it was measured: build one here (`mdprune lut build MODEL` with the same --device, "
                    "--batch, --threads), or load it anyway in Python with LatencyTable.load(path, force=True).")
        table = cls(data["fingerprint"], path, data.get("timing"))
        table.ops = data.get("ops", {})
        table.models = data.get("models", {})
        return table

    @classmethod
    def open(cls, cache_dir: str | Path, fp: dict[str, Any]) -> LatencyTable:
        """The cached table of fingerprint ``fp`` in ``cache_dir`` (empty if none yet)."""
        path = Path(cache_dir) / cache_name(fp)
        if path.exists():
            return cls.load(path, expect=fp)
        return cls(fp, path)


class TableError(ValueError):
    """A latency table file that cannot be used: unreadable, not a table, or holding non-positive entries."""


def _bad_entry(data: dict[str, Any]) -> str:
    """The first thing wrong with a table's contents ('' if none)."""
    if not isinstance(data.get("fingerprint"), dict):
        return "no fingerprint"
    for sig, e in (data.get("ops") or {}).items():
        for key, v in (e.get("points") or {}).items() if isinstance(e, dict) else [("?", None)]:
            if not isinstance(v, list) or not v or not isinstance(v[0], (int, float)) or not math.isfinite(v[0]) \
                    or v[0] <= 0:
                return f"op {sig[:60]}... point {key}: {v!r} is not a positive finite latency"
    for name, m in (data.get("models") or {}).items():
        ms = m.get("ms") if isinstance(m, dict) else None
        if not isinstance(ms, (int, float)) or not math.isfinite(ms) or ms <= 0:
            return f"model {name}: {ms!r} is not a positive finite latency"
    return ""


def fingerprint_diff(have: dict[str, Any], want: dict[str, Any]) -> str:
    """Human-readable differences between two fingerprints ('' if equal)."""
    keys = sorted(set(have) | set(want))
    return "; ".join(f"{k} {have.get(k)!r} (table) vs {want.get(k)!r} (now)" for k in keys
                     if have.get(k) != want.get(k))


def cache_name(fp: dict[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]
    return f"lut-{fp['device']}-b{fp['batch']}-t{fp.get('threads')}-{fp['backend']}-{digest}.json"


def default_cache_dir() -> Path:
    """``$MDPRUNE_CACHE`` or ``~/.cache/mdprune``, plus ``/lut``."""
    base = os.environ.get("MDPRUNE_CACHE") or Path.home() / ".cache" / "mdprune"
    return Path(base) / "lut"
