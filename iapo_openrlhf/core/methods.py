"""Every method of the IAPO paper's table and of the related papers, as pure tensor functions.

One code path, one registry: a method is a named combination of components (`METHODS`), each a
function here or in `advantages.py` / `loss.py`, shared by the local backend and the OpenRLHF
plugin so that every method sees the same rollouts, loss and evaluation:

    component        where it acts                          methods
    advantage        (B,) rewards -> (B, A) advantages      grpo (group norm), iapo, gtpo, grpo_s
    rollout filter   keep k of the G samples of a prompt    gfpo
    reward shaping   (B,) rewards before the baseline       significance (dapo: overlong penalty)
    loss mask        which tokens enter the loss            sgrpo
    loss term        added to the PPO loss                  ib (usable with any method)

Advantage estimators are registered by name like verl's `core_algos.py`
(`register_advantage` / `get_advantage_fn`); all take the same keyword signature
`fn(rewards, action_mask, *, group_size, correct=None, mi=None, pi_old=None, entropy=None, **knobs)`
and return (B, A) fp32 that is exactly 0 on masked positions.

Shapes: B completions in groups of `group_size` consecutive rows (the samples of one prompt),
A response columns; `action_mask` (B, A) marks the valid response tokens (a prefix of each row).
No statistic anywhere reads a padded position.

Where a paper leaves a choice open, or where its full text was not available to us, the choice is
ours and says so in the function's docstring; README "Methods" lists them all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .advantages import group_normalized_rewards, iapo_advantages

AdvantageFn = Callable[..., torch.Tensor]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {}

GFPO_METRICS = ("length", "reward_per_token")
GTPO_LEVELS = ("token", "sequence")
SIGNIFICANCE_SELECTIONS = ("fraction", "threshold")
SIGNIFICANCE_SCHEDULES = ("dynamic", "static")
ENTROPY_FLOOR = 1e-6  # GTPO's 1 / H for a wrong answer's token: a zero-entropy token must stay finite


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register an advantage estimator under `name` (decorator)."""

    def decorator(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGE_ESTIMATORS and ADVANTAGE_ESTIMATORS[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return decorator


def get_advantage_fn(name: str) -> AdvantageFn:
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage estimator: got {name!r}, expected one of {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]


def _check_batch(rewards: torch.Tensor, action_mask: torch.Tensor, group_size: int) -> None:
    if action_mask.dim() != 2:
        raise ValueError(f"action_mask: got shape {tuple(action_mask.shape)}, expected (B, A)")
    b = action_mask.shape[0]
    if rewards.shape != (b,):
        raise ValueError(f"rewards: got shape {tuple(rewards.shape)}, expected ({b},) to match action_mask (B, A)")
    if not isinstance(group_size, int) or group_size < 1 or b % group_size != 0:
        raise ValueError(f"group_size: got {group_size} for a batch of {b}, expected a positive integer dividing it")


def _check_token_tensor(name: str, value, action_mask: torch.Tensor) -> None:
    if value is None:
        raise ValueError(f"{name}: got None, expected a {tuple(action_mask.shape)} tensor")
    if value.shape != action_mask.shape:
        raise ValueError(f"{name}: got shape {tuple(value.shape)}, expected {tuple(action_mask.shape)} like action_mask")


def _check_correct(correct, b: int) -> torch.Tensor:
    if correct is None:
        raise ValueError(f"correct: got None, expected a ({b},) bool tensor")
    if correct.shape != (b,):
        raise ValueError(f"correct: got shape {tuple(correct.shape)}, expected ({b},)")
    return correct.bool()


# ── advantages ──────────────────────────────────────────────────────────────────────────────


@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, action_mask: torch.Tensor, *, group_size: int, **_) -> torch.Tensor:
    """GRPO: the group-normalised reward (OpenRLHF's `group_norm`) on every valid token.

    rewards (B,), action_mask (B, A) -> (B, A) fp32; a group with equal rewards gets exactly 0.
    """
    _check_batch(rewards, action_mask, group_size)
    adv = group_normalized_rewards(rewards, group_size).float().unsqueeze(-1).to(action_mask.device)
    valid = action_mask.bool()
    return torch.where(valid, adv.expand(valid.shape), 0.0)


@register_advantage("iapo")
def iapo_advantage_fn(
    rewards: torch.Tensor, action_mask: torch.Tensor, *, group_size: int, correct=None, mi=None, pi_old=None,
    alpha: float = 0.5, beta: float = 0.1, exploration: str = "prob", shaping_norm: str = "zscore", eps: float = 1e-6,
    **_,
) -> torch.Tensor:
    """IAPO (DESIGN section 2): `iapo_advantages` under the registry's signature.

    mi: (B, A) token MI; pi_old: (B, A) pi_old(o_t), or the next-token entropy with
    exploration="entropy" (the registry's `entropy` is not used: pass it as pi_old).
    """
    return iapo_advantages(rewards, mi, pi_old, action_mask, group_size=group_size, alpha=alpha, beta=beta,
                           correct=correct, eps=eps, exploration=exploration, shaping_norm=shaping_norm)


def _set_weights(values: torch.Tensor, members: torch.Tensor, group_size: int) -> torch.Tensor:
    """values * d_t / sum over the set's members present at position t: (B, A) -> (B, A).

    values, members: (B, A), members a bool mask of (token valid) & (row in the set). Within a
    group the weights of the d_t members present at a position sum to d_t, i.e. average 1.
    """
    v = torch.where(members, values, 0.0)
    g = v.reshape(-1, group_size, v.shape[-1])
    m = members.reshape(-1, group_size, v.shape[-1])
    total = g.sum(1, keepdim=True)
    present = m.sum(1, keepdim=True).to(v.dtype)
    w = torch.where(m & (total > 0), g / torch.where(total > 0, total, 1.0) * present, 0.0)
    return w.reshape(v.shape)


def _token_group_normalize(x: torch.Tensor, valid: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """(x - mean) / (std + eps) over all valid tokens of each group (population std); 0 on padding.

    A group whose valid tokens all hold the same value gets exactly 0."""
    a = x.shape[-1]
    g = torch.where(valid, x, 0.0).reshape(-1, group_size * a)
    m = valid.reshape(-1, group_size * a)
    count = m.sum(-1, keepdim=True).clamp(min=1)
    mean = g.sum(-1, keepdim=True) / count
    centered = torch.where(m, g - mean, 0.0)
    std = (centered.pow(2).sum(-1, keepdim=True) / count).sqrt()
    hi = torch.where(m, g, -math.inf).amax(-1, keepdim=True)
    lo = torch.where(m, g, math.inf).amin(-1, keepdim=True)
    out = torch.where(hi == lo, torch.zeros_like(centered), centered / (std + eps))
    return torch.where(valid, out.reshape(x.shape), 0.0)


@register_advantage("gtpo")
def gtpo_advantages(
    rewards: torch.Tensor, action_mask: torch.Tensor, *, group_size: int, correct=None, entropy=None,
    reward_weight: float = 1.0, entropy_weight: float = 1.0, eps: float = 1e-6, **_,
) -> torch.Tensor:
    """GTPO (Tan et al., arXiv 2508.04349): entropy-weighted token rewards, token-level advantages.

    rewards (B,); correct (B,) bool; entropy (B, A) the policy's next-token entropy H[i, t] at the
    position where token o[i, t] was sampled (temperature-scaled like the rollout). Within each
    group, S+ are the correct completions and S- the others; d_t is the number of completions of
    the set that have a token at position t. The abstract defines the weight ratio
    H[i, t] / sum_k H[k, t] "and similar variants to redistribute rewards"; our reading:

        correct i:  r~[i, t] = w1 * r_i + w2 * d_t * H[i, t] / sum_{k in S+ at t} H[k, t]
        wrong j:    r~[j, t] = w1 * r_j - w2 * d_t * (1/H[j, t]) / sum_{k in S- at t} (1/H[k, t])

    so confident (low-entropy) tokens of a wrong answer carry most of its extra penalty and
    uncertain (high-entropy) tokens of a right answer most of its bonus; at each position the
    entropy weights of a set average 1. A[i, t] = (r~[i, t] - mean) / (std + eps), mean and
    population std over every valid token of the group (both sets together, so a correct
    answer's tokens stay above a wrong one's). Choices of ours where the text we could read is
    silent: r_i is the run's scalar reward (not a fixed +-1), H is floored at 1e-6 before 1/H,
    d_t counts members of the same set, w1 = reward_weight and w2 = entropy_weight (default 1, 1).
    Returns (B, A) fp32, exactly 0 on padding; a group whose token rewards are all equal gets 0.
    """
    _check_batch(rewards, action_mask, group_size)
    _check_token_tensor("entropy", entropy, action_mask)
    pos = _check_correct(correct, rewards.shape[0]).to(action_mask.device).unsqueeze(-1)
    valid = action_mask.bool()
    h = entropy.double().clamp(min=ENTROPY_FLOOR)
    bonus = _set_weights(h, valid & pos, group_size)
    penalty = _set_weights(1.0 / h, valid & ~pos, group_size)
    token_reward = reward_weight * rewards.double().unsqueeze(-1).to(h.device) + entropy_weight * (bonus - penalty)
    return _token_group_normalize(token_reward, valid, group_size, eps).float()


@register_advantage("grpo_s")
def grpo_s_advantages(
    rewards: torch.Tensor, action_mask: torch.Tensor, *, group_size: int, correct=None, entropy=None,
    reward_weight: float = 1.0, entropy_weight: float = 1.0, **_,
) -> torch.Tensor:
    """GRPO-S (Tan et al., arXiv 2508.04349): GTPO's weighting at the sequence level.

    With Hbar_i the mean entropy over sequence i's valid tokens and n+ / n- the sizes of the
    group's correct / wrong sets:

        correct i:  r^_i = w1 * r_i + w2 * n+ * Hbar_i / sum_{k in S+} Hbar_k
        wrong j:    r^_j = w1 * r_j - w2 * n- * (1/Hbar_j) / sum_{k in S-} (1/Hbar_k)

    and the advantage is the group normalisation of r^ (GRPO's), the same on every valid token.
    Same choices as `gtpo_advantages`. Returns (B, A) fp32, 0 on padding.
    """
    _check_batch(rewards, action_mask, group_size)
    _check_token_tensor("entropy", entropy, action_mask)
    pos = _check_correct(correct, rewards.shape[0]).to(action_mask.device)
    valid = action_mask.bool()
    count = valid.sum(-1).clamp(min=1)
    h_bar = (torch.where(valid, entropy.double(), 0.0).sum(-1) / count).clamp(min=ENTROPY_FLOOR)
    ones = torch.ones_like(h_bar, dtype=torch.bool)
    bonus = _set_weights(h_bar.unsqueeze(-1), (ones & pos).unsqueeze(-1), group_size).squeeze(-1)
    penalty = _set_weights((1.0 / h_bar).unsqueeze(-1), (ones & ~pos).unsqueeze(-1), group_size).squeeze(-1)
    shaped = reward_weight * rewards.double().to(h_bar.device) + entropy_weight * (bonus - penalty)
    return grpo_advantages(shaped, action_mask, group_size=group_size)


# ── GFPO: rollout filter ────────────────────────────────────────────────────────────────────


def gfpo_keep_mask(
    rewards: torch.Tensor, lengths: torch.Tensor, *, group_size: int, keep: int, metric: str = "length"
) -> torch.Tensor:
    """GFPO (Shrivastava et al., arXiv 2508.09726): of the G responses sampled for a prompt, keep
    the k with the best metric; the policy is updated on those k only.

    rewards, lengths: (B,) with groups of G = group_size consecutive rows; lengths are response
    tokens (EOS included, as counted in the action mask). metric "length": the k shortest;
    "reward_per_token": the k with the highest reward / length ("token efficiency"; with negative
    rewards a longer wrong answer has the higher ratio, as the metric is defined). Ties keep the
    earlier sample (stable order), so the result is deterministic; k = G keeps everything (GRPO).
    Returns (B,) bool with exactly k True per group.

    The paper gives filtered-out responses zero advantage and normalises the kept ones by the
    kept set's mean and std; we drop them before anything else is computed (MI pass, log-probs,
    group baseline, PPO update), which gives the same advantages for the kept ones without
    paying for the others. Adaptive-difficulty GFPO (k per prompt) is not implemented.
    """
    if rewards.dim() != 1 or lengths.shape != rewards.shape:
        raise ValueError(f"rewards, lengths: got shapes {tuple(rewards.shape)} and {tuple(lengths.shape)}, expected (B,) each")
    b = rewards.shape[0]
    if not isinstance(group_size, int) or group_size < 1 or b % group_size != 0:
        raise ValueError(f"group_size: got {group_size} for a batch of {b}, expected a positive integer dividing it")
    if not isinstance(keep, int) or not 1 <= keep <= group_size:
        raise ValueError(f"keep: got {keep}, expected an integer in [1, {group_size}] (the samples per prompt)")
    if metric not in GFPO_METRICS:
        raise ValueError(f"metric: got {metric!r}, expected one of {GFPO_METRICS}")
    length = lengths.double().reshape(-1, group_size)
    if metric == "length":
        score = -length
    else:
        score = rewards.double().reshape(-1, group_size) / length.clamp(min=1)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :keep]
    kept = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, order, True)
    return kept.reshape(-1)


