"""Rule-based rewards: final-answer correctness (math-verify), R1 format, and named schemes."""

from .answer import extract_answer, is_correct
from .format import DEFAULT_POSTFIX, FORMAT_CHECKS, R1_SYSTEM_PROMPT, format_ok, format_ok_authors
from .schemes import SCHEMES, RewardResult, batch_rewards, compute_reward

__all__ = [
    "DEFAULT_POSTFIX",
    "FORMAT_CHECKS",
    "R1_SYSTEM_PROMPT",
    "SCHEMES",
    "RewardResult",
    "batch_rewards",
    "compute_reward",
    "extract_answer",
    "format_ok",
    "format_ok_authors",
    "is_correct",
]
