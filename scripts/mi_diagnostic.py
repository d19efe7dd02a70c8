#!/usr/bin/env python
"""Does the early-exit MI estimator tell necessary reasoning tokens from redundant ones? (issue 7.1)

What it measures
----------------
On the warm-started synthetic policy (the one the reproduction study starts RL from), the per-token
conditional MI s_t = h_t - h_{t+1} that IAPO's advantage uses, where h_t is the answer entropy
after the prefix o_<t followed by the postfix "</think><answer>" (`core.mi.answer_entropy`, chunked
estimator, temperature 1.0 like the rollouts), on tokens the task labels

    necessary  steps (" first bought five , 7 + 5 = 12 .") and the closing "</think><answer>N</answer>"
    redundant  restatements of the question, re-checks of the step just done, fillers

and reports, per class, the mean MI and the mean |MI|, and the AUC of the score as a classifier of
necessary tokens (Mann-Whitney, ties counted 1/2; 95% interval from 500 bootstrap resamples of
whole sequences, since tokens of one sequence are not independent). The same for
`predict_mode="next_token"` (the policy's own next-token entropy, no probe) and `probe_stride=4`.

Which tokens carry labels
-------------------------
(a) "generator traces": the policy's MI on traces drawn by the task generator
    (`SyntheticTask.sample_trace`), scored teacher-forced. Their labels are exact (`redundant_mask`),
    so this is the clean measurement; but they are the generator's texts, not the policy's.
(b) "sampled completions": completions sampled from the policy (top_k 0, temperature 1.0), labelled
    by parsing them with the task's segment grammar: cut after " ." / " ?" and before "</think>",
    then a segment is a step (" <order> <verb> <word> , a op b = c ."), a check (" check a op b =
    c ."), a restatement (a sentence of this problem's question), a filler, or the answer
    ("</think><answer>...</answer>"). Anything else (malformed or repeated steps, truncated tails)
    is "other" and left out of the AUC; its share is reported. The parser is checked against the
    generator's exact labels on the traces of (a) (`parser_agreement`, must be 1.0).

Which score, chosen before any AUC was computed
-----------------------------------------------
The primary score is the SIGNED MI s_t, because it is what IAPO's advantage adds
(alpha * norm(s; sequence)): its AUC says whether the shaping ranks necessary tokens above redundant
ones, which is what would make RL drop the redundant ones. |s_t| is reported as the secondary score:
the true conditional MI is >= 0 only in expectation over o_t, and a pointwise estimate of an
informative token can have either sign, so |s_t| measures "this token moved the answer
distribution" whatever the direction. The AUC of the per-sequence normalised MI (the quantity the
advantage actually sees, normalised over all valid tokens of the response including EOS) is
reported too. Also reported: MI by segment kind and on the first token of each segment (the token
at which the policy decides whether to insert a redundant segment: where a length change would be
learnt).

Target (issue 7): AUC >= 0.7 for the postfix probe.

    python scripts/mi_diagnostic.py                       # ~2-4 min on 2 CPU cores (warm start included if missing)
    python scripts/mi_diagnostic.py --model DIR --out runs/mi_diagnostic --num-problems 500
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from iapo_openrlhf.core.advantages import masked_sequence_normalize  # noqa: E402
from iapo_openrlhf.core.mi import answer_entropy, token_mi  # noqa: E402
from iapo_openrlhf.local.rollout import generate, left_pad  # noqa: E402
from iapo_openrlhf.tasks.synthetic import (  # noqa: E402
    _FILLERS,
    ANSWER,
    END_ANSWER,
    END_THINK,
    NECESSARY_KINDS,
    ORDER_WORDS,
    REDUNDANT_KINDS,
    Problem,
    SyntheticTask,
    check_answer,
)

POSTFIX = "</think><answer>"
# The settings of configs/local_tiny.yaml: the warm start the reproduction study starts from.
WARMSTART = {"seed": 0, "steps": 1000, "lr": 1e-2, "redundancy": 0.8}
DEFAULT_MODEL = "runs/repro/initial"
VARIANTS = {  # name -> answer_entropy keyword arguments
    "postfix": {"predict_mode": "postfix", "probe_stride": 1},
    "next_token": {"predict_mode": "next_token", "probe_stride": 1},
    "postfix_stride4": {"predict_mode": "postfix", "probe_stride": 4},
}
KINDS = (*NECESSARY_KINDS, *REDUNDANT_KINDS)


# -- AUC -----------------------------------------------------------------------------------------


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x with ties given the average of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return (starts + (counts + 1) / 2.0)[inverse.reshape(-1)]


def auc(scores, positive) -> float:
    """Area under the ROC curve of `scores` for the `positive` class: the chance that a random
    positive scores above a random negative, ties counting 1/2 (Mann-Whitney U / (n1 n0)).
    NaN when either class is empty."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = np.asarray(positive, dtype=bool).reshape(-1)
    if scores.shape != positive.shape:
        raise ValueError(f"positive: got shape {positive.shape}, expected {scores.shape} like scores")
    if not np.isfinite(scores).all():
        raise ValueError("scores: got non-finite values, expected finite numbers")
    n1 = int(positive.sum())
    n0 = positive.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = average_ranks(scores)
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def bootstrap_auc(scores: list[np.ndarray], positive: list[np.ndarray], *, resamples: int = 500, seed: int = 0) -> list[float]:
    """95% interval of the AUC over resamples of whole sequences (lists of per-sequence arrays)."""
    rng = np.random.default_rng(seed)
    n = len(scores)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        value = auc(np.concatenate([scores[i] for i in idx]), np.concatenate([positive[i] for i in idx]))
        if not np.isnan(value):
            values.append(value)
    if not values:
        return [float("nan"), float("nan")]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


# -- labels of sampled completions -----------------------------------------------------------------

