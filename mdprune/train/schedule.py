"""Pruning schedules: one-shot, or iterative with an exponential latency path (HALP/MDP)."""

from __future__ import annotations

from dataclasses import dataclass


def budget_path(dense_ms: float, target_ms: float, steps: int) -> list[float]:
    """Budget of each pruning step: ``L0 * (T / L0) ** ((t + 1) / K)``, ending at the target."""
    if steps < 1:
        raise ValueError("an iterative schedule needs at least one pruning step")
    if target_ms <= 0 or dense_ms <= 0:
        raise ValueError("latencies must be positive")
    return [dense_ms * (target_ms / dense_ms) ** ((t + 1) / steps) for t in range(steps)]


@dataclass
class PruneSchedule:
    """When to prune.

    ``oneshot``: accumulate importance over ``importance_batches`` batches, solve once, slim, fine-tune.
    ``iterative``: train the masked model; every ``every`` iterations (after ``warmup`` iterations) take one of
    ``steps`` pruning steps along :func:`budget_path`, importance accumulated since the previous step; then
    slim and fine-tune to the end.
    """

    kind: str = "oneshot"
    steps: int = 1
    every: int = 50
    warmup: int = 0
    importance_batches: int = 32

    def __post_init__(self) -> None:
        if self.kind not in ("oneshot", "iterative"):
            raise ValueError("schedule is 'oneshot' or 'iterative'")
        if self.kind == "oneshot":
            self.steps = 1

    def step_at(self, iteration: int) -> int | None:
        """The pruning step taken after ``iteration`` (0-based, counted from the start), or None."""
        if self.kind != "iterative" or iteration < self.warmup:
            return None
        k, r = divmod(iteration - self.warmup + 1, self.every)
        return k - 1 if r == 0 and 1 <= k <= self.steps else None

    @property
    def pruning_iterations(self) -> int:
        """Iterations of the pruning phase (after which the model is slimmed)."""
        return self.warmup + self.steps * self.every if self.kind == "iterative" else 0
