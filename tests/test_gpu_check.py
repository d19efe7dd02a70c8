"""`scripts/gpu_check.py --smoke`: the prepared GPU check's every step (plain forward, forward +
backward, estimator, naive spot check, a 1-rank DeepSpeed ZeRO-3 engine) on the CPU with a tiny
model of Qwen2.5-7B's shape, so the script is known to run when a GPU machine is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["lengths"]) == {"32", "48"}
    for row in report["lengths"].values():
        assert row["estimator"]["seconds"] > 0 and row["chunk_tokens"] > 0
        assert row["log_probs_max_diff_vs_forward"] < 0.1  # bf16: pi_old as the plain forward gives it
        assert row["naive_spot_check_max_diff"] < 0.1
    zero3 = report["zero3"]
    assert zero3["backend"] == "gloo" and zero3["gathered_once"] and zero3["max_diff_vs_plain"] == 0.0
    # the TP rank's and the fallback's collectives ran (a sliced head sums in another order: bf16 rounding)
    assert zero3["tp_rank_paths_max_diff"] < 0.1 and zero3["zero3_fallback_max_diff"] < 0.1, zero3


def test_gpu_check_refuses_a_machine_without_cuda(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1 and "no CUDA device" in run.stderr.strip().splitlines()[-1]