_NUM = r"\d+"
_STEP_RE = re.compile(rf"^ ({'|'.join(ORDER_WORDS)}) \w+ \w+ , {_NUM} [+-] {_NUM} = {_NUM} \.$")
_CHECK_RE = re.compile(rf"^ check {_NUM} [+-] {_NUM} = {_NUM} \.$")
_ANSWER_SEG_RE = re.compile(rf"^{re.escape(END_THINK + ANSWER)}.*{re.escape(END_ANSWER)}$")


def segment_labels(token_texts: list[str], problem: Problem) -> tuple[list[str], list[bool]]:
    """Segment kind of every token of a completion (no EOS), one of KINDS or "other", and whether
    the token opens its segment.

    Segments end after a " ." or " ?" token, and the answer segment starts at "</think>"; each is
    classified by the generator's grammar. A step whose order word already appeared earlier in
    the completion, and anything unparseable, is "other".
    """
    bounds: list[tuple[int, int]] = []
    start = 0
    for i, text in enumerate(token_texts):
        if text == END_THINK and i > start:
            bounds.append((start, i))
            start = i
        if text in (" .", " ?") and not "".join(token_texts[start:i]).startswith(END_THINK):
            bounds.append((start, i + 1))
            start = i + 1
    if start < len(token_texts):
        bounds.append((start, len(token_texts)))
    sentences = {" " + s for s in problem.sentences}
    fillers = {" " + f for f in _FILLERS}
    labels: list[str] = []
    firsts: list[bool] = []
    seen_orders: set[str] = set()
    for lo, hi in bounds:
        text = "".join(token_texts[lo:hi])
        step = _STEP_RE.match(text)
        if step:
            kind = "step" if step.group(1) not in seen_orders else "other"
            seen_orders.add(step.group(1))
        elif _CHECK_RE.match(text):
            kind = "check"
        elif text in sentences:
            kind = "restate"
        elif text in fillers:
            kind = "filler"
        elif _ANSWER_SEG_RE.match(text):
            kind = "answer"
        else:
            kind = "other"
        labels.extend([kind] * (hi - lo))
        firsts.extend([True] + [False] * (hi - lo - 1))
    return labels, firsts


# -- scoring ---------------------------------------------------------------------------------------


