"""Prompt/label examples for the local backend: the synthetic task or a prompt JSONL (GSM8K).

The JSONL reader is the same format OpenRLHF reads (`--data.input_key`, `--data.label_key`), so a
file prepared once serves both backends.

Prompt styles (`data.system_prompt`):
  r1     our R1 system prompt and the question as plain text ending in "Assistant: <think>"
         (built here from the question; OpenRLHF reads the same text from the file's "prompt");
  none   the question as it is;
  paper  the IAPO authors' prompt (configs/paper/): their R1-style system prompt plus a task
         instruction, a one-shot exchange ("What is 2+2?"), then the question, as chat messages
         that `scripts/prepare_data.py --style paper` writes under "prompt"; both backends render
         them with the model's chat template (OpenRLHF: --data.apply_chat_template).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from .config import ConfigError

THINK_OPEN = "<think>"
MESSAGES_KEY = "prompt"  # where prepare_data.py writes the prompt (text or chat messages)

# The IAPO authors' prompt (configs/paper/, data.system_prompt: paper), as their released code builds
# it: their system prompt (with the line breaks and 4-space indents of the indented triple-quoted
# string it is in their code), a newline and a task instruction, then a one-shot exchange.
PAPER_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it.\n"
    "    The assistant first thinks about the reasoning process in the mind and then provides the user\n"
    "    with the answer. The reasoning process and answer are enclosed within <think> and\n"
    "    <answer> tags, respectively, i.e., <think> reasoning process here </think>\n"
    "    <answer> answer here </answer>."
)
# Per dataset (theirs: GSM8K and DAPO-Math-17k ask for an integer; MATH-500 gets none, which
# leaves the system prompt ending in a newline).
PAPER_INSTRUCTIONS = {"gsm8k": "The answer must be a single integer.", "dapo": "The answer must be a single integer.",
                      "math500": ""}
PAPER_ONE_SHOT = (
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant",
     "content": "<think>To calculate 2+2, we simply add the numbers together: 2 + 2 = 4.</think>\n<answer>4</answer>"},
)


def paper_messages(question: str, dataset: str) -> list[dict]:
    """The authors' chat messages for one question of `dataset` (gsm8k, math500, dapo)."""
    system = PAPER_SYSTEM_PROMPT + "\n" + PAPER_INSTRUCTIONS[dataset]
    return [{"role": "system", "content": system}, *map(dict, PAPER_ONE_SHOT), {"role": "user", "content": question}]


@dataclass(frozen=True)
class Example:
    prompt: str  # ends where the completion starts (after "<think>" for r1; "" until rendered for chat)
    label: str  # gold answer as text
    messages: tuple | None = None  # chat messages ((role, content), ...) to render with a chat template


def render_chat(examples: list[Example], tokenizer) -> list[Example]:
    """Examples with chat messages get their prompt from the tokenizer's chat template (with the
    assistant turn opened); the others are returned as they are."""
    if not any(e.messages for e in examples):
        return examples
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.system_prompt: paper renders chat messages with the model's chat template, but this "
                          "tokenizer has none; expected an instruct model (e.g. Qwen/Qwen2.5-7B-Instruct)")
    out = []
    for e in examples:
        if e.messages:
            messages = [{"role": role, "content": content} for role, content in e.messages]
            e = replace(e, prompt=tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        out.append(e)
    return out


def think_in_prompt(prompts: list[str]) -> bool:
    """Whether completions start inside <think> (the prompt opened it): r1 prompts do, chat ones not."""
    return bool(prompts) and prompts[0].rstrip().endswith(THINK_OPEN)


def r1_prompt(question: str, system_prompt: str | None) -> str:
    """Plain-text R1 prompt for tokenizers without a chat template; the completion starts inside
    <think>, which is why the reward's format check is told the tag is in the prompt."""
    head = f"{system_prompt}\n" if system_prompt else ""
    return f"{head}User: {question.strip()}\nAssistant: {THINK_OPEN}"


def load_jsonl(path: str, input_key: str, label_key: str, system_prompt: str | None, *,
               chat: bool = False) -> list[Example]:
    """Rows of {input_key: question, label_key: answer}; a bad row is one error naming file and line.

    chat: the prompt is the list of chat messages under "prompt" (prepare_data.py --style paper),
    kept as `Example.messages` for `render_chat`; input_key and system_prompt are then unused."""
    if chat:
        input_key = MESSAGES_KEY
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{path}:{lineno}: not valid JSON, expected one object per line") from None
            if not isinstance(row, dict) or input_key not in row or label_key not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ConfigError(
                    f"{path}:{lineno}: expected keys '{input_key}' and '{label_key}', got {keys} "
                    "(set data.input_key / data.label_key)"
                )
            if chat:
                messages = row[input_key]
                if not (isinstance(messages, list) and messages
                        and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)):
                    raise ConfigError(
                        f"{path}:{lineno}: data.system_prompt paper expects chat messages under '{input_key}', got "
                        f"{type(messages).__name__}; write the file with scripts/prepare_data.py --style paper"
                    )
                pairs = tuple((str(m["role"]), str(m["content"])) for m in messages)
                examples.append(Example("", str(row[label_key]), pairs))
                continue
            examples.append(Example(r1_prompt(str(row[input_key]), system_prompt), str(row[label_key])))
    if not examples:
        raise ConfigError(f"{path}: no examples, expected at least one JSON line")
    return examples


def synthetic_examples(task, split: str, n: int) -> list[Example]:
    return [Example(p.prompt, str(p.answer)) for p in task.problems(split, n)]


def jsonl_texts(path: str | Path, input_key: str, label_key: str) -> list[str]:
    """Questions and answers as raw text, to train a tokenizer for a from-scratch tiny model."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                texts.extend([str(row.get(input_key, "")), str(row.get(label_key, ""))])
    return texts
