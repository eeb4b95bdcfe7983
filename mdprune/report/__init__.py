"""Human-readable report of a pruning run: markdown with summary tables, PNG plots and a JSON with every figure."""

from .report import render_markdown, write_report

__all__ = ["render_markdown", "write_report"]
