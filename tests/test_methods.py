"""Every method's core function on hand-computed tensors (core/methods.py, core/loss.py).

Each case puts a value on the padding that would change the result if it leaked into a statistic.
"""

from __future__ import annotations

import math

import pytest
import torch

from iapo_openrlhf import config
from iapo_openrlhf.core.advantages import iapo_advantages
from iapo_openrlhf.core.loss import ib_regularizer
from iapo_openrlhf.core.methods import (
    ADVANTAGE_ESTIMATORS,
    METHODS,
    PAPER_TABLE_ORDER,
    get_advantage_fn,
    gfpo_keep_mask,
    grpo_advantages,
    grpo_s_advantages,
    gtpo_advantages,
    insignificant_tokens,
    sgrpo_token_mask,
    significance_length_reward,
    significance_phase,
)


def _mask(rows):
    return torch.tensor(rows, dtype=torch.long)


# ── registry ──


def test_registry_knows_every_method_of_the_config():
    assert tuple(METHODS) == ("grpo", "dapo", "gfpo", "gtpo", "sgrpo", "iapo", "ib", "significance")
    assert set(METHODS) == set(config.METHODS)
    assert set(PAPER_TABLE_ORDER) <= set(METHODS)
    for spec in METHODS.values():
        assert get_advantage_fn(spec.advantage) is ADVANTAGE_ESTIMATORS[spec.advantage]
    assert {"grpo", "iapo", "gtpo", "grpo_s"} <= set(ADVANTAGE_ESTIMATORS)
    with pytest.raises(ValueError, match="advantage estimator: got 'ppo'"):
        get_advantage_fn("ppo")


