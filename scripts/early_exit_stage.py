#!/usr/bin/env python
"""The early-exit stage of the issue-18 warm start, run on a saved plain warm start.

`warm_start(..., early_exit_weight=w, early_exit_steps=n, early_exit_lr=lr)` trains the plain SFT
steps first and then n steps of SFT + w x the early-exit answer loss. Stage 1 is deterministic
and saved by any plain warm start, so this script starts from that saved model instead of
training it again (10 min on the shared 2-core machine): it advances the SFT batch stream past
stage 1's batches and runs stage 2 with the same generators, optimizer and schedule, which gives
the same model as the one-call warm start (tests/test_synthetic.py checks that on a small case).

    python scripts/early_exit_stage.py --init runs/science/neutral_plain --out runs/science/neutral_ee \\
        --variant neutral --weight 0.3 --steps 500 --lr 1e-3
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from iapo_openrlhf.tasks.synthetic import VARIANTS, SyntheticTask, build_tokenizer  # noqa: E402
from iapo_openrlhf.tasks.warmstart import (  # noqa: E402
    EARLY_EXIT_POSTFIX,
    _batches,
    _early_exit_rows,
    _sft_steps,
    sft_optimizer,
    torch_threads,
)


def early_exit_stage(init: str | Path, out: str | Path, *, variant: str, weight: float, steps: int, lr: float,
                     seed: int = 0, stage1_steps: int = 1000, batch_size: int = 32, warmup_steps: int = 30,
                     n_train_problems: int = 20_000, redundancy: float = 0.8, num_threads: int = 1,
                     progress: bool = False) -> Path:
    """Stage 2 of `warm_start` on the saved stage 1 at `init` (the defaults are warm_start's and
    the study's: seed 0, 1000 plain steps, batch 32, redundancy 0.8); saves model + tokenizer."""
    from transformers import AutoModelForCausalLM

    with torch_threads(num_threads):
        task = SyntheticTask(seed, redundancy=redundancy, variant=variant)
        tokenizer = build_tokenizer()
        problems = task.problems("train", n_train_problems)
        prompt_ids = tokenizer([p.prompt for p in problems], add_special_tokens=False).input_ids
        batches = _batches(task, problems, prompt_ids, tokenizer, random.Random(f"{seed}:warm_start"), batch_size)
        for _ in range(stage1_steps):  # the batches stage 1 consumed
            next(batches)
        probes = _early_exit_rows(task, problems, prompt_ids, tokenizer, random.Random(f"{seed}:early_exit"),
                                  max(1, batch_size // 2), EARLY_EXIT_POSTFIX)
        model = AutoModelForCausalLM.from_pretrained(init)
        model.train()
        optimizer, scheduler = sft_optimizer(model, lr=lr, warmup_steps=warmup_steps, steps=steps)
        _sft_steps(model, batches, probes, weight, optimizer, scheduler, steps, "early-exit stage", progress)
        model.eval()
        out = Path(out)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init", required=True, help="a saved plain warm start (stage 1)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", choices=VARIANTS, default="neutral")
    parser.add_argument("--weight", type=float, default=0.3, help="weight of the early-exit answer loss")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--stage1-steps", type=int, default=1000, help="the plain SFT steps of --init")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    early_exit_stage(args.init, args.out, variant=args.variant, weight=args.weight, steps=args.steps, lr=args.lr,
                     stage1_steps=args.stage1_steps, progress=True)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"{time.perf_counter() - t0:.0f} s (load average {load}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
