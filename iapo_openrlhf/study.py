"""A study: every method x training seed of one config, each run evaluated, all collected into the
paper's table (`iapo-slurm study`, README "Reproducing the paper").

Layout of a study directory (`--out`, default: the config's output.dir):
    study.json                 the manifest: config, overrides, methods, seeds, k, and per run its
                               directory and SLURM job ids (the table job reads it)
    runs/<method>-seed<seed>/  each run's output.dir (checkpoints, final model), and eval/ with
                               iapo-eval's report (selection.json, metrics.json, samples.json)
    scripts/                   the sbatch scripts as submitted
    logs/                      the jobs' logs
    table/                     the collected table (iapo_openrlhf/eval/collect.py)

The GPU-hour figures are an ESTIMATE from the settings (`estimate_gpu_hours`), not a measurement:
FLOPs of the PPO passes at an assumed utilisation, plus rollout and evaluation time from assumed
decode speeds and completion lengths, all listed below.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STUDY_FILE = "study.json"  # the manifest: written by iapo-slurm study, read by the table job
TABLE_DIR = "table"
PAPER_METHODS = ("grpo", "dapo", "gfpo", "gtpo", "sgrpo", "iapo")


@dataclass
class Run:
    method: str
    seed: int
    dir: Path

    @property
    def name(self) -> str:
        return f"{self.method}-seed{self.seed}"


def plan(study_dir: Path, methods: list[str], seeds: list[int]) -> list[Run]:
    return [Run(m, s, study_dir / "runs" / f"{m}-seed{s}") for m in methods for s in seeds]


# -- the estimate ------------------------------------------------------------------------------------

# Assumptions (an H100-class GPU; change them here and the README's table with them):
PEAK_FLOPS = 989e12  # bf16 dense
MFU = 0.35  # utilisation of the PPO forward/backward passes
STEP_OVERHEAD_S = 10.0  # weight sync to vLLM, wake/sleep of colocated engines, scheduling, per step
# mean prompt tokens with the authors' prompt, mean completion tokens during training and evaluation
# (GSM8K: the paper's L@k is 84-243 tokens; MATH / DAPO: assumed about 3x longer)
TOKENS = {"gsm8k": (250, 250), "math500": (300, 600), "dapo17k": (300, 700)}
DEFAULT_TOKENS = (300, 500)
TAIL = 4  # the slowest completion of a rollout batch is this many times the mean (capped by the budget)
# one sequence's decode speed in a batch (tokens/s) and one GPU's batched throughput (tokens/s), vLLM
DECODE = {"0.5b": 250.0, "1.5b": 200.0, "7b": 100.0}
THROUGHPUT = {"0.5b": 40_000.0, "1.5b": 20_000.0, "7b": 8_000.0}
PARAMS = {"0.5b": 0.49e9, "1.5b": 1.54e9, "7b": 7.6e9}
# validation and test problems of configs/paper/'s splits
SPLITS = {"gsm8k": (500, 1319), "math500": (50, 100), "dapo17k": (200, 1400)}
POSTFIX_TOKENS = 5  # "</think><answer>" in Qwen2.5's tokenizer: each response token is probed with these
CHECKPOINT_VALIDATION_SAMPLES = 8


def model_size(name: str | None) -> str | None:
    match = re.search(r"(\d+(?:\.\d+)?)b\b", (name or "").lower())
    return f"{match.group(1)}b" if match and f"{match.group(1)}b" in PARAMS else None


def dataset_of(cfg: Any) -> str | None:
    text = f"{cfg.data.train_path} {cfg.output.dir}".lower()
    for name in TOKENS:
        if name in text or name.replace("17k", "") in text:
            return name
    return None


def estimate_gpu_hours(cfg: Any, *, seeds: int = 3) -> dict[str, float] | None:
    """GPU-hours of one run (training, then iapo-eval's selection and test protocol), ESTIMATED from
    the config; None for a model size without assumptions."""
    from .config import group_size, needs_mi

    size = model_size(cfg.model.path)
    if size is None:
        return None
    n = PARAMS[size]
    dataset = dataset_of(cfg)
    prompt, completion = TOKENS.get(dataset, DEFAULT_TOKENS)
    val_problems, test_problems = SPLITS.get(dataset, (500, 1000))
    completion = min(completion, cfg.rollout.max_new_tokens)
    gpus = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    sequences = cfg.rollout.prompts_per_step * cfg.rollout.n_samples_per_prompt
    tokens = sequences * (prompt + completion)
    # actor forward + backward with recomputation (8 N per token), pi_old and reference forwards (2 N each)
    flops = (8 + 2 + 2) * n * group_size(cfg) / cfg.rollout.n_samples_per_prompt * tokens * cfg.train.ppo_epochs
    if needs_mi(cfg):  # the early-exit probes: POSTFIX_TOKENS more tokens per response token
        flops += 2 * n * POSTFIX_TOKENS * sequences * completion
    tail = min(cfg.rollout.max_new_tokens, TAIL * completion)
    step_s = tail / DECODE[size] + STEP_OVERHEAD_S + flops / (gpus * PEAK_FLOPS * MFU)
    train = cfg.train.steps * step_s * gpus / 3600
    checkpoints = cfg.train.steps // cfg.output.save_every + 1 if cfg.output.save_every else 1
    selection = checkpoints * (val_problems * CHECKPOINT_VALIDATION_SAMPLES * completion / THROUGHPUT[size] + 60) / 3600
    # the protocol's per-problem timing: each problem's slowest of its 32 completions, one problem at a time
    test = seeds * test_problems * min(cfg.rollout.max_new_tokens, TAIL * completion) / DECODE[size] / 3600
    return {"train": train, "selection": selection, "test": test, "total": train + selection + test,
            "step_seconds": step_s, "gpus": gpus}


def _span(values: list[float]) -> str:
    low, high = f"{min(values):.0f}", f"{max(values):.0f}"
    return low if low == high else f"{low}-{high}"


def format_estimate(configs: list[Any]) -> str:
    """One line for `iapo-slurm study --dry-run`: the estimate summed over the study's runs (one
    resolved config each: the methods differ in group size and MI probes)."""
    estimates = [estimate_gpu_hours(cfg) for cfg in configs]
    if not estimates or any(e is None for e in estimates):
        model = configs[0].model.path if configs else None
        return f"no GPU-hour estimate for model {model} (sizes with assumptions: {', '.join(PARAMS)})"
    train = _span([e["train"] for e in estimates])
    evaluation = _span([e["selection"] + e["test"] for e in estimates])
    step = _span([e["step_seconds"] for e in estimates])
    total = math.ceil(sum(e["total"] for e in estimates))
    return (f"estimated GPU-hours (an estimate from the settings, README 'Reproducing the paper'): per run "
            f"{train} training ({estimates[0]['gpus']} GPUs, ~{step} s a step) + {evaluation} evaluation; "
            f"{len(configs)} run(s): ~{total}")