def test_grpo_is_iapo_with_zero_weights_bit_for_bit():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    mask = _mask([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    got = grpo_advantages(rewards, mask, group_size=3)
    want = iapo_advantages(rewards, None, None, mask, group_size=3, alpha=0.0, beta=0.0, eps=1e-9)
    assert torch.equal(got, want)
    assert (got[3:] == 0).all()  # a group of equal rewards gets exactly 0, not rounding noise / eps
    assert (got[mask == 0] == 0).all()


# ── GFPO ──


@pytest.mark.parametrize(
    "rewards,lengths,keep,metric,expected",
    [
        # shortest 2 of each group; group 2 all equal lengths: the first two (stable)
        ([1, 0, 1, 0, 1, 1, 1, 1], [5, 3, 3, 9, 4, 4, 4, 4], 2, "length", [0, 1, 1, 0, 1, 1, 0, 0]),
        # three tied for the kept set: the earlier samples win
        ([0, 1, 0, 1], [3, 3, 3, 9], 2, "length", [1, 1, 0, 0]),
        # k = G keeps everything (GRPO)
        ([0, 1, 0, 1], [3, 7, 3, 9], 4, "length", [1, 1, 1, 1]),
        # reward per token [0.1, 0.2, -0.5, 0]: the two highest
        ([1, 1, -1, 0], [10, 5, 2, 4], 2, "reward_per_token", [1, 1, 0, 0]),
        # all rewards equal and lengths equal: the first k
        ([1, 1, 1, 1], [6, 6, 6, 6], 3, "reward_per_token", [1, 1, 1, 0]),
        # all rewards equal, lengths differ: reward per token prefers the shorter
        ([2, 2, 2, 2], [6, 3, 8, 4], 2, "reward_per_token", [0, 1, 0, 1]),
    ],
)
def test_gfpo_keeps_the_k_best(rewards, lengths, keep, metric, expected):
    got = gfpo_keep_mask(torch.tensor(rewards, dtype=torch.float32), torch.tensor(lengths), group_size=4, keep=keep,
                         metric=metric)
    assert got.tolist() == [bool(x) for x in expected]
    assert got.reshape(-1, 4).sum(-1).tolist() == [keep] * (len(rewards) // 4)


def test_gfpo_kept_group_is_normalised_among_itself():
    # The paper: the kept ones' advantages use the kept set's mean and std.
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    lengths = torch.tensor([5, 2, 3, 9])
    keep = gfpo_keep_mask(rewards, lengths, group_size=4, keep=2)
    assert keep.tolist() == [False, True, True, False]
    adv = grpo_advantages(rewards[keep], torch.ones(2, 3, dtype=torch.long), group_size=2)
    r = 1 / math.sqrt(0.5)  # kept [0, 1]: mean 0.5, unbiased std sqrt(0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.5 * r] * 3, [0.5 * r] * 3]))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(keep=5), r"keep: got 5, expected an integer in \[1, 4\]"),
        (dict(keep=0), r"keep: got 0"),
        (dict(keep=2, metric="tokens"), "metric: got 'tokens'"),
        (dict(keep=2, group_size=3), "group_size: got 3 for a batch of 4"),
    ],
)
def test_gfpo_bad_arguments(kwargs, message):
    args = dict(group_size=4) | kwargs
    with pytest.raises(ValueError, match=message):
        gfpo_keep_mask(torch.zeros(4), torch.ones(4), **args)


# ── GTPO / GRPO-S ──

# one group of 3: rows 0 and 1 correct, row 2 wrong; row 1 has one token (its second slot is
# padding with a large entropy that would change position 1's share if it were read)
G3_REWARDS = torch.tensor([1.0, 1.0, -1.0])
G3_CORRECT = torch.tensor([True, True, False])
G3_MASK = _mask([[1, 1], [1, 0], [1, 1]])
G3_ENTROPY = torch.tensor([[1.0, 2.0], [3.0, 7.0], [0.5, 2.0]])


def test_gtpo_hand_computed():
    # correct set, position 0: H = 1, 3 (d = 2) -> weights 1/4*2 = 0.5, 3/4*2 = 1.5; position 1: row 0 alone -> 1
    # wrong set: row 2 alone at both positions -> weight 1 each
    # token rewards (w1 = w2 = 1): row 0 [1.5, 2.0], row 1 [2.5], row 2 [-2, -2]
    # over the 5 valid tokens: mean 0.4, population std sqrt(3.94)
    std = math.sqrt(3.94)
    expected = torch.tensor([[1.1 / std, 1.6 / std], [2.1 / std, 0.0], [-2.4 / std, -2.4 / std]])
    got = gtpo_advantages(G3_REWARDS, G3_MASK, group_size=3, correct=G3_CORRECT, entropy=G3_ENTROPY, eps=0.0)
    torch.testing.assert_close(got, expected)
    assert got[1, 1] == 0


def test_gtpo_weights_and_entropy_off():
    # entropy_weight 0: every token carries its completion's reward; token-level normalisation
    got = gtpo_advantages(G3_REWARDS, G3_MASK, group_size=3, correct=G3_CORRECT, entropy=G3_ENTROPY,
                          entropy_weight=0.0, eps=0.0)
    # tokens [1, 1, 1, -1, -1]: mean 0.2, population std sqrt(0.96)
    s = math.sqrt(0.96)
    torch.testing.assert_close(got, torch.tensor([[0.8 / s, 0.8 / s], [0.8 / s, 0.0], [-1.2 / s, -1.2 / s]]))
    # reward_weight 0: the entropy shares alone ([0.5, 1], [1.5], [-1, -1])
    got = gtpo_advantages(G3_REWARDS, G3_MASK, group_size=3, correct=G3_CORRECT, entropy=G3_ENTROPY,
                          reward_weight=0.0, eps=0.0)
    x = torch.tensor([0.5, 1.0, 1.5, -1.0, -1.0])
    z = (x - x.mean()) / x.std(unbiased=False)
    torch.testing.assert_close(got[G3_MASK.bool()], z)


def test_gtpo_penalises_confident_tokens_of_wrong_answers_most():
    entropy = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.1, 1.0], [1.0, 1.0]])
    adv = gtpo_advantages(torch.tensor([1.0, 1.0, -1.0, -1.0]), torch.ones(4, 2, dtype=torch.long), group_size=4,
                          correct=torch.tensor([True, True, False, False]), entropy=entropy)
    assert adv[2, 0] < adv[3, 0] < 0  # the confident (low-entropy) wrong token is punished hardest
    assert adv[2, 1] == adv[3, 1]


