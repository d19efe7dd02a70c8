"""Early-exit answer entropy and per-token conditional MI (DESIGN section 3).

`answer_entropy` returns h[i, j] = H(y | prompt_i, response_i[:j]) for j = 0 .. n_i, read off the
model's next-token distribution after a fixed postfix (e.g. "</think><answer>") appended to each
prefix. `token_mi` turns it into s[i, t] = h[i, t] - h[i, t + 1].

Three ways to compute h, all exact against each other:
  naive    one forward of prompt + response[:j] + postfix per (i, j): O(L) forwards of length O(L).
  kv_copy  the authors' approach: one cached forward, then per probed position a copy of the cache
           prefix padded into a batch for the postfix forward. O(L^2) bytes copied.
  chunked  ours: one cached forward into a preallocated cache, then blocks of C probes per row go
           through the model as C * P new tokens on top of that cache, with a 4D mask so that the
           probe of position j sees keys [.., j) and its own block causally, RoPE positions from
           `position_ids`, and the LM head on the last token of each block only. The probe keys are
           written into spare slots after the cache and overwritten by the next chunk: nothing is
           copied per position, and the cache itself is never concatenated.

Layouts: `answer_entropy` takes OpenRLHF's batches as they are: (B, S) sequences padded on either
side and an action mask whose column t is token S - A + t (0.11: A = S - 1, `mask[1:]`), with any
number of action spans per row (multi-turn rollouts). `packed=True` runs the same batch as one
packed row (OpenRLHF's `packing_samples`). Both reduce to a list of probes (row, visible key range,
first position id) that one scheduler executes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

import torch.distributed as dist

from .entropy import entropy_from_logits, log_probs_from_logits
from .vocab_parallel import vocab_parallel_entropy, vocab_parallel_log_probs

METHODS = ("chunked", "naive", "kv_copy")
PREDICT_MODES = ("postfix", "next_token")
SMOOTHINGS = ("none", "official")

# Memory the default chunk size may spend on one probe forward (attention scores, mask, logits).
DEFAULT_PROBE_MEMORY_BYTES = 1 << 30


# ---------------------------------------------------------------------------------------------
# Cache with spare slots: the probe keys of one chunk live after the preloaded keys and are
# overwritten by the next chunk, so no chunk ever copies or concatenates the cache.
# ---------------------------------------------------------------------------------------------


class _ProbeLayer(DynamicLayer):
    """One layer's K/V in a buffer of `capacity` slots.

    Before `freeze()` it fills like a DynamicLayer (the preload forward). After it, `update`
    writes the new keys at [base, base + n) of the rows in `rows` and returns views [:base + n]
    without moving `base`, which is what makes the next chunk overwrite this one.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.base = 0
        self.frozen = False
        self.rows = slice(None)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.key_buf = key_states.new_empty(b, h, self.capacity, d)
        self.value_buf = value_states.new_empty(b, value_states.shape[1], self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self.base + n
        if end > self.capacity:
            raise RuntimeError(f"probe cache overflow: {end} slots needed, {self.capacity} allocated")
        self.key_buf[self.rows, :, self.base : end] = key_states
        self.value_buf[self.rows, :, self.base : end] = value_states
        keys, values = self.key_buf[self.rows, :, :end], self.value_buf[self.rows, :, :end]
        if not self.frozen:
            self.base = end
        self.keys, self.values = keys, values
        return keys, values

    def get_seq_length(self) -> int:
        return self.base


class _ProbeCache(Cache):
    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[_ProbeLayer(capacity) for _ in range(num_layers)])

    def freeze(self) -> None:
        for layer in self.layers:
            layer.frozen = True

    def select_rows(self, rows: slice) -> None:
        for layer in self.layers:
            layer.rows = rows


# ---------------------------------------------------------------------------------------------
# Probes: one per (sample, probed column). Every layout is reduced to these tensors.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Probes:
    """N probes. Probe k sees cache columns c with key_valid[row, c] and lo <= c < hi, and its
    postfix tokens get position ids pos .. pos + P - 1. (sample, j) says where its entropy goes.
    All on the CPU: they only index; what reaches the model is moved to its device per chunk."""

    row: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    pos: torch.Tensor
    sample: torch.Tensor
    j: torch.Tensor


