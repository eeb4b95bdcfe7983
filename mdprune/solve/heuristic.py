"""Local improvement of a feasible configuration: repeatedly apply the best single change that stays feasible.

A change is a new choice for one active dim or keeping/removing one block. Used to turn Lagrangian solutions
into good incumbents; the exact paths never depend on its quality for correctness.
"""

from __future__ import annotations

import numpy as np

from .compiled import Compiled, objective_of, usage_of


def _dim_options(cm: Compiled, joints_of: list[list[int]], d: int, choice: np.ndarray, keep: np.ndarray):
    """Objective and usage change of every choice of dim d, and whether each choice is allowed."""
    n = cm.sizes[d]
    used = np.zeros((len(cm.limit), n))
    ok = cm.allowed[d].copy()
    for i in joints_of[d]:
        j = cm.joints[i]
        if j.block >= 0 and not keep[j.block]:
            continue
        index = tuple(slice(None) if e == d else int(choice[e]) for e in j.dims)
        row = j.cost[(slice(None), *index)]
        used += row - row[:, choice[d]][:, None]
        if cm.cell_ok[i] is not None:
            ok &= cm.cell_ok[i][index]
    gain = cm.values[d] - cm.values[d][choice[d]] + cm.cost_weight @ used
    return gain, used, ok


def _block_part(cm: Compiled, joints: list[int], b: int, choice: np.ndarray) -> tuple[np.ndarray, float, bool]:
    """Use, value and admissibility of block b's part of a configuration if the block is kept."""
    used = np.zeros(len(cm.limit))
    ok = True
    for i in joints:
        j = cm.joints[i]
        cell = tuple(int(choice[d]) for d in j.dims)
        used += j.cost[(slice(None), *cell)]
        ok = ok and (cm.cell_ok[i] is None or bool(cm.cell_ok[i][cell]))
    inner = np.flatnonzero(cm.dim_block == b)
    value = float(cm.block_value[b]) + sum(float(cm.values[d][choice[d]]) for d in inner)
    ok = ok and all(cm.allowed[d][choice[d]] for d in inner)
    opts = cm.block_options(b)
    if opts is not None:
        ok = ok and bool(np.any(np.all(opts.cells == choice[list(opts.dims)], axis=1)))
    return used, value + float(cm.cost_weight @ used), ok


def improve(cm: Compiled, choice: np.ndarray, keep: np.ndarray, max_moves: int = 500) -> tuple[
    np.ndarray, np.ndarray, float
]:
    """Best-improvement local search from a feasible configuration; returns (choice, keep, objective)."""
    choice, keep = choice.copy(), keep.copy()
    joints_of: list[list[int]] = [[] for _ in range(cm.n_dims)]
    block_joints: list[list[int]] = [[] for _ in range(cm.n_blocks)]
    for i, j in enumerate(cm.joints):
        for d in j.dims:
            joints_of[d].append(i)
        if j.block >= 0:
            block_joints[j.block].append(i)
    used = usage_of(cm, choice, keep)
    value = objective_of(cm, choice, keep, used)
    room = cm.limit + cm.tol
    for _ in range(max_moves):
        best_gain, best_move = 1e-12, None
        for d in range(cm.n_dims):
            b = cm.dim_block[d]
            if b >= 0 and not keep[b]:
                continue
            gain, delta, ok = _dim_options(cm, joints_of, d, choice, keep)
            ok &= np.all(used[:, None] + delta <= room[:, None], axis=0)
            gain = np.where(ok, gain, -np.inf)
            k = int(np.argmax(gain))
            if gain[k] > best_gain:
                best_gain, best_move = float(gain[k]), ("dim", d, k)
        for b in range(cm.n_blocks):
            if cm.keep_fixed[b] >= 0 or (keep[b] and int(keep.sum()) <= cm.min_kept):
                continue
            part, part_value, ok = _block_part(cm, block_joints[b], b, choice)
            sign = -1.0 if keep[b] else 1.0
            if (keep[b] or ok) and np.all(used + sign * part <= room) and sign * part_value > best_gain:
                best_gain, best_move = sign * part_value, ("block", b, 0)
        if best_move is None:
            break
        kind, i, k = best_move
        if kind == "dim":
            choice[i] = k
        else:
            keep[i] = not keep[i]
        used = usage_of(cm, choice, keep)
        value = objective_of(cm, choice, keep, used)
    return choice, keep, value
