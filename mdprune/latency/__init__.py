"""Latency measured on the target device: lookup tables, the latency model, validation."""

from .backends import Backend, EagerBackend, FlopsBackend, OnnxRuntimeBackend, TimedBackend, get_backend
from .build import BuildReport, LatencySettings, build, latency_model, measure_models, model_key, open_table
from .model import IncompleteTable, LatencyModel
from .ratio import Ratio, RatioSettings, measure_models_ratio, measure_ratio
from .table import FingerprintMismatch, LatencyTable, TableError, default_cache_dir, fingerprint, signature
from .timing import Measurement, TimingSettings, measure, measure_many
from .validate import Validation, calibration_plans, random_plans, validate

__all__ = [
    "Backend", "BuildReport", "EagerBackend", "FingerprintMismatch", "FlopsBackend", "IncompleteTable",
    "LatencyModel", "LatencySettings", "LatencyTable", "Measurement", "OnnxRuntimeBackend", "Ratio", "RatioSettings",
    "TableError",
    "TimedBackend", "TimingSettings", "Validation", "build", "calibration_plans", "default_cache_dir", "fingerprint",
    "get_backend", "latency_model", "measure", "measure_many", "measure_models", "measure_models_ratio",
    "measure_ratio", "model_key", "open_table",
    "random_plans", "signature", "validate",
]
