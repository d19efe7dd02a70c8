#!/usr/bin/env python
"""CPU-scale reproduction (issue 7.2): does IAPO shorten reasoning without losing accuracy?

Design
------
1. One warm start (SFT of the tiny Qwen2 on the synthetic task, the settings of
   configs/local_tiny.yaml: seed 0, 1000 steps, lr 1e-2, redundancy 0.8) saved once to
   <out>/initial; every run starts from it and uses it as the KL reference.
2. Methods on the local backend's one code path (`LocalTrainer`, in-process):
       grpo          alpha = beta = 0
       dapo          clip-higher (eps_high 0.28), dynamic sampling, overlong penalty
       iapo          alpha 0.5, beta 0.1 (the paper's / local_tiny's weights)
       iapo_beta0    ablation: alpha 0.5, beta 0   (MI term only)
       iapo_alpha0   ablation: alpha 0,   beta 0.1 (exploration term only)
   (the default set, the study reported in the README) and, with --methods, any subset of those
   and of the other methods of the paper's table and related papers, at their defaults
   (README "Methods"):
       gfpo          the 4 shortest of the 8 sampled per prompt
       gtpo / grpo_s entropy-weighted token (GTPO) / sequence (GRPO-S) rewards
       sgrpo         the loss over the first 32 tokens and 30% of the others
       ib            GRPO + the advantage-weighted entropy term (0.005)
       significance  GRPO + the length reward over low-MI tokens, dynamic schedule
   each for every seed in --seeds (`--methods all`: every one). The RL seed sets the training prompts' order and the sampling;
   for one seed every method sees the same prompts. Every run gets the same budget of sampled
   rollouts (steps x prompts_per_step x n_samples_per_prompt): DAPO's dynamic sampling draws extra
   groups, so DAPO stops after fewer updates once the budget is spent (its updates are on filtered
   batches). Rollout settings are local_tiny's (8 prompts x 8 samples, 128 new tokens,
   temperature 1.0, KL 0.001); the RL learning rate and the steps are this script's (see --lr).
3. Evaluation with `iapo-eval` (its `main`, in-process) of every final model and of the warm start on
   the SAME held-out problems (the synthetic test split of task seed 0, first --eval-problems of
   it) with the same sampling seed, k = 1, 4, 8, 128 new tokens. Learning curves: accuracy and
   mean length of --curve-samples samples on --curve-problems held-out problems every
   --curve-every steps, plus the training batches' own accuracy and length at every step.
4. Report in <out>: results.json (every number), results.md (mean +- std over seeds in the paper's
   layout, the step time split rollout / MI / update per method, the target checks),
   curves.png (length and accuracy over training), accuracy_vs_length.png (final accuracy
   against length, per seed and mean), runs/<method>_s<seed>/ (metrics.jsonl, final/, eval/).

Runs are independent jobs spread over --workers processes with --threads torch threads each;
a finished run (its summary.json exists) is reused unless --force.

    python scripts/reproduce_synthetic.py --smoke --out /tmp/repro_smoke    # CI: < 90 s
    python scripts/reproduce_synthetic.py                                   # the study (see README)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "scripts"):  # the package (when not installed) and mi_diagnostic's parser
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

METHODS = {
    "grpo": ["method=grpo"],
    "dapo": ["method=dapo", "train.clip_eps_high=0.28"],
    "iapo": ["method=iapo", "iapo.alpha=0.5", "iapo.beta=0.1"],
    "iapo_beta0": ["method=iapo", "iapo.alpha=0.5", "iapo.beta=0"],
    "iapo_alpha0": ["method=iapo", "iapo.alpha=0", "iapo.beta=0.1"],
    "iapo_l2": ["method=iapo", "iapo.alpha=0.5", "iapo.beta=0.1", "iapo.shaping_norm=l2"],
    "iapo_authors": ["method=iapo", "iapo.alpha=0.5", "iapo.beta=0.1", "iapo.shaping_norm=authors"],
    "gfpo": ["method=gfpo"],
    "gtpo": ["method=gtpo"],
    "grpo_s": ["method=gtpo", "gtpo.level=sequence"],
    "sgrpo": ["method=sgrpo"],
    "ib": ["method=ib"],
    "significance": ["method=significance"],
}
DEFAULT_METHODS = ("grpo", "dapo", "iapo", "iapo_beta0", "iapo_alpha0")  # the study the README reports
KS = (1, 4, 8)
WARMSTART = {"seed": 0, "steps": 1000, "lr": 1e-2, "redundancy": 0.8}  # configs/local_tiny.yaml
EVAL_SEED = 0  # task seed of the held-out problems and sampling seed of every evaluation

FULL = dict(seeds="0,1,2", steps=100, lr=2e-4, workers=2, threads=1, eval_problems=500, curve_every=10,
            curve_problems=64, curve_samples=4, max_new_tokens=128, warmstart_steps=WARMSTART["steps"],
            redundancy_problems=0, early_exit_steps=0)
SMOKE = dict(seeds="0", steps=2, lr=2e-4, workers=2, threads=1, eval_problems=8, curve_every=1,
             curve_problems=4, curve_samples=2, max_new_tokens=32, warmstart_steps=30, redundancy_problems=0,
             early_exit_steps=0)


# -- one run (executed in a worker process) --------------------------------------------------------


def _worker_init(threads: int) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def curve_point(model, tokenizer, n_problems: int, samples: int, max_new_tokens: int) -> dict:
    """Accuracy, mean length and redundancy of `samples` completions of each of the first n held-out
    problems (fixed sampling seed). Redundancy: tokens the task's segment grammar labels restate /
    check / filler (`mi_diagnostic.segment_labels`), per completion and as a share of its tokens."""
    import torch

    from iapo_openrlhf.local.rollout import generate
    from iapo_openrlhf.rewards import batch_rewards
    from iapo_openrlhf.tasks.synthetic import REDUNDANT_KINDS, SyntheticTask
    from mi_diagnostic import segment_labels

    problems = SyntheticTask(EVAL_SEED).problems("test", n_problems)
    chosen = [p for p in problems for _ in range(samples)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EVAL_SEED + 1)
        out = generate(model, tokenizer, [p.prompt for p in chosen], max_new_tokens=max_new_tokens, temperature=1.0)
    results = batch_rewards(out.completions, [str(p.answer) for p in chosen], "paper", think_in_prompt=True)
    a = out.action_mask.shape[1]
    lengths, redundant, other = [], [], []
    for i, problem in enumerate(chosen):
        n = int(out.lengths[i]) - int(not bool(out.truncated[i]))  # tokens without EOS, as iapo-eval counts
        ids = out.sequences[i, -a:][:n].tolist()
        kinds, _ = segment_labels([tokenizer.decode([t]) for t in ids], problem)
        lengths.append(n)
        redundant.append(sum(k in REDUNDANT_KINDS for k in kinds))
        other.append(sum(k == "other" for k in kinds))
    total = max(1, sum(lengths))
    return {"accuracy": statistics.fmean(r.correct for r in results), "mean_length": statistics.fmean(lengths),
            "redundant_tokens": statistics.fmean(redundant), "redundant_frac": sum(redundant) / total,
            "unparsed_frac": sum(other) / total}


def iapo_eval(model_dir: Path, out_dir: Path, name: str, n_problems: int, max_new_tokens: int) -> dict:
    """`iapo-eval` on the shared held-out problems (stdout kept in out_dir/iapo_eval.log)."""
    from iapo_openrlhf.cli.eval import main as eval_main

    argv = ["--model", str(model_dir), "--data", "synthetic", "--k", ",".join(map(str, KS)),
            "--num", str(n_problems), "--seed", str(EVAL_SEED), "--max-new-tokens", str(max_new_tokens),
            "--name", name, "--backend", "hf", "--out", str(out_dir)]
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(io.StringIO()):
        code = eval_main(argv)
    (out_dir / "iapo_eval.log").write_text("iapo-eval " + " ".join(argv) + "\n" + buffer.getvalue())
    if code != 0:
        raise RuntimeError(f"iapo-eval failed ({code}) for {model_dir}")
    return json.loads((out_dir / "metrics.json").read_text())["methods"][name]


def run_one(job: dict) -> dict:
    """Train one (method, seed) for the rollout budget, evaluate it, write summary.json."""
    import torch

    from iapo_openrlhf.config import load_config
    from iapo_openrlhf.local.trainer import LocalTrainer

    run_dir = Path(job["run_dir"])
    summary_path = run_dir / "summary.json"
    if summary_path.exists() and not job["force"]:
        return json.loads(summary_path.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    overrides = [
        f"seed={job['seed']}", f"model.path={job['init']}", "data.task=synthetic", "data.num_test=8",
        "rollout.prompts_per_step=8", "rollout.n_samples_per_prompt=8", f"rollout.max_new_tokens={job['max_new_tokens']}",
        "rollout.temperature=1.0", f"train.steps={job['steps']}", f"train.lr={job['lr']}", "train.kl_coef=0.001",
        "eval.every=0", "output.save_every=0", f"output.dir={run_dir}",
        *METHODS[job["method"]], *job["extra"],
    ]
    if job["method"] == "dapo":
        overrides.append(f"dapo.overlong_buffer={min(16, job['max_new_tokens'] // 4)}")
    cfg = load_config(None, overrides)
    trainer = LocalTrainer(cfg, progress=False)
    trainer.setup(resume=False)
    per_step = cfg.rollout.prompts_per_step * cfg.rollout.n_samples_per_prompt
    budget = job["steps"] * per_step
    curve = [{"step": 0, "rollouts": 0, **job["curve0"]}]
    records, rollouts = [], 0
    t_start = time.perf_counter()
    while rollouts < budget:
        record = trainer.train_step()
        trainer.step += 1
        rollouts += record["sampled_groups"] * cfg.rollout.n_samples_per_prompt
        record["rollouts"] = rollouts
        records.append(record)
        trainer._log(record)
        if trainer.step % job["curve_every"] == 0 or rollouts >= budget:
            point = curve_point(trainer.model, trainer.tokenizer, job["curve_problems"], job["curve_samples"],
                                job["max_new_tokens"])
            curve.append({"step": trainer.step, "rollouts": rollouts, **point})
    train_seconds = time.perf_counter() - t_start
    final_redundancy = None
    if job["redundancy_problems"]:
        final_redundancy = curve_point(trainer.model, trainer.tokenizer, job["redundancy_problems"],
                                       job["curve_samples"], job["max_new_tokens"])
    final = run_dir / "final"
    trainer.model.save_pretrained(final)
    trainer.tokenizer.save_pretrained(final)
    t0 = time.perf_counter()
    metrics = iapo_eval(final, run_dir / "eval", job["method"], job["eval_problems"], job["max_new_tokens"])
    summary = {
        "method": job["method"], "seed": job["seed"], "steps": trainer.step, "rollouts": rollouts,
        "budget_rollouts": budget, "eval": metrics, "curve": curve, "final_redundancy": final_redundancy,
        "train": [{k: r[k] for k in ("step", "rollouts", "accuracy", "mean_length", "reward", "kl", "time_rollout",
                                     "time_mi", "time_update", "sampled_groups") if k in r}
                  | {k: r[k] for k in ("mi_mean", "mi_std", "mi_pos_frac") if k in r} for r in records],
        "time": {k: statistics.fmean(r[f"time_{k}"] for r in records) for k in ("rollout", "mi", "update")},
        "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - t0,
        "threads": torch.get_num_threads(), "overrides": overrides,
    }
    summary["time"]["step"] = sum(summary["time"].values())
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def eval_initial(job: dict) -> dict:
    """The warm start through iapo-eval and its step-0 curve point (shared by every run)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(job["out"]) / "initial_eval.json"
    if path.exists() and not job["force"]:
        return json.loads(path.read_text())
    metrics = iapo_eval(Path(job["init"]), Path(job["out"]) / "initial_eval", "warm start", job["eval_problems"],
                        job["max_new_tokens"])
    tokenizer = AutoTokenizer.from_pretrained(job["init"])
    model = AutoModelForCausalLM.from_pretrained(job["init"]).eval()
    with torch.no_grad():
        curve0 = curve_point(model, tokenizer, job["curve_problems"], job["curve_samples"], job["max_new_tokens"])
        final_redundancy = None
        if job["redundancy_problems"]:
            final_redundancy = curve_point(model, tokenizer, job["redundancy_problems"], job["curve_samples"],
                                           job["max_new_tokens"])
    result = {"eval": metrics, "curve0": curve0, "final_redundancy": final_redundancy}
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


