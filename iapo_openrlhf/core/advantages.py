"""IAPO token-wise advantages (DESIGN section 2), pure tensor functions.

    A[i, t] = norm(r_i; group) + alpha * norm(s[i, t]; seq i) + beta * norm(c[i, t]; seq i)

Shapes: B = number of completions (groups of `group_size` consecutive rows), A = response columns.
Every function returns exactly 0 on masked positions, so padding never leaks into a loss.
"""

from __future__ import annotations

import torch

EXPLORATION_MODES = ("prob", "entropy")
# How each shaping term is normalised over the valid tokens of its sequence (issue 16 item 1):
#   zscore   (x - mean) / (std + eps)                       the paper's norm(x; seq), the default
#   l2       zscore, then divided by its L2 norm            the authors' scaling, correct precedence
#   authors  (x - mean / (std + 1e-8)) / its L2 norm        the authors' released code, valid tokens only
SHAPING_NORMS = ("zscore", "l2", "authors")


def group_normalized_rewards(rewards: torch.Tensor, group_size: int, eps: float = 1e-9) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps) with the unbiased std, as OpenRLHF's `group_norm`.

    rewards: (B,) with groups of `group_size` consecutive rows. Returns (B,) in at least fp32.
    The arithmetic is OpenRLHF's, op for op, so alpha = beta = 0 reproduces its advantages bit
    for bit; a group whose rewards are all identical gets exactly 0 instead of rounding noise
    divided by eps.
    """
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).reshape(-1, group_size)
    normed = (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + eps)
    constant = (r.amax(-1, keepdim=True) == r.amin(-1, keepdim=True)).expand_as(r)
    return torch.where(constant, torch.zeros_like(normed), normed).reshape(-1)


def masked_sequence_normalize(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(x - mean) / (std + eps) over the valid tokens of each row; 0 on masked tokens.

    x, mask: (B, A). Population std (a one-token row gives 0, not NaN). Statistics are taken in
    fp64: a near-constant row in fp32 leaves rounding noise of the order of eps, which the
    division would blow up to O(1). Returns (B, A) fp32.
    """
    valid = mask.bool()
    x64 = torch.where(valid, x.double(), 0.0)
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = x64.sum(-1, keepdim=True) / count
    centered = torch.where(valid, x64 - mean, 0.0)
    std = (centered.pow(2).sum(-1, keepdim=True) / count).sqrt()
    return (centered / (std + eps)).float()


