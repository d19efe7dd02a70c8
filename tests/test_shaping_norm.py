"""`iapo.shaping_norm` (issue 16 item 1): zscore (the paper), l2, authors (their code), on hand-computed
rows; padding holds a large value that would show in any statistic it leaked into."""

from __future__ import annotations

import math

import pytest
import torch

from iapo_openrlhf.core.advantages import (
    SHAPING_NORMS,
    group_normalized_rewards,
    iapo_advantages,
    information_shaping,
    normalize_shaping,
)

PAD = 1000.0
X = torch.tensor([[1.0, 2.0, 3.0, PAD], [2.0, 4.0, 9.0, PAD]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])


def _authors(row: list[float]) -> list[float]:
    """Their precedence by hand: s - mean / (std + 1e-8), unbiased std, then / L2 norm."""
    n = len(row)
    mean = sum(row) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (n - 1))
    y = [v - mean / (std + 1e-8) for v in row]
    norm = math.sqrt(sum(v * v for v in y))
    return [v / norm for v in y]


def test_zscore_is_the_papers_formula():
    got = normalize_shaping(X, MASK, "zscore", eps=0.0)
    z0 = 1 / math.sqrt(2 / 3)  # row [1, 2, 3]: mean 2, population std sqrt(2/3)
    s1 = math.sqrt(((2 - 5) ** 2 + (4 - 5) ** 2 + (9 - 5) ** 2) / 3)
    expected = torch.tensor([[-z0, 0.0, z0, 0.0], [-3 / s1, -1 / s1, 4 / s1, 0.0]])
    torch.testing.assert_close(got, expected)


def test_l2_divides_the_zscore_by_its_norm():
    got = normalize_shaping(X, MASK, "l2", eps=0.0)
    # a non-constant z-score over T tokens has L2 norm sqrt(T): row 0 -> [-1, 0, 1] / sqrt(2)
    r = 1 / math.sqrt(2)
    n1 = math.sqrt(9 + 1 + 16)
    expected = torch.tensor([[-r, 0.0, r, 0.0], [-3 / n1, -1 / n1, 4 / n1, 0.0]])
    torch.testing.assert_close(got, expected)
    assert got[0, :3].norm().item() == pytest.approx(1.0)


def test_authors_precedence_over_valid_tokens():
    got = normalize_shaping(X, MASK, "authors")
    expected = torch.tensor([_authors([1.0, 2.0, 3.0]) + [0.0], _authors([2.0, 4.0, 9.0]) + [0.0]])
    torch.testing.assert_close(got, expected)
    # row 1 by hand: mean 5, unbiased std sqrt(13): [2, 4, 9] - 5/sqrt(13), over its L2 norm
    y = [v - 5 / math.sqrt(13) for v in (2.0, 4.0, 9.0)]
    assert got[1, 2].item() == pytest.approx(y[2] / math.sqrt(sum(v * v for v in y)), rel=1e-6)
    # it is not a z-score: the row keeps its offset (all entries positive here)
    assert (got[1, :3] > 0).all()


@pytest.mark.parametrize("norm", SHAPING_NORMS)
def test_padding_enters_no_statistic(norm):
    padded = normalize_shaping(X, MASK, norm)
    unpadded = normalize_shaping(X[:, :3], MASK[:, :3], norm)
    torch.testing.assert_close(padded[:, :3], unpadded)
    assert (padded[:, 3] == 0).all()
    other_pad = normalize_shaping(torch.where(MASK.bool(), X, -7.0), MASK, norm)
    assert torch.equal(other_pad, padded)


def test_degenerate_rows():
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 0]])
    x = torch.tensor([[3.0, PAD, PAD], [5.0, 5.0, PAD], [0.0, PAD, PAD]])
    assert torch.equal(normalize_shaping(x, mask, "zscore"), torch.zeros(3, 3))
    assert torch.equal(normalize_shaping(x, mask, "l2"), torch.zeros(3, 3))
    authors = normalize_shaping(x, mask, "authors")
    # one token: no unbiased std, taken as 0 -> 3 - 3e8 -> -1 after the L2 norm; a zero row stays 0
    # constant row [5, 5]: std 0 -> 5 - 5e8 on both -> -1/sqrt(2) each
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(authors, torch.tensor([[-1.0, 0, 0], [-r, -r, 0], [0, 0, 0]]))


def test_advantages_use_the_chosen_norm():
    rewards = torch.tensor([1.0, -1.0])
    mi = X.clone()
    pi = torch.tensor([[0.2, 0.5, 0.8, 0.9], [0.9, 0.1, 0.3, 0.9]])
    correct = torch.tensor([True, False])
    for norm in SHAPING_NORMS:
        adv = iapo_advantages(rewards, mi, pi, MASK, group_size=2, alpha=0.5, beta=0.25, correct=correct,
                              shaping_norm=norm)
        sign = torch.tensor([[1.0], [-1.0]])
        expected = (group_normalized_rewards(rewards, 2).unsqueeze(-1) + 0.5 * normalize_shaping(mi, MASK, norm)
                    + 0.25 * normalize_shaping(sign * pi, MASK, norm)) * MASK
        torch.testing.assert_close(adv, expected)
    default = information_shaping(mi, pi, MASK, correct, alpha=0.5, beta=0.25)
    torch.testing.assert_close(default, information_shaping(mi, pi, MASK, correct, alpha=0.5, beta=0.25,
                                                            shaping_norm="zscore"))
    with pytest.raises(ValueError, match="shaping_norm: got 'l3'"):
        information_shaping(mi, pi, MASK, correct, alpha=0.5, beta=0.25, shaping_norm="l3")
