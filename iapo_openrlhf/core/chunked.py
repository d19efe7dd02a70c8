"""The chunked probe schedule: every probe of a batch in a few forwards over one shared KV cache.

After the preload forward has filled the cache with every token of the batch, blocks of C probes
per row go through the model as C * P postfix tokens on top of it, with a 4D mask so that probe j
sees its own prefix's keys and its own block causally (RoPE positions from `position_ids`), and
the LM head runs on the last token of each block only. The probe keys go into spare cache slots
that the next chunk overwrites (`probe_cache.py`): nothing is copied per probe.

`default_chunk_tokens` sizes C: on the CPU from a fixed memory budget, on CUDA from the device's
free memory, with a floor that keeps each forward large enough to fill the GPU.
"""

from __future__ import annotations

import math

import torch

from .modeling import additive_mask, param_dtype, text_config
from .parallel import PROBE_MEMORY_SHARE, EstimatorSession, available_bytes
from .probe_cache import ProbeCache
from .probes import Probes

# CPU: memory one probe forward may use (attention scores, mask, logits).
DEFAULT_PROBE_MEMORY_BYTES = 1 << 30
# CUDA: probe tokens per forward below which a GPU idles between kernels (when memory allows more).
GPU_MIN_FORWARD_TOKENS = 4096


