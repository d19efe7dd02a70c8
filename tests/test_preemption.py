"""Preemption (issue 17, item 1): on SIGTERM / SIGUSR1 the step in progress ends, its checkpoint is
saved, the process exits with 128 + the signal, and a resumed run continues at the next step.

Here: the signal handling itself (in process), and the local backend end to end: `iapo-train` gets
SIGTERM in the middle of a run, then `--resume` finishes it; the metrics log has every step once
and the final weights equal those of a run that was never interrupted. The Ray backend's test
shares the runs of tests/test_ray_cpu.py (its run A is preempted, B resumes it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from iapo_openrlhf import preemption
from iapo_openrlhf.preemption import Preempted, StopSignals, exit_code

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# ── the signal handling, in this process ──


def test_exit_codes_are_128_plus_the_signal():
    assert exit_code(signal.SIGTERM) == 143 and exit_code(signal.SIGUSR1) == 138
    e = Preempted(signal.SIGTERM, 3, saved=True)
    assert "SIGTERM: saved the checkpoint of step 3; exit code 143" in str(e)
    assert "nothing to save" in str(Preempted(signal.SIGUSR1))
    import pickle

    back = pickle.loads(pickle.dumps(e))  # raised in a Ray actor, re-raised in the driver
    assert (back.signum, back.step, back.saved) == (signal.SIGTERM, 3, True)


@pytest.mark.parametrize("signum", preemption.SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_the_first_signal_is_recorded_later_ones_ignored_callbacks_run_in_a_thread(signum, capfd):
    before = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    called = []
    done = threading.Event()
    with StopSignals("prog") as stop:
        stop.on_request(lambda s: (called.append((s, threading.current_thread().name)), done.set()))
        assert stop.requested is None
        os.kill(os.getpid(), signum)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal: reported, the process keeps running
        assert done.wait(5)
        assert stop.requested == signum
        late = []
        stop.on_request(late.append)  # registered after the signal: runs at once
        deadline = time.time() + 5
        while not late and time.time() < deadline:
            time.sleep(0.01)
        assert late == [signum]
    assert called == [(signum, "iapo-stop-signals")]
    assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before  # handlers restored
    err = capfd.readouterr().err
    name = signal.Signals(signum).name
    assert f"prog: {name} received: finishing the current step, then saving a checkpoint and exiting with code " \
           f"{exit_code(signum)}" in err
    assert "prog: SIGTERM received again: still finishing the step and saving" in err


def test_an_unregistered_callback_never_runs_and_is_not_kept():
    """The Ray driver registers a relay holding the trainer actor's handle for each run of
    --methods and unregisters it after the run: the handle must not outlive it (Ray keeps an actor
    alive while a handle exists, and with it the models' processes and fake GPUs)."""
    import gc
    import weakref

    class Relay:
        def __init__(self):
            self.calls = []

        def __call__(self, signum):
            self.calls.append(signum)

    with StopSignals("prog") as stop:
        gone, kept = Relay(), Relay()
        unregister = stop.on_request(gone)
        stop.on_request(kept)
        unregister()
        ref = weakref.ref(gone)
        del gone
        gc.collect()
        assert ref() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.time() + 5
        while not kept.calls and time.time() < deadline:
            time.sleep(0.01)
        assert kept.calls == [signal.SIGUSR1]


def test_before_the_first_step_the_signal_raises_in_the_main_thread():
    with StopSignals("prog") as stop:
        stop.raise_in_main()
        with pytest.raises(Preempted, match="stopped before its first step"):
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(5)  # the handler raises here, at the next bytecode
        assert stop.requested == signal.SIGUSR1


# ── the local backend end to end ──

STEPS = 4
# configs/local_tiny.yaml cut to a few seconds a step; no periodic checkpoint (save_every 0), so the
# checkpoint the preempted run leaves is the one the signal made it write.
TOY = ["model.warmstart_steps=3", "rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=4",
       "rollout.max_new_tokens=24", "data.num_test=3", "eval.k=[1,2]", "train.micro_batch_size=3",
       f"train.steps={STEPS}", "eval.every=0", "output.save_every=0"]


def _iapo_train(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [str(BIN / "iapo-train"), "--config", str(REPO / "configs" / "local_tiny.yaml"), "--quiet",
           "--set", f"output.dir={out}", *(a for item in TOY for a in ("--set", item)), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _steps(out: Path) -> list[dict]:
    return [r for r in _records(out) if "eval" not in r]


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("preempt_local")
    full, part = base / "full", base / "part"
    uninterrupted = _iapo_train(full)
    preempted = _iapo_train(part)
    # SIGTERM once step 1 is logged: the run is then in step 2 (or its checkpoint, or step 3)
    deadline = time.monotonic() + 300
    while preempted.poll() is None and time.monotonic() < deadline and not _steps(part):
        time.sleep(0.05)
    sent_after = [r["step"] for r in _steps(part)]
    preempted.send_signal(signal.SIGTERM)
    p_out, p_err = preempted.communicate(timeout=300)
    logged = [r["step"] for r in _steps(part)]
    checkpoints = sorted(p.name for p in (part / "checkpoints").iterdir()) if (part / "checkpoints").exists() else []
    final_at_stop = (part / "final").exists()
    resumed = _iapo_train(part, "--resume")
    r_out, r_err = resumed.communicate(timeout=300)
    f_out, f_err = uninterrupted.communicate(timeout=300)
    return dict(full=full, part=part, sent_after=sent_after, logged_at_stop=logged, checkpoints_at_stop=checkpoints,
                final_at_stop=final_at_stop,
                preempted=(preempted.returncode, p_out, p_err), resumed=(resumed.returncode, r_out, r_err),
                uninterrupted=(uninterrupted.returncode, f_out, f_err))


def test_local_sigterm_saves_the_step_in_progress_and_exits_143(local_runs):
    code, _, err = local_runs["preempted"]
    assert local_runs["sent_after"] == [1], local_runs["sent_after"]
    assert code == 143, err[-3000:]
    stopped = local_runs["logged_at_stop"][-1]
    assert 1 <= stopped < STEPS, local_runs["logged_at_stop"]  # the step it was in (normally 2), no further
    assert "iapo-train: SIGTERM received: finishing the current step" in err
    assert f"iapo-train: SIGTERM: saved the checkpoint of step {stopped}; exit code 143" in err
    checkpoints = local_runs["checkpoints_at_stop"]
    assert checkpoints == [f"step_{stopped}"], checkpoints  # save_every 0: the signal's checkpoint only
    assert not local_runs["final_at_stop"]


def test_local_resume_logs_every_step_once_and_ends_with_the_uninterrupted_weights(local_runs):
    for name in ("resumed", "uninterrupted"):
        code, _, err = local_runs[name]
        assert code == 0, (name, err[-3000:])
    full, part = _steps(local_runs["full"]), _steps(local_runs["part"])
    assert [r["step"] for r in part] == list(range(1, STEPS + 1))
    for a, b in zip(full, part):
        for key in a:
            if not key.startswith("time_"):
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
    before = [r for r in _records(local_runs["part"]) if r["step"] == 0]
    assert len(before) == 1  # the initial evaluation is not redone either
    ours, reference = _final_weights(local_runs["part"]), _final_weights(local_runs["full"])
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name
