"""Importance: how much each element of each dimension matters, estimated from training data."""

from .accumulate import DEFAULT_CRITERION, ImportanceAccumulator, estimate, kept_value, normalize_scores
from .probes import Probe, probes

__all__ = ["DEFAULT_CRITERION", "ImportanceAccumulator", "Probe", "estimate", "kept_value", "normalize_scores",
           "probes"]
