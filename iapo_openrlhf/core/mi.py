"""Early-exit answer entropy and per-token conditional MI (DESIGN section 3).

`answer_entropy` returns h[i, j] = H(y | prompt_i, response_i[:j]) for j = 0 .. n_i, read off the
model's next-token distribution after a fixed postfix (e.g. "</think><answer>") appended to each
prefix. `token_mi` turns it into s[i, t] = h[i, t] - h[i, t + 1].

Three ways to compute h, all exact against each other:
  chunked  ours (`chunked.py`): one cached forward fills a preallocated cache (`probe_cache.py`),
           then blocks of C probes per row go through the model as C * P new tokens on top of it,
           with a 4D mask so that the probe of column j sees keys [.., j) and its own block
           causally, RoPE positions from `position_ids`, and the LM head on the last token of each
           block only. Nothing is copied per probe. On DeepSpeed engines it runs through
           `parallel.EstimatorSession` (ZeRO-3 gathered once per call, AutoTP, sliced LM head).
  naive    one forward of prompt + response[:j] + postfix per (i, j) (`references.py`).
  kv_copy  the authors' approach: per probe a copy of the cache prefix (`references.py`).

Layouts: `answer_entropy` takes OpenRLHF's batches as they are: (B, S) sequences padded on either
side and an action mask whose column t is token S - A + t (0.11: A = S - 1, `mask[1:]`), with any
number of action spans per row (multi-turn rollouts). `packed=True` runs the same batch as one
packed row (OpenRLHF's `packing_samples`). Both reduce to a list of probes (row, visible key range,
first position id) that one scheduler executes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from .chunked import chunked_entropies, default_chunk_tokens
from .modeling import additive_mask, check_no_sliding_window, param_dtype, sdpa_attention, text_config, uses_flash_attention
from .parallel import EstimatorSession
from .peer_failure import fail_together
from .probe_cache import ProbeCache
from .probes import Probes, action_spans, boundary_token_ids, interpolate, span_probes  # noqa: F401
from .references import kv_copy_entropies, naive_entropies

METHODS = ("chunked", "naive", "kv_copy")
PREDICT_MODES = ("postfix", "next_token")
SMOOTHINGS = ("none", "official")


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


@fail_together()
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
    probe_after_ids: Sequence[int] | torch.Tensor | None = None,
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
    probe_after_ids: token ids that end a segment (`probes.boundary_token_ids(tokenizer, "\\n")`):
        probe only at each span's start, right after each of these tokens, and at the span's end,
        and interpolate linearly in between, so each segment's entropy drop is spread evenly over
        its tokens (as probe_stride spreads a stride's). One probe per segment instead of one per
        token. None (default): every column. Needs probe_stride 1; unused with next_token.
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
    spans = [action_spans(act[i]) for i in range(b)]
    for i, row_spans in enumerate(spans):
        if row_spans and counts[i, first + row_spans[0][0] - 1] == 0:
            raise ValueError(
                f"attention_mask: row {i} has no attended token before its first action (column "
                f"{row_spans[0][0]}), expected at least one prompt token"
            )
    stride = probe_stride if predict_mode == "postfix" else 1
    ends_segment = None
    if probe_after_ids is not None and predict_mode == "postfix":
        if probe_stride != 1:
            raise ValueError(f"probe_after_ids: given with probe_stride={probe_stride}, expected probe_stride=1 "
                             "(probe at segment boundaries or every k-th column, not both)")
        ids = torch.as_tensor(probe_after_ids, dtype=torch.long).flatten()
        ends_segment = (torch.isin(sequences[:, first:].cpu(), ids) & act).tolist()  # (B, A): token t ends a segment
    plan = [(k, span_probes(start, end, stride, None if ends_segment is None else
                            [t for t in range(start, end) if ends_segment[k][t]]))
            for k in range(b) for start, end in spans[k]]
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
    probes = Probes(row=rows[k_of], lo=lo[k_of], hi=hi, pos=pos, sample=k_of, j=j_of)

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


def _run(model, lay: _Layout, probes: Probes, plan, act, postfix, *, method, chunk_tokens, temperature,
         predict_mode, return_log_probs):
    """Shared back end of both layouts: preload, then the probes; results to the CPU once."""
    n_out, a = act.shape
    device = lay.input_ids.device
    log_probs = None
    with EstimatorSession(model) as session:
        if (session.layout.tp_group is not None or session.count_sync or session.gathered) and method != "chunked":
            raise ValueError(f"method: got {method!r} on a distributed engine, expected 'chunked' (the references are single-process)")
        session.check_same_batch(lay.input_ids, lay.key_valid, len(probes.row) if predict_mode == "postfix" else 0)
        if method == "naive" and predict_mode == "postfix":
            values = naive_entropies(model, lay.input_ids, lay.key_valid, probes, postfix, temperature)
        else:
            if method == "chunked":
                check_no_sliding_window(model)
            need_logits = predict_mode == "next_token" or return_log_probs
            p_len = 0 if postfix is None else len(postfix)
            rows, key_len = lay.input_ids.shape
            if method == "chunked" and predict_mode == "postfix":
                budget = chunk_tokens or session.agree_min(default_chunk_tokens(rows, key_len, p_len, session))
                cache = ProbeCache(text_config(model).num_hidden_layers, key_len + max(budget, p_len * rows))
            else:
                cache = DynamicCache()
            logits = _preload(session, lay, cache, need_logits)
            if need_logits:
                flat = lay.flat.to(device)
                if return_log_probs:
                    sel = act.to(device)
                    log_probs = torch.zeros(n_out, a, dtype=torch.float32, device=device)
                    log_probs[sel] = session.log_probs(logits[flat[:, :a][sel]], lay.labels.to(device)[sel],
                                                       temperature).float()
                if predict_mode == "next_token":
                    values = session.entropy(logits[flat[probes.sample.to(device), probes.j.to(device)]], temperature)
                del logits
            if predict_mode == "postfix":
                with sdpa_attention(model):
                    if method == "chunked":
                        cache.freeze()
                        values = chunked_entropies(session, lay.key_valid, probes, postfix, cache, budget, temperature)
                    else:
                        values = kv_copy_entropies(model, lay.key_valid, probes, postfix, cache, chunk_tokens, temperature)
    values = values.float().cpu()
    out = torch.zeros(n_out, a + 1, dtype=torch.float32)
    offset = 0
    for k, positions in plan:
        interpolate(values[offset : offset + len(positions)], positions, out[k])
        offset += len(positions)
    if return_log_probs:
        return out, log_probs.cpu()
    return out


def _preload(session: EstimatorSession, lay: _Layout, cache, need_logits: bool) -> torch.Tensor | None:
    """One forward over all tokens into `cache`; returns the kept logits flattened to (M, V), or None.

    Packed rows go in with the block-diagonal causal mask spelled out, or with attention_mask=None
    under flash attention, which derives it from the position ids restarting at each sample (varlen).
    """
    attention_mask = lay.key_valid.long()
    if lay.packed:
        model = session.model
        attention_mask = None if uses_flash_attention(model) else _packed_causal_mask(lay.position_ids, lay.key_valid, model)
    logits = session.forward(input_ids=lay.input_ids, attention_mask=attention_mask, position_ids=lay.position_ids,
                             cache=cache, keep=lay.logits_to_keep if need_logits else 1)
    if not need_logits:
        return None
    return logits.reshape(-1, logits.shape[-1])


def _packed_causal_mask(position_ids: torch.Tensor, key_valid: torch.Tensor, model) -> torch.Tensor:
    """(1, 1, T, T) additive mask: causal within each packed sample, nothing across samples."""
    sample_id = (position_ids == 0).cumsum(-1)  # (1, T), increments where a sample starts
    t = position_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    same = sample_id[:, :, None] == sample_id[:, None, :]
    return additive_mask((causal & same & key_valid[:, None, :]).unsqueeze(1), param_dtype(model))


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


def marker_columns(sequences: torch.Tensor, action_mask: torch.Tensor, texts: Sequence[str], marker: str) -> torch.Tensor:
    """(B,) long: per row, the action column of the token in which `marker` first begins in the
    row's action text (its action tokens' texts joined), -1 where it does not occur.

    sequences: (B, S) token ids; action_mask: (B, A), column t = token S - A + t (`answer_entropy`'s
    layout); texts: `token_texts(tokenizer)`. A marker split over several tokens ("</", "think",
    ">") begins at the first of them.
    """
    if not marker:
        raise ValueError("marker: got an empty string, expected a text such as '</think>'")
    width = action_mask.shape[1]
    tokens = sequences[:, sequences.shape[1] - width :].cpu()
    found = torch.full((len(tokens),), -1, dtype=torch.long)
    for i, cols in enumerate(action_mask.bool().cpu()):
        cols = cols.nonzero().flatten()
        pieces = [texts[t] for t in tokens[i, cols].tolist()]
        start = "".join(pieces).find(marker)
        if start >= 0:  # the piece whose characters cover index `start`
            ends = np.cumsum([len(p) for p in pieces])
            found[i] = cols[int(np.searchsorted(ends, start, side="right"))]
    return found


def hold_entropy(h: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """h with every column after `columns[i]` set to h[i, columns[i]] (rows with -1 unchanged), so
    that token_mi gives 0 from that token on.

    h: (B, A + 1) from `answer_entropy`; columns: (B,) from `marker_columns`. Why (iapo.mi_hold_after,
    issue 18): once a response has written the postfix's "</think>", the probe appends the postfix to
    a prefix that already ended the reasoning; its entropy there measures a malformed input, not
    what the token told about the answer.
    """
    columns = columns.to(h.device)
    held = h.gather(1, columns.clamp(min=0).unsqueeze(1))
    after = (torch.arange(h.shape[1], device=h.device).unsqueeze(0) > columns.unsqueeze(1)) & (columns >= 0).unsqueeze(1)
    return torch.where(after, held, h)


def before_columns(action_mask: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """(B, A) bool: the action columns strictly before `columns[i]` (the whole row where -1).

    action_mask: (B, A); columns: (B,) from `marker_columns`. With iapo.mi_held_tokens "exclude"
    this is the MI term's mask: the held tokens (the marker's token and after) have no measured MI,
    so they take no part in its per-sequence normalisation, as padding takes none.
    """
    columns = columns.to(action_mask.device)
    cut = torch.where(columns >= 0, columns, action_mask.shape[1]).unsqueeze(1)
    return action_mask.bool() & (torch.arange(action_mask.shape[1], device=action_mask.device).unsqueeze(0) < cut)
