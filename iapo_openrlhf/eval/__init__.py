"""Evaluation: P@k / pass@k / L@k / R@k metrics and reports (DESIGN section 7)."""

from .metrics import (
    evaluate_matrices,
    length_at_k,
    pass_at_k_first,
    pass_at_k_unbiased,
    ratio_at_k,
    to_markdown,
    write_reports,
)

__all__ = [
    "evaluate_matrices",
    "length_at_k",
    "pass_at_k_first",
    "pass_at_k_unbiased",
    "ratio_at_k",
    "to_markdown",
    "write_reports",
]