def _l2_scaled(x64: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x / ||x||_2 over the valid tokens of each row (fp64 in, fp64 out); a zero row stays 0."""
    x64 = torch.where(valid, x64, 0.0)
    norm = x64.pow(2).sum(-1, keepdim=True).sqrt()
    return torch.where(norm > 0, x64 / torch.where(norm > 0, norm, 1.0), 0.0)


def normalize_shaping(x: torch.Tensor, mask: torch.Tensor, norm: str = "zscore", eps: float = 1e-6) -> torch.Tensor:
    """One shaping term normalised per sequence over its valid tokens only; 0 on masked tokens.

    x, mask: (B, A). Returns (B, A) fp32. Padding enters no statistic in any mode.
      zscore:  (x - mean) / (std + eps), population std (`masked_sequence_normalize`): the paper's
               norm(x; seq).
      l2:      the z-score divided by its L2 norm over the valid tokens. With T valid tokens and a
               non-constant row the z-score has norm ~sqrt(T), so each token gets ~z / sqrt(T):
               the weight of the term no longer grows with the sequence's length.
      authors: the authors' released code, `s - s.mean / (s.std + 1e-8)` (Python precedence: the
               mean divided by the std is subtracted from s, no centring), then divided by its L2
               norm; mean and unbiased std (torch's default `.std()`) over the valid tokens only,
               where their code takes them over the padded row. A one-token row has no unbiased
               std: it is taken as 0 there.
    """
    if norm not in SHAPING_NORMS:
        raise ValueError(f"shaping_norm: got {norm!r}, expected one of {SHAPING_NORMS}")
    valid = mask.bool()
    if norm == "zscore":
        return masked_sequence_normalize(x, valid, eps)
    if norm == "l2":
        z = masked_sequence_normalize(x, valid, eps).double()
        return torch.where(valid, _l2_scaled(z, valid), 0.0).float()
    x64 = torch.where(valid, x.double(), 0.0)
    count = valid.sum(-1, keepdim=True)
    mean = x64.sum(-1, keepdim=True) / count.clamp(min=1)
    centered = torch.where(valid, x64 - mean, 0.0)
    var = centered.pow(2).sum(-1, keepdim=True) / (count - 1).clamp(min=1)
    std = torch.where(count > 1, var.sqrt(), 0.0)
    precedence = x64 - mean / (std + 1e-8)
    return torch.where(valid, _l2_scaled(precedence, valid), 0.0).float()


def exploration_signal(
    pi_old: torch.Tensor, correct: torch.Tensor, exploration: str = "prob"
) -> torch.Tensor:
    """c[i, t] = sign_i * confidence[i, t], sign +1 for correct completions and -1 otherwise.

    Confidence is pi_old(o_t) for "prob" and minus the next-token entropy for "entropy": in both
    cases a correct completion is pushed towards confident tokens and a wrong one away from them.
    pi_old: (B, A); correct: (B,) bool. Returns (B, A).
    """
    sign = torch.where(correct.bool(), 1.0, -1.0).to(pi_old.device).unsqueeze(-1)
    confidence = pi_old.float() if exploration == "prob" else -pi_old.float()
    return sign * confidence


def _validate_shaping(mi, pi_old, action_mask, alpha, beta, correct, eps, exploration, shaping_norm="zscore",
                      mi_mask=None) -> None:
    if action_mask.dim() != 2:
        raise ValueError(f"action_mask: got shape {tuple(action_mask.shape)}, expected (B, A)")
    b, a = action_mask.shape
    if mi_mask is not None and mi_mask.shape != (b, a):
        raise ValueError(f"mi_mask: got shape {tuple(mi_mask.shape)}, expected ({b}, {a}) like action_mask")
    for name, value, weight in (("mi", mi, alpha), ("pi_old", pi_old, beta)):
        if value is None:
            if weight != 0:
                raise ValueError(f"{name}: got None with a nonzero weight, expected a ({b}, {a}) tensor")
        elif value.shape != (b, a):
            raise ValueError(f"{name}: got shape {tuple(value.shape)}, expected ({b}, {a}) like action_mask")
    if correct is not None and correct.shape != (b,):
        raise ValueError(f"correct: got shape {tuple(correct.shape)}, expected ({b},)")
    for name, weight in (("alpha", alpha), ("beta", beta)):
        if not weight >= 0:
            raise ValueError(f"{name}: got {weight}, expected a weight >= 0")
    if not eps > 0:
        raise ValueError(f"eps: got {eps}, expected a number > 0")
    if exploration not in EXPLORATION_MODES:
        raise ValueError(f"exploration: got {exploration!r}, expected one of {EXPLORATION_MODES}")
    if shaping_norm not in SHAPING_NORMS:
        raise ValueError(f"shaping_norm: got {shaping_norm!r}, expected one of {SHAPING_NORMS}")
    empty = (action_mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"action_mask: rows {empty[:8]} have no valid token, expected at least one per row")
    if exploration == "prob" and pi_old is not None and beta != 0:
        valid = pi_old[action_mask.bool()]
        if valid.numel() and (valid.min() < 0 or valid.max() > 1):
            raise ValueError(
                f"pi_old: got values in [{valid.min().item():.3g}, {valid.max().item():.3g}], expected probabilities "
                "in [0, 1] (pass action_log_probs.exp(), not log-probs)"
            )


def information_shaping(
    mi: torch.Tensor | None,
    pi_old: torch.Tensor | None,
    action_mask: torch.Tensor,
    correct: torch.Tensor | None,
    *,
    alpha: float,
    beta: float,
    eps: float = 1e-6,
    exploration: str = "prob",
    shaping_norm: str = "zscore",
    mi_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """alpha * norm(s; seq) + beta * norm(c; seq): the token-wise part of the IAPO advantage, (B, A)
    fp32, 0 on masked positions. `shaping_norm` picks norm (`normalize_shaping`).
    mi_mask: (B, A) bool, the columns the MI term covers (statistics and shaping), a subset of
    action_mask; default action_mask. iapo.mi_held_tokens "exclude" passes `mi.before_columns`.

    Kept apart from the reward term so the OpenRLHF plugin can add it to the advantages OpenRLHF
    itself computed (group_norm, KL-in-reward, length penalties), which keeps alpha = beta = 0
    identical to OpenRLHF. mi, pi_old: (B, A) as in `iapo_advantages`; correct: (B,) bool
    exploration sign, needed when beta != 0.
    """
    _validate_shaping(mi, pi_old, action_mask, alpha, beta, correct, eps, exploration, shaping_norm, mi_mask)
    valid = action_mask.bool()
    shaping = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    if alpha != 0:
        mi_valid = valid if mi_mask is None else valid & mi_mask.bool().to(valid.device)
        shaping = shaping + alpha * normalize_shaping(mi, mi_valid, shaping_norm, eps)
    if beta != 0:
        if correct is None:
            raise ValueError("correct: got None with a nonzero beta, expected a (B,) bool tensor (the exploration sign)")
        c = exploration_signal(pi_old, correct, exploration)
        shaping = shaping + beta * normalize_shaping(c, valid, shaping_norm, eps)
    return torch.where(valid, shaping, torch.zeros_like(shaping))


def iapo_advantages(
    rewards: torch.Tensor,
    mi: torch.Tensor | None,
    pi_old: torch.Tensor | None,
    action_mask: torch.Tensor,
    *,
    group_size: int,
    alpha: float,
    beta: float,
    correct: torch.Tensor | None = None,
    eps: float = 1e-6,
    exploration: str = "prob",
    shaping_norm: str = "zscore",
    mi_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """IAPO advantages, (B, A) fp32, exactly 0 on masked positions.

    rewards: (B,) scalar reward per completion, groups of `group_size` consecutive rows.
    mi: (B, A) per-token conditional MI s[i, t] (see `mi.token_mi`); may be None when alpha = 0.
    pi_old: (B, A) probability of each sampled token under the rollout policy, or with
        exploration="entropy" the policy's next-token entropy; may be None when beta = 0.
    correct: (B,) bool deciding the exploration sign; defaults to rewards > 0.
    eps: added to every std (group and per-sequence).
    shaping_norm: how the MI and exploration terms are normalised per sequence (`normalize_shaping`).
    mi_mask: (B, A) bool, the columns the MI term covers (`information_shaping`); default action_mask.
    """
    if action_mask.dim() != 2:
        raise ValueError(f"action_mask: got shape {tuple(action_mask.shape)}, expected (B, A)")
    b = action_mask.shape[0]
    if rewards.shape != (b,):
        raise ValueError(f"rewards: got shape {tuple(rewards.shape)}, expected ({b},) to match action_mask (B, A)")
    if not isinstance(group_size, int) or group_size < 2 or b % group_size != 0:
        raise ValueError(
            f"group_size: got {group_size} for a batch of {b}, expected an integer >= 2 that divides the batch "
            "(IAPO normalises rewards within groups of samples of the same prompt)"
        )
    sign = (rewards > 0) if correct is None else correct
    shaping = information_shaping(mi, pi_old, action_mask, sign, alpha=alpha, beta=beta, eps=eps, exploration=exploration,
                                  shaping_norm=shaping_norm, mi_mask=mi_mask)
    valid = action_mask.bool()
    adv = group_normalized_rewards(rewards, group_size, eps).float().unsqueeze(-1) + shaping
    return torch.where(valid, adv, torch.zeros_like(adv))
