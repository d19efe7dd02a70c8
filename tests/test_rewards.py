"""Answer extraction / checking, the R1 format check and the reward schemes."""

from __future__ import annotations

import threading

import pytest

from iapo_openrlhf.rewards import (
    DEFAULT_POSTFIX,
    R1_SYSTEM_PROMPT,
    RewardResult,
    batch_rewards,
    compute_reward,
    extract_answer,
    format_ok,
    is_correct,
)

GSM8K_SOLUTION = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("So we get #### 18", "18"),
        ("So we get #### 18<|im_end|>", "18"),  # decoded with special tokens kept (OpenRLHF queries)
        ("The answer is 18 <|eot_id|></s>", "18"),
        ("Thus \\boxed{18}.", "18"),
        ("<think>6*3</think> <answer>18</answer>", "18"),
        ("The answer is 18.", "18"),
        ("**Answer:** 18", "18"),
        ("The answer is 0.5", "0.5"),  # a decimal point is not the end of the sentence
        ("Final Answer: The final answer is $18$. I hope it is correct.", "18"),  # Minerva style
        ("<answer>The final answer is $\\boxed{\\frac{3}{4}}$</answer>", "\\frac{3}{4}"),
        ("<answer>$18.00$</answer>", "18.00"),
        ("\\boxed{17} wait, no: \\boxed{18}", "18"),  # last box wins
        ("\\boxed{18} and then \\boxed{1", "18"),  # an unclosed last box falls back to the closed one
        ("\\boxed{5} <answer>18</answer>", "18"),  # the answer tag outranks a box
        ("I will write <answer> tags. <answer>18</answer>", "18"),  # a mentioned tag swallows nothing
        ("<think>...</think><answer>18", "18"),  # rollout stopped on "</answer>"
        ("\\boxed{\\frac{1}{2}} #### 3", "\\frac{1}{2}"),
        ("I think it is 18", None),  # no commitment, no answer
        ("The answer isn't obvious", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        ("#### 18", "18", True),
        ("\\boxed{18}", "18", True),
        ("\\boxed{17}", "18", False),
        ("<answer>18</answer>", "18", True),
        ("<answer>19</answer>", "18", False),
        ("The answer is 18.", "18", True),
        ("<answer>1,000</answer>", "1000", True),
        ("<answer>1000</answer>", "1,000", True),
        ("<answer>1,001</answer>", "1000", False),
        ("<answer>$18.00</answer>", "18", True),
        ("The answer is \\$18.", "18", True),
        ("\\boxed{25\\%}", "25", True),
        ("<answer>3/4</answer>", "0.75", True),
        ("\\boxed{\\frac{3}{4}}", "0.75", True),
        ("\\boxed{\\frac{3}{4}}", "0.7", False),
        ("<answer>0.75</answer>", "\\frac{3}{4}", True),
        ("<answer>-5</answer>", "-5", True),
        ("<answer>-5</answer>", "5", False),
        ("<answer>5</answer>", "-5", False),
        ("<answer>18</answer>", GSM8K_SOLUTION, True),
        ("<answer>9</answer>", GSM8K_SOLUTION, False),
        ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "The result is $\\boxed{\\frac{\\sqrt3}{2}}$.", True),  # MATH solution
        ("\\boxed{x^2 + 1}", "1 + x^2", True),
        ("\\boxed{18 \\text{ dollars}}", "18", True),
        ("<answer>18 eggs</answer>", "18", True),  # unit words after a plain number
        ("<answer>5 x</answer>", "5", False),  # ...but a one-letter "unit" is a variable
        ("I think it is 18", "18", False),  # uncommitted
        ("<answer>18</answer>", 18, True),  # integer labels from a dataset
    ],
)
def test_is_correct(completion, gold, expected):
    assert is_correct(completion, gold) is expected


NASTY = [
    None,
    "",
    "\\boxed{",
    "\\boxed{" * 3000,
    "{" * 5000 + "}" * 10,
    "x" * 100_000,
    "7" * 100_000,
    "<answer>" * 1000,
    "\udcff\x00\U0001f600 ∑∫ \u202e",
    "#### ",
    "The answer is",
    "<answer></answer>",
    "\\boxed{9^{9^{9^{9}}}}",  # 9^387420489: sympy would never finish
    "\\boxed{1000000!}",
    "\\boxed{" + "(" * 30 + "x" + ")" * 30 + "}",  # LaTeX parser is slow on deep nesting
    b"\\boxed{18}",
    12.5,
]