# -- aggregation and reports -----------------------------------------------------------------------


def concise_length(n_problems: int) -> float:
    """Mean tokens (no EOS) of the generator's trace with no redundant segment, over the held-out
    problems: the shortest complete answer the task's grammar allows."""
    import random

    from iapo_openrlhf.tasks.synthetic import SyntheticTask

    task = SyntheticTask(EVAL_SEED, redundancy=0.0)
    rng = random.Random(0)
    return statistics.fmean(len(task.sample_trace(p, rng).token_ids) for p in task.problems("test", n_problems))


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(summaries: list[dict], initial: dict, methods: list[str]) -> dict:
    per_method = {}
    for method in methods:
        runs = sorted((s for s in summaries if s["method"] == method), key=lambda s: s["seed"])
        if not runs:
            continue
        agg = {"seeds": [r["seed"] for r in runs], "steps": [r["steps"] for r in runs],
               "rollouts": [r["rollouts"] for r in runs]}
        for key in [f"{m}@{k}" for k in KS for m in ("P", "L", "R")] + ["accuracy", "mean_length"]:
            agg[key] = mean_std([r["eval"][key] for r in runs])
        for key in ("rollout", "mi", "update", "step"):
            agg[f"time_{key}"] = mean_std([r["time"][key] for r in runs])
        for key in ("redundant_tokens", "redundant_frac"):
            agg[key] = mean_std([(r.get("final_redundancy") or r["curve"][-1]).get(key, math.nan) for r in runs])
        per_method[method] = agg
    return {"initial": initial["eval"], "initial_curve": initial.get("final_redundancy") or initial["curve0"],
            "methods": per_method}


