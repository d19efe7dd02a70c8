"""The IAPO shaping term on redundant tokens against completion length (issue 18, the beta = 0 runs).

norm(MI; seq i) is a z-score over the completion's tokens: it sums to 0 over them, so when a few
tokens carry most of the MI, every other token gets about -sqrt(K / (N - K)) and that penalty
shrinks as the completion (N tokens) grows. This script measures whether the policy's own samples
show it: per completion, the mean shaping over its redundant tokens, over its necessary ones and
at "</think>" (where it stops reasoning), by length tercile, and the Spearman correlation of the
first two with the length.

    python scripts/shaping_by_length.py --model runs/ws/ee_w03_n500 --variant neutral --out shaping_by_length.json

With --horizon / --decay / --mi-hold-after / --mi-held-tokens it scores the estimator settings of a
study (issue 18, session 7: the MI term's shaping per token class under each hold variant).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mi_diagnostic import (  # noqa: E402
    BOUNDARY_PATTERN,
    NECESSARY_KINDS,
    POSTFIX,
    REDUNDANT_KINDS,
    WARMSTART,
    _padded,
    average_ranks,
    held_after,
    sample_and_label,
    score_rows,
)

from iapo_openrlhf.core.advantages import normalize_shaping  # noqa: E402
from iapo_openrlhf.core.mi import token_mi  # noqa: E402
from iapo_openrlhf.core.probes import boundary_token_ids, token_texts  # noqa: E402
from iapo_openrlhf.tasks.synthetic import SyntheticTask  # noqa: E402
from preconditions import pearson  # noqa: E402


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--variant", choices=["classic", "neutral", "preamble"], default="neutral")
    parser.add_argument("--num-problems", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--every-position", action="store_true", help="probe every token (default: boundary probes)")
    parser.add_argument("--horizon", type=int, default=1, help="iapo.mi_horizon")
    parser.add_argument("--decay", type=float, default=1.0, help="iapo.mi_decay")
    parser.add_argument("--mi-hold-after", default=None, metavar="TEXT", help="iapo.mi_hold_after, e.g. '</think>'")
    parser.add_argument("--mi-held-tokens", choices=["zero", "exclude"], default="zero", help="iapo.mi_held_tokens")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.mi_held_tokens != "zero" and args.mi_hold_after is None:
        parser.error(f"--mi-held-tokens {args.mi_held_tokens}: needs --mi-hold-after TEXT")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    task = SyntheticTask(args.seed, redundancy=WARMSTART["redundancy"], variant=args.variant)
    problems = task.problems("test", args.num_problems)
    _, rows, labels = sample_and_label(model, tokenizer, problems, seed=args.seed, max_new_tokens=args.max_new_tokens)
    probe_after = None if args.every_position else boundary_token_ids(tokenizer, BOUNDARY_PATTERN)
    scored = score_rows(model, rows, tokenizer(POSTFIX, add_special_tokens=False).input_ids, predict_mode="postfix",
                        probe_stride=1, batch_size=32, probe_after_ids=probe_after)
    h, act = _padded([s["h"] for s in scored])
    mi_mask = act
    if args.mi_hold_after is not None:
        h, before = held_after(h, act, rows, token_texts(tokenizer), args.mi_hold_after)
        mi_mask = act & before if args.mi_held_tokens == "exclude" else act
    mi = token_mi(h, act, horizon=args.horizon, decay=args.decay)
    report: dict = {"model": args.model, "problems": len(problems), "seed": args.seed,
                    "probes": "every" if probe_after is None else "boundary", "horizon": args.horizon,
                    "decay": args.decay, "mi_hold_after": args.mi_hold_after, "mi_held_tokens": args.mi_held_tokens}
    for norm in ("zscore", "l2"):
        shaped = normalize_shaping(mi, mi_mask, norm).numpy()
        per = []  # (length, mean shaping on redundant tokens, on necessary ones, at "</think>"; nan if none)
        for i, (kinds, firsts) in enumerate(labels):
            n = len(kinds)
            red = [shaped[i, t] for t in range(n) if kinds[t] in REDUNDANT_KINDS]
            nec = [shaped[i, t] for t in range(n) if kinds[t] in NECESSARY_KINDS]
            stop = [shaped[i, t] for t in range(n) if kinds[t] == "answer" and firsts[t]]
            per.append((int(act[i].sum()), np.mean(red) if red else np.nan, np.mean(nec) if nec else np.nan,
                        stop[0] if stop else np.nan))
        arr = np.array(per, dtype=float)
        has_red = ~np.isnan(arr[:, 1])
        cuts = np.quantile(arr[:, 0], [1 / 3, 2 / 3])
        tercile = np.digitize(arr[:, 0], cuts)
        report[norm] = {
            "completions_with_redundancy": int(has_red.sum()),
            "spearman_length_vs_redundant_shaping": spearman(arr[has_red, 0], arr[has_red, 1]),
            "spearman_length_vs_necessary_shaping": spearman(arr[:, 0], arr[:, 2]),
            "answer_start_shaping_mean": float(np.nanmean(arr[:, 3])),
            "redundant_shaping_mean": float(np.nanmean(arr[has_red, 1])),  # per completion, then over them
            "necessary_shaping_mean": float(np.nanmean(arr[:, 2])),
            "by_length_tercile": [
                {"length_mean": float(arr[tercile == k, 0].mean()),
                 "redundant_shaping_mean": float(np.nanmean(arr[(tercile == k) & has_red, 1])),
                 "necessary_shaping_mean": float(np.nanmean(arr[tercile == k, 2])),
                 "answer_start_shaping_mean": float(np.nanmean(arr[tercile == k, 3])),
                 "n": int((tercile == k).sum())} for k in range(3)],
        }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for norm in ("zscore", "l2"):
        r = report[norm]
        print(f"{norm}: spearman(length, mean shaping on redundant tokens) = "
              f"{r['spearman_length_vs_redundant_shaping']:+.3f} ({r['completions_with_redundancy']} completions), "
              f"on necessary tokens {r['spearman_length_vs_necessary_shaping']:+.3f}; mean shaping: redundant "
              f"{r['redundant_shaping_mean']:+.3f}, necessary {r['necessary_shaping_mean']:+.3f}, at </think> "
              f"{r['answer_start_shaping_mean']:+.3f}")
        for row in r["by_length_tercile"]:
            print(f"  length {row['length_mean']:6.1f} (n {row['n']}): redundant {row['redundant_shaping_mean']:+.3f}, "
                  f"necessary {row['necessary_shaping_mean']:+.3f}, at </think> {row['answer_start_shaping_mean']:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
