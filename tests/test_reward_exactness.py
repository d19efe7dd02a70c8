"""The reward on the whole GSM8K test split: every gold answer in several accepted forms scores 1,
every gold plus or minus one scores 0 (an integer gold compares exactly); the authors' format check."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from iapo_openrlhf.rewards import compute_reward, format_ok, format_ok_authors, is_correct
from test_prepare_data import load_script

ROOT = Path(__file__).resolve().parents[1]
GSM8K_TEST = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def _text(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else str(float(value))


def _commas(value: Fraction) -> str:
    return f"{value.numerator:,}" if value.denominator == 1 else _text(value)


ACCEPTED = [
    lambda g, v: f"<think>so it is {g}</think> <answer>{g}</answer>",
    lambda g, v: f"<think>add them</think> <answer>\\boxed{{{g}}}</answer>",
    lambda g, v: f"First 3 + 4, then the rest.\n#### {g}",
    lambda g, v: f"Adding up the costs. The answer is {g}.",
    lambda g, v: f"<think>sum</think> <answer>${_commas(v)}</answer>",
    lambda g, v: f"<think>sum</think> <answer>{g}.00</answer>" if v.denominator == 1 else f"<answer>{g}</answer>",
    lambda g, v: f"<think>count</think> <answer>{g} dollars</answer>",
]
REJECTED = [
    lambda g: f"<think>so it is {g}</think> <answer>{g}</answer>",
    lambda g: f"<think>sum</think> <answer>{_commas(Fraction(g))}</answer>",
    lambda g: f"The final answer is \\boxed{{{g}}}.",
]


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason="../shared/data/gsm8k not beside the checkout")
def test_every_gsm8k_test_gold_is_accepted_and_its_neighbours_refused():
    prepare = load_script()  # scripts/prepare_data.py
    rows = [json.loads(line) for line in GSM8K_TEST.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == 1319
    wrong = []
    for n, row in enumerate(rows):
        _, gold = prepare.gsm8k_row(row, f"test.jsonl:{n + 1}")
        value = Fraction(gold)
        for form in ACCEPTED:
            completion = form(gold, value)
            if compute_reward(completion, gold, "correctness").reward != 1.0:
                wrong.append(("refused", gold, completion))
        for delta in (-1, 1):
            neighbour = _text(value + delta)
            for form in REJECTED:
                completion = form(neighbour)
                if compute_reward(completion, gold, "correctness").reward != 0.0:
                    wrong.append(("accepted", gold, completion))
        # the raw GSM8K solution is a gold label too ("... #### 1,450,000" style)
        if not is_correct(f"<answer>{_commas(value)}</answer>", row["answer"]):
            wrong.append(("refused vs solution", row["answer"][-30:], _commas(value)))
    assert not wrong, f"{len(wrong)} wrong verdicts, e.g. {wrong[:5]}"


@pytest.mark.parametrize("gold,pred,ok", [
    ("1,450,000", "1450001", False), ("1450000", "1,450,001", False), ("2880000", "2880001", False),
    ("2880000", "2,880,000.0", True), ("18", "18.000001", False), ("-7", "-7", True), ("18.00", "18", True),
    # a non-integer gold: within 1e-6 absolute (math-verify's 6-decimal rounding), nothing looser
    ("0.3", "0.30000000000000004", True), ("2.5", "2.50", True), ("2.5", "2.5000001", True),
    ("2.5", "2.50001", False), ("0.25", "0.26", False), ("1.5", "1.46", False),
])
def test_integer_gold_is_exact_and_a_decimal_gold_has_a_tiny_tolerance(gold, pred, ok):
    assert is_correct(f"<answer>{pred}</answer>", gold) is ok


@pytest.mark.parametrize("completion,authors,ours", [
    ("<think>2 + 2 = 4</think>\n<answer>4</answer>", True, True),
    ("<think>2 + 2 = 4</think>\n<answer>4</answer>\n", True, True),
    ("Sure. <think>2 + 2 = 4</think>\n<answer>4</answer>", True, False),  # text before <think>: theirs accepts
    ("<think>2 + 2\n= 4</think>\n<answer>4</answer>", False, True),  # a multi-line thought: theirs refuses
    ("<think>2 + 2 = 4</think> <answer>4</answer>", False, True),  # theirs needs exactly one newline there
    ("<think>2 + 2 = 4</think>\n<answer></answer>", True, False),  # an empty answer: theirs accepts
    ("<think>a</think>\n<answer>4</answer> trailing", False, False),
    ("<think>a <think> b</think>\n<answer>4</answer>", False, False),
    ("<think>a</think>\n<answer>4</answer><|im_end|>", True, True),
    (None, False, False),
])
def test_authors_format_check(completion, authors, ours):
    assert format_ok_authors(completion) is authors
    assert format_ok(completion) is ours
    scheme = compute_reward(completion, "4", "paper", format_check="authors")
    assert scheme.format_ok is authors and scheme.reward == (1.0 if scheme.correct else -1.0) + (0.5 if authors else -0.5)


def test_unknown_format_check_is_refused():
    with pytest.raises(ValueError, match="format_check: got 'strict'"):
        compute_reward("x", "1", "paper", format_check="strict")
