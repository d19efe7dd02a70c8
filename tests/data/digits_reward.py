"""A reward file for the CPU end-to-end tests (OpenRLHF's --reward.remote_url file format).

A tiny random model never answers a GSM8K question, so the project's reward gives every sample
the same value, every group-normalised advantage is 0 and PPO has nothing to learn from. This one
varies from sample to sample: the share of digits in the response. `scores` (correctness, the
sign of IAPO's exploration term) is 1 when that share is above 5%.
"""

import torch


def reward_func(queries, prompts, labels, **kwargs):
    rewards = []
    for query, prompt in zip(queries, prompts):
        response = query[len(prompt):] if query.startswith(prompt) else query
        rewards.append(sum(c.isdigit() for c in response) / max(len(response), 1))
    rewards = torch.tensor(rewards, dtype=torch.float32)
    scores = (rewards > 0.05).float()
    return {"rewards": rewards, "scores": scores, "extra_logs": {"digit_share": rewards.clone()}}
