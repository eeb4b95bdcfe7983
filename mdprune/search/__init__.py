"""The search stage: budgets and constraints, the MDP program built from a space and solved, the calibrated
latency model it uses, and the measured check that holds a plan to its budget.

``solve/`` is the MIP library underneath (problems in, solutions out); this package is the bridge between it and
the rest of mdprune.
"""

from .budgets import Budget, check_budget, parse_budget, parse_constraints_text, read_budget, read_constraints
from .calibrate import calibrated_model
from .constraints import ConstraintRow, format_table, resolve
from .measured import solve_within_measured_budget
from .program import build_problem, plan_from_solution, smallest_latency, smallest_usage, solve_plan
from .search import Search

__all__ = [
    "Budget", "ConstraintRow", "Search", "build_problem", "calibrated_model", "check_budget", "format_table",
    "parse_budget", "parse_constraints_text", "plan_from_solution", "read_budget", "read_constraints", "resolve",
    "smallest_latency", "smallest_usage", "solve_plan", "solve_within_measured_budget",
]
