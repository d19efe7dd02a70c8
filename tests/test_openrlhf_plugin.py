"""The OpenRLHF plugin against OpenRLHF's own classes: experience maker, Experience plumbing, CLI.

OpenRLHF is imported for real; its two GPU-only imports (flash_attn, vllm) are served by
`cpu_stubs` on this CPU machine (README: "How the tests reach OpenRLHF").
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from iapo_openrlhf.openrlhf import cpu_stubs

cpu_stubs.install()
pytest.importorskip("openrlhf", reason="OpenRLHF is installed by .ci/run (pip install --no-deps openrlhf)")

from openrlhf.trainer.ppo_utils.experience import Experience, split_experience_batch  # noqa: E402
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker  # noqa: E402
from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController  # noqa: E402

from iapo_openrlhf.core.advantages import iapo_advantages  # noqa: E402
from iapo_openrlhf.openrlhf import launch  # noqa: E402
from iapo_openrlhf.openrlhf.experience_maker import IAPOExperienceMaker  # noqa: E402

import openrlhf_batches  # noqa: E402

G = 4  # samples per prompt


def _args(*extra: str) -> SimpleNamespace:
    """Real hierarchised args from OpenRLHF's parser (through ours), for a tiny local setup."""
    return launch.parse_args([
        "--actor.model_name_or_path", "/nonexistent/tiny", "--rollout.n_samples_per_prompt", str(G),
        "--rollout.batch_size", "2", "--train.batch_size", "8", "--rollout.micro_batch_size", "4",
        "--actor.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1", "--reward.remote_url", __file__,
        *extra,
    ])


def _experiences(seed: int = 0, with_kl: bool = False) -> list[Experience]:
    """Two micro-batches of 4 completions each (2 prompts x G=4), made by OpenRLHF's own rollout
    code (`openrlhf_batches`: executor, samples generator, `concat_experiences`: right-padded rows,
    action_mask = mask[1:]), in a shuffled rollout order as OpenRLHF's dynamic batching leaves them
    (`index` maps each row to its rollout position). Rewards, scores, log-probs, KL and the actor's
    MI are filled in as the reward function and the actor would."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(2 * G, generator=gen).tolist()
    micro_batches = []
    for k, part in enumerate((order[:4], order[4:])):
        lengths = torch.randint(1, 7, (4,), generator=gen).tolist()
        singles = openrlhf_batches.experiences(lengths, seed=seed * 10 + k)
        for single in singles:
            correct = bool(torch.rand(1, generator=gen) > 0.5)
            reward = (1.0 if correct else -1.0) + (0.5 if torch.rand(1, generator=gen) > 0.3 else -0.5)
            single.rewards, single.scores = torch.tensor([reward]), torch.tensor([float(correct)])
            single.info["reward"] = single.rewards.clone()
        exp = Experience.concat_experiences(singles, openrlhf_batches.TOKENIZER.pad_token_id)
        mask = exp.action_mask.bool()
        width = mask.shape[1]
        exp.index = part
        exp.action_log_probs = -torch.rand(4, width, generator=gen) * 3 * mask
        exp.kl = (torch.rand(4, width, generator=gen) * 0.1 * mask) if with_kl else torch.zeros(4, width)
        exp.info["iapo/mi"] = torch.randn(4, width, generator=gen) * mask
        micro_batches.append(exp)
    return micro_batches


def _maker(cls, args):
    strategy = SimpleNamespace(args=args)
    return cls(None, None, None, None, FixedKLController(args.algo.kl.init_coef), strategy, tokenizer=None)


def _in_rollout_order(experiences, attr):
    """(2G, A) rows of `attr` placed by each row's rollout index, padded to a common width."""
    rows = {}
    for e in experiences:
        value = getattr(e, attr) if isinstance(attr, str) else attr(e)
        for i, idx in enumerate(e.index):
            rows[idx] = value[i]
    width = max(r.shape[-1] for r in rows.values())
    return torch.stack([torch.nn.functional.pad(rows[i].float(), (0, width - rows[i].shape[-1])) for i in range(len(rows))])


