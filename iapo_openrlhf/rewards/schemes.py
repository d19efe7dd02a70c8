"""Reward schemes selectable by name from config.

Every scheme is a function of two verdicts (answer correct, format ok), so swapping schemes never
changes what is judged, only how it is scored:

    correctness      1 / 0                       (plain accuracy reward)
    correctness_pm1  +1 / -1                     (symmetric; same group-normalised advantages as 1/0)
    paper            +1 / -1 correct, +0.5 / -0.5 format (the IAPO paper's scheme)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .answer import extract_answer, is_correct
from .format import FORMAT_CHECKS

SCHEMES: dict[str, Callable[[bool, bool], float]] = {
    "correctness": lambda correct, formatted: 1.0 if correct else 0.0,
    "correctness_pm1": lambda correct, formatted: 1.0 if correct else -1.0,
    "paper": lambda correct, formatted: (1.0 if correct else -1.0) + (0.5 if formatted else -0.5),
}


@dataclass(frozen=True)
class RewardResult:
    """The scalar reward plus the verdicts behind it, for logging and for IAPO's sign_i."""

    reward: float
    correct: bool
    format_ok: bool
    answer: str | None


def _check_scheme(scheme: str) -> Callable[[bool, bool], float]:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: got {scheme!r}, expected one of {sorted(SCHEMES)}")
    return SCHEMES[scheme]


def _check_format(check: str):
    if check not in FORMAT_CHECKS:
        raise ValueError(f"format_check: got {check!r}, expected one of {sorted(FORMAT_CHECKS)}")
    return FORMAT_CHECKS[check]


def compute_reward(
    completion: str | None, gold: str | int | float | None, scheme: str, think_in_prompt: bool = False,
    format_check: str = "r1",
) -> RewardResult:
    """Score one completion against its gold label; never raises on the completion itself.

    format_check: "r1" (ours) or "authors" (the IAPO authors' one-line check), see format.py."""
    score = _check_scheme(scheme)
    formatted = _check_format(format_check)(completion, think_in_prompt)
    correct = is_correct(completion, gold)
    return RewardResult(score(correct, formatted), correct, formatted, extract_answer(completion))


def batch_rewards(
    completions: Sequence[str | None],
    golds: Sequence[str | int | float | None],
    scheme: str,
    think_in_prompt: bool = False,
    format_check: str = "r1",
) -> list[RewardResult]:
    """compute_reward over aligned lists; the scheme is checked before any work is done."""
    _check_scheme(scheme)
    _check_format(format_check)
    if len(completions) != len(golds):
        raise ValueError(
            f"golds: got {len(golds)} labels for {len(completions)} completions, expected one label per completion"
        )
    return [compute_reward(c, g, scheme, think_in_prompt, format_check) for c, g in zip(completions, golds)]