def score_rows(model, rows, postfix_ids, *, predict_mode: str, probe_stride: int, batch_size: int,
               probe_after_ids=None) -> list[dict]:
    """MI of every response token of rows [(prompt_ids, response_ids incl. EOS)], in batches of
    the OpenRLHF layout. Returns per row {"h": (n + 1,), "mi": (n,), "mi_norm": (n,)}."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompt_ids, prompt_mask = left_pad([p for p, _ in chunk], pad_id=0)
        width = max(len(r) for _, r in chunk)
        response = torch.zeros(len(chunk), width, dtype=torch.long)
        action = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, (_, r) in enumerate(chunk):
            response[i, : len(r)] = torch.tensor(r)
            action[i, : len(r)] = 1
        sequences = torch.cat([prompt_ids, response], 1)
        attention = torch.cat([prompt_mask, action], 1)
        h = answer_entropy(model, sequences, attention, action, postfix_ids if predict_mode == "postfix" else None,
                           predict_mode=predict_mode, probe_stride=probe_stride, temperature=1.0,
                           probe_after_ids=probe_after_ids)
        mi = token_mi(h, action)
        mi_norm = masked_sequence_normalize(mi, action)
        for i, (_, r) in enumerate(chunk):
            n = len(r)
            out.append({"h": h[i, : n + 1].numpy(), "mi": mi[i, :n].numpy(), "mi_norm": mi_norm[i, :n].numpy()})
    return out


def summarize(scored: list[dict], labels: list[tuple[list[str], list[bool]]], *, resamples: int, seed: int) -> dict:
    """Class statistics and AUCs over the labelled tokens. labels: per row (kind per token, opens a
    segment per token) for the tokens before EOS; "other" and EOS are left out."""
    mi, mi_norm, necessary, per_seq_mi, per_seq_abs, per_seq_norm, per_seq_pos = [], [], [], [], [], [], []
    kind_all, first_all, seg_sum, seg_step = [], [], [], []
    for s, (k, f) in zip(scored, labels):
        k = np.array(k + ["eos"] * (len(s["mi"]) - len(k)))
        first = np.array(f + [False] * (len(s["mi"]) - len(f)), dtype=bool)
        starts = np.flatnonzero(first)
        for a, b in zip(starts, list(starts[1:]) + [len(f)]):  # whole segments: sum of MI = h_start - h_end
            if k[a] in ("step", *REDUNDANT_KINDS):
                seg_sum.append(float(s["mi"][a:b].sum()))
                seg_step.append(k[a] == "step")
        keep = np.isin(k, KINDS)
        pos = np.isin(k[keep], NECESSARY_KINDS)
        mi.append(s["mi"][keep])
        mi_norm.append(s["mi_norm"][keep])
        necessary.append(pos)
        kind_all.append(k[keep])
        first_all.append(first[keep])
        per_seq_mi.append(s["mi"][keep])
        per_seq_abs.append(np.abs(s["mi"][keep]))
        per_seq_norm.append(s["mi_norm"][keep])
        per_seq_pos.append(pos)
    mi_c, norm_c, pos_c = np.concatenate(mi), np.concatenate(mi_norm), np.concatenate(necessary)
    kind_c, first_c = np.concatenate(kind_all), np.concatenate(first_all)
    step_or_red = kind_c != "answer"

    def cls(mask):
        return {"tokens": int(mask.sum()), "mean_mi": float(mi_c[mask].mean()) if mask.any() else None,
                "mean_abs_mi": float(np.abs(mi_c[mask]).mean()) if mask.any() else None,
                "std_mi": float(mi_c[mask].std()) if mask.any() else None,
                "positive_frac": float((mi_c[mask] > 0).mean()) if mask.any() else None}

    result = {
        "necessary": cls(pos_c),
        "redundant": cls(~pos_c),
        "auc_mi": auc(mi_c, pos_c),
        "auc_mi_ci95": bootstrap_auc(per_seq_mi, per_seq_pos, resamples=resamples, seed=seed),
        "auc_abs_mi": auc(np.abs(mi_c), pos_c),
        "auc_abs_mi_ci95": bootstrap_auc(per_seq_abs, per_seq_pos, resamples=resamples, seed=seed),
        "auc_seq_norm_mi": auc(norm_c, pos_c),
        "auc_seq_norm_mi_ci95": bootstrap_auc(per_seq_norm, per_seq_pos, resamples=resamples, seed=seed),
        # Steps against redundant segments only (the closing answer tokens left out).
        "auc_mi_steps_vs_redundant": auc(mi_c[step_or_red], pos_c[step_or_red]),
        "auc_abs_mi_steps_vs_redundant": auc(np.abs(mi_c[step_or_red]), pos_c[step_or_red]),
        "by_kind": {kind: cls(kind_c == kind) for kind in KINDS},
        # Whole segments: the MI summed over a segment is the answer entropy before it minus after it.
        "segment_sum": {
            "steps": int(np.sum(seg_step)), "redundant": int(len(seg_step) - np.sum(seg_step)),
            "mean_step": float(np.mean([v for v, st in zip(seg_sum, seg_step) if st])) if any(seg_step) else None,
            "mean_redundant": float(np.mean([v for v, st in zip(seg_sum, seg_step) if not st]))
            if not all(seg_step) else None,
            "auc": auc(seg_sum, seg_step) if seg_sum else float("nan"),
        },
        # First token of each segment: where the policy chooses to go on with a step or to insert
        # a redundant segment.
        "segment_first_token": {
            "necessary": cls(first_c & pos_c),
            "redundant": cls(first_c & ~pos_c),
            "auc_mi": auc(mi_c[first_c], pos_c[first_c]),
            "auc_seq_norm_mi": auc(norm_c[first_c], pos_c[first_c]),
        },
    }
    return result


@torch.no_grad()
def probe_behaviour(model, tokenizer, problems, traces, prompt_ids, postfix_ids, batch_size: int = 64) -> dict:
    """What the early-exit probe answers at segment boundaries of the generator traces.

    At the start of the trace and after every segment before the answer, one plain forward of
    prompt + trace prefix + postfix (no estimator involved): the entropy there (the h the MI is made
    of), whether the probe's top token is the first digit of the gold answer, and whether it is the
    first digit of the LAST number written so far (prompt included). Grouped by the number of
    necessary steps still to come, so a probe whose uncertainty shrinks as the steps are done shows
    falling entropy and rising gold accuracy down the table.
    """
    rows, keys = [], []
    for problem, trace, pids in zip(problems, traces, prompt_ids):
        ids, done, prefix_text = [], 0, problem.prompt
        total = len(problem.steps)
        boundaries = [(0, done, prefix_text, "start")]
        for seg in trace.segments[:-1]:
            ids += tokenizer(seg.text, add_special_tokens=False).input_ids
            prefix_text += seg.text
            done += seg.kind == "step"
            boundaries.append((len(ids), done, prefix_text, seg.kind))
        for n, done, text, after in boundaries:
            last = re.findall(r"\d+", text)[-1]
            rows.append(pids + ids[:n] + list(postfix_ids))
            keys.append((total - done, after, str(problem.answer)[0], last[0]))
    digit_id = {d: tokenizer.convert_tokens_to_ids(d) for d in "0123456789"}
    stats: dict = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask = left_pad(chunk, pad_id=tokenizer.pad_token_id)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1].float()
        logp = logits.log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        top = logits.argmax(-1)
        for i, (remaining, after, gold, last) in enumerate(keys[start : start + batch_size]):
            for key in (f"steps_remaining={remaining}", f"after_{after}"):
                bucket = stats.setdefault(key, {"n": 0, "h": 0.0, "top_is_gold_first_digit": 0, "top_is_last_number_first_digit": 0,
                                                "p_gold_first_digit": 0.0})
                bucket["n"] += 1
                bucket["h"] += float(entropy[i])
                bucket["top_is_gold_first_digit"] += int(top[i]) == digit_id[gold]
                bucket["top_is_last_number_first_digit"] += int(top[i]) == digit_id[last]
                bucket["p_gold_first_digit"] += float(logp[i, digit_id[gold]].exp())
    out = {}
    for key in sorted(stats):
        b = stats[key]
        out[key] = {"n": b["n"], **{k: b[k] / b["n"] for k in b if k != "n"}}
    return out


def _values(scored, labels, key="mi"):
    """(necessary values, redundant values) pooled over sequences, for the histogram."""
    nec, red = [], []
    for s, (k, _) in zip(scored, labels):
        k = np.array(k + ["eos"] * (len(s[key]) - len(k)))
        nec.append(s[key][np.isin(k, NECESSARY_KINDS)])
        red.append(s[key][np.isin(k, REDUNDANT_KINDS)])
    return np.concatenate(nec), np.concatenate(red)


def plot(path: Path, panels: list[tuple[str, np.ndarray, np.ndarray, float]]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(panels), 3.6))
    FigureCanvasAgg(fig)
    for i, (title, nec, red, value) in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), i)
        both = np.concatenate([nec, red])
        lo, hi = np.percentile(both, [0.5, 99.5]) if both.size else (-1, 1)
        lo, hi = min(lo, -0.05), max(hi, 0.05)
        bins = np.linspace(lo, hi, 61)
        for values, label in ((nec, "necessary"), (red, "redundant")):
            if values.size:
                ax.hist(np.clip(values, lo, hi), bins=bins, density=True, alpha=0.55, label=f"{label} (n={values.size})")
        ax.set_yscale("log")
        ax.set_title(f"{title}\nAUC(MI) = {_fmt(value, '.3f')}", fontsize=9)
        ax.set_xlabel("token MI  s_t = h_t - h_(t+1)  (nats)")
        if nec.size or red.size:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)



# -- segment-start study (issue 18) ---------------------------------------------------------------

HORIZONS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
DECAYS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
PROBE_MODES = ("every", "boundary")  # every response position; only after segment-ending tokens
BOUNDARY_PATTERN = r"[.?]"  # the task's segments end with " ." or " ?" (iapo.probe_after)
TIE = 0.005  # validation AUCs closer than this count as tied: the cheaper / simpler setting wins


def _padded(h_rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, A + 1) entropies and (N, A) action mask from per-row h arrays (n + 1 values each)."""
    width = max(len(h) for h in h_rows) - 1
    h = torch.zeros(len(h_rows), width + 1)
    act = torch.zeros(len(h_rows), width, dtype=torch.bool)
    for i, values in enumerate(h_rows):
        h[i, : len(values)] = torch.as_tensor(values)
        act[i, : len(values) - 1] = True
    return h, act