@pytest.mark.parametrize("kl_in_reward", [False, True], ids=["kl-loss", "kl-in-reward"])
def test_zero_weights_reproduce_openrlhf_group_norm_exactly(kl_in_reward):
    extra = ["--algo.kl.init_coef", "0.01"] + ([] if kl_in_reward else ["--algo.kl.use_loss"])
    args = _args("--iapo.alpha", "0", "--iapo.beta", "0", *extra)
    stock = _maker(RemoteExperienceMaker, args).compute_advantages_and_returns(_experiences(1, kl_in_reward))
    ours = _maker(IAPOExperienceMaker, args).compute_advantages_and_returns(_experiences(1, kl_in_reward))
    for a, b in zip(stock, ours):
        assert torch.equal(a.advantages, b.advantages) and torch.equal(a.returns, b.returns)
        assert "iapo/mi" not in b.info  # per-token fields never reach the replay buffer's metric merge
    assert any(e.advantages.abs().sum() > 0 for e in ours)


@pytest.mark.parametrize("held_tokens", ["zero", "exclude"])
def test_nonzero_weights_match_iapo_advantages(held_tokens):
    """With --iapo.mi_held_tokens exclude the actor sends the MI term's mask beside the MI
    (`iapo_forward`); the maker must shape with it, as iapo_advantages does with mi_mask."""
    hold = ["--iapo.mi_hold_after", "</think>", "--iapo.mi_held_tokens", held_tokens]
    args = _args("--iapo.alpha", "0.7", "--iapo.beta", "0.3", "--algo.kl.use_loss", "--algo.kl.init_coef", "0.001", *hold)
    experiences = _experiences(2)
    mi_mask = None
    if held_tokens == "exclude":
        for k, e in enumerate(experiences):  # held from a row's third action token on, two rows not held
            m = e.action_mask.bool().clone()
            for i in range(k, 4, 2):
                m[i, m[i].nonzero().flatten()[2:]] = False
            e.info["iapo/mi_mask"] = m
        mi_mask = _in_rollout_order(experiences, lambda e: e.info["iapo/mi_mask"]).bool()
    mi = _in_rollout_order(experiences, lambda e: e.info["iapo/mi"])
    mask = _in_rollout_order(experiences, "action_mask").bool()
    pi_old = _in_rollout_order(experiences, "action_log_probs").exp() * mask
    rewards = _in_rollout_order(experiences, lambda e: e.rewards.unsqueeze(-1)).squeeze(-1)
    correct = _in_rollout_order(experiences, lambda e: e.scores.unsqueeze(-1)).squeeze(-1) > 0
    expected = iapo_advantages(rewards, mi, pi_old, mask, group_size=G, alpha=0.7, beta=0.3, correct=correct,
                               mi_mask=mi_mask)
    if mi_mask is not None:
        assert not torch.allclose(expected, iapo_advantages(rewards, mi, pi_old, mask, group_size=G, alpha=0.7,
                                                            beta=0.3, correct=correct))

    stock = _maker(RemoteExperienceMaker, args).compute_advantages_and_returns(copy.deepcopy(experiences))
    ours = _maker(IAPOExperienceMaker, args).compute_advantages_and_returns(experiences)
    got = _in_rollout_order(ours, "advantages")
    # OpenRLHF's group_norm divides by std + 1e-9, iapo_advantages by std + 1e-6.
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=1e-5)
    # Off the actions (the prompt columns of 0.11's full-width mask, padding) OpenRLHF's cumulative
    # returns leave nonzero advantages that its loss masks out; the shaping adds exactly nothing there.
    assert torch.equal(got[~mask], _in_rollout_order(stock, "advantages")[~mask])
    for e in ours:
        assert e.info["iapo/mi_mean"].shape == (4,) and e.info["iapo/shaping_abs_mean"].shape == (4,)