def default_chunk_tokens(rows: int, key_len: int, postfix_len: int, session: EstimatorSession) -> int:
    """Probe tokens per forward (rows * C * P) for a batch of `rows` rows of `key_len` keys.

    CPU: the largest C whose forward fits DEFAULT_PROBE_MEMORY_BYTES with fp32 attention scores
    materialised (eager / sdpa-math: rows * heads * q * (S + q) for q = C * P tokens per row), the
    mask, MLP activations and the kept logits (times 3 for softmax temporaries), at most
    max(256, S // 8) probe tokens per row: every query is computed against the whole q-token block
    of its row, of which it sees only its own P, so a larger block buys nothing once the matrix
    multiplies are full.

    CUDA: sdpa's memory-efficient kernel takes the additive mask and never materialises the
    scores; it allocates its output and a log-sum-exp per query. A forward then holds the mask
    (rows * q * (S + q) in the model's dtype), the MLP activations (3 * rows * q * intermediate),
    the hidden states, the probe slots of the KV cache (2 * layers * rows * kv_heads * q *
    head_dim) and the kept logits in fp32 with softmax temporaries (3 * 4 * rows * C * V, this
    rank's slice of V under TP). C is the largest whose forward fits PROBE_MEMORY_SHARE of the
    free memory, q at most max(S, GPU_MIN_FORWARD_TOKENS / rows) (beyond S the wasted part of the
    attention dominates), so each forward carries thousands of tokens whenever memory allows.
    """
    cfg = text_config(session.model)
    heads = getattr(cfg, "num_attention_heads", 16)
    hidden = getattr(cfg, "hidden_size", 1024)
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    lay = session.layout
    vocab = lay.vocab_end - lay.vocab_start if lay.vocab_parallel else getattr(cfg, "vocab_size", 32000)
    device = session.device
    if device.type != "cuda":

        def cost(c: int) -> int:
            q = c * postfix_len
            return 4 * rows * (q * (key_len + q) * (heads + 1) + 3 * q * inter + 3 * c * vocab)

        budget, cap = DEFAULT_PROBE_MEMORY_BYTES, max(256, key_len // 8)
    else:
        itemsize = torch.finfo(param_dtype(session.model)).bits // 8
        tp = max(1, lay.tp_size)
        kv_heads = max(1, getattr(cfg, "num_key_value_heads", heads) // tp)
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        layers = getattr(cfg, "num_hidden_layers", 1)

        def cost(c: int) -> int:
            q = c * postfix_len
            per_row = (q * (key_len + q) * itemsize + 3 * q * (inter // tp) * itemsize + 4 * q * hidden * itemsize
                       + 2 * layers * kv_heads * q * head_dim * itemsize + (heads // tp) * q * (head_dim * itemsize + 4)
                       + 12 * c * vocab)
            return rows * per_row

        free = available_bytes(device)
        budget = int(PROBE_MEMORY_SHARE * free) if free else DEFAULT_PROBE_MEMORY_BYTES
        cap = max(key_len, math.ceil(GPU_MIN_FORWARD_TOKENS / rows))
    c = 1
    while cost(2 * c) <= budget and c < key_len and 2 * c * postfix_len <= cap:
        c *= 2
    return c * rows * postfix_len


def chunked_entropies(
    session: EstimatorSession, key_valid: torch.Tensor, probes: Probes, postfix: torch.Tensor, cache: ProbeCache,
    budget: int, temperature: float,
) -> torch.Tensor:
    """Entropy at every probe, (N,) on the model's device. Rows are visited in blocks and probes
    in chunks of C per row.

    Chunks run from the last probes of each row to the first. A chunk attends to the cache
    columns [0, base) only, base being the end of the visible range of every probe not done yet,
    and its probe keys are written at [base, base + C * P): over cache columns that no remaining
    probe sees. So early positions skip the masked tail of the cache (about half of the attention
    work for a padded batch) at no copy; the cache is consumed.

    The schedule depends only on the probe list, so every rank holding the same batch runs the
    same sequence of forwards (tensor parallelism needs that for its collectives).
    """
    device = key_valid.device
    dtype = param_dtype(session.model)
    p_len = len(postfix)
    rows, key_len = key_valid.shape
    postfix = postfix.to(device)
    values = torch.zeros(len(probes.row), dtype=torch.float32, device=device)
    # Rank of each probe in its row by the end of its visible range (= by position in the padded
    # layout), so that the probes still to do after a chunk all see a prefix of [0, base).
    # hi <= key_len keeps the rows apart in the sort key.
    order = torch.argsort(probes.row * (key_len + 1) + probes.hi, stable=True)
    counts = torch.bincount(probes.row, minlength=rows)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order)) - starts[probes.row[order]]

    rows_per_block = rows if budget >= rows * p_len else max(1, budget // p_len)
    per_row = max(1, budget // (rows_per_block * p_len))
    cols = torch.arange(key_len, device=device)
    self_block = torch.ones(p_len, p_len, dtype=torch.bool, device=device).tril()
    blocks = []  # (first row, end row, probes of its busiest row)
    for r0 in range(0, rows, rows_per_block):
        in_block = (probes.row >= r0) & (probes.row < min(rows, r0 + rows_per_block))
        blocks.append((r0, min(rows, r0 + rows_per_block), int(rank[in_block].max()) + 1 if in_block.any() else 0))
    forwards = sum(math.ceil(max_rank / per_row) for *_, max_rank in blocks)
    # ZeRO-3 with its hooks active (the gathered copy did not fit): every forward gathers
    # parameters over all ranks, so every rank runs as many as the busiest one. The count is
    # agreed on before the first probe forward: agreeing after, while a busier rank is still in a
    # forward's gather, would deadlock.
    total = session.forwards_to_match(forwards)
    for r0, r1, max_rank in blocks:
        cache.select_rows(slice(r0, r1))
        in_block = (probes.row >= r0) & (probes.row < r1)
        for c0 in reversed(range(0, max_rank, per_row)):
            todo = in_block & (rank < c0 + per_row)
            sel = (todo & (rank >= c0)).nonzero().flatten()
            base = int(probes.hi[todo].max())
            cache.set_base(base)
            c = min(per_row, max_rank - c0)
            nr = r1 - r0
            # Empty slots probe nothing and see only their own block (no fully masked query row).
            lo = torch.zeros(nr, c, dtype=torch.long)
            hi = torch.zeros(nr, c, dtype=torch.long)
            pos = torch.zeros(nr, c, dtype=torch.long)
            slot_r, slot_c = probes.row[sel] - r0, rank[sel] - c0
            lo[slot_r, slot_c], hi[slot_r, slot_c], pos[slot_r, slot_c] = probes.lo[sel], probes.hi[sel], probes.pos[sel]
            lo, hi, pos = lo.to(device), hi.to(device), pos.to(device)
            # (nr, c, base): which cached keys each probe block sees.
            see_cache = key_valid[r0:r1, None, :base] & (cols[:base] >= lo[..., None]) & (cols[:base] < hi[..., None])
            see_cache = see_cache.repeat_interleave(p_len, dim=1)
            see_self = torch.block_diag(*([self_block] * c)).expand(nr, -1, -1)
            mask = additive_mask(torch.cat([see_cache, see_self], dim=-1).unsqueeze(1), dtype)
            position_ids = (pos[..., None] + torch.arange(p_len, device=device)).reshape(nr, c * p_len)
            last_tokens = torch.arange(c, device=device) * p_len + p_len - 1
            logits = session.forward(input_ids=postfix.repeat(nr, c), attention_mask=mask, position_ids=position_ids,
                                     cache=cache, keep=last_tokens).reshape(nr * c, -1)
            # On CPU, entropy over cache-sized blocks of rows: whole-chunk fp32 temporaries of
            # 100+ MB would be page-faulted in afresh by every chunk.
            # Vocab-parallel shards may differ in width across ranks, and each block is a collective:
            # there one block for all rows keeps the number of all-reduces equal on every rank.
            cpu_blocks = device.type == "cpu" and not session.layout.vocab_parallel
            step = max(1, (8 << 20) // (4 * logits.shape[-1])) if cpu_blocks else len(logits)
            h = torch.cat([session.entropy(logits[i : i + step], temperature) for i in range(0, len(logits), step)])
            values[sel.to(device)] = h.reshape(nr, c)[slot_r.to(device), slot_c.to(device)].float()
    # Then empty probes up to the agreed count (one token block seeing only itself; the cache is
    # consumed by now, so writing at slot 0 harms nothing).
    cache.select_rows(slice(0, 1))
    cache.set_base(0)
    for _ in range(total - forwards):
        mask = additive_mask(torch.ones(1, 1, p_len, p_len, dtype=torch.bool, device=device).tril(), dtype)
        logits = session.forward(input_ids=postfix.unsqueeze(0), attention_mask=mask,
                                 position_ids=torch.arange(p_len, device=device).unsqueeze(0), cache=cache, keep=1)
        session.entropy(logits[:, -1], temperature)
    cache.select_rows(slice(None))
    return values


