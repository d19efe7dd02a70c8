"""Entropy and log-probabilities of logits sharded by vocabulary over a tensor-parallel group.

When DeepSpeed AutoTP makes the LM head vocab-parallel, each rank holds logits for its slice
[vocab_start, vocab_end) of the vocabulary. Gathering them would materialise (N, V) per rank
(152k columns for Qwen); instead each quantity is reduced from per-shard partial sums:

    m   = max over ranks of the local max                      (all-reduce MAX)
    S   = sum over ranks of sum_v exp(z_v - m)                 (all-reduce SUM)
    T   = sum over ranks of sum_v exp(z_v - m) * (z_v - m)     (same all-reduce as S)
    H   = log S - T / S
    log p(y) = z_y - m - log S, z_y from the rank that owns y  (all-reduce SUM of a one-hot pick)

Every function is collective: all ranks of the group must call it with the same leading shape.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _scaled(local_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = local_logits.float()
    return z / temperature if temperature != 1.0 else z


def _global_max(z: torch.Tensor, group) -> torch.Tensor:
    m = z.amax(-1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    return m


def vocab_parallel_entropy(local_logits: torch.Tensor, group, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax over the full vocabulary from this rank's (..., V_local) shard. Returns
    (...,) fp32, identical on every rank. Moves 3 floats per row instead of V_local."""
    z = _scaled(local_logits, temperature)
    shifted = z - _global_max(z, group).unsqueeze(-1)
    e = shifted.exp()
    sums = torch.stack([e.sum(-1), (e * shifted).sum(-1)])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    total, weighted = sums[0], sums[1]
    return total.log() - weighted / total


def vocab_parallel_log_probs(
    local_logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    vocab_end: int,
    group,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log softmax(full logits)[label] from this rank's shard [vocab_start, vocab_end).

    local_logits (..., V_local), labels (...,) global token ids. Returns (...,) fp32 on every rank.
    """
    z = _scaled(local_logits, temperature)
    m = _global_max(z, group)
    owned = (labels >= vocab_start) & (labels < vocab_end)
    local_index = (labels - vocab_start).clamp(0, z.shape[-1] - 1)
    picked = torch.where(owned, z.gather(-1, local_index.unsqueeze(-1)).squeeze(-1) - m, torch.zeros_like(m))
    sums = torch.stack([(z - m.unsqueeze(-1)).exp().sum(-1), picked])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return sums[1] - sums[0].log()
