"""Exact optimiser for latency-constrained multidimensional pruning (method.md section 4).

``solve(problem)`` picks one width per dimension and keeps or removes each block to maximise the kept
importance within every budget, and proves it optimal (or reports its gap at a time limit). Paths:

- ``"decomposition"`` (decompose.py): Lagrangian bounds from a relaxation solved exactly block by block,
  exact fixing of every choice, cell and block configuration that cannot be optimal, then an exact final
  step: a knapsack dynamic programme over the outside-dim assignments (one budget) or a small MILP;
- ``"milp"`` (milp.py): the whole problem as one marginal-equality MILP in HiGHS;
- ``"brute"`` (brute.py): enumeration, for tiny problems and tests.

``"auto"`` takes the decomposition unless its tables would be too large, then the MILP.
"""

from .compiled import compile_problem
from .decompose import milp_size
from .problem import (
    BUDGET_RTOL,
    CostTerm,
    DimChoice,
    InfeasibleBudget,
    Problem,
    Resource,
    Solution,
    evaluate,
    validate,
    within_budget,
)
from .solver import METHODS, minimum_usage, solve
from .synthetic import deit_v100_problem, resnet_problem, vit_problem

__all__ = [
    "BUDGET_RTOL", "METHODS", "CostTerm", "DimChoice", "InfeasibleBudget", "Problem", "Resource", "Solution",
    "compile_problem", "deit_v100_problem", "evaluate", "milp_size", "minimum_usage", "resnet_problem", "solve",
    "validate", "vit_problem", "within_budget",
]
