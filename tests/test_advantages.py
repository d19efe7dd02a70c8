"""IAPO advantages on hand-computed cases (DESIGN section 2)."""

from __future__ import annotations

import math

import pytest
import torch

from iapo_openrlhf.core.advantages import (
    group_normalized_rewards,
    iapo_advantages,
    information_shaping,
    masked_sequence_normalize,
)


def _mask(rows):
    return torch.tensor(rows, dtype=torch.long)


def test_alpha_beta_zero_is_group_norm_on_valid_tokens():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    mask = _mask([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    adv = iapo_advantages(rewards, None, None, mask, group_size=3, alpha=0.0, beta=0.0, eps=1e-9)
    # group [1, 0, 0]: mean 1/3, unbiased std sqrt(1/3) -> (2/3)/0.57735 = 1.1547, (-1/3)/0.57735 = -0.57735
    g1 = [2 / 3 / math.sqrt(1 / 3), -1 / 3 / math.sqrt(1 / 3), -1 / 3 / math.sqrt(1 / 3)]
    expect = torch.tensor([g1[0], g1[1], g1[2], -g1[0], -g1[1], -g1[2]]).unsqueeze(-1) * mask
    torch.testing.assert_close(adv, expect.float(), atol=1e-6, rtol=0)


def test_hand_computed_mi_and_exploration_terms():
    rewards = torch.tensor([1.0, -1.0])
    mask = _mask([[1, 1, 1, 0], [1, 1, 0, 0]])
    mi = torch.tensor([[0.3, 0.0, -0.3, 9.0], [2.0, 4.0, 7.0, 7.0]])
    pi = torch.tensor([[0.2, 0.5, 0.8, 0.1], [0.9, 0.1, 0.3, 0.3]])
    adv = iapo_advantages(rewards, mi, pi, mask, group_size=2, alpha=0.5, beta=0.25, eps=1e-12)
    # reward: group [1, -1] -> +-1 / sqrt(2) (unbiased std sqrt(2))
    r = 1 / math.sqrt(2)
    # row 0 MI [0.3, 0, -0.3]: mean 0, population std sqrt(0.06) -> [1.2247, 0, -1.2247]
    z = 0.3 / math.sqrt(0.06)
    # row 0 correct: c = +pi = [0.2, 0.5, 0.8] -> same shape as above: [-1.2247, 0, 1.2247]
    # row 1 MI [2, 4] -> [-1, 1]; row 1 wrong: c = -pi = [-0.9, -0.1] -> [-1, 1]
    expect = torch.tensor(
        [
            [r + 0.5 * z - 0.25 * z, r, r - 0.5 * z + 0.25 * z, 0.0],
            [-r - 0.5 - 0.25, -r + 0.5 + 0.25, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(adv, expect, atol=1e-5, rtol=0)


def test_shaping_is_the_token_part_of_the_advantage():
    # The OpenRLHF plugin adds information_shaping to OpenRLHF's own group_norm advantages.
    torch.manual_seed(1)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    mask = _mask([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    mi, pi = torch.randn(4, 4), torch.rand(4, 4)
    correct = torch.tensor([True, False, False, True])
    shaping = information_shaping(mi, pi, mask, correct, alpha=0.7, beta=0.2)
    full = iapo_advantages(rewards, mi, pi, mask, group_size=2, alpha=0.7, beta=0.2, correct=correct)
    group = group_normalized_rewards(rewards, 2, 1e-6).unsqueeze(-1) * mask
    torch.testing.assert_close(group + shaping, full, atol=1e-6, rtol=0)
    assert (shaping[~mask.bool()] == 0).all() and shaping[mask.bool()].abs().sum() > 0
    with pytest.raises(ValueError, match="correct: got None"):
        information_shaping(mi, pi, mask, None, alpha=0.0, beta=0.2)


@pytest.mark.parametrize("shaping_norm", ["zscore", "l2", "authors"])
def test_mi_mask_limits_the_mi_term_to_its_columns(shaping_norm):
    """iapo.mi_held_tokens exclude: the MI term is the norm of the MI over mi_mask's columns alone
    (the same function on the row cut to them), 0 elsewhere; the exploration term still covers
    every action token. A row whose mask is empty gets no MI term."""
    from iapo_openrlhf.core.advantages import normalize_shaping

    torch.manual_seed(3)
    mask = _mask([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]).bool()
    mi_mask = mask.clone()
    mi_mask[0, 3:] = False  # held from column 3
    mi_mask[1, 4:] = False
    mi_mask[2, :] = False  # held from the first action token
    mi, pi = torch.randn(4, 6) * 3, torch.rand(4, 6)
    correct = torch.tensor([True, False, True, False])
    got = information_shaping(mi, None, mask, None, alpha=0.6, beta=0.0, shaping_norm=shaping_norm, mi_mask=mi_mask)
    for i in range(4):
        cols = mi_mask[i].nonzero().flatten()
        expect = torch.zeros(6)
        if len(cols):
            expect[cols] = 0.6 * normalize_shaping(mi[i, cols][None], torch.ones(1, len(cols), dtype=torch.bool),
                                                   shaping_norm)[0]
        torch.testing.assert_close(got[i], expect, atol=1e-6, rtol=0)
    assert got[3].abs().sum() > 0 and not got[2].any()
    both = information_shaping(mi, pi, mask, correct, alpha=0.6, beta=0.3, shaping_norm=shaping_norm, mi_mask=mi_mask)
    explore = information_shaping(mi, pi, mask, correct, alpha=0.0, beta=0.3, shaping_norm=shaping_norm)
    torch.testing.assert_close(both, got + explore, atol=1e-6, rtol=0)
    assert explore[0, 4] != 0  # past the hold the exploration term still shapes


def test_masked_positions_exactly_zero_and_no_nan():
    torch.manual_seed(0)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    mask = _mask([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    mi = torch.randn(4, 5)
    mi[~mask.bool()] = float("nan")  # padding may hold anything
    pi = torch.rand(4, 5)
    adv = iapo_advantages(rewards, mi, pi, mask, group_size=2, alpha=1.0, beta=1.0)
    assert torch.isfinite(adv).all()
    assert (adv[~mask.bool()] == 0).all()
    assert (adv[mask.bool()] != 0).any()


def test_constant_mi_gives_zero_term_without_nan():
    mask = _mask([[1, 1, 1, 0], [1, 0, 0, 0]])
    mi = torch.tensor([[0.1, 0.1, 0.1, 5.0], [3.7, 0.0, 0.0, 0.0]])
    term = masked_sequence_normalize(mi, mask, 1e-6)
    assert torch.isfinite(term).all()
    assert term.abs().max() < 1e-6
    rewards = torch.tensor([1.0, 0.0])
    with_mi = iapo_advantages(rewards, mi, None, mask, group_size=2, alpha=2.0, beta=0.0)
    without = iapo_advantages(rewards, None, None, mask, group_size=2, alpha=0.0, beta=0.0)
    torch.testing.assert_close(with_mi, without, atol=1e-5, rtol=0)


def test_identical_rewards_give_zero_reward_term():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])  # 0.1 sums with rounding error
    mask = torch.ones(8, 3, dtype=torch.long)
    adv = iapo_advantages(rewards, None, None, mask, group_size=8, alpha=0.0, beta=0.0, eps=1e-9)
    assert (adv == 0).all()


def test_exploration_sign_follows_correctness():
    mask = torch.ones(2, 2, dtype=torch.long)
    pi = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    rewards = torch.tensor([1.0, 1.0])
    correct = torch.tensor([True, False])
    adv = iapo_advantages(rewards, None, pi, mask, group_size=2, alpha=0.0, beta=1.0, correct=correct)
    assert adv[0, 0] > adv[0, 1]  # correct: favour the confident token
    assert adv[1, 0] < adv[1, 1]  # wrong: favour the exploratory token
    ent = torch.tensor([[0.2, 3.0], [0.2, 3.0]])  # low entropy = confident
    adv_e = iapo_advantages(rewards, None, ent, mask, group_size=2, alpha=0.0, beta=1.0, correct=correct, exploration="entropy")
    torch.testing.assert_close(adv_e, adv)
    default = iapo_advantages(torch.tensor([1.0, 0.0]), None, pi, mask, group_size=2, alpha=0.0, beta=1.0)
    assert default[0, 0] - default[0, 1] > 0 > default[1, 0] - default[1, 1]


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(rewards=torch.zeros(3)), r"rewards: got shape \(3,\), expected \(4,\)"),
        (dict(mi=torch.zeros(4, 2)), r"mi: got shape \(4, 2\), expected \(4, 3\)"),
        (dict(pi_old=torch.zeros(4, 2)), r"pi_old: got shape \(4, 2\)"),
        (dict(group_size=3), "group_size: got 3 for a batch of 4"),
        (dict(group_size=1), "group_size: got 1 for a batch of 4"),
        (dict(alpha=-0.1), "alpha: got -0.1, expected a weight >= 0"),
        (dict(beta=-1.0), "beta: got -1.0, expected a weight >= 0"),
        (dict(exploration="kl"), "exploration: got 'kl'"),
        (dict(eps=0.0), "eps: got 0.0"),
        (dict(pi_old=torch.full((4, 3), -0.5)), r"pi_old: got values in \[-0.5, -0.5\], expected probabilities"),
        (dict(mi=None), "mi: got None with a nonzero weight"),
        (dict(correct=torch.ones(2, dtype=torch.bool)), r"correct: got shape \(2,\)"),
        (dict(mi_mask=torch.ones(4, 2, dtype=torch.bool)), r"mi_mask: got shape \(4, 2\), expected \(4, 3\)"),
    ],
)
def test_bad_input(change, match):
    args = dict(
        rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]), mi=torch.zeros(4, 3), pi_old=torch.full((4, 3), 0.5),
        action_mask=torch.ones(4, 3, dtype=torch.long), group_size=2, alpha=1.0, beta=1.0,
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        iapo_advantages(args.pop("rewards"), args.pop("mi"), args.pop("pi_old"), args.pop("action_mask"), **args)


def test_empty_action_row_rejected():
    mask = _mask([[1, 1], [0, 0]])
    with pytest.raises(ValueError, match=r"action_mask: rows \[1\] have no valid token"):
        iapo_advantages(torch.tensor([1.0, 0.0]), None, None, mask, group_size=2, alpha=0.0, beta=0.0)