def _pm(value: tuple[float, float], fmt: str) -> str:
    mean, std = value
    return "n.a." if math.isnan(mean) else f"{format(mean, fmt)} ± {format(std, fmt)}"


def target_checks(agg: dict) -> list[tuple[str, str, str]]:
    m = agg["methods"]
    if "iapo" not in m or "grpo" not in m:
        return []
    iapo, grpo = m["iapo"], m["grpo"]
    checks = []
    ratio = iapo["L@8"][0] / grpo["L@8"][0]
    checks.append(("IAPO L@8 <= 0.75 x GRPO's", f"{ratio:.3f} x ({iapo['L@8'][0]:.2f} vs {grpo['L@8'][0]:.2f})",
                   "PASS" if ratio <= 0.75 else "FAIL"))
    gap = iapo["P@8"][0] - grpo["P@8"][0]
    checks.append(("IAPO P@8 within 2 points of GRPO's", f"{100 * gap:+.2f} points", "PASS" if abs(gap) <= 0.02 else "FAIL"))
    best = max(m, key=lambda k: m[k]["R@8"][0])
    checks.append(("IAPO has the best R@8", f"best: {best} ({m[best]['R@8'][0]:.3e})", "PASS" if best == "iapo" else "FAIL"))
    t = iapo["time_step"][0] / grpo["time_step"][0]
    checks.append(("IAPO step time <= 1.5 x GRPO's (MI pass included)", f"{t:.2f} x", "PASS" if t <= 1.5 else "FAIL"))
    # issue 18: the MI term, not the exploration term, removes the redundancy that outcome reward leaves
    red0 = agg["initial_curve"].get("redundant_tokens", math.nan)
    keep = grpo["redundant_tokens"][0] / red0
    checks.append(("GRPO keeps >= 1/2 of the warm start's redundant tokens",
                   f"{keep:.3f} x ({grpo['redundant_tokens'][0]:.2f} vs {red0:.2f})", "PASS" if keep >= 0.5 else "FAIL"))
    for name in ("iapo", "iapo_alpha0", "iapo_beta0", "iapo_l2", "iapo_authors", "significance"):
        if name not in m:
            continue
        r = m[name]["redundant_tokens"][0] / grpo["redundant_tokens"][0]
        gap = m[name]["accuracy"][0] - grpo["accuracy"][0]
        holds = r <= 0.5 and abs(gap) <= 0.02
        want = "does not" if name == "iapo_alpha0" else ""
        label = (f"{name}: redundant tokens <= 1/2 x GRPO's and accuracy within 2 points"
                 + (" (target: it does NOT)" if want else ""))
        verdict = ("PASS" if not holds else "FAIL") if want else ("PASS" if holds else "FAIL")
        if name not in ("iapo", "iapo_alpha0"):
            verdict = "holds" if holds else "does not hold"
        checks.append((label, f"{r:.3f} x ({m[name]['redundant_tokens'][0]:.2f} vs {grpo['redundant_tokens'][0]:.2f}); "
                              f"accuracy {100 * gap:+.2f} points", verdict))
    return checks


