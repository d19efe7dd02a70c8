"""PPO policy loss with clip-higher and a k3 KL penalty, pure tensor functions.

Shapes: (B, A) per-token tensors with an action mask; the aggregation decides whether long
completions weigh more (token_mean, DAPO's choice and OpenRLHF's default) or every completion
weighs the same (seq_mean).
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, agg: str = "token_mean") -> torch.Tensor:
    """token_mean: mean over all valid tokens of the batch; seq_mean: mean over rows of each row's mean."""
    m = mask.to(x.dtype)
    if agg == "token_mean":
        return (x * m).sum() / m.sum().clamp(min=1)
    if agg == "seq_mean":
        return ((x * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    raise ValueError(f"loss_agg: got {agg!r}, expected 'token_mean' or 'seq_mean'")


def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): exp(r) - r - 1 with r = log pi_ref - log pi.

    Non-negative and unbiased under samples from pi (Schulman's "Approximating KL divergence").
    """
    log_ratio = (ref_log_probs.float() - log_probs.float()).clamp(-20, 20)
    return log_ratio.exp() - log_ratio - 1


def ppo_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    agg: str = "token_mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A), aggregated over valid tokens.

    All (B, A). clip_eps_high > clip_eps_low is DAPO's clip-higher: low-probability tokens with a
    positive advantage may grow further before the clip stops their gradient.
    Returns the scalar loss and detached statistics (clip fraction, approximate KL to old).
    """
    log_ratio = log_probs.float() - old_log_probs.float()
    ratio = log_ratio.exp()
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * advantages
    loss = masked_mean(-torch.min(surr1, surr2), action_mask, agg)
    with torch.no_grad():
        clipped = (surr2 < surr1).float()
        stats = {
            "clip_frac": masked_mean(clipped, action_mask).item(),
            "approx_kl_old": masked_mean(0.5 * log_ratio.pow(2), action_mask).item(),
        }
    return loss, stats


def ib_regularizer(
    advantages: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, agg: str = "token_mean"
) -> torch.Tensor:
    """Information-bottleneck regularisation (arXiv 2507.18391): the advantage-weighted entropy.

    J_IB = sum_t A_t * H_t, aggregated like the policy loss; the loss SUBTRACTS coef * J_IB, so a
    token with a positive advantage is pushed to higher entropy and one with a negative advantage
    to lower entropy (the paper's "one-line change" of the entropy bonus, coefficient 0.005).
    advantages, entropy, mask: (B, A); entropy is the current policy's next-token entropy with its
    gradient, the advantages are constants. Returns a scalar.
    """
    return masked_mean(advantages.detach().float() * entropy.float(), mask, agg)