def test_gtpo_constant_group_and_padding():
    # all correct, equal entropies and lengths: every token reward is 2 -> advantage exactly 0
    mask = _mask([[1, 1, 0], [1, 1, 0]])
    got = gtpo_advantages(torch.tensor([1.0, 1.0]), mask, group_size=2, correct=torch.tensor([True, True]),
                          entropy=torch.tensor([[2.0, 2.0, 50.0], [2.0, 2.0, 0.0]]))
    assert torch.equal(got, torch.zeros(2, 3))
    # two groups are independent: the second group does not move the first
    four = gtpo_advantages(torch.cat([G3_REWARDS[:2], torch.tensor([5.0, -3.0])]), _mask([[1, 1], [1, 0], [1, 1], [1, 0]]),
                           group_size=2, correct=torch.tensor([True, True, True, False]),
                           entropy=torch.cat([G3_ENTROPY[:2], torch.tensor([[1.0, 1.0], [1.0, 1.0]])]))
    alone = gtpo_advantages(G3_REWARDS[:2], G3_MASK[:2], group_size=2, correct=G3_CORRECT[:2], entropy=G3_ENTROPY[:2])
    torch.testing.assert_close(four[:2], alone)


def test_grpo_s_hand_computed():
    # mean entropies: row 0 1.5, row 1 3.0 (its padding excluded), row 2 1.25
    # correct: 1.5/4.5*2 = 2/3 and 3/4.5*2 = 4/3; wrong: 1 -> r^ = [5/3, 7/3, -2]
    # group norm: mean 2/3, unbiased std 7/3 -> [3/7, 5/7, -8/7]
    got = grpo_s_advantages(G3_REWARDS, G3_MASK, group_size=3, correct=G3_CORRECT, entropy=G3_ENTROPY)
    expected = torch.tensor([[3 / 7, 3 / 7], [5 / 7, 0.0], [-8 / 7, -8 / 7]])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_gtpo_needs_its_signals():
    with pytest.raises(ValueError, match="entropy: got None"):
        gtpo_advantages(G3_REWARDS, G3_MASK, group_size=3, correct=G3_CORRECT)
    with pytest.raises(ValueError, match="correct: got None"):
        grpo_s_advantages(G3_REWARDS, G3_MASK, group_size=3, entropy=G3_ENTROPY)
    with pytest.raises(ValueError, match=r"entropy: got shape \(3, 3\)"):
        gtpo_advantages(G3_REWARDS, G3_MASK, group_size=3, correct=G3_CORRECT, entropy=torch.ones(3, 3))


# ── S-GRPO ──


