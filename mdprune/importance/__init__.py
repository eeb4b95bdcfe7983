"""Importance: how much each element of each dimension, and each removable block, matters, estimated from data."""

from .accumulate import (
    BLOCK_PREFIX,
    DEFAULT_CRITERION,
    ImportanceAccumulator,
    block_key,
    block_kind,
    estimate,
    kept_value,
    normalize_scores,
)
from .blocks import BlockProbe, block_probes
from .probes import Probe, probes

__all__ = ["BLOCK_PREFIX", "DEFAULT_CRITERION", "BlockProbe", "ImportanceAccumulator", "Probe", "block_key",
           "block_kind", "block_probes", "estimate", "kept_value", "normalize_scores", "probes"]
