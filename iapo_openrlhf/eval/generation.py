"""Sample k completions per problem and score them: the correctness and length matrices that
P@k / L@k / R@k are computed from. Shared by the trainer's periodic evaluation and `iapo-eval`."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..data import Example, think_in_prompt
from ..local.rollout import generate
from ..rewards import batch_rewards
from .metrics import evaluate_matrices


def sample_matrices(
    model,
    tokenizer,
    examples: list[Example],
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    reward_scheme: str,
    format_check: str = "r1",
    batch_size: int = 64,
    seed: int = 0,
    progress=None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """(correct (P, k) bool, lengths (P, k) tokens without EOS, seconds of generation).

    Runs under a forked RNG seeded with `seed`: evaluation is reproducible and leaves the training
    RNG untouched, so a resumed run samples the same rollouts as an uninterrupted one.
    """
    prompts = [e.prompt for e in examples for _ in range(samples)]
    golds = [e.label for e in examples for _ in range(samples)]
    correct, lengths = [], []
    elapsed = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            t0 = time.perf_counter()
            out = generate(
                model, tokenizer, prompts[start : start + batch_size],
                max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size,
            )
            elapsed += time.perf_counter() - t0
            results = batch_rewards(out.completions, golds[start : start + batch_size], reward_scheme,
                                    think_in_prompt=think_in_prompt(prompts), format_check=format_check)
            correct.extend(r.correct for r in results)
            lengths.extend((out.lengths - (~out.truncated).long()).tolist())
            if progress is not None:
                progress.update(len(results))
    shape = (len(examples), samples)
    return np.array(correct, dtype=bool).reshape(shape), np.array(lengths).reshape(shape), elapsed


def evaluate_model(model, tokenizer, examples: list[Example], *, ks: list[int], **kwargs) -> dict:
    """P@k, pass@k, L@k, R@k for every k plus mean accuracy/length and inference seconds."""
    correct, lengths, seconds = sample_matrices(model, tokenizer, examples, samples=max(ks), **kwargs)
    result = evaluate_matrices(correct, lengths, ks)
    result["accuracy"] = float(correct.mean())
    result["mean_length"] = float(lengths.mean())
    result["inference_seconds"] = seconds
    result["num_problems"] = len(examples)
    return result