def test_sgrpo_mask_rules():
    mask = _mask([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    first_only = sgrpo_token_mask(mask, keep_first=3, keep_prob=0.0)
    assert first_only.tolist() == [[True, True, True, False, False, False], [True, True, False, False, False, False]]
    every = sgrpo_token_mask(mask, keep_first=1, keep_prob=1.0)
    assert torch.equal(every, mask.bool())
    assert not sgrpo_token_mask(torch.zeros(2, 4, dtype=torch.long), keep_first=2, keep_prob=1.0).any()


def test_sgrpo_later_tokens_kept_at_keep_prob_and_reproducible():
    mask = torch.ones(300, 200, dtype=torch.long)
    mask[:, 150:] = 0
    a = sgrpo_token_mask(mask, keep_first=10, keep_prob=0.3, generator=torch.Generator().manual_seed(3))
    b = sgrpo_token_mask(mask, keep_first=10, keep_prob=0.3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a[:, :10].all() and not a[:, 150:].any()
    assert abs(a[:, 10:150].float().mean().item() - 0.3) < 0.01
    with pytest.raises(ValueError, match="keep_prob: got 1.5"):
        sgrpo_token_mask(mask, keep_first=1, keep_prob=1.5)


# ── IB ──


def test_ib_regularizer_hand_computed_with_gradient():
    mask = _mask([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([[0.5, 0.5, 9.0], [-0.5, 9.0, 9.0]])
    entropy = torch.tensor([[2.0, 4.0, 100.0], [3.0, 100.0, 100.0]], requires_grad=True)
    token = ib_regularizer(adv, entropy, mask, "token_mean")
    assert token.item() == pytest.approx((0.5 * 2 + 0.5 * 4 - 0.5 * 3) / 3)
    token.backward()
    torch.testing.assert_close(entropy.grad, torch.tensor([[0.5, 0.5, 0.0], [-0.5, 0.0, 0.0]]) / 3)
    seq = ib_regularizer(adv, entropy.detach(), mask, "seq_mean")
    assert seq.item() == pytest.approx(((1.0 + 2.0) / 2 + (-1.5)) / 2)


# ── significance-aware length reward ──


def test_insignificant_tokens_by_fraction_and_threshold():
    mi = torch.tensor([[0.5, -0.01, 0.2, 0.0], [0.02, -0.3, 0.0, 0.0]])  # padding holds MI 0: the lowest |MI|
    mask = _mask([[1, 1, 1, 0], [1, 1, 0, 0]])
    low = insignificant_tokens(mi, mask, group_size=2, selection="fraction", fraction=0.4)  # floor(0.4 * 5) = 2
    assert low.tolist() == [[False, True, False, False], [True, False, False, False]]
    low = insignificant_tokens(mi, mask, group_size=2, selection="threshold", threshold=0.25)
    assert low.tolist() == [[False, True, True, False], [True, False, False, False]]
    # ties: equal |MI| -> the earlier positions (row-major within the group)
    tied = insignificant_tokens(torch.full((2, 3), 0.1), torch.ones(2, 3), group_size=2, fraction=0.5)
    assert tied.tolist() == [[True, True, True], [False, False, False]]
    # groups are separate: each gets its own bottom fraction
    two = insignificant_tokens(torch.tensor([[1.0, 2.0], [9.0, 8.0]]), torch.ones(2, 2), group_size=1, fraction=0.5)
    assert two.tolist() == [[True, False], [False, True]]


def test_significance_length_reward_hand_computed():
    mask = torch.ones(4, 4, dtype=torch.long)
    low = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1], [1, 1, 1, 0]]).bool()  # n = 3, 1, 1, 3
    correct = torch.tensor([True, True, False, False])
    # lambda = 0.5 - (n - 1) / 2 = [-0.5, 0.5, 0.5, -0.5]; coef 0.5
    concise = significance_length_reward(low, mask, correct, group_size=4, phase=1.0, coef=0.5)
    assert concise.tolist() == [-0.25, 0.25, 0.0, -0.25]  # a wrong answer only ever loses
    detail = significance_length_reward(low, mask, correct, group_size=4, phase=-1.0, coef=0.5)
    assert detail.tolist() == [0.25, -0.25, -0.25, 0.0]
    # insignificant flags on padding are not counted; equal counts give 0
    padded = significance_length_reward(torch.ones(2, 3, dtype=torch.bool), _mask([[1, 1, 0], [1, 1, 0]]),
                                        torch.tensor([True, True]), group_size=2, phase=1.0, coef=1.0)
    assert padded.tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "progress,schedule,switch,expected",
    [(0.0, "dynamic", 0.5, -1.0), (0.25, "dynamic", 0.5, -0.5), (0.5, "dynamic", 0.5, 0.0), (0.75, "dynamic", 0.5, 0.5),
     (1.0, "dynamic", 0.5, 1.0), (3.0, "dynamic", 0.5, 1.0), (0.3, "dynamic", 0.0, 0.3), (0.3, "dynamic", 1.0, -0.7),
     (0.0, "static", 0.5, 1.0)],
)
def test_significance_phase(progress, schedule, switch, expected):
    assert significance_phase(progress, schedule, switch) == pytest.approx(expected)
