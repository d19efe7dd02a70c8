"""Rollouts with HF `generate`, returned in OpenRLHF's layout.

sequences (B, S) = left-padded prompt + response in the last A columns; attention_mask (B, S);
action_mask (B, A) = 1 on the response tokens up to and including EOS. The same layout feeds the
MI estimator, the advantages and the PPO update, as in OpenRLHF's experience maker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Rollout:
    sequences: torch.Tensor  # (B, S)
    attention_mask: torch.Tensor  # (B, S)
    action_mask: torch.Tensor  # (B, A)
    completions: list[str]  # decoded responses, EOS removed
    lengths: torch.Tensor  # (B,) response tokens including EOS
    truncated: torch.Tensor  # (B,) bool: no EOS within max_new_tokens


def left_pad(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, token_lists))
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        ids[i, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
        mask[i, width - len(tokens) :] = 1
    return ids, mask


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    greedy: bool = False,
    batch_size: int = 64,
) -> Rollout:
    """Sample one completion per prompt (repeat prompts for a group).

    top_k=0 and top_p=1: the PPO ratio and the exploration term assume the tokens were drawn from
    the plain temperature-scaled policy, which transformers' default top_k=50 would not be. Every
    other sampling knob is pinned off too: transformers fills what this config leaves unset from the
    model's generation_config.json, and Qwen2.5-Instruct's sets repetition_penalty 1.05 (and top_k
    20, top_p 0.8, temperature 0.7), which would bias both the rollouts and the evaluation protocol.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    config = GenerationConfig(
        do_sample=not greedy,
        temperature=temperature if not greedy else None,
        top_k=0 if not greedy else None,
        top_p=1.0 if not greedy else None,
        repetition_penalty=1.0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
        no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    prompt_ids, prompt_mask = left_pad(encoded, tokenizer.pad_token_id)
    responses: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        ids = prompt_ids[start : start + batch_size].to(device)
        mask = prompt_mask[start : start + batch_size].to(device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        responses.extend(out[:, ids.shape[1] :].cpu())
    model.train(was_training)

    width = max(len(r) for r in responses)
    response = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    action_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    lengths, truncated, completions = [], [], []
    for i, r in enumerate(responses):
        eos = (r == tokenizer.eos_token_id).nonzero().flatten()
        n = int(eos[0]) + 1 if len(eos) else len(r)
        response[i, :n] = r[:n]
        action_mask[i, :n] = 1
        lengths.append(n)
        truncated.append(len(eos) == 0)
        text_tokens = r[: n - 1] if len(eos) else r[:n]
        completions.append(tokenizer.decode(text_tokens, skip_special_tokens=True))
    return Rollout(
        sequences=torch.cat([prompt_ids, response], dim=1),
        attention_mask=torch.cat([prompt_mask, action_mask], dim=1),
        action_mask=action_mask,
        completions=completions,
        lengths=torch.tensor(lengths),
        truncated=torch.tensor(truncated),
    )