def test_exploration_sign_comes_from_scores_not_rewards():
    # Rewards and correctness can disagree (shaped or custom rewards);
    # the exploration sign must follow correctness (scores), as the reward file returns it.
    args = _args("--iapo.alpha", "0", "--iapo.beta", "1", "--algo.kl.use_loss", "--algo.kl.init_coef", "0.001")
    flipped = _experiences(3)
    for e in flipped:
        e.rewards = -e.rewards
        e.info["reward"] = e.rewards.clone()
    plain = _maker(IAPOExperienceMaker, args).compute_advantages_and_returns(_experiences(3))
    negated = _maker(IAPOExperienceMaker, args).compute_advantages_and_returns(flipped)
    for a, b in zip(plain, negated):
        mask = a.action_mask.bool()
        # reward term flips sign with the rewards; the exploration term (from scores) does not
        shaping_a = a.advantages - (a.returns)
        shaping_b = b.advantages - (b.returns)
        torch.testing.assert_close(shaping_a[mask], shaping_b[mask], atol=1e-6, rtol=0)
        assert shaping_a[mask].abs().sum() > 0


def test_token_fields_survive_openrlhf_concat_and_split():
    parts = _experiences(4)
    merged = Experience.concat_experiences(parts, pad_token_id=0)
    width = merged.action_mask.shape[1]
    assert merged.info["iapo/mi"].shape == (8, width)
    for k, part in enumerate(parts):
        w = part.action_mask.shape[1]
        assert torch.equal(merged.info["iapo/mi"][4 * k : 4 * k + 4, :w], part.info["iapo/mi"])
    singles = split_experience_batch(merged)
    assert len(singles) == 8
    assert torch.equal(singles[5].info["iapo/mi"], merged.info["iapo/mi"][5])
    # and the maker still finds them after OpenRLHF's concat
    args = _args("--iapo.alpha", "1", "--iapo.beta", "0", "--algo.kl.use_loss", "--algo.kl.init_coef", "0.001")
    merged = Experience.concat_experiences(_experiences(4), pad_token_id=0)  # split cleared its index
    shaped = _maker(IAPOExperienceMaker, args).compute_advantages_and_returns([merged])
    stock = _maker(RemoteExperienceMaker, args).compute_advantages_and_returns(
        [Experience.concat_experiences(_experiences(4), pad_token_id=0)])
    assert not torch.equal(shaped[0].advantages, stock[0].advantages)


def test_alpha_without_actor_mi_is_a_clear_error():
    args = _args("--iapo.alpha", "0.5", "--algo.kl.use_loss", "--algo.kl.init_coef", "0.001")
    experiences = _experiences(5)
    for e in experiences:
        del e.info["iapo/mi"]
    with pytest.raises(RuntimeError, match="IAPOPolicyModelActor"):
        _maker(IAPOExperienceMaker, args).compute_advantages_and_returns(experiences)


def test_flatten_splits_actor_dicts_into_log_probs_and_extras(monkeypatch):
    args = _args("--algo.kl.use_loss", "--algo.kl.init_coef", "0.001")
    maker = _maker(IAPOExperienceMaker, args)
    results = [{"action_log_probs": torch.full((2, 3), -1.0), "mi": torch.ones(2, 3)}, None,
               {"action_log_probs": torch.full((2, 3), -2.0), "mi": torch.zeros(2, 3)}, None]
    # OpenRLHF keeps every duplicate_factor-th actor's result (TP rank 0); others returned None.
    monkeypatch.setattr(RemoteExperienceMaker, "_flatten_results", lambda self, refs, dup: refs[::dup])
    flat = maker._flatten_results(results, 2)
    assert [t[0, 0].item() for t in flat] == [-1.0, -2.0]
    assert [e["mi"][0, 0].item() for e in maker._actor_extras] == [1.0, 0.0]
    assert maker._flatten_results([torch.ones(1)], 1)[0].item() == 1.0  # reference model results untouched


# ── iapo-train-ray ──

