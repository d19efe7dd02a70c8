"""Entropy and log-probabilities from logits, framework-free.

Both functions upcast to fp32 block by block: bf16 logits of a 152k vocabulary lose most of their
mantissa in a softmax sum, while upcasting a whole (B, L, V) tensor at once would double the
largest activation of the step. Blocks of rows keep the fp32 temporary bounded.
"""

from __future__ import annotations

import torch

# Rows of logits upcast to fp32 at a time: 4096 rows x 152k vocab x 4 bytes ~ 2.5 GB at the worst.
_ROWS_PER_BLOCK = 4096


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature: got {temperature}, expected a number > 0")


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of softmax(logits / temperature) over the last dimension.

    logits: (..., V) in any float dtype. Returns (...,) in fp32.
    Uses H = logsumexp(z) - sum(softmax(z) * z) on max-shifted z: finite for any finite logits and
    free of the cancellation between two terms of the size of the largest logit.
    """
    _check_temperature(temperature)
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], _ROWS_PER_BLOCK):
        z = flat[start : start + _ROWS_PER_BLOCK].float()
        if temperature != 1.0:
            z = z / temperature
        # Shifting by the max keeps both terms of the difference below log(V) instead of ~max(z).
        z = z - z.amax(-1, keepdim=True)
        log_z = torch.logsumexp(z, dim=-1, keepdim=True)
        p = torch.exp(z - log_z)
        out[start : start + _ROWS_PER_BLOCK] = log_z.squeeze(-1) - (p * z).sum(-1)
    return out.reshape(logits.shape[:-1])


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[label] in fp32.

    logits: (..., V); labels: (...,) integer. Returns (...,) in fp32.
    """
    _check_temperature(temperature)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels: got shape {tuple(labels.shape)}, expected {tuple(logits.shape[:-1])}")
    flat = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1, 1)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], _ROWS_PER_BLOCK):
        z = flat[start : start + _ROWS_PER_BLOCK].float()
        if temperature != 1.0:
            z = z / temperature
        picked = z.gather(-1, flat_labels[start : start + _ROWS_PER_BLOCK]).squeeze(-1)
        out[start : start + _ROWS_PER_BLOCK] = picked - torch.logsumexp(z, dim=-1)
    return out.reshape(labels.shape)