def segment_start_points(labels: list[tuple[list[str], list[bool]]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row: (columns of the first token of each labelled segment, necessary?) for segments
    of the kinds of KINDS ("other" left out)."""
    out = []
    for kinds, firsts in labels:
        cols = [t for t, (k, f) in enumerate(zip(kinds, firsts)) if f and k in KINDS]
        out.append((np.array(cols, dtype=np.int64), np.array([kinds[t] in NECESSARY_KINDS for t in cols], dtype=bool)))
    return out


def shaping_at_segment_starts(h: torch.Tensor, act: torch.Tensor, points, *, horizon: int, decay: float,
                              norm: str, mi_mask: torch.Tensor | None = None) -> list[np.ndarray]:
    """The IAPO shaping term norm(MI; sequence) (alpha > 0 only scales it) with the MI summed over
    `horizon` tokens at `decay`, read at the first token of every labelled segment. mi_mask: the
    columns the MI term covers (iapo.mi_held_tokens exclude), as `information_shaping` takes it."""
    from iapo_openrlhf.core.advantages import normalize_shaping

    mi = token_mi(h, act, horizon=horizon, decay=decay)
    shaped = normalize_shaping(mi, act if mi_mask is None else act & mi_mask, norm).numpy()
    return [shaped[i, cols] for i, (cols, _) in enumerate(points)]


def segment_start_auc(scores: list[np.ndarray], points, *, resamples: int = 0, seed: int = 0) -> dict:
    positive = [pos for _, pos in points]
    flat_s, flat_p = np.concatenate(scores), np.concatenate(positive)
    out = {"auc": auc(flat_s, flat_p), "necessary": int(flat_p.sum()), "redundant": int((~flat_p).sum())}
    if resamples:
        out["ci95"] = bootstrap_auc(scores, positive, resamples=resamples, seed=seed)
    return out


def held_after(h: torch.Tensor, act: torch.Tensor, rows, texts: list[str], marker: str) -> tuple[torch.Tensor, torch.Tensor]:
    """h as the estimator holds it with iapo.mi_hold_after = marker (`core.mi.marker_columns`,
    `hold_entropy`), and the (B, A) columns before the marker (the MI term's mask with
    iapo.mi_held_tokens exclude): rows' responses are the columns of act, left-aligned as `_padded` lays them."""
    from iapo_openrlhf.core.mi import before_columns, hold_entropy, marker_columns

    responses = torch.zeros(act.shape, dtype=torch.long)
    for i, (_, response) in enumerate(rows):
        responses[i, : len(response)] = torch.as_tensor(response)
    columns = marker_columns(responses, act, texts, marker)
    return hold_entropy(h, columns), before_columns(act, columns)


def auc_by_necessary_kind(scores: list[np.ndarray], points, labels) -> dict:
    """The segment-start AUC with one kind of necessary segment left out: steps only (the
    decisions a filler competes with) and the answer only ("</think>...", where the probe is
    asked after a prefix that already holds the postfix)."""
    out = {}
    for name, drop in (("steps_vs_redundant", "answer"), ("answer_vs_redundant", "step")):
        keep = [np.array([kinds[c] != drop for c in cols], dtype=bool) for (kinds, _), (cols, _) in zip(labels, points)]
        kept = [(cols[k], pos[k]) for (cols, pos), k in zip(points, keep)]
        out[name] = segment_start_auc([s_[k] for s_, k in zip(scores, keep)], kept)["auc"]
    return out


def count_probes(rows, probe_after_ids=None) -> int:
    """Probed columns of the estimator for these rows (prefix + response incl. EOS, one span each)."""
    from iapo_openrlhf.core.probes import span_probes

    total = 0
    for _, response in rows:
        n = len(response)
        bounds = None if probe_after_ids is None else [t for t in range(n) if response[t] in set(probe_after_ids)]
        total += len(span_probes(0, n, 1, bounds))
    return total


def segment_start_study(model, tokenizer, postfix_ids, splits: dict, *, batch_size: int, resamples: int, seed: int,
                        norm: str, out: Path, boundary_pattern: str = BOUNDARY_PATTERN,
                        hold_after: str | None = None, held_tokens: str = "zero") -> dict:
    """Validation -> pre-registration -> test, for the shaping at segment-first tokens.

    splits: {"validation": (rows, labels), "test": (rows, labels)}, sampled completions of disjoint
    held-out problems. On validation every probe mode x horizon x decay is scored; the setting
    with the highest AUC is chosen (ties within TIE: boundary probes before every-position probes,
    then the smaller horizon, then the larger decay) and written to preregistration.json BEFORE the
    test split is scored. Then the test split: the chosen setting with a 95% interval (the
    headline), and for reference horizon 1 and each mode's own validation-best setting.
    hold_after: iapo.mi_hold_after (e.g. "</think>"): the MI from that text on is 0, in both splits.
    held_tokens: iapo.mi_held_tokens; "exclude" leaves the held tokens out of the normalisation.
    """
    from iapo_openrlhf.core.probes import boundary_token_ids, token_texts

    boundary_ids = boundary_token_ids(tokenizer, boundary_pattern)
    texts = token_texts(tokenizer) if hold_after is not None else []
    mode_kwargs = {"every": {}, "boundary": {"probe_after_ids": boundary_ids}}
    result: dict = {"norm": norm, "boundary_pattern": boundary_pattern, "horizons": list(HORIZONS),
                    "decays": list(DECAYS), "tie": TIE, "mi_hold_after": hold_after, "mi_held_tokens": held_tokens}

    def entropies(split: str) -> dict:
        rows, _ = splits[split]
        per_mode = {}
        for mode in PROBE_MODES:
            t0 = time.perf_counter()
            scored = score_rows(model, rows, postfix_ids, predict_mode="postfix", probe_stride=1,
                                batch_size=batch_size, **mode_kwargs[mode])
            h, act = _padded([s_["h"] for s_ in scored])
            mi_mask = None
            if hold_after is not None:
                h, before = held_after(h, act, rows, texts, hold_after)
                mi_mask = before if held_tokens == "exclude" else None
            per_mode[mode] = {"h": (h, act), "mi_mask": mi_mask, "seconds": time.perf_counter() - t0,
                              "probes": count_probes(rows, mode_kwargs[mode].get("probe_after_ids"))}
        return per_mode

    # validation
    val = entropies("validation")
    val_points = segment_start_points(splits["validation"][1])
    grid = []
    for mode in PROBE_MODES:
        h, act = val[mode]["h"]
        for horizon in HORIZONS:
            for decay in DECAYS if horizon > 1 else (1.0,):
                scores = shaping_at_segment_starts(h, act, val_points, horizon=horizon, decay=decay, norm=norm,
                                                   mi_mask=val[mode]["mi_mask"])
                grid.append({"mode": mode, "horizon": horizon, "decay": decay,
                             "auc": segment_start_auc(scores, val_points)["auc"]})
    # An undefined AUC (a split without one of the two classes) ranks last; if every AUC is
    # undefined, the tie rule alone picks (boundary probes, horizon 1).
    valid = [g["auc"] for g in grid if not math.isnan(g["auc"])]
    best_auc = max(valid) if valid else math.nan
    tied = [g for g in grid if g["auc"] >= best_auc - TIE] if valid else grid
    chosen = min(tied, key=lambda g: (g["mode"] != "boundary", g["horizon"], -g["decay"]))
    per_mode_best = {mode: max((g for g in grid if g["mode"] == mode),
                               key=lambda g: -math.inf if math.isnan(g["auc"]) else g["auc"]) for mode in PROBE_MODES}
    prereg = {"chosen": chosen, "rule": "highest validation AUC; ties within TIE: boundary before every-position, "
              "then smaller horizon, then larger decay", "validation_best_per_mode": per_mode_best,
              "validation_grid": grid, "validation_segments": segment_start_auc([np.zeros(len(c)) for c, _ in val_points],
                                                                                val_points)}
    (out / "preregistration.json").write_text(json.dumps(prereg, indent=1) + "\n")
    result["preregistration"] = prereg
    result["validation_cost"] = {m: {"seconds": val[m]["seconds"], "probes": val[m]["probes"]} for m in PROBE_MODES}

    # test (after the choice is on disk)
    test = entropies("test")
    test_points = segment_start_points(splits["test"][1])

    def score(mode, horizon, decay, with_ci=False):
        h, act = test[mode]["h"]
        scores = shaping_at_segment_starts(h, act, test_points, horizon=horizon, decay=decay, norm=norm,
                                           mi_mask=test[mode]["mi_mask"])
        return segment_start_auc(scores, test_points, resamples=resamples if with_ci else 0, seed=seed)

    h, act = test[chosen["mode"]]["h"]
    chosen_scores = shaping_at_segment_starts(h, act, test_points, horizon=chosen["horizon"], decay=chosen["decay"],
                                              norm=norm, mi_mask=test[chosen["mode"]]["mi_mask"])
    result["test"] = {
        "chosen": {**chosen, **segment_start_auc(chosen_scores, test_points, resamples=resamples, seed=seed),
                   **auc_by_necessary_kind(chosen_scores, test_points, splits["test"][1])},
        "horizon1": {m: score(m, 1, 1.0, with_ci=True) for m in PROBE_MODES},
        "validation_best_per_mode": {m: {**g, "test": score(m, g["horizon"], g["decay"], with_ci=True)}
                                     for m, g in per_mode_best.items()},
        "cost": {m: {"seconds": test[m]["seconds"], "probes": test[m]["probes"]} for m in PROBE_MODES},
    }
    return result


def print_segment_start(study: dict) -> None:
    pre = study["preregistration"]
    c = pre["chosen"]
    print(f"\nsegment-start study: shaping norm(MI; sequence) ({study['norm']}) at the first token of every segment, "
          "necessary (step, answer) vs redundant; sampled completions")
    print(f"validation: best every-position {pre['validation_best_per_mode']['every']}, best boundary "
          f"{pre['validation_best_per_mode']['boundary']}")
    print(f"pre-registered (validation): probes {c['mode']}, horizon {c['horizon']}, decay {c['decay']} "
          f"(validation AUC {c['auc']:.3f})")
    print("| probes | horizon / decay | chosen on | test AUC [95%] | estimator s (test) | probes (test) |")
    print("|---|---|---|---|---|---|")
    t = study["test"]
    for mode in PROBE_MODES:
        cost = t["cost"][mode]
        h1 = t["horizon1"][mode]
        print(f"| {mode} | 1 / 1.0 | fixed | {h1['auc']:.3f} [{h1['ci95'][0]:.3f}, {h1['ci95'][1]:.3f}] | "
              f"{cost['seconds']:.1f} | {cost['probes']} |")
        b = t["validation_best_per_mode"][mode]
        print(f"| {mode} | {b['horizon']} / {b['decay']} | validation | {b['test']['auc']:.3f} "
              f"[{b['test']['ci95'][0]:.3f}, {b['test']['ci95'][1]:.3f}] | {cost['seconds']:.1f} | {cost['probes']} |")


# -- main ------------------------------------------------------------------------------------------


def warm_start_probe_trained(
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = 1000,
    batch_size: int = 32,
    probe_rows: int = 16,
    probe_weight: float = 1.0,
    lr: float = 1e-2,
    warmup_steps: int = 30,
    n_train_problems: int = 20_000,
    redundancy: float = 0.8,
    num_threads: int = 1,
) -> Path:
    """EXPERIMENT, not the package's warm start: `tasks.warmstart.warm_start` plus an early-exit
    answer loss, to test whether the MI signal needs a probe that was ever trained to answer early.

    Every step's batch is the same SFT batch as `warm_start` (batch_size fresh traces, loss on the
    completion) plus `probe_rows` rows "prompt + trace[:j] + </think><answer> + gold answer +
    </answer>" with j uniform over the reasoning tokens, and the loss ONLY on the answer tokens: the
    postfix is never a target, so nothing teaches the policy to stop early; what is trained is the
    answer distribution after a truncated trace, i.e. the quantity the estimator reads. Same model
    size, optimizer, schedule and seeds as `warm_start`.
    """
    from iapo_openrlhf.tasks.warmstart import sft_optimizer, tiny_qwen2_config, torch_threads
    from iapo_openrlhf.tasks.synthetic import build_tokenizer
    from transformers import Qwen2ForCausalLM

    with torch_threads(num_threads):
        torch.manual_seed(seed)
        task = SyntheticTask(seed, redundancy=redundancy)
        tokenizer = build_tokenizer()
        model = Qwen2ForCausalLM(tiny_qwen2_config(tokenizer))
        model.train()
        problems = task.problems("train", n_train_problems)
        prompt_ids = tokenizer([p.prompt for p in problems], add_special_tokens=False).input_ids
        postfix = tokenizer(POSTFIX, add_special_tokens=False).input_ids
        end_answer = tokenizer(END_ANSWER, add_special_tokens=False).input_ids
        rng = random.Random(f"{seed}:warm_start_probe")
        optimizer, scheduler = sft_optimizer(model, lr=lr, warmup_steps=warmup_steps, steps=steps)
        for _ in range(steps):
            rows = []  # (ids, first labelled index, is a probe row)
            for k, i in enumerate(rng.sample(range(len(problems)), batch_size)):
                trace = task.sample_trace(problems[i], rng)
                rows.append((prompt_ids[i] + list(trace.token_ids) + [tokenizer.eos_token_id], len(prompt_ids[i]), False))
                if k < probe_rows:
                    answer_len = len(tokenizer(trace.segments[-1].text, add_special_tokens=False).input_ids)
                    j = rng.randint(0, len(trace.token_ids) - answer_len)
                    gold = tokenizer(str(problems[i].answer), add_special_tokens=False).input_ids
                    head = prompt_ids[i] + list(trace.token_ids[:j]) + postfix
                    rows.append((head + gold + end_answer, len(head), True))
            width = max(len(ids) for ids, _, _ in rows)
            input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
            labelled = torch.zeros((len(rows), width), dtype=torch.bool)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, (ids, first, _) in enumerate(rows):
                input_ids[r, : len(ids)] = torch.tensor(ids)
                labelled[r, first : len(ids)] = True
                attention_mask[r, : len(ids)] = 1
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
            probe = torch.tensor([is_probe for _, _, is_probe in rows]).unsqueeze(-1)
            target = labelled[:, 1:]
            # SFT loss + probe_weight x early-exit answer loss, each a mean over its own tokens
            # (pooled, the few answer tokens would be ~3% of the loss)
            loss = nll[target & ~probe].mean() + probe_weight * nll[target & probe].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
        model.eval()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return out_dir


def sample_and_label(model, tokenizer, problems, *, seed: int, max_new_tokens: int):
    """The policy's completions of `problems` (temperature 1, torch seed `seed`) as estimator rows
    (prompt ids, response ids incl. EOS) and their segment labels (the grammar parser)."""
    prompt_ids = tokenizer([p.prompt for p in problems], add_special_tokens=False).input_ids
    torch.manual_seed(seed)
    rollout = generate(model, tokenizer, [p.prompt for p in problems], max_new_tokens=max_new_tokens,
                       temperature=1.0, batch_size=64)
    a = rollout.action_mask.shape[1]
    rows, labels = [], []
    for i, p in enumerate(problems):
        ids = rollout.sequences[i, -a:][: int(rollout.lengths[i])].tolist()
        text_ids = ids[:-1] if not bool(rollout.truncated[i]) else ids
        rows.append((prompt_ids[i], ids))
        labels.append(segment_labels([tokenizer.decode([t]) for t in text_ids], p))
    return rollout, rows, labels


def ensure_model(path: Path, warmstart_steps: int, variant: str = "plain", probe_weight: float = 1.0, *,
                 task_variant: str = "classic", early_exit_weight: float = 0.0) -> Path:
    if (path / "config.json").exists():
        return path
    print(f"warm start ({variant}, task {task_variant}, early-exit weight {early_exit_weight}, {warmstart_steps} steps) "
          f"into {path}", flush=True)
    if variant == "probe":
        return warm_start_probe_trained(path, seed=WARMSTART["seed"], steps=warmstart_steps, lr=WARMSTART["lr"],
                                        redundancy=WARMSTART["redundancy"], probe_weight=probe_weight)
    from iapo_openrlhf.tasks.warmstart import warm_start

    warm_start(path, seed=WARMSTART["seed"], steps=warmstart_steps, lr=WARMSTART["lr"],
               task=SyntheticTask(WARMSTART["seed"], redundancy=WARMSTART["redundancy"], variant=task_variant),
               early_exit_weight=early_exit_weight, progress=False)
    return path


def run(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_model(Path(args.model), args.warmstart_steps, args.warm_start, args.probe_weight,
                             task_variant=args.variant, early_exit_weight=args.early_exit_weight)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    postfix_ids = tokenizer(POSTFIX, add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    task = SyntheticTask(args.seed, redundancy=WARMSTART["redundancy"], variant=args.variant)
    # test: the first --num-problems held-out problems (iapo-eval's); validation: the next --val-problems
    held_out = task.problems("test", args.num_problems + args.val_problems)
    problems, val_problems = held_out[: args.num_problems], held_out[args.num_problems :]
    prompt_ids = tokenizer([p.prompt for p in problems], add_special_tokens=False).input_ids
    timings: dict[str, float] = {}

    # (a) generator traces, exact labels
    rng = random.Random(f"{args.seed}:mi_diagnostic")
    traces = [task.sample_trace(p, rng) for p in problems]
    for t in traces:
        assert list(tokenizer(t.completion, add_special_tokens=False).input_ids) == list(t.token_ids)
    trace_rows = [(p, list(t.token_ids) + [eos]) for p, t in zip(prompt_ids, traces)]
    trace_labels = []
    for t in traces:
        lengths = [len(tokenizer(s.text, add_special_tokens=False).input_ids) for s in t.segments]
        kinds = [s.kind for s, n in zip(t.segments, lengths) for _ in range(n)]
        assert [int(x in REDUNDANT_KINDS) for x in kinds] == list(t.redundant_mask)
        trace_labels.append((kinds, [i == 0 for n in lengths for i in range(n)]))
    parsed = [segment_labels([tokenizer.decode([i]) for i in t.token_ids], p) for t, p in zip(traces, problems)]
    agree = np.mean([pk == tk for p, t in zip(parsed, trace_labels) for pk, tk in zip(zip(*p), zip(*t))])

    # (b) completions sampled from the policy, labelled by the parser
    t0 = time.perf_counter()
    rollout, sample_rows, sample_labels = sample_and_label(model, tokenizer, problems, seed=args.seed,
                                                           max_new_tokens=args.max_new_tokens)
    timings["sample_seconds"] = time.perf_counter() - t0
    # validation completions (other problems, other sampling seed) for the segment-start study
    val_rows, val_labels = [], []
    if val_problems:
        _, val_rows, val_labels = sample_and_label(model, tokenizer, val_problems, seed=args.seed + 1,
                                                   max_new_tokens=args.max_new_tokens)
    all_sample_kinds = np.array([k for kinds, _ in sample_labels for k in kinds])
    sample_info = {
        "accuracy": float(np.mean([check_answer(c, p) for c, p in zip(rollout.completions, problems)])),
        "mean_length": float(rollout.lengths.float().mean()),
        "truncated_frac": float(rollout.truncated.float().mean()),
        "token_kind_frac": {k: float(np.mean(all_sample_kinds == k)) for k in (*KINDS, "other")},
        "redundant_token_frac_of_labelled": float(
            np.isin(all_sample_kinds, REDUNDANT_KINDS).sum() / max(1, np.isin(all_sample_kinds, KINDS).sum())),
    }
    trace_all = np.array([k for kinds, _ in trace_labels for k in kinds])
    trace_info = {
        "mean_length": float(np.mean([len(r) for _, r in trace_rows])),
        "token_kind_frac": {k: float(np.mean(trace_all == k)) for k in KINDS},
    }

    t0 = time.perf_counter()
    trace_info["probe_at_segment_boundaries"] = probe_behaviour(model, tokenizer, problems, traces, prompt_ids, postfix_ids)
    timings["probe_behaviour_seconds"] = time.perf_counter() - t0
    results = {"generator_traces": {"labels": "exact (SyntheticTask.sample_trace redundant_mask)", **trace_info},
               "sampled_completions": {"labels": "parsed with the task's segment grammar", **sample_info}}
    hist = {}
    for name, kwargs in VARIANTS.items():
        for source, rows, labels in (("generator_traces", trace_rows, trace_labels),
                                     ("sampled_completions", sample_rows, sample_labels)):
            t0 = time.perf_counter()
            scored = score_rows(model, rows, postfix_ids, batch_size=args.batch_size, **kwargs)
            timings[f"{source}/{name}_seconds"] = time.perf_counter() - t0
            summary = summarize(scored, labels, resamples=args.resamples, seed=args.seed)
            h0 = np.array([s["h"][0] for s in scored])
            hn = np.array([s["h"][-2] if len(s["h"]) > 1 else s["h"][-1] for s in scored])
            summary["answer_entropy"] = {"mean_h_start": float(h0.mean()), "mean_h_before_eos": float(hn.mean())}
            results[source][name] = summary
            hist[(source, name)] = (*_values(scored, labels), summary["auc_mi"])

    if val_problems:
        t0 = time.perf_counter()
        results["sampled_completions"]["segment_start"] = segment_start_study(
            model, tokenizer, postfix_ids, {"validation": (val_rows, val_labels), "test": (sample_rows, sample_labels)},
            batch_size=args.batch_size, resamples=args.resamples, seed=args.seed, norm=args.shaping_norm, out=out,
            hold_after=args.mi_hold_after, held_tokens=args.mi_held_tokens)
        timings["segment_start_seconds"] = time.perf_counter() - t0

    report = {
        "model": str(model_dir),
        "num_problems": len(problems),
        "val_problems": len(val_problems),
        "task_variant": args.variant,
        "task_seed": args.seed,
        "postfix": POSTFIX,
        "temperature": 1.0,
        "primary_score": "signed MI s_t = h_t - h_{t+1} (what IAPO's advantage adds); |MI| secondary",
        "parser_agreement_on_generator_traces": float(agree),
        "target": {"auc_postfix_min": 0.7},
        **results,
        "timings": timings,
        "threads": args.threads,
        "load_average": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    (out / "mi_diagnostic.json").write_text(json.dumps(report, indent=2) + "\n")
    panels = [(f"{src.replace('_', ' ')}: {name}", *hist[(src, name)])
              for src in ("generator_traces", "sampled_completions") for name in VARIANTS]
    plot(out / "mi_histogram.png", panels[:3])
    plot(out / "mi_histogram_sampled.png", panels[3:])
    return report


def _fmt(value, spec: str) -> str:
    return "n.a." if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def print_summary(report: dict) -> None:
    print("\nprobe at segment boundaries of generator traces (top = the probe's most likely answer token):")
    print("| where | n | mean h | top = gold 1st digit | top = last number's 1st digit | p(gold 1st digit) |")
    print("|---|---|---|---|---|---|")
    for key, b in report["generator_traces"]["probe_at_segment_boundaries"].items():
        print(f"| {key} | {b['n']} | {b['h']:.3f} | {b['top_is_gold_first_digit']:.3f} | "
              f"{b['top_is_last_number_first_digit']:.3f} | {b['p_gold_first_digit']:.3f} |")
    print(f"\nmodel {report['model']}, {report['num_problems']} test problems; parser agreement on generator "
          f"traces {report['parser_agreement_on_generator_traces']:.4f}")
    head = ("| tokens | estimator | mean MI nec. | mean MI red. | mean abs MI nec. | mean abs MI red. "
            "| AUC(MI) [95%] | AUC(abs MI) | AUC(seq-norm MI) | AUC(MI) steps vs red. | AUC(segment sum) |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for source in ("generator_traces", "sampled_completions"):
        for name in VARIANTS:
            r = report[source][name]
            ci = r["auc_mi_ci95"]
            print(f"| {source} | {name} | {_fmt(r['necessary']['mean_mi'], '+.4f')} | "
                  f"{_fmt(r['redundant']['mean_mi'], '+.4f')} | {_fmt(r['necessary']['mean_abs_mi'], '.4f')} | "
                  f"{_fmt(r['redundant']['mean_abs_mi'], '.4f')} | {_fmt(r['auc_mi'], '.3f')} "
                  f"[{_fmt(ci[0], '.3f')}, {_fmt(ci[1], '.3f')}] | {_fmt(r['auc_abs_mi'], '.3f')} | "
                  f"{_fmt(r['auc_seq_norm_mi'], '.3f')} | {_fmt(r['auc_mi_steps_vs_redundant'], '.3f')} | "
                  f"{_fmt(r['segment_sum']['auc'], '.3f')} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"warm-started policy (default {DEFAULT_MODEL}; warm-started there if missing)")
    parser.add_argument("--out", default="runs/mi_diagnostic")
    parser.add_argument("--num-problems", type=int, default=500, help="held-out problems (one trace + one sample each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--resamples", type=int, default=500, help="bootstrap resamples for the AUC intervals")
    parser.add_argument("--warm-start", choices=["plain", "probe"], default="plain",
                        help="when --model does not exist: the package's warm start (plain), or the experiment "
                             "with an early-exit answer loss (probe, see warm_start_probe_trained)")
    parser.add_argument("--probe-weight", type=float, default=1.0, help="--warm-start probe: weight of the answer loss")
    parser.add_argument("--warmstart-steps", type=int, default=WARMSTART["steps"],
                        help="SFT steps when --model does not exist yet (default: local_tiny's)")
    parser.add_argument("--variant", choices=["classic", "neutral", "preamble"], default="classic",
                        help="task variant of the generator traces (and of the warm start made when --model is missing)")
    parser.add_argument("--early-exit-weight", type=float, default=0.0,
                        help="when --model does not exist: the package warm start's early-exit answer loss weight")
    parser.add_argument("--val-problems", type=int, default=None,
                        help="held-out problems after the first --num-problems: the validation split of the "
                             "segment-start study (default: as many as --num-problems; 0: no study)")
    parser.add_argument("--shaping-norm", choices=["zscore", "l2", "authors"], default="zscore",
                        help="iapo.shaping_norm of the segment-start score")
    parser.add_argument("--mi-hold-after", default=None, metavar="TEXT",
                        help="segment-start study: the estimator's iapo.mi_hold_after, e.g. '</think>' (MI 0 from "
                             "that text on: past it the probe is malformed); default: no hold")
    parser.add_argument("--mi-held-tokens", choices=["zero", "exclude"], default="zero",
                        help="with --mi-hold-after: the estimator's iapo.mi_held_tokens (exclude: the held tokens "
                             "take no part in the MI term's normalisation, shaping 0 there)")
    args = parser.parse_args(argv)
    if args.mi_held_tokens != "zero" and args.mi_hold_after is None:
        parser.error(f"--mi-held-tokens {args.mi_held_tokens}: needs --mi-hold-after TEXT (the held tokens are "
                     "the marker's and after)")
    if args.val_problems is None:
        args.val_problems = args.num_problems
    t0 = time.perf_counter()
    report = run(args)
    print_summary(report)
    print(f"\n{time.perf_counter() - t0:.0f} s (load average {report['load_average']}); wrote "
          f"{Path(args.out) / 'mi_diagnostic.json'}, {Path(args.out) / 'mi_histogram.png'}, "
          f"{Path(args.out) / 'mi_histogram_sampled.png'}")
    study = report["sampled_completions"].get("segment_start")
    if study:
        print_segment_start(study)
        chosen = study["test"]["chosen"]
        print(f"pre-registered setting, necessary = steps only: {chosen['steps_vs_redundant']:.3f}; "
              f"answer only: {chosen['answer_vs_redundant']:.3f}")
        print(f"segment-start AUC = {chosen['auc']:.3f} [{chosen['ci95'][0]:.3f}, {chosen['ci95'][1]:.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
