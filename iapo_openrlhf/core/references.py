"""Reference ways to compute the probe entropies, single-process, for tests and benchmarks.

  naive    one unpadded forward of prefix + postfix per probe, no cache: the ground truth.
  kv_copy  the authors' approach: one cached forward, then per probe a copy of its cache prefix,
           left-padded into a batch with the other probes of its chunk. O(L^2) bytes copied.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from .entropy import entropy_from_logits
from .probes import Probes


def kv_copy_entropies(model, key_valid, probes: Probes, postfix, cache: DynamicCache, chunk_tokens, temperature):
    """The authors' method, kept as a benchmark baseline: each probe gets its own copy of its cache
    prefix, left-padded into a batch with the other probes of its chunk."""
    device = key_valid.device
    p_len = len(postfix)
    batch = max(1, (chunk_tokens or 256) // p_len)
    values = torch.zeros(len(probes.row), dtype=torch.float32)
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    for b0 in range(0, len(probes.row), batch):
        idx = range(b0, min(len(probes.row), b0 + batch))
        prefixes = []
        for k in idx:
            r, lo, hi = int(probes.row[k]), int(probes.lo[k]), int(probes.hi[k])
            prefixes.append((key_valid[r, lo:hi].nonzero().flatten() + lo, r))
        width = max(len(cols) for cols, _ in prefixes)
        data = []
        for keys, vals in layers:
            k_new = keys.new_zeros(len(prefixes), keys.shape[1], width, keys.shape[-1])
            v_new = vals.new_zeros(len(prefixes), vals.shape[1], width, vals.shape[-1])
            for q, (cols, r) in enumerate(prefixes):
                k_new[q, :, width - len(cols) :] = keys[r, :, cols]
                v_new[q, :, width - len(cols) :] = vals[r, :, cols]
            data.append((k_new, v_new))
        attn = torch.zeros(len(prefixes), width + p_len, dtype=torch.long, device=device)
        for q, (cols, _) in enumerate(prefixes):
            attn[q, width - len(cols) :] = 1
        pos = probes.pos[list(idx)].to(device)[:, None] + torch.arange(p_len, device=device)
        out = model(
            input_ids=postfix.to(device).repeat(len(prefixes), 1),
            attention_mask=attn,
            position_ids=pos,
            past_key_values=DynamicCache(ddp_cache_data=data),
            use_cache=True,
            logits_to_keep=1,
        )
        values[b0 : b0 + len(prefixes)] = entropy_from_logits(out.logits[:, -1], temperature).cpu()
    return values


def naive_entropies(model, input_ids, key_valid, probes: Probes, postfix, temperature) -> torch.Tensor:
    """Ground truth: one unpadded forward of prefix + postfix per probe, no cache."""
    device = input_ids.device
    values = torch.zeros(len(probes.row), dtype=torch.float32)
    for k in range(len(probes.row)):
        r, lo, hi = int(probes.row[k]), int(probes.lo[k]), int(probes.hi[k])
        cols = key_valid[r, lo:hi].nonzero().flatten() + lo
        ids = torch.cat([input_ids[r, cols], postfix.to(device)]).unsqueeze(0)
        out = model(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=device).unsqueeze(0), logits_to_keep=1)
        values[k] = entropy_from_logits(out.logits[0, -1], temperature).cpu()
    return values