PAPER_7B = (
    "--actor.model_name_or_path Qwen/Qwen2.5-7B-Instruct --actor.num_nodes 2 --actor.num_gpus_per_node 8 "
    "--ref.num_nodes 2 --ref.num_gpus_per_node 8 --vllm.num_engines 8 --vllm.tensor_parallel_size 2 "
    "--train.colocate_all --ds.tensor_parallel_size 2 --ds.zero_stage 3 --ds.param_dtype bf16 "
    "--rollout.batch_size 128 --rollout.n_samples_per_prompt 8 --train.batch_size 1024 "
    "--rollout.micro_batch_size 8 --train.micro_batch_size 4 --rollout.max_new_tokens 2048 --data.max_len 2560 "
    "--rollout.temperature 1.0 --actor.adam.lr 1e-6 --algo.kl.init_coef 0.001 --algo.kl.use_loss "
    "--algo.kl.estimator k3 --data.prompt_dataset data/gsm8k_train.jsonl --data.input_key prompt "
    "--data.label_key answer --iapo.alpha 0.5 --iapo.beta 0.1"
).split()


def _reward_file() -> str:
    from iapo_openrlhf.openrlhf import reward_func

    return reward_func.__file__


def test_dry_run_on_the_papers_7b_settings(capsys):
    assert launch.main(["--dry-run", *PAPER_7B, "--reward.remote_url", _reward_file()]) == 0
    out = capsys.readouterr().out
    settings = json.loads(out[out.index("{"): out.index("\nRay resource layout")])
    assert settings["iapo"]["alpha"] == 0.5 and settings["algo"]["advantage"]["estimator"] == "group_norm"
    assert settings["ds"]["tensor_parallel_size"] == 2 and settings["actor"]["adam"]["lr"] == 1e-6
    assert "| actor (IAPOPolicyModelActor, DeepSpeed) | 16 | 2 node(s) x 8; ZeRO-3, AutoTP 2, ring 1, data-parallel 8 |" in out
    assert "GPUs requested: 16 (2 node(s) of 8 GPUs)" in out
    assert "128 prompts x 8 = 1024" in out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--rollout.n_samples_per_prompt", "1"], "--rollout.n_samples_per_prompt 1: IAPO normalises"),
        (["--algo.advantage.estimator", "gae"], "critic-based (gae)"),
        (["--algo.advantage.estimator", "reinforce"], "not a per-prompt group baseline"),
        (["--iapo.alpha", "-0.5"], "--iapo.alpha: got -0.5, expected a value >= 0"),
        (["--iapo.beta", "-1"], "--iapo.beta: got -1.0"),
        (["--iapo.postfix", ""], "--iapo.postfix: got an empty postfix"),
        (["--iapo.exploration", "bogus"], "argument --iapo.exploration: invalid choice"),
        (["--reward.remote_url", "/no/such/reward.py"], "--reward.remote_url /no/such/reward.py: no such file"),
        (["--train.async_enable"], "--train.async_enable"),
        (["--ds.ring_attn_size", "2", "--ds.packing_samples"], "--ds.ring_attn_size > 1"),
    ],
)
def test_invalid_combinations_are_one_line_and_exit_2(extra, message, capsys):
    argv = ["--dry-run", *PAPER_7B, "--reward.remote_url", _reward_file(), *extra]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iapo-train-ray: error: ") and message in err[0], err


def test_openrlhf_own_checks_are_one_line_and_exit_2(capsys):
    # OpenRLHF asserts this one itself (fewer sample batches than actor data-parallel ranks).
    argv = ["--dry-run", *PAPER_7B, "--reward.remote_url", _reward_file(), "--rollout.batch_size", "1",
            "--rollout.micro_batch_size", "16", "--rollout.n_samples_per_prompt", "2"]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "effective number of actor processes" in err[0], err