def markdown(agg: dict, meta: dict) -> str:
    header = "| Method | " + " | ".join(f"{m}@{k}" for k in KS for m in ("P", "L", "R")) + " |"
    lines = [header, "|---|" + ":---:|" * (3 * len(KS))]
    fmt = {"P": ".4f", "L": ".2f", "R": ".2e"}
    init = agg["initial"]
    lines.append("| warm start (no RL) | " + " | ".join(
        format(init[f"{m}@{k}"], fmt[m]) for k in KS for m in ("P", "L", "R")) + " |")
    for method, a in agg["methods"].items():
        lines.append(f"| {method} | " + " | ".join(_pm(a[f"{m}@{k}"], fmt[m]) for k in KS for m in ("P", "L", "R")) + " |")
    grpo = agg["methods"].get("grpo")
    ic = agg["initial_curve"]
    red_lines = ["| Method | accuracy (mean of all samples) | mean length | redundant tokens / completion "
                 "| redundant share |", "|---|" + ":---:|" * 4,
                 f"| warm start (no RL) | {init['accuracy']:.4f} | {init['mean_length']:.2f} | "
                 f"{ic.get('redundant_tokens', math.nan):.2f} | {ic.get('redundant_frac', math.nan):.3f} |"]
    time_lines = ["| Method | rollout s/step | MI s/step | update s/step | step s | x GRPO | updates | rollouts |",
                  "|---|" + ":---:|" * 7]
    for method, a in agg["methods"].items():
        ratio = a["time_step"][0] / grpo["time_step"][0] if grpo else math.nan
        red_lines.append(f"| {method} | {_pm(a['accuracy'], '.4f')} | {_pm(a['mean_length'], '.2f')} | "
                         f"{_pm(a['redundant_tokens'], '.2f')} | {_pm(a['redundant_frac'], '.3f')} |")
        time_lines.append(
            f"| {method} | {_pm(a['time_rollout'], '.3f')} | {_pm(a['time_mi'], '.3f')} | {_pm(a['time_update'], '.3f')} | "
            f"{_pm(a['time_step'], '.3f')} | {ratio:.2f} | {'/'.join(map(str, a['steps']))} | "
            f"{'/'.join(map(str, a['rollouts']))} |")
    checks = ["| target | measured | |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in target_checks(agg)]
    return "\n".join([
        f"Held-out: {meta['eval_problems']} problems of the synthetic test split x 8 samples (iapo-eval, temperature 1.0, "
        f"{meta['max_new_tokens']} new tokens); mean ± std over seeds {meta['seeds']}; {meta['steps']} steps x 64 rollouts "
        f"per run, lr {meta['lr']}. A complete answer with no redundant segment has {meta['concise_length']:.2f} tokens "
        "on average on these problems (the floor of L@k without skipping a step).", "", *lines, "",
        f"Redundancy of {meta['curve_samples']} samples x the first "
        f"{meta.get('redundancy_problems') or meta['curve_problems']} held-out problems, labelled "
        "with the task's segment grammar (scripts/mi_diagnostic.py):", "", *red_lines, "",
        f"Step time (mean over steps; {meta['workers']} runs at a time, {meta['threads']} torch thread(s) each). "
        "MI s/step is the pass before the update: the MI estimator for IAPO and its ablations (it also gives pi_old), "
        "a plain log-prob forward for GRPO/DAPO.", "", *time_lines, "", *checks, ""])


def plots(out: Path, summaries: list[dict], agg: dict, methods: list[str]) -> list[Path]:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    fig = Figure(figsize=(15, 8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    top = ("mean_length", "accuracy", "redundant_tokens")
    bottom = ("mean_length", "accuracy", "kl")
    for method in methods:
        runs = [s for s in summaries if s["method"] == method]
        if not runs:
            continue
        # held-out curves, mean +- std over seeds at the evaluation points every seed has
        points = sorted({p["step"] for r in runs for p in r["curve"]})
        for col, key in enumerate(top):
            xs, ms, ss = [], [], []
            for step in points:
                vals = [p for r in runs for p in r["curve"] if p["step"] == step]
                if len(vals) == len(runs):
                    xs.append(np.mean([p["rollouts"] for p in vals]))
                    ms.append(np.mean([p[key] for p in vals]))
                    ss.append(np.std([p[key] for p in vals]))
            xs, ms, ss = map(np.array, (xs, ms, ss))
            ax = axes[0, col]
            ax.plot(xs, ms, marker="o", ms=3, color=colors[method], label=method)
            ax.fill_between(xs, ms - ss, ms + ss, color=colors[method], alpha=0.15)
        # training batches, moving average over 10 steps, mean over seeds
        n = min(len(r["train"]) for r in runs)
        for col, key in enumerate(bottom):
            if not n:
                continue
            series = np.mean([[t.get(key, np.nan) for t in r["train"][:n]] for r in runs], axis=0)
            w = min(10, n)
            smooth = np.convolve(series, np.ones(w) / w, mode="valid")
            x = np.mean([[t["rollouts"] for t in r["train"][:n]] for r in runs], axis=0)[w - 1:]
            axes[1, col].plot(x, smooth, marker="." if len(x) < 5 else None, color=colors[method], label=method)
    titles = [("held-out mean length (tokens)", "held-out accuracy", "held-out redundant tokens per completion"),
              ("training batch mean length (10-step moving avg.)", "training batch accuracy (10-step moving avg.)",
               "KL to the warm start (k3, 10-step moving avg.)")]
    for row in range(2):
        for col in range(3):
            ax = axes[row, col]
            ax.set_title(titles[row][col], fontsize=10)
            ax.set_xlabel("rollouts sampled (mean over seeds)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    curves = out / "curves.png"
    fig.savefig(curves, dpi=100)

    fig = Figure(figsize=(6.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    init = agg["initial"]
    ax.scatter([init["mean_length"]], [init["accuracy"]], marker="*", s=160, color="k", label="warm start")
    for method in methods:
        runs = [s for s in summaries if s["method"] == method]
        if not runs:
            continue
        ax.scatter([r["eval"]["mean_length"] for r in runs], [r["eval"]["accuracy"] for r in runs],
                   color=colors[method], alpha=0.35, s=18)
        a = agg["methods"][method]
        ax.errorbar(a["mean_length"][0], a["accuracy"][0], xerr=a["mean_length"][1], yerr=a["accuracy"][1],
                    fmt="o", color=colors[method], capsize=3, label=method)
    ax.set_xlabel("mean completion length on held-out problems (tokens, L@8)")
    ax.set_ylabel("accuracy (mean over 8 samples, pass@1)")
    ax.set_title("Final accuracy against length (dots: seeds; bars: mean ± std)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    scatter = out / "accuracy_vs_length.png"
    fig.savefig(scatter, dpi=110)
    return [curves, scatter]


# -- main ------------------------------------------------------------------------------------------


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n.a."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="CPU-scale reproduction: GRPO, DAPO, IAPO and ablations on the synthetic task.")
    parser.add_argument("--out", default="runs/repro")
    parser.add_argument("--smoke", action="store_true", help="1 seed, 2 steps, tiny warm start and evaluation (CI)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma separated, from {list(METHODS)}, or 'all' (default: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--seeds", help=f"RL seeds (default {FULL['seeds']})")
    parser.add_argument("--steps", type=int, help=f"steps of 64 rollouts per run: the rollout budget (default {FULL['steps']})")
    parser.add_argument("--lr", type=float, help=f"RL learning rate (default {FULL['lr']})")
    parser.add_argument("--workers", type=int, help=f"parallel runs (default {FULL['workers']})")
    parser.add_argument("--threads", type=int, help=f"torch threads per run (default {FULL['threads']})")
    parser.add_argument("--eval-problems", type=int, help=f"held-out problems for iapo-eval (default {FULL['eval_problems']})")
    parser.add_argument("--curve-every", type=int, help=f"steps between learning-curve points (default {FULL['curve_every']})")
    parser.add_argument("--curve-problems", type=int)
    parser.add_argument("--curve-samples", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--warmstart-steps", type=int)
    parser.add_argument("--redundancy-problems", type=int,
                        help="after training, redundancy of --curve-samples samples x this many held-out problems "
                             "(the number the redundancy table and targets use; default 0: the last curve point)")
    parser.add_argument("--variant", choices=["classic", "neutral", "preamble"], default="classic",
                        help="task variant of the warm start's traces (issue 18: neutral, preamble)")
    parser.add_argument("--early-exit-weight", type=float, default=0.0,
                        help="warm start: weight of the early-exit answer loss (0: plain SFT, the issue-7 study)")
    parser.add_argument("--early-exit-steps", type=int,
                        help="warm start: steps of the early-exit stage after the plain SFT (0: joint from the start)")
    parser.add_argument("--early-exit-lr", type=float, help="warm start: learning rate of that stage (default lr / 10)")
    parser.add_argument("--init", help="start from this saved model instead of <out>/initial")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run, e.g. --set iapo.probe_stride=4")
    parser.add_argument("--force", action="store_true", help="redo runs whose summary.json exists")
    args = parser.parse_args(argv)
    settings = dict(SMOKE if args.smoke else FULL)
    for key in settings:
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    methods = list(METHODS) if args.methods.strip() == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods:
        parser.error("--methods: empty, expected at least one method")
    if unknown:
        parser.error(f"--methods: unknown {unknown}, expected some of {list(METHODS)}")
    seeds = [int(s) for s in str(settings["seeds"]).split(",")]
    # The runs read --set in worker processes, after the warm start: check it here, in one line.
    from iapo_openrlhf.config import ConfigError, load_config

    for method in methods:
        try:
            load_config(None, ["data.task=synthetic", *METHODS[method], *args.set])
        except ConfigError as e:
            parser.error(f"{method}: {e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    load_start = load_average()

    _worker_init(settings["threads"])
    init = Path(args.init) if args.init else out / "initial"
    t0 = time.perf_counter()
    if not (init / "config.json").exists():
        from iapo_openrlhf.tasks.synthetic import SyntheticTask
        from iapo_openrlhf.tasks.warmstart import warm_start

        print(f"warm start: {settings['warmstart_steps']} SFT steps into {init}", flush=True)
        warm_start(init, seed=WARMSTART["seed"], steps=settings["warmstart_steps"], lr=WARMSTART["lr"],
                   task=SyntheticTask(WARMSTART["seed"], redundancy=WARMSTART["redundancy"], variant=args.variant),
                   num_threads=1, progress=False, early_exit_weight=args.early_exit_weight,
                   early_exit_steps=settings["early_exit_steps"], early_exit_lr=args.early_exit_lr)
    warmstart_seconds = time.perf_counter() - t0

    common = {"init": str(init.resolve()), "out": str(out.resolve()), "force": args.force,
              **{k: settings[k] for k in ("eval_problems", "curve_problems", "curve_samples", "max_new_tokens",
                                          "redundancy_problems")}}
    t0 = time.perf_counter()
    initial = eval_initial(common)
    initial_eval_seconds = time.perf_counter() - t0
    print(f"warm start on {settings['eval_problems']} held-out problems: accuracy {initial['eval']['accuracy']:.3f}, "
          f"mean length {initial['eval']['mean_length']:.1f}", flush=True)

    # Longest runs first (IAPO variants and the significance reward pay the MI pass, DAPO resamples)
    # so the pool drains evenly.
    order = {"dapo": 0, "iapo": 1, "iapo_beta0": 2, "iapo_alpha0": 3, "significance": 4, "gtpo": 5, "grpo_s": 6}
    jobs = [{**common, "method": m, "seed": s, "steps": settings["steps"], "lr": settings["lr"],
             "curve_every": settings["curve_every"], "curve0": initial["curve0"], "extra": args.set,
             "run_dir": str((out / "runs" / f"{m}_s{s}").resolve())}
            for s in seeds for m in sorted(methods, key=lambda m: order.get(m, len(order)))]
    summaries = []
    t0 = time.perf_counter()
    if settings["workers"] == 1:
        for job in jobs:
            summaries.append(run_one(job))
            print(f"  {job['method']} seed {job['seed']}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    else:
        context = get_context("spawn")
        with ProcessPoolExecutor(settings["workers"], mp_context=context, initializer=_worker_init,
                                 initargs=(settings["threads"],)) as pool:
            futures = {pool.submit(run_one, job): job for job in jobs}
            for future in as_completed(futures):
                job = futures[future]
                summaries.append(future.result())
                s = summaries[-1]
                print(f"  {job['method']} seed {job['seed']}: accuracy {s['eval']['accuracy']:.3f}, "
                      f"L@8 {s['eval']['L@8']:.1f}, {s['time']['step']:.2f} s/step "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    runs_seconds = time.perf_counter() - t0

    agg = aggregate(summaries, initial, methods)
    concise = concise_length(settings["eval_problems"])
    meta = {"seeds": seeds, "methods": methods, **settings, "smoke": args.smoke, "extra_overrides": args.set,
            "variant": args.variant, "early_exit_weight": args.early_exit_weight, "early_exit_lr": args.early_exit_lr,
            "concise_length": concise, "init": str(init), "warmstart_seconds": warmstart_seconds, "initial_eval_seconds": initial_eval_seconds,
            "runs_seconds": runs_seconds, "total_seconds": time.perf_counter() - t_start,
            "load_average_start": load_start, "load_average_end": load_average(), "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "command": "python scripts/reproduce_synthetic.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    import torch

    meta["torch"] = torch.__version__
    report = markdown(agg, meta)
    paths = plots(out, summaries, agg, methods)
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps({"meta": meta, **agg, "runs": summaries,
                                                  "targets": target_checks(agg)}, indent=1) + "\n")
    print("\n" + report)
    print(f"total {meta['total_seconds']:.0f} s (warm start {warmstart_seconds:.0f} s, runs {runs_seconds:.0f} s); "
          f"load average {load_start} -> {meta['load_average_end']}")
    print("wrote", out / "results.md", out / "results.json", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
