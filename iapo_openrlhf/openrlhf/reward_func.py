"""GSM8K / MATH reward for OpenRLHF's reward-function file option.

    --reward.remote_url "$(python -m iapo_openrlhf.openrlhf.reward_func --path)"

OpenRLHF loads this file by path (`importlib.util.spec_from_file_location("reward_func", path)`) in
every vLLM engine actor and calls `reward_func([query], [prompt], [label])` once per sample in a
worker thread (`openrlhf.utils.agent.SingleTurnAgentExecutor`). `query` is prompt + response
decoded with `skip_special_tokens=False`, so it ends with the model's end-of-turn tokens.

Returned per sample i (tensors of shape (N,), float32):
- `rewards[i]`: the configured scheme's reward (`iapo_openrlhf.rewards.SCHEMES`), used for the
  advantages. Scheme from the environment variable IAPO_REWARD_SCHEME, default "paper" (+1/-1
  correct, +0.5/-0.5 R1 format). It must be set in the vLLM actors' environment (on an existing Ray
  cluster: `ray job submit --runtime-env-json '{"env_vars": {"IAPO_REWARD_SCHEME": "..."}}'`).
  An unknown name fails when OpenRLHF loads this file, not per sample.
  The format check from IAPO_REWARD_FORMAT: "r1" (default) or "authors" (the IAPO authors' one-line
  check, `iapo_openrlhf.rewards.format`), set the same way.
- `scores[i]`: answer correctness, 1.0 / 0.0, whatever the scheme. OpenRLHF's dynamic filtering and
  IAPO's exploration sign (scores > 0) read it, so it must not be the shaped reward.
- `extra_logs`: `correct`, `format` (1.0 / 0.0); OpenRLHF logs each key as a rollout metric.

Never raises: OpenRLHF turns an exception into a missing reward, which stops training later with a
misleading error. A sample that cannot be scored gets the scheme's lowest reward and score 0.

The R1 format check treats `<think>` as already open when the prompt ends with it (R1-distilled
chat templates and `iapo_openrlhf.data.r1_prompt` do), as `rewards.batch_rewards(think_in_prompt=)`.
Absolute imports only: loaded by path, this module is not part of the package.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

from iapo_openrlhf.data import THINK_OPEN
from iapo_openrlhf.rewards import FORMAT_CHECKS, SCHEMES, compute_reward
from iapo_openrlhf.rewards.answer import strip_end_markers

PATH = str(Path(__file__).resolve())
SCHEME_ENV = "IAPO_REWARD_SCHEME"
DEFAULT_SCHEME = "paper"
FORMAT_ENV = "IAPO_REWARD_FORMAT"
DEFAULT_FORMAT = "r1"

logger = logging.getLogger("iapo_openrlhf.reward_func")

# Prompt tails tried, longest first, when the query does not start with the prompt (tokenizer
# round trip not exact, or a long prompt left-truncated by OpenRLHF).
_TAIL_CHARS = (256, 64, 16)
_warned: set[str] = set()


def _scheme_from_env() -> str:
    name = os.environ.get(SCHEME_ENV, "").strip() or DEFAULT_SCHEME
    if name not in SCHEMES:
        raise ValueError(f"{SCHEME_ENV}: got {name!r}, expected one of {sorted(SCHEMES)}")
    return name


def _format_from_env() -> str:
    name = os.environ.get(FORMAT_ENV, "").strip() or DEFAULT_FORMAT
    if name not in FORMAT_CHECKS:
        raise ValueError(f"{FORMAT_ENV}: got {name!r}, expected one of {sorted(FORMAT_CHECKS)}")
    return name


SCHEME = _scheme_from_env()
FORMAT = _format_from_env()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def split_response(query: str, prompt: str | None) -> str:
    """The completion inside `query`: what follows the prompt.

    Exact prefix first; otherwise what follows the first occurrence of the prompt's last 256, 64 or
    16 characters; otherwise the whole query (warned once: the format check then fails, the answer
    is still read from the end).
    """
    if not isinstance(prompt, str) or not prompt:
        return query
    if query.startswith(prompt):
        return query[len(prompt) :]
    for n in _TAIL_CHARS:
        tail = prompt[-n:]
        index = query.find(tail)
        if index >= 0:
            return query[index + len(tail) :]
    _warn_once("prompt", "reward_func: a query does not contain its prompt; scoring the whole query")
    return query


def _score(query, prompt, label) -> tuple[float, bool, bool]:
    """(reward, correct, format ok) for one sample."""
    response = strip_end_markers(split_response(query, prompt if isinstance(prompt, str) else None))
    think_in_prompt = isinstance(prompt, str) and prompt.rstrip().endswith(THINK_OPEN)
    result = compute_reward(response, label, SCHEME, think_in_prompt=think_in_prompt, format_check=FORMAT)
    return result.reward, result.correct, result.format_ok


def reward_func(queries, prompts, labels, **kwargs) -> dict:
    """OpenRLHF reward function: {"rewards": (N,), "scores": (N,), "extra_logs": {name: (N,)}}."""
    worst = SCHEMES[SCHEME](False, False)
    if isinstance(queries, str):
        queries, prompts, labels = [queries], [prompts], [labels]
    try:
        n = len(queries)
    except Exception:
        queries, n = [], 0
    rewards, correct, formatted = [], [], []
    for i in range(n):
        try:
            query = queries[i]
            prompt = prompts[i] if prompts is not None and i < len(prompts) else None
            label = labels[i] if labels is not None and i < len(labels) else None
            if not isinstance(query, str):
                raise TypeError(f"query is {type(query).__name__}, expected str")
            reward, ok, fmt = _score(query, prompt, label)
        except Exception as exc:  # noqa: BLE001 - a reward function must not raise
            _warn_once("error", f"reward_func: sample scored as wrong after {type(exc).__name__}: {exc}")
            reward, ok, fmt = worst, False, False
        rewards.append(float(reward))
        correct.append(1.0 if ok else 0.0)
        formatted.append(1.0 if fmt else 0.0)
    scores = torch.tensor(correct, dtype=torch.float32)
    return {
        "rewards": torch.tensor(rewards, dtype=torch.float32),
        "scores": scores,
        "extra_logs": {"correct": scores.clone(), "format": torch.tensor(formatted, dtype=torch.float32)},
    }


if __name__ == "__main__":
    if sys.argv[1:] != ["--path"]:
        sys.exit("usage: python -m iapo_openrlhf.openrlhf.reward_func --path  (prints this file's path)")
    print(PATH)