def test_postfix_that_tokenizes_to_nothing(tmp_path, capsys):
    from iapo_openrlhf.tasks.synthetic import build_tokenizer

    build_tokenizer().save_pretrained(tmp_path)  # a tiny vocabulary without the snowman
    argv = ["--dry-run", *PAPER_7B, "--reward.remote_url", _reward_file(),
            "--actor.model_name_or_path", str(tmp_path), "--iapo.postfix", "\u2603"]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert "tokenizes to nothing" in err
    argv[-1] = "</think><answer>"
    assert launch.main(argv) == 0
    assert "'</think><answer>' (checked)" in capsys.readouterr().out


def test_training_run_without_gpu_stack_is_refused(capsys):
    assert launch.main([*PAPER_7B, "--reward.remote_url", _reward_file()]) == 2
    assert "not installed: a training run needs the GPU stack" in capsys.readouterr().err


def test_training_run_substitutes_iapo_classes_into_openrlhf(monkeypatch, tmp_path):
    import openrlhf.cli.train_ppo_ray as orl_cli
    import openrlhf.trainer.ppo_trainer as orl_trainer

    from iapo_openrlhf.openrlhf.actor import IAPOPolicyModelActor
    from iapo_openrlhf.openrlhf.trainer import IAPOPPOTrainer

    seen = {}

    def fake_train(args):
        seen["actor"] = orl_cli.PolicyModelActor.__ray_actor_class__
        from openrlhf.trainer.ppo_trainer import PPOTrainer  # what train() imports at call time

        seen["trainer"] = PPOTrainer.__ray_actor_class__
        seen["alpha"] = args.iapo.alpha

    import ray

    monkeypatch.setattr(orl_cli, "train", fake_train)
    monkeypatch.setattr(cpu_stubs, "missing_gpu_packages", lambda: [])
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # no local Ray cluster in this test
    stock_actor = orl_cli.PolicyModelActor
    assert launch.main([*PAPER_7B, "--reward.remote_url", _reward_file(), "--iapo.alpha", "0.25",
                        "--ckpt.path", str(tmp_path / "ckpt")]) == 0
    assert seen == {"actor": IAPOPolicyModelActor, "trainer": IAPOPPOTrainer, "alpha": 0.25}
    assert orl_cli.PolicyModelActor is stock_actor  # restored afterwards
    assert issubclass(IAPOPolicyModelActor, stock_actor.__ray_actor_class__)
    assert issubclass(IAPOPPOTrainer, orl_trainer.PPOTrainer.__ray_actor_class__)


TINY_RAY = Path(__file__).resolve().parent.parent / "configs" / "ray_tiny.yaml"


def test_a_resume_on_another_prompt_set_is_refused(tmp_path):
    """The checkpoint's run read the first 10 prompts (5 steps x 2); a resume asking for 3 steps
    would read 6 and OpenRLHF would restore the data position on them: one-line error. The same
    set resumes; a new run (no checkpoint yet) records its own set."""
    def args(steps: int) -> SimpleNamespace:
        return launch.parse_args(launch.expand_config(
            ["--config", str(TINY_RAY), "--set", f"output.dir={tmp_path}", "--set", f"train.steps={steps}"]))

    launch.check_prompt_set(args(5))  # first start: records 10 prompts of the train file
    record = json.loads((Path(args(5).ckpt.path) / launch.PROMPT_SET_FILE).read_text())
    assert record["max_samples"] == 10 and record["prompt_dataset"].endswith("gsm8k_train.jsonl")
    launch.check_prompt_set(args(3))  # no checkpoint saved yet: the new settings are recorded
    assert json.loads((Path(args(3).ckpt.path) / launch.PROMPT_SET_FILE).read_text())["max_samples"] == 6
    launch.check_prompt_set(args(5))
    (Path(args(5).ckpt.path) / "_actor").mkdir()  # OpenRLHF saved a checkpoint: now it is a resume
    launch.check_prompt_set(args(5))
    with pytest.raises(launch.UsageError, match="its run read the first 10 prompts of .* this one would read 6 of"):
        launch.check_prompt_set(args(3))


