"""Helpers for the tests that run `iapo-train-ray --cpu` for real (test_ray_cpu.py,
test_methods_plugin.py): the inputs (GSM8K prompts, a tiny random Qwen2), one run's command, and
readers for what OpenRLHF and --cpu write (TensorBoard scalars, the run's event log)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
GSM8K = REPO.parent / "shared" / "data" / "gsm8k"
CONFIG = REPO / "configs" / "ray_tiny.yaml"
# The share of digits in each response: the tiny random model never answers GSM8K, and the
# project's reward would give every sample the same value (all advantages 0, nothing to compare).
REWARD = REPO / "tests" / "data" / "digits_reward.py"
BIN = Path(sys.executable).parent
RUN_TIMEOUT = 420
EVENTS = Path("ckpt") / "cpu_run_events.jsonl"

needs_gsm8k = pytest.mark.skipif(not (GSM8K / "train.jsonl").exists(), reason="../shared/data/gsm8k not beside the checkout")


def _env(extra: dict | None = None) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # --cpu starts its own Ray
    return {**environ, **(extra or {})}


def run(cmd: list, log: Path, env: dict | None = None, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                            env=_env(env), cwd=REPO)
    log.write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
    return result


def prepare_inputs(work: Path) -> SimpleNamespace:
    """64 train and 8 test GSM8K prompts and the tiny model of configs/ray_tiny.yaml, under work."""
    py = sys.executable
    for split, limit in (("train", 64), ("test", 8)):
        prep = run([py, REPO / "scripts" / "prepare_data.py", "gsm8k", "--input", GSM8K / f"{split}.jsonl",
                    "--split", split, "--limit", limit, "--out", work / f"{split}.jsonl"], work / f"prep_{split}.log")
        assert prep.returncode == 0, prep.stderr
    tiny = run([py, "-m", "iapo_openrlhf.local.tiny", "--config", CONFIG, "--set", f"data.train_path={work / 'train.jsonl'}",
                "--out", work / "model"], work / "tiny.log")
    assert tiny.returncode == 0, tiny.stderr
    return SimpleNamespace(work=work, model=work / "model", train=work / "train.jsonl", test=work / "test.jsonl")


def train_cmd(inputs: SimpleNamespace, out: Path, *extra) -> list:
    """`iapo-train-ray --cpu` on configs/ray_tiny.yaml with these inputs, writing under out."""
    return [
        BIN / "iapo-train-ray", "--cpu", "--config", CONFIG,
        "--set", f"model.path={inputs.model}", "--set", f"data.train_path={inputs.train}",
        "--set", f"data.test_path={inputs.test}", "--set", f"output.dir={out}",
        "--reward.remote_url", REWARD, *extra,
    ]


def run_and_signal(cmd: list, log: Path, events: Path, at_step: int, signum: int = signal.SIGTERM,
                   env: dict | None = None) -> subprocess.CompletedProcess:
    """Run cmd and send it `signum` once its trainer has started step `at_step` (the event log's
    `generate_samples` event of this process's run), i.e. in the middle of the run."""
    out_path, err_path = log.with_suffix(".stdout"), log.with_suffix(".stderr")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, env=_env(env), cwd=REPO)
        deadline, sent = time.time() + RUN_TIMEOUT, False
        while proc.poll() is None and time.time() < deadline:
            if not sent and events.exists():
                rows = read_events(events)
                run_id = next((e["run"] for e in rows if e["event"] == "launch" and e["pid"] == proc.pid), None)
                if any(e["event"] == "generate_samples" and e["run"] == run_id and e["next_step"] == at_step
                       for e in rows):
                    proc.send_signal(signum)
                    sent = True
            time.sleep(0.05)  # a tiny model's step takes about a second: signal well inside it
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out_path.read_text(), err_path.read_text())
    log.write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
    out_path.unlink()
    err_path.unlink()
    assert sent, f"step {at_step} never started (log: {log}):\n{result.stderr[-4000:]}"
    return result


def read_events(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def runs_of(events: list[dict]) -> list[list[dict]]:
    """The event log split by run (one per iapo-train-ray process), in launch order."""
    order = [e["run"] for e in events if e["event"] == "launch"]
    return [[e for e in events if e["run"] == run] for run in order]


def scalars(tensorboard_dir: Path) -> dict[int, dict[str, float]]:
    """{global step: {tag: value}} from every TensorBoard event file OpenRLHF wrote."""
    return {step: {tag: values[-1] for tag, values in tags.items()}
            for step, tags in scalar_history(tensorboard_dir).items()}


def scalar_history(tensorboard_dir: Path) -> dict[int, dict[str, list[float]]]:
    """{global step: {tag: every value logged for it}}: a step logged twice (redone) has two."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps: dict[int, dict[str, list[float]]] = {}
    for path in sorted(tensorboard_dir.rglob("events.out.tfevents*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):  # torch's SummaryWriter.add_scalar, as written
                    steps.setdefault(event.step, {}).setdefault(value.tag, []).append(value.simple_value)
                elif value.tensor.float_val:  # the same, as the loader's compatibility layer returns it
                    steps.setdefault(event.step, {}).setdefault(value.tag, []).append(value.tensor.float_val[0])
    return steps
