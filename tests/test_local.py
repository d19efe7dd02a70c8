"""The local backend end to end at toy scale: config errors, training runs, exact resume."""

from __future__ import annotations

import json
import re
import os
from pathlib import Path

import pytest

from iapo_openrlhf.cli.eval import main as eval_main
from iapo_openrlhf.cli.train import main as train_main
from iapo_openrlhf.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k"
TOY = [
    "model.warmstart_steps=3", "rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=4",
    "rollout.max_new_tokens=24", "data.num_test=3", "eval.k=[1,2]", "dapo.overlong_buffer=4",
    "train.micro_batch_size=3",
]


def _steps(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if "eval" not in r]


def _train(tmp: Path, *extra: str, config: str = "configs/local_tiny.yaml", resume: bool = False) -> int:
    args = ["--config", str(REPO / config), "--quiet", "--set", f"output.dir={tmp}"]
    for item in (*TOY, *extra):
        args += ["--set", item]
    return train_main(args + (["--resume"] if resume else []))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["nosuch.key=1"], "nosuch: unknown key"),
        (["iapo.alfa=1"], "iapo.alfa: unknown key"),
        (["iapo.alpha=-0.5"], "iapo.alpha: got -0.5, expected a value >= 0"),
        (["rollout.n_samples_per_prompt=1"], "rollout.n_samples_per_prompt: got 1, expected >= 2"),
        (["train.steps=abc"], "train.steps: got 'abc' (str), expected int"),
        (["method=ppo"], "method: got 'ppo', expected one of"),
        (["data.task=jsonl", "data.train_path=/no/such.jsonl", "data.test_path=/no/such.jsonl"],
         "data.train_path: /no/such.jsonl does not exist"),
        (["dapo.dynamic_sampling=yes please"], "dapo.dynamic_sampling: got 'yes please', expected true or false"),
        (["iapo"], "--set iapo: expected key=value"),
    ],
)
def test_config_errors_are_one_line_exit_2(overrides, message, capsys, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(str(REPO / "configs/local_tiny.yaml"), overrides)
    args = ["--config", str(REPO / "configs/local_tiny.yaml")]
    for o in overrides:
        args += ["--set", o]
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("iapo-train: error: ") and message in err and "\n" not in err


def test_missing_config_file(capsys):
    assert train_main(["--config", "/no/such.yaml"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_every_shipped_config_validates():
    for path in sorted((REPO / "configs").glob("local_*.yaml")):
        cwd = os.getcwd()
        os.chdir(REPO)
        try:
            # the GSM8K config points at ../shared: check its files only where they are
            load_config(str(path), local_files=GSM8K.exists())
        finally:
            os.chdir(cwd)


def test_two_steps_synthetic_then_eval_cli(tmp_path, capsys):
    assert _train(tmp_path, "train.steps=2", "eval.every=0", "output.save_every=1") == 0
    steps = _steps(tmp_path / "metrics.jsonl")
    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:
        assert 0 <= s["accuracy"] <= 1 and s["mean_length"] > 0 and s["groups"] == 2
        assert s["time_rollout"] > 0 and s["time_mi"] > 0 and s["time_update"] > 0
        assert "mi_mean" in s and s["grad_norm"] > 0
    assert (tmp_path / "final" / "config.json").exists()
    assert (tmp_path / "checkpoints" / "step_2" / "trainer_state.pt").exists()
    out = capsys.readouterr().out
    assert "| before RL |" in out and "| after RL |" in out
    rc = eval_main(["--model", str(tmp_path / "final"), "--data", "synthetic", "--k", "1,2", "--num", "3",
                    "--max-new-tokens", "16", "--backend", "hf", "--out", str(tmp_path / "eval")])
    assert rc == 0
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())["methods"]["final"]
    assert result["num_problems"] == 3 and 0 <= result["P@2"] <= 1
    assert (tmp_path / "eval" / "accuracy_vs_length.png").stat().st_size > 0


@pytest.mark.parametrize("method", ["grpo", "dapo"])
def test_baselines_run(tmp_path, method):
    assert _train(tmp_path, f"method={method}", "train.steps=1", "eval.every=0", "output.save_every=0") == 0
    (step,) = _steps(tmp_path / "metrics.jsonl")
    assert "mi_mean" not in step  # alpha = beta = 0: no MI pass
    if method == "dapo":
        assert step["sampled_groups"] >= 2


@pytest.mark.skipif(not GSM8K.exists(), reason="../shared/data/gsm8k not beside the checkout")
def test_two_steps_gsm8k(tmp_path):
    rc = _train(tmp_path, f"data.train_path={GSM8K / 'train.jsonl'}", f"data.test_path={GSM8K / 'test.jsonl'}",
                "model.path=null", config="configs/local_gsm8k_tiny.yaml")
    assert rc == 0
    steps = _steps(tmp_path / "metrics.jsonl")
    assert [s["step"] for s in steps] == [1, 2]
    # A random tiny model never answers right: the paper scheme gives -1 (wrong) - 0.5 (unformatted).
    assert all(s["reward"] == -1.5 for s in steps)


def test_resume_continues_exactly(tmp_path):
    common = ("eval.every=0", "output.save_every=1")
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(full, "train.steps=3", *common) == 0
    assert _train(part, "train.steps=1", *common) == 0
    assert _train(part, "train.steps=3", *common, resume=True) == 0
    a, b = _steps(full / "metrics.jsonl"), _steps(part / "metrics.jsonl")
    assert [s["step"] for s in b] == [1, 2, 3]
    for x, y in zip(a, b):
        for key in x:
            if not key.startswith("time_"):
                assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (x["step"], key)
    # a save interrupted by preemption leaves step_N.tmp: resume ignores it
    import shutil

    shutil.copytree(part / "checkpoints" / "step_3", part / "checkpoints" / "step_4.tmp")
    # resuming a finished run (a requeued SLURM job) trains nothing and reports the logged table
    assert _train(part, "train.steps=3", *common, resume=True) == 0
    assert [s["step"] for s in _steps(part / "metrics.jsonl")] == [1, 2, 3]


def test_resume_without_checkpoint_is_an_error(tmp_path, capsys):
    assert _train(tmp_path, "train.steps=1", resume=True) == 2
    assert "--resume: no checkpoint" in capsys.readouterr().err
