"""OpenRLHF's PPOTrainer with the IAPO experience maker.

BasePPOTrainer builds its `RemoteExperienceMaker` in `__init__` and the trainer is a Ray actor
in its own process, so the maker is swapped on the instance right after OpenRLHF built it
(same arguments), not by patching a module global that the worker would never see.

Two thin overrides serve the methods: `train_step` tells the maker which rollout step it is on
(the significance reward's schedule), and `get_max_steps` counts GFPO's optimizer steps over the
k kept samples per prompt, not the G sampled (the learning-rate schedule's length).
"""

from __future__ import annotations

import ray
from openrlhf.trainer.ppo_trainer import PPOTrainer

from ..config import resolved_section
from .actor import unwrap_ray_class
from .experience_maker import IAPOExperienceMaker


class IAPOPPOTrainer(unwrap_ray_class(PPOTrainer)):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        stock = self.experience_maker
        self.experience_maker = IAPOExperienceMaker(
            stock.actor_model_group, stock.critic_model_group, stock.reward_model_group,
            stock.initial_model_group, stock.kl_ctl, stock.strategy, stock.tokenizer,
        )
        self.experience_maker.total_steps = self.rollout_steps()

    def rollout_steps(self) -> int:
        """Rollout steps of the whole run: prompts x episodes / prompts per step."""
        args = self.args
        return max(1, len(self.prompts_dataloader) * args.train.num_episodes // args.rollout.batch_size)

    def train_step(self, rollout_samples, global_step: int):
        self.experience_maker.global_step = global_step
        return super().train_step(rollout_samples, global_step)

    def get_max_steps(self):
        steps = super().get_max_steps()
        methods = self.experience_maker.methods
        if methods.method == "gfpo":
            steps = max(1, steps * resolved_section(methods, "gfpo").keep // self.args.rollout.n_samples_per_prompt)
        return steps


IAPOPPOTrainerRemote = ray.remote(IAPOPPOTrainer)
