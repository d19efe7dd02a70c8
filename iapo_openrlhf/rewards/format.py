"""DeepSeek-R1 think/answer format checks and the matching system prompt.

The format reward rewards *structure* only. Two checks, chosen with `reward.format`:

- `r1` (ours, the default): `<think> ... </think> <answer> ... </answer>`, each tag exactly once, in
  that order, a non-blank answer and nothing but whitespace or end-of-sequence markers after
  `</answer>`; the reasoning may span lines.
- `authors`: the check of the IAPO authors' released code, reimplemented from what it accepts: the
  whole completion on ONE line except for exactly one newline between `</think>` and `<answer>`
  (their pattern has no DOTALL, so `.` never matches a newline), optional text before `<think>`,
  no second `<think>` / `<answer>`, an answer that may be empty, one optional trailing newline.
  A multi-line chain of thought therefore loses the 0.5 format reward there: it pushes towards
  short one-line reasoning, which matters when reproducing their lengths.

Correctness is judged separately (answer.py).
"""

from __future__ import annotations

import re

R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>."
)

# Early-exit probe appended after a reasoning prefix (DESIGN section 2): closes the thought and
# opens the answer, so the next-token distribution is the model's answer distribution.
DEFAULT_POSTFIX = "</think><answer>"

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_LAYOUT = re.compile(r"\s*<think>.*?</think>\s*<answer>(.*?)</answer>(.*)", re.DOTALL)
# Detokenised EOS / turn markers a rollout may keep: <|im_end|>, <|endoftext|>, </s>, <｜end▁of▁sentence｜>.
_TRAILER = re.compile(r"(?:\s|<[|｜][^<>]{0,40}[|｜]>|</s>)*")


_AUTHORS_LAYOUT = re.compile(r"([^\n]*)<think>([^\n]*)</think>\n<answer>([^\n]*)</answer>\n?")


def format_ok_authors(completion: str | None, think_in_prompt: bool = False) -> bool:
    """Whether `completion` passes the IAPO authors' format check (see the module docstring).

    think_in_prompt as for `format_ok`. Trailing end-of-turn markers are ignored (their trainer
    decodes without special tokens). Never raises.
    """
    if not isinstance(completion, str):
        return False
    text = "<think>" + completion if think_in_prompt else completion
    text = re.sub(r"(?:<[|｜][^<>]{0,40}[|｜]>|</s>)+\Z", "", text)
    match = _AUTHORS_LAYOUT.fullmatch(text)
    return bool(match) and not any("<think>" in part or "<answer>" in part for part in match.groups())


def format_ok(completion: str | None, think_in_prompt: bool = False) -> bool:
    """Whether `completion` follows the R1 layout.

    think_in_prompt: the chat template already ends the prompt with `<think>` (R1-distilled and
    many R1-Zero setups), so the completion is checked as `"<think>" + completion`; a completion
    that opens `<think>` again then has two and fails. Never raises.
    """
    if not isinstance(completion, str):
        return False
    text = "<think>" + completion if think_in_prompt else completion
    if any(text.count(tag) != 1 for tag in _TAGS):
        return False
    match = _LAYOUT.fullmatch(text)
    return bool(match and match.group(1).strip() and _TRAILER.fullmatch(match.group(2)))


FORMAT_CHECKS = {"r1": format_ok, "authors": format_ok_authors}
