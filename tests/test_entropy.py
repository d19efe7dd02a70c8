"""Entropy and log-probs against float64 references."""

from __future__ import annotations

import pytest
import torch

from iapo_openrlhf.core import entropy as entropy_mod
from iapo_openrlhf.core.entropy import entropy_from_logits, log_probs_from_logits


def _reference_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    p = torch.softmax(logits.double() / temperature, -1)
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_entropy_matches_float64(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 1000) * 4
    got = entropy_from_logits(logits, temperature)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _reference_entropy(logits, temperature), atol=1e-5, rtol=0)


def test_entropy_large_vocab_and_extreme_logits():
    torch.manual_seed(1)
    logits = torch.randn(2, 152_064) * 3
    logits[0, 7] = 1e4  # one token carries all the mass: entropy ~ 0, no NaN from exp overflow
    got = entropy_from_logits(logits)
    assert torch.isfinite(got).all()
    assert got[0].abs() < 1e-6
    torch.testing.assert_close(got[1].double(), _reference_entropy(logits[1], 1.0), atol=1e-4, rtol=0)


def test_entropy_bf16_accumulates_in_fp32():
    torch.manual_seed(2)
    logits = (torch.randn(4, 152_064) * 2).bfloat16()
    got = entropy_from_logits(logits)
    assert got.dtype == torch.float32
    # the reference sees the same bf16 values, so only the accumulation differs
    torch.testing.assert_close(got.double(), _reference_entropy(logits.float(), 1.0), atol=1e-4, rtol=0)


def test_blocks_cover_every_row(monkeypatch):
    monkeypatch.setattr(entropy_mod, "_ROWS_PER_BLOCK", 3)
    torch.manual_seed(3)
    logits = torch.randn(2, 5, 50)
    labels = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(entropy_from_logits(logits).double(), _reference_entropy(logits, 1.0), atol=1e-5, rtol=0)
    expect = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(log_probs_from_logits(logits, labels).double(), expect, atol=1e-5, rtol=0)


def test_log_probs_temperature():
    torch.manual_seed(4)
    logits = torch.randn(6, 300) * 5
    labels = torch.randint(0, 300, (6,))
    got = log_probs_from_logits(logits, labels, temperature=0.5)
    expect = torch.log_softmax(logits.double() / 0.5, -1)[torch.arange(6), labels]
    torch.testing.assert_close(got.double(), expect, atol=1e-5, rtol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature: got 0"):
        entropy_from_logits(torch.zeros(2, 3), temperature=0)
    with pytest.raises(ValueError, match=r"labels: got shape \(3,\), expected \(2,\)"):
        log_probs_from_logits(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
