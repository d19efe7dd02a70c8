"""Every method through `iapo-train` (the local backend): 2 steps each on the tiny synthetic config,
and the bad settings of every method as one-line errors with exit code 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from iapo_openrlhf.cli.train import main as train_main
from iapo_openrlhf.config import ConfigError, load_config
from iapo_openrlhf.core.methods import METHODS

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "local_tiny.yaml")
TOY = [
    "model.warmstart_steps=3", "rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=4",
    "rollout.max_new_tokens=16", "data.num_test=2", "eval.k=[1]", "dapo.overlong_buffer=4",
    "train.micro_batch_size=3", "train.steps=2", "eval.every=0", "output.save_every=0",
]
# What each run must log at every step, besides the common keys.
RUNS = {
    "grpo": ([], set()),
    "dapo": ([], {"sampled_groups"}),
    "gfpo": (["gfpo.keep=2"], {"gfpo_sampled_length", "gfpo_kept_length", "gfpo_sampled_accuracy"}),
    "gtpo": ([], {"entropy_mean"}),
    "gtpo_sequence": (["method=gtpo", "gtpo.level=sequence"], {"entropy_mean"}),
    "sgrpo": (["sgrpo.keep_first=4", "sgrpo.keep_prob=0.5"], {"sgrpo_kept_frac"}),
    "iapo": ([], {"mi_mean"}),
    "iapo_authors_norm": (["method=iapo", "iapo.shaping_norm=authors"], {"mi_mean"}),
    "ib": ([], {"ib_term"}),
    "grpo_with_ib": (["method=grpo", "ib.coef=0.01"], {"ib_term"}),
    "significance": ([], {"mi_mean", "significance_phase", "insignificant_frac", "length_reward_mean"}),
}


def _train(out: Path, *overrides: str) -> int:
    args = ["--config", CONFIG, "--quiet", "--set", f"output.dir={out}"]
    for item in (*TOY, *overrides):
        args += ["--set", item]
    return train_main(args)


def _steps(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if "eval" not in r]


def test_every_method_has_a_run():
    assert set(METHODS) <= set(RUNS)


@pytest.mark.parametrize("run", list(RUNS))
def test_two_steps(run, tmp_path):
    overrides, keys = RUNS[run]
    method = run if run in METHODS else None
    assert _train(tmp_path, *([f"method={method}"] if method else []), *overrides) == 0
    steps = _steps(tmp_path / "metrics.jsonl")
    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:
        assert keys <= set(s), (run, sorted(keys - set(s)))
        assert s["groups"] == 2 and 0 <= s["accuracy"] <= 1 and s["mean_length"] > 0
        assert all(isinstance(v, (int, float)) and v == v for v in s.values()), s  # numbers, no NaN
        assert ("mi_mean" in s) == (run in ("iapo", "iapo_authors_norm", "significance"))
        assert ("ib_term" in s) == (run in ("ib", "grpo_with_ib"))
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["method"] == (method or overrides[0].split("=")[1])
    if run == "gfpo":
        for s in steps:  # 2 of the 4 sampled per prompt, the shortest
            assert s["gfpo_kept_length"] <= s["gfpo_sampled_length"]
            assert s["mean_length"] == s["gfpo_kept_length"]
    if run == "sgrpo":
        assert all(0 < s["sgrpo_kept_frac"] <= 1 for s in steps)
    if run == "significance":
        # dynamic schedule over 2 steps: detail (-1) at step 0, then 0 at the switch (half way)
        assert [s["significance_phase"] for s in steps] == [-1.0, 0.0]


def test_gfpo_updates_on_the_kept_groups_only(tmp_path, monkeypatch):
    """The update sees k rows per prompt, normalised among themselves (the core's GRPO advantages)."""
    from iapo_openrlhf.core.methods import grpo_advantages
    from iapo_openrlhf.local import trainer as local

    seen = []
    real = local.LocalTrainer._update

    def spy(self, batch, old_lp, adv, loss_mask):
        seen.append((batch.rewards.clone(), adv.clone(), batch.rollout.action_mask.clone()))
        return real(self, batch, old_lp, adv, loss_mask)

    monkeypatch.setattr(local.LocalTrainer, "_update", spy)
    assert _train(tmp_path, "method=gfpo", "gfpo.keep=3", "train.steps=1") == 0
    ((rewards, adv, mask),) = seen
    assert rewards.shape == (2 * 3,)
    torch.testing.assert_close(adv, grpo_advantages(rewards, mask, group_size=3))


CONFIG_ERRORS = [
    (["method=gfpo", "gfpo.keep=5"], "gfpo.keep: got 5, expected <= rollout.n_samples_per_prompt (4)"),
    (["method=gfpo", "gfpo.keep=1"], "gfpo.keep: got 1, expected an integer >= 2"),
    (["method=gfpo", "gfpo.metric=tokens"], "gfpo.metric: got 'tokens', expected one of ['length', 'reward_per_token']"),
    (["method=grpo", "gfpo.keep=2"], "gfpo.keep: set, but the method is 'grpo'; gfpo.* applies to method 'gfpo' only"),
    (["method=gtpo", "sgrpo.keep_prob=0.5"], "sgrpo.keep_prob: set, but the method is 'gtpo'"),
    (["method=iapo", "significance.coef=1"], "significance.coef: set, but the method is 'iapo'"),
    (["method=sgrpo", "gtpo.level=sequence"], "gtpo.level: set, but the method is 'sgrpo'"),
    (["method=ib", "ib.coef=-0.005"], "ib.coef: got -0.005, expected a value >= 0"),
    (["method=gtpo", "gtpo.entropy_weight=-1"], "gtpo.entropy_weight: got -1.0, expected a value >= 0"),
    (["method=gtpo", "gtpo.reward_weight=0", "gtpo.entropy_weight=0"], "both 0, expected at least one > 0"),
    (["method=significance", "significance.coef=-0.5"], "significance.coef: got -0.5, expected a value >= 0"),
    (["method=significance", "significance.threshold=0.1"],
     "significance.threshold: set with significance.selection=fraction, expected significance.selection: threshold"),
    (["method=significance", "significance.schedule=static", "significance.switch=0.3"],
     "significance.switch: set with significance.schedule=static"),
    (["method=significance", "significance.fraction=1.5"], "significance.fraction: got 1.5, expected a number in [0, 1]"),
    (["method=sgrpo", "sgrpo.keep_first=0"], "sgrpo.keep_first: got 0, expected an integer >= 1"),
    (["method=sgrpo", "sgrpo.keep_prob=-0.1"], "sgrpo.keep_prob: got -0.1, expected a number in [0, 1]"),
    (["method=gfpo", "iapo.method=gtpo"], "iapo.method: got 'gtpo' with method 'gfpo', expected the same method"),
    (["iapo.shaping_norm=l3"], "iapo.shaping_norm: got 'l3', expected one of ['zscore', 'l2', 'authors']"),
    (["method=bogus"], "method: got 'bogus', expected one of ['iapo', 'grpo', 'dapo', 'gfpo', 'gtpo', 'sgrpo', 'ib', "
                       "'significance']"),
]


@pytest.mark.parametrize("overrides,message", CONFIG_ERRORS)
def test_bad_settings_are_one_line_exit_2(overrides, message, capsys):
    overrides = ["rollout.n_samples_per_prompt=4", *overrides]
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(CONFIG, overrides)
    args = ["--config", CONFIG]
    for o in overrides:
        args += ["--set", o]
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("iapo-train: error: ") and message in err and "\n" not in err


def test_method_knobs_allowed_with_their_method():
    cfg = load_config(CONFIG, ["method=gfpo", "gfpo.keep=8", "gfpo.metric=reward_per_token"])
    assert (cfg.gfpo.keep, cfg.gfpo.metric) == (8, "reward_per_token")  # k = G is allowed (GRPO)
    for method in METHODS:  # ib's coefficient goes with every method
        assert load_config(CONFIG, [f"method={method}", "ib.coef=0.01"]).ib.coef == 0.01
