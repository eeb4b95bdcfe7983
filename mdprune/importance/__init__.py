"""Importance: how much each element of each dimension, and each removable block, matters, estimated from data.

Criteria (:mod:`.criteria`): ``taylor`` and ``fisher`` from gate gradients, ``l1`` and ``l2`` weight magnitude,
or a user's criterion following :class:`GateCriterion` (``from_gate_gradients(grad) -> scores``, per batch) or
:class:`ModelCriterion` (``from_model(model, batch, context) -> {dim: scores}``, per batch or once), passed as an
object or registered by name with :func:`register_criterion`.
"""

from .accumulate import (
    DEFAULT_CRITERION,
    ImportanceAccumulator,
    block_kind,
    estimate,
    kept_value,
    normalize_scores,
)
from .blocks import BlockProbe, block_probes
from .criteria import (
    Criterion,
    Fisher,
    GateCriterion,
    Magnitude,
    ModelContext,
    ModelCriterion,
    Taylor,
    criterion_names,
    register_criterion,
)
from .keys import BLOCK_PREFIX, SHARE_PREFIX, block_key, share_key, share_parts
from .probes import Probe, probes

__all__ = ["BLOCK_PREFIX", "DEFAULT_CRITERION", "SHARE_PREFIX", "BlockProbe", "Criterion", "Fisher", "GateCriterion",
           "ImportanceAccumulator", "Magnitude", "ModelContext", "ModelCriterion", "Probe", "Taylor", "block_key",
           "block_kind", "block_probes", "criterion_names", "estimate", "kept_value", "normalize_scores", "probes",
           "register_criterion", "share_key", "share_parts"]
