#!/usr/bin/env python
"""The preconditions of the issue-18 study, measured on a warm-started policy.

1. Redundancy does not cost accuracy: on the policy's own samples (--samples completions of each
   of the first --num-problems held-out problems, temperature 1.0, top_k 0: the rollout
   distribution), the Pearson correlation between a completion's redundant tokens (labelled with
   the task's segment grammar, `mi_diagnostic.segment_labels`) and its correctness, with a 95%
   interval from resampling whole problems; accuracy by number of redundant segments and the
   same split by place (before the first step, between steps, after the last). Target:
   within +-0.1. (The second half of the precondition, a GRPO run keeping at least half of the
   warm start's redundant tokens, is read off the study: scripts/reproduce_synthetic.py.)
2. The early-exit answers are calibrated: on the generator's traces of held-out problems
   (a --variant trace per problem, exact segment labels), the probe "prefix + </think><answer>"
   at EVERY reasoning prefix (cut before each token up to and including "</think>"), one plain
   forward each: the distribution of the answer's first token, which is what the estimator's
   entropy h is taken of. Confidence = its top probability, correct = top token is the gold
   answer's first token; expected calibration error over 10 equal-width confidence bins (the
   reliability table), and the mean entropy h by steps still to come (it must fall as steps are
   done). Target: ECE <= 0.1. The same at segment boundaries only (where a segment starts).

    python scripts/preconditions.py --model runs/science/initial --variant neutral --out runs/science/preconditions
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from iapo_openrlhf.local.rollout import generate, left_pad  # noqa: E402
from iapo_openrlhf.tasks.synthetic import REDUNDANT_KINDS, VARIANTS, SyntheticTask, check_answer  # noqa: E402
from mi_diagnostic import segment_labels  # noqa: E402

POSTFIX = "</think><answer>"
BINS = 10


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def redundancy_vs_correctness(model, tokenizer, problems, *, samples: int, max_new_tokens: int, seed: int,
                              resamples: int = 1000) -> dict:
    chosen = [p for p in problems for _ in range(samples)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = generate(model, tokenizer, [p.prompt for p in chosen], max_new_tokens=max_new_tokens, temperature=1.0)
    a = out.action_mask.shape[1]
    redundant, segments, correct, lengths, other = [], [], [], [], []
    placed = []  # redundant tokens before the first step, between steps, after the last step
    for i, problem in enumerate(chosen):
        n = int(out.lengths[i]) - int(not bool(out.truncated[i]))
        ids = out.sequences[i, -a:][:n].tolist()
        kinds, firsts = segment_labels([tokenizer.decode([t]) for t in ids], problem)
        redundant.append(sum(k in REDUNDANT_KINDS for k in kinds))
        steps = [t for t, k in enumerate(kinds) if k == "step"] or [n]
        at = [t for t, k in enumerate(kinds) if k in REDUNDANT_KINDS]
        before, after = sum(t < steps[0] for t in at), sum(t > steps[-1] for t in at)
        placed.append((before, len(at) - before - after, after))
        segments.append(sum(f and k in REDUNDANT_KINDS for k, f in zip(kinds, firsts)))
        other.append(sum(k == "other" for k in kinds))
        correct.append(float(check_answer(out.completions[i], problem)))
        lengths.append(n)
    redundant, correct = np.array(redundant), np.array(correct)
    r = pearson(redundant, correct)
    # Within a problem (what GRPO's group baseline sees): both centred on their problem's mean.
    red_c = (redundant.reshape(-1, samples) - redundant.reshape(-1, samples).mean(1, keepdims=True)).reshape(-1)
    cor_c = (correct.reshape(-1, samples) - correct.reshape(-1, samples).mean(1, keepdims=True)).reshape(-1)
    n_steps = np.array([len(p.steps) for p in chosen])
    by_steps = {}
    for k in sorted(set(n_steps.tolist())):
        m = n_steps == k
        by_steps[str(k)] = {"completions": int(m.sum()), "accuracy": float(correct[m].mean()),
                            "redundant_tokens": float(redundant[m].mean()),
                            "correlation": pearson(redundant[m], correct[m])}
    rng = np.random.default_rng(seed)
    by_problem = np.arange(len(chosen)).reshape(len(problems), samples)
    boot = []
    for _ in range(resamples):
        idx = by_problem[rng.integers(0, len(problems), len(problems))].reshape(-1)
        value = pearson(redundant[idx], correct[idx])
        if not np.isnan(value):
            boot.append(value)
    buckets = {}
    for lo, hi, name in ((0, 0, "0"), (1, 1, "1"), (2, 2, "2"), (3, 3, "3"), (4, 5, "4-5"), (6, 99, "6+")):
        mask = (np.array(segments) >= lo) & (np.array(segments) <= hi)
        if mask.any():
            buckets[name] = {"completions": int(mask.sum()), "accuracy": float(correct[mask].mean()),
                             "mean_redundant_tokens": float(redundant[mask].mean())}
    # Where redundancy costs accuracy (the preamble variant's reason): each place's tokens against
    # correctness, and the completions whose only redundancy is before the first step.
    placed = np.array(placed)
    by_place = {name: {"redundant_tokens": float(placed[:, j].mean()), "correlation": pearson(placed[:, j], correct),
                       "completions_with": int((placed[:, j] > 0).sum())}
                for j, name in enumerate(("before_first_step", "between_steps", "after_last_step"))}
    none, only_before = placed.sum(1) == 0, (placed[:, 0] > 0) & (placed[:, 1:].sum(1) == 0)
    for name, mask in (("no_redundancy", none), ("only_before_first_step", only_before)):
        by_place[name] = {"completions": int(mask.sum()), "accuracy": float(correct[mask].mean()) if mask.any() else None}
    return {
        "completions": len(chosen), "accuracy": float(correct.mean()), "mean_length": float(np.mean(lengths)),
        "truncated_frac": float(out.truncated.float().mean()),
        "redundant_tokens_per_completion": float(redundant.mean()),
        "redundant_frac": float(redundant.sum() / max(1, sum(lengths))),
        "unparsed_frac": float(sum(other) / max(1, sum(lengths))),
        "correlation_redundant_tokens_correct": r,
        "correlation_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if boot else None,
        "correlation_redundant_segments_correct": pearson(segments, correct),
        "correlation_within_problem": pearson(red_c, cor_c),
        "by_number_of_steps": by_steps,
        "accuracy_by_redundant_segments": buckets,
        "by_place": by_place,
    }


@torch.no_grad()
def early_exit_calibration(model, tokenizer, task: SyntheticTask, problems, *, seed: int, batch_size: int = 128) -> dict:
    """Probe distribution of the answer's first token after every reasoning prefix of a generator
    trace of each problem (see the module docstring)."""
    postfix = tokenizer(POSTFIX, add_special_tokens=False).input_ids
    rng = random.Random(f"{seed}:preconditions")
    rows, keys = [], []  # keys: (steps remaining, at a segment start, gold first token)
    for problem in problems:
        trace = task.sample_trace(problem, rng)
        prompt = tokenizer(problem.prompt, add_special_tokens=False).input_ids
        gold = tokenizer(str(problem.answer), add_special_tokens=False).input_ids[0]
        ids, starts, remaining = [], [], []
        done = 0
        for seg in trace.segments:
            seg_ids = tokenizer(seg.text, add_special_tokens=False).input_ids
            for k in range(len(seg_ids)):
                starts.append(k == 0)
                remaining.append(len(problem.steps) - done)
                if seg.kind == "answer":
                    break  # the cut before "</think>" is the last reasoning prefix
            if seg.kind == "answer":
                break
            ids += seg_ids
            done += seg.kind == "step"
        for j in range(len(ids) + 1):
            rows.append(prompt + ids[:j] + postfix)
            keys.append((remaining[j], starts[j], gold))
    conf, hit, ent = [], [], []
    for start in range(0, len(rows), batch_size):
        ids, mask = left_pad(rows[start : start + batch_size], pad_id=tokenizer.pad_token_id)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=1).logits[:, -1]
        logp = logits.float().log_softmax(-1)
        p = logp.exp()
        top = p.max(-1)
        conf.extend(top.values.tolist())
        ent.extend((-(p * logp).sum(-1)).tolist())
        golds = torch.tensor([k[2] for k in keys[start : start + batch_size]])
        hit.extend((top.indices == golds).float().tolist())
    conf, hit, ent = np.array(conf), np.array(hit), np.array(ent)
    remaining = np.array([k[0] for k in keys])
    seg_start = np.array([k[1] for k in keys])

    def reliability(mask):
        table, ece = [], 0.0
        edges = np.linspace(0, 1, BINS + 1)
        for b in range(BINS):
            inside = mask & (conf > edges[b]) & (conf <= edges[b + 1]) if b else mask & (conf <= edges[1])
            if inside.any():
                gap = abs(conf[inside].mean() - hit[inside].mean())
                ece += inside.sum() / mask.sum() * gap
                table.append({"bin": f"({edges[b]:.1f}, {edges[b + 1]:.1f}]", "n": int(inside.sum()),
                              "confidence": float(conf[inside].mean()), "accuracy": float(hit[inside].mean())})
        return {"prefixes": int(mask.sum()), "ece": float(ece), "accuracy": float(hit[mask].mean()),
                "confidence": float(conf[mask].mean()), "table": table}

    every = np.ones_like(seg_start, dtype=bool)
    by_remaining = {}
    for k in sorted(set(remaining.tolist())):
        m = remaining == k
        by_remaining[str(k)] = {"prefixes": int(m.sum()), "mean_h": float(ent[m].mean()),
                                "mean_h_at_segment_starts": float(ent[m & seg_start].mean()) if (m & seg_start).any() else None,
                                "top_is_gold": float(hit[m].mean()), "confidence": float(conf[m].mean())}
    return {"traces": len(problems), "every_prefix": reliability(every), "segment_starts": reliability(seg_start),
            "h_by_steps_remaining": by_remaining}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--variant", choices=VARIANTS, default="neutral", help="task variant of the generator traces")
    parser.add_argument("--out", default="runs/preconditions")
    parser.add_argument("--num-problems", type=int, default=500)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    task = SyntheticTask(args.seed, variant=args.variant)
    problems = task.problems("test", args.num_problems)
    report = {"model": args.model, "variant": args.variant, "num_problems": len(problems), "samples": args.samples,
              "seed": args.seed}
    report["redundancy_vs_correctness"] = redundancy_vs_correctness(
        model, tokenizer, problems, samples=args.samples, max_new_tokens=args.max_new_tokens, seed=args.seed)
    report["early_exit_calibration"] = early_exit_calibration(model, tokenizer, task, problems, seed=args.seed)
    report["seconds"] = time.perf_counter() - t0
    report["load_average"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "preconditions.json").write_text(json.dumps(report, indent=1) + "\n")
    rc, cal = report["redundancy_vs_correctness"], report["early_exit_calibration"]
    print(f"model {args.model}: sampled accuracy {rc['accuracy']:.4f}, mean length {rc['mean_length']:.1f}, "
          f"redundant tokens/completion {rc['redundant_tokens_per_completion']:.2f}")
    ci = rc["correlation_ci95"] or [float("nan")] * 2
    print(f"correlation(redundant tokens, correct) = {rc['correlation_redundant_tokens_correct']:+.4f} "
          f"[{ci[0]:+.4f}, {ci[1]:+.4f}]")
    print(f"within a problem (both centred per problem): {rc['correlation_within_problem']:+.4f}")
    print("| steps | completions | accuracy | redundant tokens | correlation |\n|---|---|---|---|---|")
    for k, b in rc["by_number_of_steps"].items():
        print(f"| {k} | {b['completions']} | {b['accuracy']:.4f} | {b['redundant_tokens']:.2f} | {b['correlation']:+.4f} |")
    print("| redundant segments | completions | accuracy | redundant tokens |\n|---|---|---|---|")
    for name, b in rc["accuracy_by_redundant_segments"].items():
        print(f"| {name} | {b['completions']} | {b['accuracy']:.4f} | {b['mean_redundant_tokens']:.2f} |")
    print("| redundancy | completions with it | tokens / completion | correlation with correct |\n|---|---|---|---|")
    for name in ("before_first_step", "between_steps", "after_last_step"):
        b = rc["by_place"][name]
        print(f"| {name} | {b['completions_with']} | {b['redundant_tokens']:.2f} | {b['correlation']:+.4f} |")
    for name in ("no_redundancy", "only_before_first_step"):
        b = rc["by_place"][name]
        print(f"{name}: {b['completions']} completions, accuracy {b['accuracy']}")
    print(f"\nearly-exit calibration ({cal['every_prefix']['prefixes']} prefixes): ECE {cal['every_prefix']['ece']:.4f}; "
          f"at segment starts ({cal['segment_starts']['prefixes']}): ECE {cal['segment_starts']['ece']:.4f}")
    print("| confidence bin | prefixes | mean confidence | accuracy |\n|---|---|---|---|")
    for row in cal["every_prefix"]["table"]:
        print(f"| {row['bin']} | {row['n']} | {row['confidence']:.3f} | {row['accuracy']:.3f} |")
    print("| steps remaining | prefixes | mean h (nats) | h at segment starts | top = gold |\n|---|---|---|---|---|")
    for k, b in cal["h_by_steps_remaining"].items():
        hs = b["mean_h_at_segment_starts"]
        print(f"| {k} | {b['prefixes']} | {b['mean_h']:.3f} | {'n.a.' if hs is None else format(hs, '.3f')} | "
              f"{b['top_is_gold']:.3f} |")
    print(f"\n{report['seconds']:.0f} s, load average {report['load_average']}; wrote {out / 'preconditions.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