def _action_spans(mask_row: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of ones in a (A,) 0/1 row: one per action span (turn)."""
    m = mask_row.bool().tolist()
    spans, start = [], None
    for t, on in enumerate(m + [False]):
        if on and start is None:
            start = t
        elif not on and start is not None:
            spans.append((start, t))
            start = None
    return spans


def _span_probes(start: int, end: int, stride: int) -> list[int]:
    """Columns probed for the span [start, end): start, start + stride, ... and always end (the
    entropy after its last token)."""
    positions = list(range(start, end + 1, stride))
    if positions[-1] != end:
        positions.append(end)
    return positions


def _interpolate(values: torch.Tensor, positions: list[int], out: torch.Tensor) -> None:
    """Fill out[positions[0] .. positions[-1]] from `values` at `positions` (sorted columns of one
    span), linearly in between, so the entropy drop of a stride is spread over its tokens;
    probed columns keep their value bit for bit."""
    pos = torch.tensor(positions, dtype=torch.float32)
    grid = torch.arange(positions[0], positions[-1] + 1, dtype=torch.float32)
    right = torch.searchsorted(pos, grid).clamp(max=len(positions) - 1)
    left = (right - 1).clamp(min=0)
    w = (grid - pos[left]) / (pos[right] - pos[left]).clamp(min=1)
    values = values.to(out.dtype)
    interp = values[left] + w * (values[right] - values[left])
    out[positions[0] : positions[-1] + 1] = torch.where(pos[right] == grid, values[right], interp)


# ---------------------------------------------------------------------------------------------
# Model plumbing
# ---------------------------------------------------------------------------------------------


def _hf_model(model) -> torch.nn.Module:
    """The transformers module behind `model`: itself, or what a DeepSpeed engine (`.module`) or an
    OpenRLHF Actor (`.model`) wraps. DeepSpeed engines expose their own dict as `.config`."""
    inner = model
    for _ in range(4):
        if isinstance(getattr(inner, "config", None), PretrainedConfig):
            return inner
        inner = getattr(inner, "module", None) or getattr(inner, "model", None)
        if inner is None:
            break
    raise ValueError(
        f"model: got {type(model).__name__}, expected a transformers causal LM or a DeepSpeed engine wrapping one"
    )


def _text_config(model):
    cfg = _hf_model(model).config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


@contextlib.contextmanager
def _inference(model) -> Iterator[None]:
    """no_grad + eval mode, restoring train mode after (the actor is mid-training when called).

    The mode is read off the transformers module: a DeepSpeed engine's own `training` flag stays
    True whatever `eval()` did to the module it wraps."""
    was_training = _hf_model(model).training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _uses_flash_attention(model) -> bool:
    impl = getattr(_hf_model(model).config, "_attn_implementation", None)
    return isinstance(impl, str) and impl.startswith(("flash", "flex"))


@contextlib.contextmanager
def _sdpa_attention(model) -> Iterator[None]:
    """Flash-attention kernels take no 4D mask: the probe forwards run through sdpa on the same
    weights and the same cache layout, the preload keeps the model's own kernel."""
    cfg = _hf_model(model).config
    impl = cfg._attn_implementation
    swap = _uses_flash_attention(model)
    if swap:
        cfg._attn_implementation = "sdpa"
    try:
        yield
    finally:
        if swap:
            cfg._attn_implementation = impl


def _param_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _check_no_sliding_window(model) -> None:
    cfg = _text_config(model)
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(
            f"model: has attention layer types {sorted(set(layer_types))}; the chunked estimator supports "
            "full attention only, use method='naive' for sliding-window models"
        )


def _default_chunk_tokens(rows: int, key_len: int, postfix_len: int, model) -> int:
    """Largest C * rows * P whose probe forward fits DEFAULT_PROBE_MEMORY_BYTES, with at most
    max(256, key_len // 8) probe tokens (C * P) per row.

    Per forward with q = C * P new tokens per row: fp32 attention scores rows * heads * q * (S + q)
    (eager/sdpa-math materialise them), the additive mask rows * q * (S + q), the MLP activations
    rows * q * intermediate and the kept logits rows * C * V (times 3 for the softmax temporaries).
    The cap: every query of a chunk is computed against the whole q-token block of its row, of
    which only its own P tokens are visible, so the wasted part grows as q / (S / 2 + q) and a
    larger block saves nothing once rows * 256 tokens fill the matrix multiplies.
    """
    cfg = _text_config(model)
    heads = getattr(cfg, "num_attention_heads", 16)
    inter = getattr(cfg, "intermediate_size", 4 * getattr(cfg, "hidden_size", 1024))
    vocab = getattr(cfg, "vocab_size", 32000)
    max_row_tokens = max(256, key_len // 8)

    def cost(c: int) -> int:
        q = c * postfix_len
        return 4 * rows * (q * (key_len + q) * (heads + 1) + 3 * q * inter + 3 * c * vocab)

    c = 1
    while cost(2 * c) <= DEFAULT_PROBE_MEMORY_BYTES and c < key_len and 2 * c * postfix_len <= max_row_tokens:
        c *= 2
    return c * rows * postfix_len


# ---------------------------------------------------------------------------------------------
# Distributed layout: read off the engine, so the caller passes nothing but the model.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParallelLayout:
    """How the model's weights are spread over ranks, as far as the estimator cares.

    tp_group: ranks that split every layer (AutoTP); they must run identical forwards.
    vocab_parallel: the LM head returns logits for [vocab_start, vocab_end) only.
    zero_stage: 3 means every forward gathers parameters over all ranks, so every rank must run
        the same number of forwards even when its batch is shorter.
    """

    tp_group: object | None = None
    tp_size: int = 1
    vocab_parallel: bool = False
    vocab_start: int = 0
    vocab_end: int = 0
    zero_stage: int = 0

    @property
    def count_sync(self) -> bool:
        return self.zero_stage == 3 and dist.is_initialized() and dist.get_world_size() > 1


def parallel_layout(model) -> ParallelLayout:
    """Detect AutoTP (any layer with a `mp_group` of size > 1), a vocab-parallel LM head
    (DeepSpeed's `VocabParallelLinear`) and the ZeRO stage, from the engine or module itself."""
    hf = _hf_model(model)
    tp_group, tp_size = None, 1
    for module in hf.modules():
        size = getattr(module, "tp_world_size", 1)
        if getattr(module, "mp_group", None) is not None and size > 1:
            tp_group, tp_size = module.mp_group, size
            break
    head = hf.get_output_embeddings()
    vocab_parallel = bool(getattr(head, "is_vocab_parallel_lm_head", False))
    if hasattr(model, "zero_optimization_stage"):
        zero = int(model.zero_optimization_stage())
    else:
        zero = 3 if any(hasattr(p, "ds_id") for p in hf.parameters()) else 0
    if vocab_parallel and tp_group is None:
        raise ValueError("model: the LM head is vocab-parallel but no tensor-parallel group was found on its layers")
    return ParallelLayout(
        tp_group=tp_group, tp_size=tp_size, vocab_parallel=vocab_parallel,
        vocab_start=int(getattr(head, "vocab_start_index", 0)), vocab_end=int(getattr(head, "vocab_end_index", 0)),
        zero_stage=zero,
    )


def _entropy(logits: torch.Tensor, layout: ParallelLayout, temperature: float) -> torch.Tensor:
    if layout.vocab_parallel:
        return vocab_parallel_entropy(logits, layout.tp_group, temperature)
    return entropy_from_logits(logits, temperature)


def _log_probs(logits: torch.Tensor, labels: torch.Tensor, layout: ParallelLayout, temperature: float) -> torch.Tensor:
    if layout.vocab_parallel:
        return vocab_parallel_log_probs(logits, labels, layout.vocab_start, layout.vocab_end, layout.tp_group, temperature)
    return log_probs_from_logits(logits, labels, temperature)


def _check_same_batch(layout: ParallelLayout, input_ids: torch.Tensor, key_valid: torch.Tensor, n_probes: int) -> None:
    """TP ranks run one model between them: a different batch on one rank would hang or corrupt
    every layer's collectives. Compare a fingerprint first and fail on every rank alike."""
    if layout.tp_group is None:
        return
    ids = input_ids.long() * key_valid.long()
    weights = torch.arange(1, ids.shape[1] + 1, device=ids.device)
    # On the model's device: NCCL takes no CPU tensors (gloo does, which is why CPU tests pass either way).
    mine = torch.stack([
        torch.tensor(ids.shape[0], device=ids.device), torch.tensor(ids.shape[1], device=ids.device),
        torch.tensor(n_probes, device=ids.device), (ids * weights).sum(), key_valid.long().sum(),
    ])
    gathered = [torch.zeros_like(mine) for _ in range(layout.tp_size)]
    dist.all_gather(gathered, mine, group=layout.tp_group)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        shapes = ", ".join(f"rank {r}: {tuple(g[:2].tolist())} tokens, {int(g[2])} probes" for r, g in enumerate(gathered))
        raise ValueError(
            f"sequences: tensor-parallel ranks hold different batches ({shapes}); every rank of a TP group "
            "must get the same samples (as OpenRLHF's actor does)"
        )


def _forwards_to_match(layout: ParallelLayout, mine: int, device: torch.device) -> int:
    """Under ZeRO-3 every forward is a collective parameter gather: ranks with fewer probe chunks
    run empty ones until all have run the largest count."""
    if not layout.count_sync:
        return mine
    count = torch.tensor([mine], dtype=torch.long, device=device)  # the model's device (NCCL)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_common(
    method, predict_mode, postfix_ids, probe_stride, temperature, chunk_tokens, return_log_probs
) -> torch.Tensor | None:
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}, expected one of {METHODS}")
    if return_log_probs and method != "chunked":
        raise ValueError(f"return_log_probs: needs method='chunked', got method={method!r}")
    if predict_mode not in PREDICT_MODES:
        raise ValueError(f"predict_mode: got {predict_mode!r}, expected one of {PREDICT_MODES}")
    if not isinstance(probe_stride, int) or probe_stride < 1:
        raise ValueError(f"probe_stride: got {probe_stride!r}, expected an integer >= 1")
    if not temperature > 0:
        raise ValueError(f"temperature: got {temperature}, expected a number > 0")
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens: got {chunk_tokens!r}, expected a positive integer or None (automatic)")
    if predict_mode == "next_token":
        return None
    postfix = torch.as_tensor(postfix_ids if postfix_ids is not None else [], dtype=torch.long).flatten()
    if postfix.numel() == 0:
        raise ValueError(
            "postfix_ids: got an empty postfix, expected at least one token id "
            "(tokenize e.g. '</think><answer>', or use predict_mode='next_token')"
        )
    return postfix


