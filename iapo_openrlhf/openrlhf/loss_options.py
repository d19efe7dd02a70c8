"""Loss-side options at OpenRLHF's actor training step: the IB regularisation (`--ib.coef`).

IB (arXiv 2507.18391) adds `- coef * agg(A_t * H_t)` to the loss: the entropy bonus of PPO,
weighted by each token's advantage. OpenRLHF's `ActorPPOTrainer.training_step` computes the
policy's entropy with its gradient whenever `--actor.entropy_coef` is set (the launcher sets it
to 0 for IB runs, which logs `entropy_loss` and adds nothing), then calls its loss function. Two
small pieces attach IB to that very step, without copying it:

- `EntropyCapture`, a forward hook on the OpenRLHF `Actor` module, keeps the `entropy` of the
  last forward that produced one (the training forward; the experience forward produces none);
- `IBPolicyLoss` wraps the trainer's `PolicyLoss`: it returns OpenRLHF's policy loss minus
  coef * the advantage-weighted entropy, aggregated the way the policy loss is (token-mean over
  the optimizer step's tokens, or sequence-mean), so the rest of `training_step` (KL term,
  backward, optimizer step) is OpenRLHF's own.

`install_loss_options` is called at the end of `IAPOPolicyModelActor.init_model_from_pretrained`;
it also wraps the instance's `training_step` (calling the original) to log `iapo/ib_term`.
S-GRPO's token subset is applied earlier, in the experience maker (see there why).
"""

from __future__ import annotations

from typing import Any

import torch
from openrlhf.models import aggregate_loss

from ..config import ib_coef
from .settings import method_config_from_args


class EntropyCapture:
    """Forward hook: the `entropy` of the Actor's last output that carried one, else None."""

    def __init__(self):
        self.entropy: torch.Tensor | None = None

    def __call__(self, module, inputs, output) -> None:
        extra = output[1] if isinstance(output, tuple) and len(output) == 2 else None
        self.entropy = getattr(extra, "entropy", None)


class IBPolicyLoss(torch.nn.Module):
    """OpenRLHF's PolicyLoss minus coef * aggregate(A_t * H_t); same call signature and outputs."""

    def __init__(self, inner: torch.nn.Module, capture: EntropyCapture, coef: float):
        super().__init__()
        self.inner = inner
        self.capture = capture
        self.coef = coef
        self.last_ib: torch.Tensor | None = None

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, **batch_info):
        actor_loss, *rest = self.inner(log_probs, old_log_probs, advantages, action_mask=action_mask,
                                       rollout_log_probs=rollout_log_probs, **batch_info)
        entropy = self.capture.entropy
        if entropy is None:
            raise RuntimeError("IB regularisation needs the policy's entropy from the training forward: "
                               "expected --actor.entropy_coef set (iapo-train-ray sets 0 for --ib.coef > 0)")
        entropy = entropy[:, -action_mask.shape[1]:]
        ib = aggregate_loss(advantages.detach().float() * entropy.float(), action_mask,
                            token_level_loss=getattr(self.inner, "token_level_loss", True), **batch_info)
        self.last_ib = ib.detach()
        return (actor_loss - self.coef * ib, *rest)


def install_loss_options(policy_actor: Any, args: Any) -> IBPolicyLoss | None:
    """Attach the IB term to `policy_actor.trainer` (an ActorPPOTrainer) when --ib.coef > 0."""
    coef = ib_coef(method_config_from_args(args))
    if coef <= 0:
        return None
    if args.actor.entropy_coef is None:
        raise RuntimeError("--ib.coef > 0 needs --actor.entropy_coef set (0 is fine): OpenRLHF computes the "
                           "policy's entropy only then")
    trainer = policy_actor.trainer
    capture = EntropyCapture()
    trainer.actor.register_forward_hook(capture)
    loss_fn = IBPolicyLoss(trainer.actor_loss_fn, capture, coef)
    trainer.actor_loss_fn = loss_fn
    original_step = trainer.training_step

    def training_step(experience, kl_ctl, step, loss_batch_info=None):
        status = original_step(experience, kl_ctl, step, loss_batch_info)
        if loss_fn.last_ib is not None:
            status["metrics"]["iapo/ib_term"] = loss_fn.last_ib
            status["weights"]["iapo/ib_term"] = "token"
        return status

    trainer.training_step = training_step
    return loss_fn
