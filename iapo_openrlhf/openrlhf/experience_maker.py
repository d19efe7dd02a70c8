"""IAPO experience maker: OpenRLHF's `RemoteExperienceMaker` plus every method's advantage side.

OpenRLHF computes the advantages exactly as it always does (group_norm reward baseline,
KL-in-reward, DAPO overlong / length penalties, dynamic filtering upstream); this subclass then
adds alpha * norm(MI) + beta * norm(exploration) per token. With alpha = beta = 0 nothing is
added, so the result is OpenRLHF's own, bit for bit.

The other methods (`--iapo.method`, core/methods.py) act around that same call:
- gfpo: `make_experience_batch` keeps k of the G samples of each prompt (`gfpo_keep_mask`) before
  OpenRLHF's experience pass (log-probs, MI, reference) and its group baseline, which then runs
  over groups of k. GFPO must come first: the paper's advantages are normalised over the kept
  set, and the filtered-out samples would otherwise cost the experience forwards for nothing.
- significance: the length reward over low-MI tokens is added to the rewards before OpenRLHF's
  baseline (so OpenRLHF normalises the shaped rewards).
- gtpo: after OpenRLHF, the advantages are replaced by GTPO's / GRPO-S's (token-level, from the
  actor's next-token entropy); KL must then be a loss term (`--algo.kl.use_loss`), as the
  launcher checks, since KL-in-reward would be dropped.
- sgrpo: after the advantages, the action mask becomes S-GRPO's token subset. Everything
  downstream in OpenRLHF's actor then counts only those tokens: the policy loss, the KL and
  entropy terms, and the token-mean denominator `iter_grad_accum_global_norm` takes from the masks
  of a whole optimizer step across data-parallel ranks. Subsampling inside the actor's training
  step instead would divide the kept tokens' loss by the count of all tokens, which OpenRLHF has
  already summed over the step by then.
- ib is a loss term: `loss_options.py`, at the actor.

The actor's extra per-token tensors travel in `Experience.info` under `iapo/...` keys: OpenRLHF
builds `Experience(**fields)` by name in concat/split, so a subclass with new fields would be
dropped, while `info` survives both. They are replaced by per-sample statistics once used, so
OpenRLHF's logger (wandb / tensorboard) gets (B,) MI metrics and no (B, A) tensor reaches the
replay buffer's metric merging.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import List

import torch
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
from openrlhf.utils.logging_utils import init_logger

from ..config import resolved_section
from ..core.advantages import information_shaping
from ..core.methods import (
    get_advantage_fn,
    gfpo_keep_mask,
    insignificant_tokens,
    sgrpo_token_mask,
    significance_length_reward,
    significance_phase,
)
from .settings import iapo_config_from_args, method_config_from_args

logger = init_logger(__name__)

TOKEN_KEYS = ("mi", "next_token_entropy", "mi_mask")  # (B, A) per-token fields from the actor
PREFIX = "iapo/"
# Debugging aid (and the end-to-end test's source of real experiences): a directory where every
# rollout's experiences are saved as OpenRLHF's loop hands them to the advantage computation
# (`rollout_<k>_experiences.pt`) and the advantages this maker returns (`rollout_<k>_advantages.pt`).
DUMP_ENV = "IAPO_DUMP_EXPERIENCES"


@contextlib.contextmanager
def samples_per_prompt(args, n: int):
    """OpenRLHF's group baseline reads args.rollout.n_samples_per_prompt: GFPO's groups hold k."""
    old = args.rollout.n_samples_per_prompt
    args.rollout.n_samples_per_prompt = n
    try:
        yield
    finally:
        args.rollout.n_samples_per_prompt = old


class IAPOExperienceMaker(RemoteExperienceMaker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.iapo = iapo_config_from_args(self.args)
        self.methods = method_config_from_args(self.args)  # Config: method, its sections, G
        self.method = self.methods.method
        self.global_step = 0  # rollout steps done; IAPOPPOTrainer sets both before each step
        self.total_steps: int | None = None
        self._actor_extras: list[dict] | None = None
        self._warned_no_scores = False
        self._rollouts = 0
        self._seed = int(getattr(self.args.train, "seed", 0) or 0)

    # ── GFPO: keep k of each prompt's G samples, before anything is computed on them ──

    @torch.no_grad()
    def make_experience_batch(self, rollout_samples) -> List[Experience]:
        if self.method == "gfpo":
            rollout_samples = self.gfpo_filter(rollout_samples)
        return super().make_experience_batch(rollout_samples)

    def gfpo_filter(self, samples: List[Experience]) -> List[Experience]:
        """The samples GFPO trains on: of every G consecutive single-sample Experiences (one prompt's,
        as OpenRLHF's SamplesGenerator returns them), the k best by `gfpo.metric`."""
        g = self.args.rollout.n_samples_per_prompt
        gfpo = resolved_section(self.methods, "gfpo")
        if len(samples) % g:
            raise RuntimeError(f"GFPO: got {len(samples)} rollout samples, expected whole groups of "
                               f"--rollout.n_samples_per_prompt {g}")
        if any(s.rewards is None for s in samples):
            raise RuntimeError("GFPO ranks samples by their reward before the experience pass, expected rewards with "
                               "the rollouts (--reward.remote_url), not a reward model")
        rewards = torch.cat([s.rewards.reshape(-1) for s in samples]).float()
        lengths = torch.stack([s.action_mask.sum() for s in samples]).float()
        keep = gfpo_keep_mask(rewards, lengths, group_size=g, keep=gfpo.keep, metric=gfpo.metric)
        group_length = lengths.reshape(-1, g).mean(-1).repeat_interleave(g)
        kept = []
        for i, sample in enumerate(samples):
            if keep[i]:
                sample.info[PREFIX + "gfpo_group_length_mean"] = group_length[i : i + 1]
                kept.append(sample)
        return kept

    def group_size(self) -> int:
        if self.method == "gfpo":
            return resolved_section(self.methods, "gfpo").keep
        return self.args.rollout.n_samples_per_prompt

    # ── the actor's per-token fields ──

    def _flatten_results(self, refs, duplicate_factor):
        """Split the IAPO actor's dict results into the log-probs OpenRLHF expects and extras."""
        results = super()._flatten_results(refs, duplicate_factor)
        if results and isinstance(results[0], dict) and "action_log_probs" in results[0]:
            self._actor_extras = [{k: v for k, v in r.items() if k != "action_log_probs"} for r in results]
            return [r["action_log_probs"] for r in results]
        return results

    @torch.no_grad()
    def make_experience(self, samples_list: List[Experience]) -> List[Experience]:
        self._actor_extras = None
        experiences = super().make_experience(samples_list)
        extras, self._actor_extras = self._actor_extras, None
        for experience, extra in zip(experiences, extras or []):
            for key, value in extra.items():
                experience.info[PREFIX + key] = value
        return experiences

    # ── advantages ──

    @torch.no_grad()
    def compute_advantages_and_returns(self, experiences: List[Experience]) -> List[Experience]:
        self._rollouts += 1
        dump = os.environ.get(DUMP_ENV)
        if dump:
            os.makedirs(dump, exist_ok=True)
            torch.save(copy.deepcopy(experiences), os.path.join(dump, f"rollout_{self._rollouts}_experiences.pt"))
        experiences = self._shaped_advantages(experiences)
        if dump:
            torch.save([e.advantages for e in experiences], os.path.join(dump, f"rollout_{self._rollouts}_advantages.pt"))
        return experiences

    def _shaped_advantages(self, experiences: List[Experience]) -> List[Experience]:
        per_token = [{k: e.info.pop(PREFIX + k, None) for k in TOKEN_KEYS} for e in experiences]
        group = self.group_size()
        if self.method == "significance":
            self._add_significance_reward(experiences, per_token, group)
        with samples_per_prompt(self.args, group):
            experiences = super().compute_advantages_and_returns(experiences)
        if self.method == "gtpo":
            self._gtpo_advantages(experiences, per_token, group)
        cfg = self.iapo
        for experience, fields in zip(experiences, per_token):
            if cfg.alpha == 0 and cfg.beta == 0:
                continue
            mask = experience.action_mask.bool()
            mi = fields["mi"]
            if cfg.alpha != 0 and mi is None:
                raise RuntimeError(
                    "IAPO alpha != 0 but the actor returned no MI: the actor group must be "
                    "IAPOPolicyModelActor (run through iapo-train-ray)"
                )
            if cfg.exploration == "entropy":
                explore = fields["next_token_entropy"]
            else:
                explore = experience.action_log_probs.float().exp()
            correct = self._correct(experience)
            shaping = torch.zeros_like(experience.advantages, dtype=torch.float32)
            rows = mask.any(-1)  # a row without response tokens has nothing to shape
            if rows.any():
                shaping[rows] = information_shaping(
                    mi[rows] if mi is not None else None,
                    explore[rows] if explore is not None and cfg.beta != 0 else None,
                    mask[rows],
                    correct[rows],
                    alpha=cfg.alpha, beta=cfg.beta, exploration=cfg.exploration, shaping_norm=cfg.shaping_norm,
                    mi_mask=fields["mi_mask"][rows] if fields["mi_mask"] is not None else None,
                )
            experience.advantages = experience.advantages + shaping.to(experience.advantages.dtype)
            self._log_statistics(experience, mi, shaping, mask)
        if self.method == "sgrpo":
            self._sgrpo_masks(experiences)
        return experiences

    def _correct(self, experience: Experience) -> torch.Tensor:
        """Exploration sign: the reward function's `scores` (correctness) when present."""
        if experience.scores is not None:
            return experience.scores.float() > 0
        if not self._warned_no_scores:
            logger.warning("IAPO: experiences carry no `scores`; using rewards > 0 as correctness for the exploration sign")
            self._warned_no_scores = True
        return experience.rewards.float() > 0

    def _token_field(self, per_token: list[dict], key: str, why: str) -> None:
        if any(fields[key] is None for fields in per_token):
            raise RuntimeError(f"{why} but the actor returned no {key}: the actor group must be IAPOPolicyModelActor "
                               "(run through iapo-train-ray)")

    def _add_significance_reward(self, experiences: List[Experience], per_token: list[dict], group: int) -> None:
        """rewards += the length reward counted over each completion's insignificant tokens."""
        self._token_field(per_token, "mi", "the significance reward needs the MI")
        sig = resolved_section(self.methods, "significance")
        rows = RolloutRows(experiences)
        mask = rows.tokens([e.action_mask for e in experiences]).bool()
        mi = rows.tokens([f["mi"] for f in per_token])
        correct = rows.scalars([self._correct(e) for e in experiences]).bool()
        low = insignificant_tokens(mi, mask, group_size=group, selection=sig.selection, fraction=sig.fraction,
                                   threshold=sig.threshold)
        progress = self.global_step / self.total_steps if self.total_steps else 0.0
        phase = significance_phase(progress, sig.schedule, sig.switch)
        bonus = significance_length_reward(low, mask, correct, group_size=group, phase=phase, coef=sig.coef)
        low_frac = (low.sum(-1) / mask.sum(-1).clamp(min=1)).float()
        for k, experience in enumerate(experiences):
            idx = rows.rows_of(k)
            dtype = torch.promote_types(experience.rewards.dtype, torch.float32)
            experience.rewards = experience.rewards.to(dtype) + bonus[idx].to(dtype)
            experience.info[PREFIX + "length_reward"] = bonus[idx]
            experience.info[PREFIX + "insignificant_frac"] = low_frac[idx]
            experience.info[PREFIX + "significance_phase"] = torch.full((len(idx),), float(phase))

    def _gtpo_advantages(self, experiences: List[Experience], per_token: list[dict], group: int) -> None:
        """Replace OpenRLHF's advantages (and returns) by GTPO's / GRPO-S's, from the same rewards."""
        if self.kl_ctl.value > 0 and not self.args.algo.kl.use_loss:
            raise RuntimeError("GTPO replaces the advantages: expected --algo.kl.use_loss (KL as a loss term), since "
                               "a KL in the reward would be dropped")
        self._token_field(per_token, "next_token_entropy", "GTPO weights rewards by the policy's entropy")
        gtpo = resolved_section(self.methods, "gtpo")
        rows = RolloutRows(experiences)
        mask = rows.tokens([e.action_mask for e in experiences]).bool()
        entropy = rows.tokens([f["next_token_entropy"] for f in per_token])
        rewards = rows.scalars([e.rewards for e in experiences])
        correct = rows.scalars([self._correct(e) for e in experiences]).bool()
        estimator = get_advantage_fn("gtpo" if gtpo.level == "token" else "grpo_s")
        adv = estimator(rewards, mask, group_size=group, correct=correct, entropy=entropy,
                        reward_weight=gtpo.reward_weight, entropy_weight=gtpo.entropy_weight)
        for k, experience in enumerate(experiences):
            idx = rows.rows_of(k)
            width = experience.action_mask.shape[1]
            value = adv[idx, :width].to(experience.advantages.dtype)
            experience.advantages = value
            experience.returns = value.clone()
            valid = experience.action_mask.bool()
            ent = entropy[idx, :width]
            experience.info[PREFIX + "entropy_mean"] = (ent * valid).sum(-1) / valid.sum(-1).clamp(min=1)

    def _sgrpo_masks(self, experiences: List[Experience]) -> None:
        """S-GRPO: the action mask becomes the token subset the loss is computed over."""
        sgrpo = resolved_section(self.methods, "sgrpo")
        # seeded by (seed, step): the same subsets when a run resumes from a checkpoint
        generator = torch.Generator().manual_seed(self._seed + 1_000_003 * self.global_step)
        for experience in experiences:
            full = experience.action_mask
            kept = sgrpo_token_mask(full, keep_first=sgrpo.keep_first, keep_prob=sgrpo.keep_prob,
                                    generator=generator)
            experience.info[PREFIX + "sgrpo_kept_frac"] = kept.sum(-1) / full.bool().sum(-1).clamp(min=1)
            experience.action_mask = kept.to(full.dtype)

    @staticmethod
    def _log_statistics(experience: Experience, mi, shaping: torch.Tensor, mask: torch.Tensor) -> None:
        count = mask.sum(-1).clamp(min=1)
        if mi is not None:
            experience.info[PREFIX + "mi_mean"] = (mi.float() * mask).sum(-1) / count
            experience.info[PREFIX + "mi_positive_frac"] = ((mi > 0) & mask).sum(-1) / count
        experience.info[PREFIX + "shaping_abs_mean"] = (shaping.abs() * mask).sum(-1) / count


class RolloutRows:
    """Rows of several micro-batch Experiences in rollout order (`Experience.index`), as OpenRLHF's
    group baseline arranges them: the samples of a prompt are consecutive in that order."""

    def __init__(self, experiences: List[Experience]):
        self.experiences = experiences
        where = {}
        for k, experience in enumerate(experiences):
            if experience.index is None:
                raise RuntimeError("Experience.index is None: rows cannot be placed in rollout order")
            for r, position in enumerate(experience.index):
                where[position] = (k, r)
        if sorted(where) != list(range(len(where))):
            raise RuntimeError(f"Experience.index: got positions {sorted(where)[:8]}..., expected 0..N-1 once each")
        self.order = [where[i] for i in range(len(where))]
        self.width = max(e.action_mask.shape[1] for e in experiences)

    def tokens(self, values: list[torch.Tensor]) -> torch.Tensor:
        """(N, W) fp32 in rollout order from one (B_k, A_k) tensor per experience, right-padded with 0."""
        rows = [values[k][r].float() for k, r in self.order]
        return torch.stack([torch.nn.functional.pad(row, (0, self.width - row.shape[-1])) for row in rows])

    def scalars(self, values: list[torch.Tensor]) -> torch.Tensor:
        """(N,) fp32 in rollout order from one (B_k,) tensor per experience."""
        return torch.stack([values[k].reshape(-1)[r].float() for k, r in self.order])

    def rows_of(self, k: int) -> torch.Tensor:
        """Rollout positions of experience k's rows, in its row order."""
        return torch.tensor(self.experiences[k].index)