@dataclass
class _Layout:
    """The keys the model sees and where each output row's columns are among them.

    input_ids, key_valid, position_ids: (R, K), R = B rows (padded) or one packed row.
    flat: (B, A + 1) row of the flattened preload logits whose distribution predicts column j's
        token (the next-token distribution after the prefix of column j), -1 where none is kept.
    labels: (B, A) token id of each action column (0 elsewhere).
    logits_to_keep: what the preload passes to the model (int: last columns; tensor: packed indices).
    """

    input_ids: torch.Tensor
    key_valid: torch.Tensor
    position_ids: torch.Tensor
    packed: bool
    flat: torch.Tensor
    labels: torch.Tensor
    logits_to_keep: int | torch.Tensor


def answer_entropy(
    model,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    action_mask: torch.Tensor,
    postfix_ids: Sequence[int] | torch.Tensor | None,
    *,
    method: str = "chunked",
    chunk_tokens: int | None = None,
    temperature: float = 1.0,
    probe_stride: int = 1,
    predict_mode: str = "postfix",
    return_log_probs: bool = False,
    packed: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Early-exit answer entropies, (B, A + 1) fp32 on the CPU.

    sequences, attention_mask: (B, S), padded on either side (OpenRLHF 0.11 right-pads each
        rollout; left-padded prompts with right-padded responses work alike).
    action_mask: (B, A), 1 <= A <= S - 1; column t is token S - A + t, OpenRLHF's convention
        (`log_probs[:, -A:]`), so A = S - 1 is OpenRLHF 0.11's `mask[1:]` and a prefix of ones
        over the last A columns is a left-padded prompt + response. Any pattern of ones works:
        each run is one action span (a turn of a multi-turn rollout; the observation tokens
        between turns are context and get no probe). A row without actions gets zeros.
    Column j is the entropy after every attended token before column j's token (keys
    [0, S - A + j)) wherever column j is an action or directly follows one, 0 elsewhere, so
    `token_mi` gives action token t the drop h[t] - h[t + 1].
    chunk_tokens: probe tokens per forward (rows * C * P); None picks it from a memory budget.
    probe_stride: probe every k-th column of a span (and its end), interpolate the rest linearly.
    predict_mode: "postfix" (the probe) or "next_token" (the policy's own next-token entropy,
        free from the preload forward; probe_stride and the postfix are unused).
    return_log_probs: also return (B, A) fp32 log-probs of the action tokens from the preload
        forward (0 elsewhere, temperature-scaled like OpenRLHF's actor), so the actor pays one
        forward for pi_old and the MI. Needs method "chunked".
    packed: run the batch as one row of its attended tokens, samples back to back (OpenRLHF's
        `packing_samples`: no work on padding). Same inputs, same results; each row's attended
        tokens must be contiguous.
    """
    postfix = _check_common(method, predict_mode, postfix_ids, probe_stride, temperature, chunk_tokens, return_log_probs)
    if sequences.dim() != 2 or attention_mask.shape != sequences.shape:
        raise ValueError(
            f"attention_mask: got shape {tuple(attention_mask.shape)} for sequences {tuple(sequences.shape)}, "
            "expected both (B, S)"
        )
    b, s = sequences.shape
    if action_mask.dim() != 2 or action_mask.shape[0] != b or not 1 <= action_mask.shape[1] < s:
        raise ValueError(
            f"action_mask: got shape {tuple(action_mask.shape)} for sequences {tuple(sequences.shape)}, "
            f"expected (B={b}, A) with 1 <= A <= S - 1 (column t is token S - A + t)"
        )
    a = action_mask.shape[1]
    first = s - a  # key column of action column 0
    att = attention_mask.bool().cpu()
    act = action_mask.bool().cpu()
    bad = (act & ~att[:, first:]).any(-1)
    if bad.any():
        raise ValueError(
            f"action_mask: rows {bad.nonzero().flatten().tolist()[:8]} mark tokens that attention_mask masks out, "
            "expected actions on attended tokens only"
        )
    counts = att.long().cumsum(-1)  # (B, S): attended tokens up to and including each column
    spans = [_action_spans(act[i]) for i in range(b)]
    for i, row_spans in enumerate(spans):
        if row_spans and counts[i, first + row_spans[0][0] - 1] == 0:
            raise ValueError(
                f"attention_mask: row {i} has no attended token before its first action (column "
                f"{row_spans[0][0]}), expected at least one prompt token"
            )
    stride = probe_stride if predict_mode == "postfix" else 1
    plan = [(k, _span_probes(start, end, stride)) for k in range(b) for start, end in spans[k]]
    k_of = torch.tensor([k for k, ps in plan for _ in ps], dtype=torch.long)
    j_of = torch.tensor([j for _, ps in plan for j in ps], dtype=torch.long)

    device = sequences.device
    if packed:
        lengths = att.sum(-1)
        first_valid = torch.where(lengths > 0, att.long().argmax(-1), 0)
        last_valid = first_valid + lengths - 1
        holes = (lengths > 0) & (counts.gather(1, last_valid.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                                 - counts.gather(1, first_valid.unsqueeze(-1)).squeeze(-1) + 1 != lengths)
        if holes.any():
            raise ValueError(
                f"attention_mask: rows {holes.nonzero().flatten().tolist()[:8]} have masked tokens between attended "
                "ones, expected one contiguous run per row for packed=True (or use packed=False)"
            )
        starts = torch.cumsum(lengths, 0) - lengths
        lo = starts
        base = starts + first - first_valid  # packed column of action column 0 of each sample
        input_ids = sequences[att.to(device)].unsqueeze(0)
        key_valid = torch.ones_like(input_ids, dtype=torch.bool)
        position_ids = torch.cat([torch.arange(int(n)) for n in lengths]).unsqueeze(0).to(device)
        rows = torch.zeros(b, dtype=torch.long)
        hi = base[k_of] + j_of
        pos = hi - lo[k_of]
    else:
        lo = torch.zeros(b, dtype=torch.long)
        base = torch.full((b,), first, dtype=torch.long)
        input_ids, key_valid = sequences, attention_mask.bool()
        position_ids = key_valid.long().cumsum(-1) - 1
        position_ids.masked_fill_(~key_valid, 1)
        rows = torch.arange(b)
        hi = base[k_of] + j_of
        pos = counts[k_of, hi - 1]
    probes = _Probes(row=rows[k_of], lo=lo[k_of], hi=hi, pos=pos, sample=k_of, j=j_of)

    # Preload logits to keep: for each sample the columns from its first action to just after its
    # last one (next-token entropies at every probe, log-probs at every action); -1 elsewhere.
    flat = torch.full((b, a + 1), -1, dtype=torch.long)
    extent = [(k, spans[k][0][0], spans[k][-1][1]) for k in range(b) if spans[k]]
    if packed:
        cols, offset = [], 0
        for k, j0, j1 in extent:
            flat[k, j0 : j1 + 1] = torch.arange(offset, offset + j1 - j0 + 1)
            cols.append(torch.arange(j0, j1 + 1) + base[k] - 1)
            offset += j1 - j0 + 1
        keep = torch.cat(cols).to(device) if cols else torch.zeros(1, dtype=torch.long, device=device)
    else:
        j_min = min((j0 for _, j0, _ in extent), default=a)
        keep = a + 1 - j_min  # the last columns of every row: first - 1 + j_min .. S - 1
        for k, j0, j1 in extent:
            flat[k, j0 : j1 + 1] = k * keep + torch.arange(j0, j1 + 1) - j_min
    label_cols = (base.unsqueeze(-1) + torch.arange(a)).clamp(max=input_ids.shape[1] - 1)
    labels = torch.where(act, input_ids.cpu()[rows.unsqueeze(-1), label_cols], 0)
    lay = _Layout(input_ids=input_ids, key_valid=key_valid, position_ids=position_ids, packed=packed,
                  flat=flat, labels=labels, logits_to_keep=keep)
    return _run(model, lay, probes, plan, act, postfix, method=method, chunk_tokens=chunk_tokens,
                temperature=temperature, predict_mode=predict_mode, return_log_probs=return_log_probs)


# ---------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------


def _run(model, lay: _Layout, probes: _Probes, plan, act, postfix, *, method, chunk_tokens, temperature,
         predict_mode, return_log_probs):
    """Shared back end of both layouts: preload, then the probes; results to the CPU once."""
    n_out, a = act.shape
    layout = parallel_layout(model)
    distributed = layout.tp_group is not None or layout.count_sync
    if distributed and method != "chunked":
        raise ValueError(f"method: got {method!r} on a distributed engine, expected 'chunked' (the references are single-process)")
    device = lay.input_ids.device
    log_probs = None
    with _inference(model):
        _check_same_batch(layout, lay.input_ids, lay.key_valid, len(probes.row) if predict_mode == "postfix" else 0)
        if method == "naive" and predict_mode == "postfix":
            values = _naive(model, lay.input_ids, lay.key_valid, probes, postfix, temperature)
        else:
            if method == "chunked":
                _check_no_sliding_window(model)
            need_logits = predict_mode == "next_token" or return_log_probs
            p_len = 0 if postfix is None else len(postfix)
            rows, key_len = lay.input_ids.shape
            if method == "chunked" and predict_mode == "postfix":
                budget = chunk_tokens or _default_chunk_tokens(rows, key_len, p_len, model)
                cache = _ProbeCache(_text_config(model).num_hidden_layers, key_len + max(budget, p_len * rows))
            else:
                cache = DynamicCache()
            logits = _preload(model, lay, cache, need_logits)
            if need_logits:
                flat = lay.flat.to(device)
                if return_log_probs:
                    sel = act.to(device)
                    log_probs = torch.zeros(n_out, a, dtype=torch.float32, device=device)
                    log_probs[sel] = _log_probs(logits[flat[:, :a][sel]], lay.labels.to(device)[sel], layout,
                                                temperature).float()
                if predict_mode == "next_token":
                    values = _entropy(logits[flat[probes.sample.to(device), probes.j.to(device)]], layout, temperature)
                del logits
            if predict_mode == "postfix":
                with _sdpa_attention(model):
                    if method == "chunked":
                        cache.freeze()
                        values = _chunked(model, lay.key_valid, probes, postfix, cache, budget, temperature, layout)
                    else:
                        values = _kv_copy(model, lay.key_valid, probes, postfix, cache, chunk_tokens, temperature)
    values = values.float().cpu()
    out = torch.zeros(n_out, a + 1, dtype=torch.float32)
    offset = 0
    for k, positions in plan:
        _interpolate(values[offset : offset + len(positions)], positions, out[k])
        offset += len(positions)
    if return_log_probs:
        return out, log_probs.cpu()
    return out


def _preload(model, lay: _Layout, cache, need_logits: bool) -> torch.Tensor | None:
    """One forward over all tokens into `cache`; returns the kept logits flattened to (M, V), or None.

    Packed rows go in with the block-diagonal causal mask spelled out, or with attention_mask=None
    under flash attention, which derives it from the position ids restarting at each sample (varlen).
    """
    attention_mask = lay.key_valid.long()
    if lay.packed:
        attention_mask = None if _uses_flash_attention(model) else _packed_causal_mask(lay.position_ids, lay.key_valid, model)
    out = model(
        input_ids=lay.input_ids,
        attention_mask=attention_mask,
        position_ids=lay.position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=lay.logits_to_keep if need_logits else 1,
    )
    if not need_logits:
        return None
    return out.logits.reshape(-1, out.logits.shape[-1])


def _packed_causal_mask(position_ids: torch.Tensor, key_valid: torch.Tensor, model) -> torch.Tensor:
    """(1, 1, T, T) additive mask: causal within each packed sample, nothing across samples."""
    sample_id = (position_ids == 0).cumsum(-1)  # (1, T), increments where a sample starts
    t = position_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    same = sample_id[:, :, None] == sample_id[:, None, :]
    return _additive_mask((causal & same & key_valid[:, None, :]).unsqueeze(1), _param_dtype(model))


def _additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (.., q, k) -> 0 / dtype-min float mask (eager adds it, sdpa accepts it)."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)


def _chunked(
    model, key_valid, probes: _Probes, postfix, cache: _ProbeCache, budget, temperature, layout: ParallelLayout
) -> torch.Tensor:
    """Entropy at every probe, (N,). Rows are visited in blocks and probes in chunks of C per row.

    Chunks run from the last probes of each row to the first. A chunk attends to the cache
    columns [0, base) only, base being the end of the visible range of every probe not done yet,
    and its probe keys are written at [base, base + C * P): over cache columns that no remaining
    probe sees. So early positions skip the masked tail of the cache (about half of the attention
    work for a padded batch) at no copy; the cache is consumed.

    The schedule depends only on the probe list, so every rank holding the same batch runs the
    same sequence of forwards (tensor parallelism needs that for its collectives).
    """
    device = key_valid.device
    dtype = _param_dtype(model)
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
    forwards = 0
    for r0 in range(0, rows, rows_per_block):
        r1 = min(rows, r0 + rows_per_block)
        cache.select_rows(slice(r0, r1))
        in_block = (probes.row >= r0) & (probes.row < r1)
        max_rank = int(rank[in_block].max()) + 1 if in_block.any() else 0
        for c0 in reversed(range(0, max_rank, per_row)):
            todo = in_block & (rank < c0 + per_row)
            sel = (todo & (rank >= c0)).nonzero().flatten()
            base = int(probes.hi[todo].max())
            for layer in cache.layers:
                layer.base = base
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
            mask = _additive_mask(torch.cat([see_cache, see_self], dim=-1).unsqueeze(1), dtype)
            position_ids = (pos[..., None] + torch.arange(p_len, device=device)).reshape(nr, c * p_len)
            last_tokens = torch.arange(c, device=device) * p_len + p_len - 1
            out = model(
                input_ids=postfix.repeat(nr, c),
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=last_tokens,
            )
            logits = out.logits.reshape(nr * c, -1)
            # On CPU, entropy over cache-sized blocks of rows: whole-chunk fp32 temporaries of
            # 100+ MB would be page-faulted in afresh by every chunk.
            # Vocab-parallel shards may differ in width across ranks, and each block is a collective:
            # there one block for all rows keeps the number of all-reduces equal on every rank.
            cpu_blocks = device.type == "cpu" and not layout.vocab_parallel
            step = max(1, (8 << 20) // (4 * logits.shape[-1])) if cpu_blocks else len(logits)
            h = torch.cat([_entropy(logits[i : i + step], layout, temperature) for i in range(0, len(logits), step)])
            values[sel.to(device)] = h.reshape(nr, c)[slot_r.to(device), slot_c.to(device)].float()
            forwards += 1
    # ZeRO-3: match the busiest rank with empty probes (one token block seeing only itself; the
    # cache is consumed by now, so writing at slot 0 harms nothing).
    cache.select_rows(slice(0, 1))
    for layer in cache.layers:
        layer.base = 0
    for _ in range(_forwards_to_match(layout, forwards, device) - forwards):
        mask = _additive_mask(torch.ones(1, 1, p_len, p_len, dtype=torch.bool, device=device).tril(), dtype)
        out = model(input_ids=postfix.unsqueeze(0), attention_mask=mask,
                    position_ids=torch.arange(p_len, device=device).unsqueeze(0), past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        _entropy(out.logits[:, -1], layout, temperature)
    cache.select_rows(slice(None))
    return values


def _kv_copy(model, key_valid, probes: _Probes, postfix, cache: DynamicCache, chunk_tokens, temperature):
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


def _naive(model, input_ids, key_valid, probes: _Probes, postfix, temperature) -> torch.Tensor:
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


# ---------------------------------------------------------------------------------------------
# Entropy -> per-token MI
# ---------------------------------------------------------------------------------------------


def token_mi(
    h: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    smoothing: str = "none",
    horizon: int = 1,
    decay: float = 1.0,
) -> torch.Tensor:
    """Per-token conditional MI, (B, A) fp32, 0 on non-action columns.

    h: (B, A + 1) from `answer_entropy`; action_mask: (B, A), any pattern of action spans.
    s[t] = h[t] - h[t + 1]: how much token t lowered the uncertainty about the answer.
    smoothing="official": s[t] = (h[t] + h[t - 1]) / 2 - h[t + 1], with h[t - 1] := h[t] at the
        first token of a span (the authors' variant). horizon H, decay d: s'[t] = sum_{k < H} d^k
        s[t + k] over the next H columns (non-action columns, e.g. a tool's observation between
        two turns, add 0).
    """
    if smoothing not in SMOOTHINGS:
        raise ValueError(f"smoothing: got {smoothing!r}, expected one of {SMOOTHINGS}")
    if not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon: got {horizon!r}, expected an integer >= 1")
    if not 0 <= decay <= 1:
        raise ValueError(f"decay: got {decay}, expected a number in [0, 1]")
    if action_mask.dim() != 2 or h.shape != (action_mask.shape[0], action_mask.shape[1] + 1):
        raise ValueError(
            f"h: got shape {tuple(h.shape)} for action_mask {tuple(action_mask.shape)}, expected (B, A + 1)"
        )
    valid = action_mask.bool().to(h.device)
    h = h.float()
    current = h[:, :-1]
    if smoothing == "official":
        after_action = torch.zeros_like(valid)
        after_action[:, 1:] = valid[:, :-1]
        previous = torch.cat([h[:, :1], h[:, :-2]], dim=1)
        current = (current + torch.where(after_action, previous, current)) / 2
    s = torch.where(valid, current - h[:, 1:], torch.zeros_like(current))
    if horizon > 1:
        total = s.clone()
        for k in range(1, horizon):
            shifted = torch.zeros_like(s)
            shifted[:, :-k] = s[:, k:]
            total += (decay**k) * shifted
        s = torch.where(valid, total, torch.zeros_like(total))
    return s
