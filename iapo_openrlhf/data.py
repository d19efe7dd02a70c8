"""Prompt/label examples for the local backend: the synthetic task or a prompt JSONL (GSM8K).

The JSONL reader is the same format OpenRLHF reads (`--data.input_key`, `--data.label_key`), so a
file prepared once serves both backends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError

THINK_OPEN = "<think>"


@dataclass(frozen=True)
class Example:
    prompt: str  # ends where the completion starts (after "<think>")
    label: str  # gold answer as text


def r1_prompt(question: str, system_prompt: str | None) -> str:
    """Plain-text R1 prompt for tokenizers without a chat template; the completion starts inside
    <think>, which is why the reward's format check is told the tag is in the prompt."""
    head = f"{system_prompt}\n" if system_prompt else ""
    return f"{head}User: {question.strip()}\nAssistant: {THINK_OPEN}"


def load_jsonl(path: str, input_key: str, label_key: str, system_prompt: str | None) -> list[Example]:
    """Rows of {input_key: question, label_key: answer}; a bad row is one error naming file and line."""
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
