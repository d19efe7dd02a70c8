#!/usr/bin/env python
"""Collect finished runs (or a whole `iapo-slurm study`) into the paper's table: the command line of
iapo_openrlhf/eval/collect.py, where the code and its documentation are.

    python scripts/collect_results.py IAPO=runs/iapo_eval GRPO=runs/grpo_eval --k 1,4,8,16 --out results/
    python scripts/collect_results.py --study runs/paper/qwen2.5-7b_gsm8k --k 16,32
"""

from __future__ import annotations

import sys

from iapo_openrlhf.eval.collect import *  # noqa: F401,F403 - the script is the module's command line
from iapo_openrlhf.eval.collect import main

if __name__ == "__main__":
    sys.exit(main())
