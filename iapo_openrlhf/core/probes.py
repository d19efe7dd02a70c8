"""Which prefixes the estimator probes, and how probed entropies fill the columns in between.

Every layout (padded or packed, single- or multi-turn) is reduced to a list of `Probes`: one per
(sample, probed column), each with the key range it sees and the position id of its first
postfix token. The schedulers (`chunked.py`, `references.py`) only ever see this list.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Probes:
    """N probes. Probe k sees cache columns c with key_valid[row, c] and lo <= c < hi, and its
    postfix tokens get position ids pos .. pos + P - 1. (sample, j) says where its entropy goes.
    All on the CPU: they only index; what reaches the model is moved to its device per chunk."""

    row: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    pos: torch.Tensor
    sample: torch.Tensor
    j: torch.Tensor


def action_spans(mask_row: torch.Tensor) -> list[tuple[int, int]]:
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


def span_probes(start: int, end: int, stride: int, boundaries: list[int] | None = None) -> list[int]:
    """Columns probed for the span [start, end): start, start + stride, ... and always end (the
    entropy after its last token).

    boundaries (stride 1 only): the columns t of the span whose token ends a segment (a newline, a
    sentence's full stop); then only start, t + 1 for each of them, and end are probed: one probe
    per segment boundary, and `interpolate` spreads each segment's entropy drop evenly over its
    tokens, as a stride does over its columns.
    """
    if boundaries is not None:
        if stride != 1:
            raise ValueError(f"boundaries: given with stride {stride}, expected stride 1 (one or the other)")
        inner = sorted({t + 1 for t in boundaries if start <= t < end - 1})
        return [start, *inner, end] if end > start else [start]
    positions = list(range(start, end + 1, stride))
    if positions[-1] != end:
        positions.append(end)
    return positions


def boundary_token_ids(tokenizer, pattern: str) -> list[int]:
    """Ids of the vocabulary's tokens whose decoded text matches the regular expression `pattern`
    (`re.search`), e.g. "\\n" for every token that contains a newline: the tokens after which
    `answer_entropy(..., probe_after_ids=...)` probes."""
    import re

    regex = re.compile(pattern)
    return [i for i, text in enumerate(token_texts(tokenizer)) if regex.search(text)]


def token_texts(tokenizer) -> list[str]:
    """The decoded text of every token id of the vocabulary, once per run: matching a pattern
    against token texts then costs list look-ups, not a decode per token of every rollout."""
    return tokenizer.batch_decode([[i] for i in range(len(tokenizer))])


def interpolate(values: torch.Tensor, positions: list[int], out: torch.Tensor) -> None:
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
