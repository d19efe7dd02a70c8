"""Vocab-parallel entropy / log-probs on 2 gloo ranks against the unsharded computation."""

from __future__ import annotations

import torch
import torch.distributed as dist

from distributed import run_distributed
from iapo_openrlhf.core.entropy import entropy_from_logits, log_probs_from_logits
from iapo_openrlhf.core.vocab_parallel import vocab_parallel_entropy, vocab_parallel_log_probs


def _check_shards(rank: int, world: int, vocab: int, temperature: float) -> None:
    torch.manual_seed(0)  # same full logits on every rank
    logits = torch.randn(3, 7, vocab) * 6
    logits[0, 0, vocab - 1] = 80.0  # the max sits on the last rank's shard only
    labels = torch.randint(0, vocab, (3, 7))
    bounds = [vocab * r // world for r in range(world + 1)]  # uneven shards when vocab % world != 0
    start, end = bounds[rank], bounds[rank + 1]
    local = logits[..., start:end].clone()
    h = vocab_parallel_entropy(local, dist.group.WORLD, temperature)
    lp = vocab_parallel_log_probs(local, labels, start, end, dist.group.WORLD, temperature)
    torch.testing.assert_close(h, entropy_from_logits(logits, temperature), atol=1e-5, rtol=0)
    torch.testing.assert_close(lp, log_probs_from_logits(logits, labels, temperature), atol=1e-5, rtol=0)


def test_vocab_parallel_matches_full_vocab():
    run_distributed(_check_shards, 2, 120.0, 1001, 0.7)
