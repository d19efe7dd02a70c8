"""IAPO experience maker: OpenRLHF's `RemoteExperienceMaker` plus the information shaping.

OpenRLHF computes the advantages exactly as it always does (group_norm reward baseline,
KL-in-reward, DAPO overlong / length penalties, dynamic filtering upstream); this subclass then
adds alpha * norm(MI) + beta * norm(exploration) per token. With alpha = beta = 0 nothing is
added, so the result is OpenRLHF's own, bit for bit.

The actor's extra per-token tensors travel in `Experience.info` under `iapo/...` keys: OpenRLHF
builds `Experience(**fields)` by name in concat/split, so a subclass with new fields would be
dropped, while `info` survives both. They are replaced by per-sample statistics once used, so
OpenRLHF's logger (wandb / tensorboard) gets (B,) MI metrics and no (B, A) tensor reaches the
replay buffer's metric merging.
"""

from __future__ import annotations

import copy
import os
from typing import List

import torch
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
from openrlhf.utils.logging_utils import init_logger

from ..core.advantages import information_shaping
from .settings import iapo_config_from_args

logger = init_logger(__name__)

TOKEN_KEYS = ("mi", "next_token_entropy")  # (B, A) per-token fields from the actor
PREFIX = "iapo/"
# Debugging aid (and the end-to-end test's source of real experiences): a directory where every
# rollout's experiences are saved as OpenRLHF's loop hands them to the advantage computation
# (`rollout_<k>_experiences.pt`) and the advantages this maker returns (`rollout_<k>_advantages.pt`).
DUMP_ENV = "IAPO_DUMP_EXPERIENCES"


class IAPOExperienceMaker(RemoteExperienceMaker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.iapo = iapo_config_from_args(self.args)
        self._actor_extras: list[dict] | None = None
        self._warned_no_scores = False
        self._rollouts = 0

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
        experiences = super().compute_advantages_and_returns(experiences)
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
                    alpha=cfg.alpha, beta=cfg.beta, exploration=cfg.exploration,
                )
            experience.advantages = experience.advantages + shaping.to(experience.advantages.dtype)
            self._log_statistics(experience, mi, shaping, mask)
        return experiences

    def _correct(self, experience: Experience) -> torch.Tensor:
        """Exploration sign: the reward function's `scores` (correctness) when present."""
        if experience.scores is not None:
            return experience.scores.float() > 0
        if not self._warned_no_scores:
            logger.warning("IAPO: experiences carry no `scores`; using rewards > 0 as correctness for the exploration sign")
            self._warned_no_scores = True
        return experience.rewards.float() > 0

    @staticmethod
    def _log_statistics(experience: Experience, mi, shaping: torch.Tensor, mask: torch.Tensor) -> None:
        count = mask.sum(-1).clamp(min=1)
        if mi is not None:
            experience.info[PREFIX + "mi_mean"] = (mi.float() * mask).sum(-1) / count
            experience.info[PREFIX + "mi_positive_frac"] = ((mi > 0) & mask).sum(-1) / count
        experience.info[PREFIX + "shaping_abs_mean"] = (shaping.abs() * mask).sum(-1) / count
