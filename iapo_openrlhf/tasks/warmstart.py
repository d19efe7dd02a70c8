"""Warm-start SFT of a tiny Qwen2 policy on the synthetic task.

Why: RL from a random model never reaches a correct answer, and the README job must finish on a
2-core CPU in minutes. A couple of minutes of SFT on verbose traces gives a policy that is
partly accurate and whose outputs carry removable redundancy, which is what IAPO is meant to cut.
"""

from __future__ import annotations

import contextlib
import math
import random
import statistics
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from ..local.rollout import generate
from .synthetic import END_ANSWER, Problem, SyntheticTask, build_tokenizer, check_answer

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids, attention_mask, labels


def tiny_qwen2_config(tokenizer: PreTrainedTokenizerFast, *, hidden_size: int = 64, num_layers: int = 2) -> Qwen2Config:
    """A Qwen2 small enough for RL on a 2-core CPU (168k parameters at the defaults).

    head_dim 32 because vLLM rejects smaller heads; no GQA, since at two heads it would leave one
    key/value head for all the copying the task needs. Untied embeddings because with tied ones the
    number words (whose embeddings also carry their digit value) were still copied wrongly after
    1000 SFT steps, where untied they were right after 500 (measured, same seed).
    """
    head_dim = 32
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // head_dim,
        num_key_value_heads=hidden_size // head_dim,
        head_dim=head_dim,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def _batches(
    task: SyntheticTask,
    problems: Sequence[Problem],
    prompt_ids: Sequence[list[int]],
    tokenizer: PreTrainedTokenizerFast,
    rng: random.Random,
    batch_size: int,
    group: int = 4,
) -> Iterator[Batch]:
    """Endless right-padded batches of prompt + fresh trace + EOS, labels on the completion only.

    `group` batches are drawn at once and cut by length, so that a batch pads to its own length:
    padding fell from ~40% of the tokens of random batches to ~12% (measured).
    """
    while True:
        rows: list[tuple[list[int], int]] = []  # (ids, prompt length)
        for i in rng.sample(range(len(problems)), group * batch_size):
            trace = task.sample_trace(problems[i], rng)
            rows.append((prompt_ids[i] + list(trace.token_ids) + [tokenizer.eos_token_id], len(prompt_ids[i])))
        rows.sort(key=lambda row: len(row[0]))
        chunks = [rows[k : k + batch_size] for k in range(0, len(rows), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            yield _pad_rows(chunk, tokenizer.pad_token_id)


EARLY_EXIT_POSTFIX = "</think><answer>"  # the estimator's default postfix (config iapo.postfix)


def _early_exit_rows(
    task: SyntheticTask,
    problems: Sequence[Problem],
    prompt_ids: Sequence[list[int]],
    tokenizer: PreTrainedTokenizerFast,
    rng: random.Random,
    n: int,
    postfix: str,
) -> Iterator[list[tuple[list[int], int]]]:
    """Endless lists of n rows "prompt + trace[:j] + postfix + gold answer + </answer>", each
    with the index of its first labelled token (the answer's first token).

    j is uniform over every prefix the estimator probes: 0 .. len(trace) is the trace cut before
    token j, len(trace) + 1 the whole trace and its EOS. The postfix itself is never a target, so
    nothing teaches the policy to stop early; what is trained is the answer distribution after a
    cut trace, the quantity the estimator reads.
    """
    postfix_ids = tokenizer(postfix, add_special_tokens=False).input_ids
    end_answer = tokenizer(END_ANSWER, add_special_tokens=False).input_ids
    while True:
        rows = []
        for i in rng.sample(range(len(problems)), n):
            trace = task.sample_trace(problems[i], rng)
            body = list(trace.token_ids) + [tokenizer.eos_token_id]
            j = rng.randint(0, len(body))
            gold = tokenizer(str(problems[i].answer), add_special_tokens=False).input_ids
            head = prompt_ids[i] + body[:j] + postfix_ids
            rows.append((head + gold + end_answer, len(head)))
        yield rows


def _pad_rows(rows: list[tuple[list[int], int]], pad_id: int) -> Batch:
    """Right-padded input_ids, attention_mask and labels (-100 before each row's first labelled token)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, first) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, first : len(ids)] = input_ids[r, first : len(ids)]
        attention_mask[r, : len(ids)] = 1
    return input_ids, attention_mask, labels


def _label_nll(model, batch: Batch) -> torch.Tensor:
    """Mean next-token NLL over the labelled tokens of a batch (HF's causal-LM loss)."""
    input_ids, attention_mask, labels = batch
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss


def _sft_steps(model, batches: Iterator[Batch], probes, weight: float, optimizer, scheduler, steps: int, desc: str,
               progress: bool) -> None:
    """`steps` optimizer steps of the SFT loss (+ weight x the early-exit answer loss when `probes`)."""
    pad_id = model.config.pad_token_id
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for _ in bar:
        input_ids, attention_mask, labels = next(batches)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        if probes is not None:
            loss = loss + weight * _label_nll(model, _pad_rows(next(probes), pad_id))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def sft_optimizer(model: torch.nn.Module, *, lr: float, warmup_steps: int, steps: int):
    """AdamW with linear warm-up then cosine decay to 0.1 x lr: the warm start's optimizer, shared
    with the experimental warm starts in scripts/ so they differ from it only in their loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def warm_start(
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = 1000,
    batch_size: int = 32,
    lr: float = 1e-2,
    warmup_steps: int = 30,
    n_train_problems: int = 20_000,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_threads: int | None = 1,
    task: SyntheticTask | None = None,
    progress: bool = True,
    early_exit_weight: float = 0.0,
    early_exit_rows: int | None = None,
    early_exit_postfix: str = EARLY_EXIT_POSTFIX,
    early_exit_steps: int = 0,
    early_exit_lr: float | None = None,
) -> Path:
    """SFT a tiny Qwen2 from scratch on fresh traces each step and save model + tokenizer.

    early_exit_weight > 0 (issue 18): every step also trains the early-exit answer, on
    `early_exit_rows` (default batch_size // 2) extra rows "prompt + trace cut anywhere + postfix +
    gold answer" (`_early_exit_rows`), loss = SFT loss + weight x the answer loss (each a mean over
    its own tokens), so the probe's answer is a calibrated belief about the answer instead of a
    copy of the last number written. Those rows draw from their own seeded generator: the SFT
    batches are the same as without them, and weight 0 is today's warm start bit for bit.
    early_exit_steps = 0: the answer loss from the first step on. early_exit_steps > 0: the `steps`
    plain SFT steps first (today's warm start, unchanged), then a second stage of that many steps
    of SFT + answer loss with a fresh optimizer at `early_exit_lr` (default lr / 10), same
    schedule shape: the copy circuits form first, then the probe is calibrated on top of them
    (trained jointly from the start, the noisy answer loss kept them from forming: issue 18).

    Deterministic given `seed` and the machine (data order and traces come from seeded generators).
    Cosine decay to 10% of `lr` after a linear warm-up: a short run needs the high early rate for
    the copy circuits to form and the low late rate to settle the arithmetic.

    `num_threads` is set for the run only (None keeps torch's setting). One thread by default: on
    an idle 2-core machine 2 threads were 1.35x faster, but with another process busy they were
    5-15x slower (measured), and this model is too small to gain much from more.
    """
    with torch_threads(num_threads):
        torch.manual_seed(seed)
        task = task or SyntheticTask(seed)
        tokenizer = build_tokenizer()
        model = Qwen2ForCausalLM(tiny_qwen2_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers))
        model.train()
        problems = task.problems("train", n_train_problems)
        prompt_ids = tokenizer([p.prompt for p in problems], add_special_tokens=False).input_ids
        batches = _batches(task, problems, prompt_ids, tokenizer, random.Random(f"{seed}:warm_start"), batch_size)
        if early_exit_weight < 0:
            raise ValueError(f"early_exit_weight: got {early_exit_weight}, expected a value >= 0")
        probes = None
        if early_exit_weight > 0:
            probes = _early_exit_rows(task, problems, prompt_ids, tokenizer, random.Random(f"{seed}:early_exit"),
                                      early_exit_rows or max(1, batch_size // 2), early_exit_postfix)
        optimizer, scheduler = sft_optimizer(model, lr=lr, warmup_steps=warmup_steps, steps=steps)
        joint = probes if early_exit_steps == 0 else None
        _sft_steps(model, batches, joint, early_exit_weight, optimizer, scheduler, steps, "warm start", progress)
        if probes is not None and early_exit_steps > 0:
            optimizer, scheduler = sft_optimizer(model, lr=early_exit_lr or lr / 10, warmup_steps=warmup_steps,
                                                 steps=early_exit_steps)
            _sft_steps(model, batches, probes, early_exit_weight, optimizer, scheduler, early_exit_steps,
                       "early-exit stage", progress)
        model.eval()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return out_dir


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    problems: Sequence[Problem],
    *,
    samples: int = 4,
    temperature: float = 1.0,
    greedy: bool = False,
    max_new_tokens: int = 160,
    batch_size: int = 64,
) -> dict[str, float]:
    """Accuracy and completion length (tokens before EOS) over `samples` completions per problem
    (one when greedy). A quick check of a warm start, not the project's P@k evaluation; it samples
    through the rollout path (top_k=0) so its numbers describe the policy RL starts from."""
    prompts = [p for p in problems for _ in range(1 if greedy else samples)]
    out = generate(
        model, tokenizer, [p.prompt for p in prompts],
        max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy, batch_size=batch_size,
    )
    lengths = (out.lengths - (~out.truncated).long()).tolist()
    correct = [check_answer(text, problem) for text, problem in zip(out.completions, prompts)]
    return {
        "accuracy": sum(correct) / len(correct),
        "mean_length": statistics.fmean(lengths),
        "std_length": statistics.pstdev(lengths),
    }
