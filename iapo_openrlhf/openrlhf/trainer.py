"""OpenRLHF's PPOTrainer with the IAPO experience maker.

BasePPOTrainer builds its `RemoteExperienceMaker` in `__init__` and the trainer is a Ray actor
in its own process, so the maker is swapped on the instance right after OpenRLHF built it
(same arguments), not by patching a module global that the worker would never see.
"""

from __future__ import annotations

import ray
from openrlhf.trainer.ppo_trainer import PPOTrainer

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


IAPOPPOTrainerRemote = ray.remote(IAPOPPOTrainer)