# ── S-GRPO: loss mask ───────────────────────────────────────────────────────────────────────


def sgrpo_token_mask(
    action_mask: torch.Tensor, *, keep_first: int, keep_prob: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """S-GRPO (Lee & Tong, arXiv 2504.20834): the loss over a random subset of each completion's tokens.

    The paper trains "on a small, informative subset of output tokens", a summary of it reports
    30-50% of the tokens, "prioritizing early tokens while stochastically dropping later ones".
    Our rule (the paper's exact schedule was not in the text we could read): the first
    `keep_first` response tokens are always kept and every later token independently with
    probability `keep_prob` (defaults 32 and 0.3: on GSM8K-length answers about 40-50% kept).
    action_mask: (B, A). Returns (B, A) bool, False on padding; a row keeps at least
    min(keep_first, its length) tokens. The draw uses `generator` (CPU) when given.
    """
    if action_mask.dim() != 2:
        raise ValueError(f"action_mask: got shape {tuple(action_mask.shape)}, expected (B, A)")
    if not isinstance(keep_first, int) or keep_first < 0:
        raise ValueError(f"keep_first: got {keep_first}, expected an integer >= 0")
    if not 0.0 <= keep_prob <= 1.0:
        raise ValueError(f"keep_prob: got {keep_prob}, expected a probability in [0, 1]")
    valid = action_mask.bool()
    position = valid.long().cumsum(-1) - 1  # index of each valid token within its response
    draw = torch.rand(valid.shape, generator=generator, device="cpu").to(valid.device) < keep_prob
    return valid & ((position < keep_first) | draw)


# ── significance-aware length reward (seed 003) ─────────────────────────────────────────────


def insignificant_tokens(
    mi: torch.Tensor, action_mask: torch.Tensor, *, group_size: int, selection: str = "fraction",
    fraction: float = 0.5, threshold: float = 0.01,
) -> torch.Tensor:
    """Which response tokens are insignificant for the answer, from our MI estimator.

    Significance-aware length reward (Liu et al., arXiv 2506.08125): their significance model is
    not public; this is our reading of the abstract ("many CoT tokens contribute little to the
    final answer"): a token's significance is |MI| of `mi.token_mi`, the answer-entropy drop it
    causes. selection "threshold": |MI| < threshold (nats); "fraction": the `fraction` of the
    group's valid tokens with the smallest |MI| (pooled over the G completions of a prompt, so a
    completion rich in low-MI tokens holds more of them; ties broken by position, row-major).
    mi, action_mask: (B, A). Returns (B, A) bool, False on padding.
    """
    if mi.shape != action_mask.shape or mi.dim() != 2:
        raise ValueError(f"mi: got shape {tuple(mi.shape)}, expected {tuple(action_mask.shape)} like action_mask")
    b, a = action_mask.shape
    if not isinstance(group_size, int) or group_size < 1 or b % group_size != 0:
        raise ValueError(f"group_size: got {group_size} for a batch of {b}, expected a positive integer dividing it")
    if selection not in SIGNIFICANCE_SELECTIONS:
        raise ValueError(f"selection: got {selection!r}, expected one of {SIGNIFICANCE_SELECTIONS}")
    valid = action_mask.bool()
    score = mi.double().abs()
    if selection == "threshold":
        if not threshold >= 0:
            raise ValueError(f"threshold: got {threshold}, expected a value >= 0")
        return valid & (score < threshold)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: got {fraction}, expected a value in [0, 1]")
    out = torch.zeros_like(valid)
    flat_valid = valid.reshape(-1, group_size * a)
    flat_score = score.reshape(-1, group_size * a)
    flat_out = out.reshape(-1, group_size * a)
    for g in range(flat_valid.shape[0]):
        idx = flat_valid[g].nonzero().flatten()
        n_low = int(math.floor(fraction * idx.numel()))
        if n_low:
            order = torch.sort(flat_score[g, idx], stable=True).indices[:n_low]
            flat_out[g, idx[order]] = True
    return flat_out.reshape(b, a)


def significance_phase(progress: float, schedule: str = "dynamic", switch: float = 0.5) -> float:
    """Sign and strength of the length reward at `progress` = step / total steps, in [-1, 1].

    The paper's dynamic length reward "encourages more detailed reasoning early in training and
    gradually shifts toward conciseness"; our schedule: linear from -1 (reward more tokens) at the
    start to 0 at `switch` and to +1 (reward fewer) at the end. "static": +1 throughout.
    """
    if schedule not in SIGNIFICANCE_SCHEDULES:
        raise ValueError(f"schedule: got {schedule!r}, expected one of {SIGNIFICANCE_SCHEDULES}")
    if schedule == "static":
        return 1.0
    if not 0.0 <= switch <= 1.0:
        raise ValueError(f"switch: got {switch}, expected a value in [0, 1]")
    p = min(max(float(progress), 0.0), 1.0)
    if p < switch:
        return (p - switch) / switch
    return (p - switch) / (1.0 - switch) if switch < 1.0 else 0.0


def significance_length_reward(
    insignificant: torch.Tensor, action_mask: torch.Tensor, correct: torch.Tensor, *, group_size: int,
    phase: float, coef: float,
) -> torch.Tensor:
    """The length reward counted over insignificant tokens only, added to each completion's reward.

    n_i = insignificant tokens of completion i; within its group
    lambda_i = 0.5 - (n_i - min n) / (max n - min n) (0 when all n are equal): +0.5 for the fewest,
    -0.5 for the most (Kimi k1.5's length reward, counted over insignificant tokens as the paper
    proposes). reward_i = coef * phase * lambda_i for a correct completion, and only its negative
    part, min(0, coef * phase * lambda_i), for a wrong one (a wrong answer is never paid for its
    length, in either direction; also Kimi's rule). phase from `significance_phase`.
    insignificant, action_mask: (B, A); correct: (B,). Returns (B,) fp32.
    """
    if insignificant.shape != action_mask.shape:
        raise ValueError(f"insignificant: got shape {tuple(insignificant.shape)}, expected {tuple(action_mask.shape)}")
    b = action_mask.shape[0]
    correct = _check_correct(correct, b)
    if not isinstance(group_size, int) or group_size < 1 or b % group_size != 0:
        raise ValueError(f"group_size: got {group_size} for a batch of {b}, expected a positive integer dividing it")
    if not coef >= 0:
        raise ValueError(f"coef: got {coef}, expected a value >= 0")
    n = (insignificant.bool() & action_mask.bool()).sum(-1).double().reshape(-1, group_size)
    lo, hi = n.amin(-1, keepdim=True), n.amax(-1, keepdim=True)
    lam = torch.where(hi > lo, 0.5 - (n - lo) / torch.where(hi > lo, hi - lo, 1.0), 0.0).reshape(-1)
    signed = coef * phase * lam
    return torch.where(correct.to(signed.device), signed, signed.clamp(max=0.0)).float()


# ── the methods ─────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class MethodSpec:
    """A method as a combination of the components above (None: the component is not used)."""

    name: str
    label: str  # as the IAPO paper's table names it
    paper: str
    advantage: str  # registered advantage estimator
    rollout_filter: str | None = None
    reward_shaping: str | None = None
    loss_mask: str | None = None
    loss_term: str | None = None
    needs_mi: bool = False  # the MI estimator's pass (iapo: when alpha != 0)
    needs_entropy: bool = False  # the policy's next-token entropy per response token


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("grpo", "GRPO", "Shao et al., 2024 (arXiv 2402.03300)", "grpo"),
        MethodSpec("dapo", "DAPO", "Yu et al., 2025 (arXiv 2503.14476)", "grpo", reward_shaping="overlong"),
        MethodSpec("gfpo", "GFPO", "Shrivastava et al., 2025 (arXiv 2508.09726)", "grpo", rollout_filter="gfpo"),
        MethodSpec("gtpo", "GTPO", "Tan et al., 2025 (arXiv 2508.04349)", "gtpo", needs_entropy=True),
        MethodSpec("sgrpo", "S-GRPO", "Lee & Tong, 2025 (arXiv 2504.20834)", "grpo", loss_mask="sgrpo"),
        MethodSpec("iapo", "IAPO", "He et al., 2026 (arXiv 2602.19049)", "iapo", needs_mi=True),
        MethodSpec("ib", "IB regularisation", "arXiv 2507.18391", "grpo", loss_term="ib"),
        MethodSpec("significance", "significance-aware length reward", "Liu et al., 2025 (arXiv 2506.08125)",
                   "grpo", reward_shaping="significance", needs_mi=True),
    )
}
# The IAPO paper's table, in its order (rows after the base model).
PAPER_TABLE_ORDER = ("dapo", "gfpo", "gtpo", "sgrpo", "iapo")