def test_help_lists_openrlhf_and_iapo_options():
    out = subprocess.run([sys.executable, "-m", "iapo_openrlhf.openrlhf.launch", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for option in ("--iapo.alpha", "--iapo.probe_stride", "--iapo.mi_smoothing", "--dry-run",
                   "--rollout.n_samples_per_prompt", "--ds.tensor_parallel_size", "--vllm.num_engines"):
        assert option in out.stdout


def test_unsupported_openrlhf_version_is_one_line(monkeypatch, capsys):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.9.1" if name == "openrlhf" else real(name))
    assert launch.main(["--dry-run"]) == 2
    assert "OpenRLHF 0.9.1 is installed, this plugin supports openrlhf>=0.11,<0.12" in capsys.readouterr().err


def test_per_token_fields_are_consumed_once():
    # compute_advantages_and_returns pops them: nothing per-token is left for OpenRLHF's metric merge
    args = _args("--iapo.alpha", "1", "--algo.kl.use_loss", "--algo.kl.init_coef", "0.001")
    experiences = _experiences(6)
    kept = copy.deepcopy(experiences)
    _maker(IAPOExperienceMaker, args).compute_advantages_and_returns(experiences)
    assert all("iapo/mi" not in e.info for e in experiences) and all("iapo/mi" in e.info for e in kept)


# ── one YAML for both backends ──

CLUSTER_CONFIGS = sorted(p.name for p in (Path(__file__).parent.parent / "configs").glob("qwen2.5-*.yaml"))


def test_every_model_dataset_pair_has_a_config():
    assert CLUSTER_CONFIGS == sorted(f"qwen2.5-{m}_{d}.yaml" for m in ("0.5b", "1.5b", "7b")
                                     for d in ("gsm8k", "math500", "dapo17k"))


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
@pytest.mark.parametrize("method", ["iapo", "grpo", "dapo"])
def test_cluster_configs_parse_with_openrlhfs_parser(name, method, monkeypatch):
    monkeypatch.delenv(launch.SCHEME_ENV, raising=False)
    path = Path(__file__).parent.parent / "configs" / name
    args = launch.parse_args(launch.expand_config(["--config", str(path), "--set", f"method={method}", "--dry-run"]))
    assert args.rollout.n_samples_per_prompt == 8 and args.actor.adam.lr == 1e-6 and args.algo.kl.init_coef == 0.001
    assert args.rollout.temperature == 1.0 and args.algo.advantage.estimator == "group_norm"
    assert (args.iapo.alpha, args.iapo.beta) == ((0.5, 0.1) if method == "iapo" else (0.0, 0.0))
    assert args.algo.dynamic_filtering_enable == (method == "dapo")
    assert (args.reward.overlong_buffer_len is not None) == (method == "dapo")
    assert args.reward.remote_url == [launch.REWARD_FILE]
    if name.startswith("qwen2.5-7b"):
        assert args.ds.tensor_parallel_size == 2 and args.vllm.tensor_parallel_size == 2 and args.actor.num_nodes >= 2
    import os

    assert os.environ[launch.SCHEME_ENV] == "paper"


def test_command_line_options_override_the_config():
    path = Path(__file__).parent.parent / "configs" / "qwen2.5-0.5b_gsm8k.yaml"
    args = launch.parse_args(launch.expand_config(
        ["--config", str(path), "--set", "iapo.alpha=0.3", "--rollout.batch_size", "16", "--dry-run"]))
    assert args.iapo.alpha == 0.3 and args.rollout.batch_size == 16 and args.data.max_samples == 58 * 128


def test_config_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: iapo\nmodel:\n  path: null\ndata:\n  task: jsonl\n  train_path: x.jsonl\n")
    assert launch.main(["--config", str(bad), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        "iapo-train-ray: error: model.path: required for iapo-train-ray, expected a HF model name or directory "
        "(e.g. Qwen/Qwen2.5-7B-Instruct)")
    assert launch.main(["--set", "iapo.alpha=1", "--dry-run"]) == 2
    assert "--set needs --config" in capsys.readouterr().err