@pytest.mark.parametrize("garbage", NASTY, ids=range(len(NASTY)))
def test_garbage_never_raises(garbage):
    assert is_correct(garbage, "18") is False
    assert is_correct("\\boxed{18}", garbage) is False
    extract_answer(garbage)
    assert format_ok(garbage) is False
    result = compute_reward(garbage, "18", "paper")
    assert result.reward == -1.5 and not result.correct


def test_is_correct_off_the_main_thread():
    """math-verify's signal timeouts raise off the main thread; the checker must not."""
    cases = [
        ("\\boxed{\\frac{3}{4}}", "0.75", True),
        ("\\boxed{x^2 + 1}", "1 + x^2", True),
        ("<answer>1,000</answer>", "1000", True),
        ("\\boxed{17}", "18", False),
        ("\\boxed{9^{9^{9^{9}}}}", "18", False),  # no timeout here: only the cost guard stops this
    ]
    results: list[bool] = []
    errors: list[BaseException] = []

    def work():
        try:
            results.extend(is_correct(c, g) for c, g, _ in cases)
        except BaseException as e:  # pragma: no cover - the assertion below reports it
            errors.append(e)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(timeout=300)
    assert not worker.is_alive() and not errors
    assert results == [expected for _, _, expected in cases]


@pytest.mark.parametrize(
    "completion, think_in_prompt, expected",
    [
        ("<think>6*3</think><answer>18</answer>", False, True),
        ("<think>\n6*3\n</think>\n<answer>\n18\n</answer>\n", False, True),
        ("  <think>6*3</think> <answer>18</answer><|im_end|>", False, True),
        ("<think>6*3</think><answer>18</answer></s>", False, True),
        ("6*3</think><answer>18</answer>", True, True),  # "<think>" is in the prompt
        ("6*3</think><answer>18</answer>", False, False),
        ("<think>6*3</think><answer>18</answer>", True, False),  # a second <think>
        ("<think>6*3</think>", False, False),
        ("<answer>18</answer>", False, False),
        ("<answer>18</answer><think>6*3</think>", False, False),
        ("<think>a</think><answer>1</answer><answer>18</answer>", False, False),
        ("<think>a</think><think>b</think><answer>18</answer>", False, False),
        ("<think>6*3</think><answer>18</answer> Hope this helps!", False, False),
        ("<think>6*3</think><answer>  </answer>", False, False),
        ("Sure! <think>6*3</think><answer>18</answer>", False, False),
        ("<think>6*3</think><answer>18", False, False),
    ],
)
def test_format_ok(completion, think_in_prompt, expected):
    assert format_ok(completion, think_in_prompt) is expected


def test_prompt_constants():
    assert DEFAULT_POSTFIX == "</think><answer>"
    assert R1_SYSTEM_PROMPT.startswith("A conversation between User and Assistant.")
    assert "<think> reasoning process here </think> <answer> answer here </answer>" in R1_SYSTEM_PROMPT


GOOD_RIGHT = "<think>6*3</think><answer>18</answer>"
GOOD_WRONG = "<think>6*3</think><answer>17</answer>"
BAD_RIGHT = "It is 6*3. The answer is 18."
BAD_WRONG = "It is 6*3. The answer is 17."


@pytest.mark.parametrize(
    "scheme, expected",
    [
        ("paper", [1.5, -0.5, 0.5, -1.5]),
        ("correctness", [1.0, 0.0, 1.0, 0.0]),
        ("correctness_pm1", [1.0, -1.0, 1.0, -1.0]),
    ],
)
def test_schemes(scheme, expected):
    results = batch_rewards([GOOD_RIGHT, GOOD_WRONG, BAD_RIGHT, BAD_WRONG], ["18"] * 4, scheme)
    assert [r.reward for r in results] == expected
    assert [r.correct for r in results] == [True, False, True, False]
    assert [r.format_ok for r in results] == [True, True, False, False]
    assert [r.answer for r in results] == ["18", "17", "18", "17"]


def test_compute_reward_think_in_prompt():
    assert compute_reward("6*3</think><answer>18</answer>", "18", "paper", think_in_prompt=True) == RewardResult(
        reward=1.5, correct=True, format_ok=True, answer="18"
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"^scheme: got 'bogus', expected one of \['correctness', .*'paper'\]$"):
        compute_reward(GOOD_RIGHT, "18", "bogus")
    with pytest.raises(ValueError, match="scheme"):
        batch_rewards([], [], "bogus")
    with pytest.raises(ValueError, match=r"^golds: got 1 labels for 2 completions"):
        batch_rewards([GOOD_RIGHT, GOOD_WRONG], ["18"], "paper")
