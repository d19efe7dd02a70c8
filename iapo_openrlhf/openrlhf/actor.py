"""IAPO policy actor: OpenRLHF's Ray `PolicyModelActor` whose forward also returns the per-token MI.

Why a subclass of the actor and not a separate model: the estimator must run on the actor's own
DeepSpeed engine (ZeRO shards, AutoTP shards, no second copy of 7B weights), and its preload
forward is the one that gives OpenRLHF its old log-probs, so pi_old and the MI cost one pass.

Import this module only after OpenRLHF can be imported (on CPU: `cpu_stubs.install()` first).
"""

from __future__ import annotations

from typing import Optional

import ray
import torch
import torch.distributed as dist
from openrlhf.trainer.ray.ppo_actor import PolicyModelActor

from ..config import IapoConfig
from ..core.mi import answer_entropy, before_columns, hold_entropy, marker_columns, token_mi
from ..core.probes import boundary_token_ids, token_texts
from .loss_options import install_loss_options
from .settings import iapo_config_from_args, needs_mi, needs_next_token_entropy, postfix_token_ids


def unwrap_ray_class(actor_class) -> type:
    """The plain Python class behind a `@ray.remote` class: Ray forbids subclassing the wrapper."""
    plain = getattr(actor_class, "__ray_actor_class__", None)
    if plain is None:
        raise TypeError(
            f"{actor_class!r} exposes no __ray_actor_class__; this Ray version is not supported, "
            "expected ray>=2.55 (pip install 'ray[default]>=2.55,<3')"
        )
    return plain


@torch.no_grad()
def iapo_forward(
    actor,
    sequences: torch.Tensor,
    action_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    cfg: IapoConfig,
    postfix_ids: list[int],
    probe_after_ids: list[int] | None = None,
    hold_texts: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """One estimator pass on an OpenRLHF `Actor` (its `.model` a DeepSpeed engine or a HF model),
    on the micro-batch OpenRLHF's experience maker sends.

    sequences, attention_mask: (B, S), each rollout unpadded then right-padded by
    `Experience.concat_experiences`; action_mask: (B, S - 1) = `mask[1:]` (column t is token t + 1;
    the core takes any width A <= S - 1 with column t = token S - A + t, as `Actor.forward` does),
    one action span per single-turn rollout, several for multi-turn agent rollouts. Runs packed
    when the actor does (`--ds.packing_samples`). Returns fp32 CPU tensors, column for column with
    OpenRLHF's `action_log_probs`:
      action_log_probs (B, A): what `Actor.forward` returns (temperature-scaled, 0 off the actions);
      mi (B, A) when alpha != 0 (0 off the actions), with answer_entropy_first / _last (B,): the
        entropy before the first action token and after the last one;
      next_token_entropy (B, A) when beta != 0 and exploration == "entropy";
      mi_mask (B, A) bool when cfg.mi_held_tokens == "exclude": the columns the MI term covers.
    hold_texts: `token_texts(tokenizer)` when cfg.mi_hold_after is set (the hold finds its marker in them).
    """
    if not (needs_mi(cfg) or needs_next_token_entropy(cfg)):
        raise ValueError("iapo_forward: alpha = 0 and no entropy exploration, nothing to estimate (use Actor.forward)")
    common = dict(chunk_tokens=cfg.chunk_tokens, temperature=float(getattr(actor, "temperature", 1.0)),
                  return_log_probs=True, packed=bool(getattr(actor, "packing_samples", False)))
    was_training = actor.training
    actor.eval()
    try:
        out: dict[str, torch.Tensor] = {}
        valid = action_mask.bool().cpu()  # the estimator's results are on the CPU
        if needs_mi(cfg):
            postfix = postfix_ids if cfg.predict_mode == "postfix" else None
            h, log_probs = answer_entropy(actor.model, sequences, attention_mask, action_mask, postfix,
                                          predict_mode=cfg.predict_mode, probe_stride=cfg.probe_stride,
                                          probe_after_ids=probe_after_ids, **common)
            if cfg.mi_hold_after is not None:
                columns = marker_columns(sequences, action_mask, hold_texts, cfg.mi_hold_after)
                h = hold_entropy(h, columns)
                if cfg.mi_held_tokens == "exclude":
                    out["mi_mask"] = before_columns(valid, columns)
            out["mi"] = token_mi(h, valid, smoothing=cfg.mi_smoothing, horizon=cfg.mi_horizon, decay=cfg.mi_decay)
            any_action = valid.any(-1)
            first = valid.long().argmax(-1)
            last = valid.shape[1] - valid.flip(-1).long().argmax(-1)  # column after the last action
            rows = torch.arange(len(h))
            out["answer_entropy_first"] = torch.where(any_action, h[rows, first], 0.0)
            out["answer_entropy_last"] = torch.where(any_action, h[rows, last], 0.0)
            if needs_next_token_entropy(cfg) and cfg.predict_mode == "next_token":
                out["next_token_entropy"] = torch.where(valid, h[:, :-1], 0.0)
        if needs_next_token_entropy(cfg) and "next_token_entropy" not in out:
            h_next, log_probs = answer_entropy(actor.model, sequences, attention_mask, action_mask, None,
                                               predict_mode="next_token", **common)
            out["next_token_entropy"] = torch.where(valid, h_next[:, :-1], 0.0)
        out["action_log_probs"] = log_probs
    finally:
        actor.train(was_training)
    return out


def is_group_leader(strategy) -> bool:
    """First rank of its ring-attention x tensor-parallel block: the one whose results OpenRLHF's
    experience maker keeps (`ray.get(refs)[::duplicate_factor]`); the others return None."""
    if not dist.is_initialized():
        return True
    block = strategy.args.ds.ring_attn_size * strategy.args.ds.tensor_parallel_size
    return dist.get_rank() % block == 0


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class IAPOPolicyModelActor(unwrap_ray_class(PolicyModelActor)):
    """PolicyModelActor + the MI estimator in `forward` (see `iapo_forward`)."""

    def init_model_from_pretrained(self, strategy, pretrain, max_steps=None, vllm_engines=None):
        super().init_model_from_pretrained(strategy, pretrain, max_steps, vllm_engines)
        self.iapo = iapo_config_from_args(strategy.args)
        self.iapo_postfix_ids = postfix_token_ids(self.tokenizer, self.iapo)
        self.iapo_probe_after_ids = None  # --iapo.probe_after: probe only after these tokens
        if self.iapo.probe_after is not None and needs_mi(self.iapo):
            self.iapo_probe_after_ids = boundary_token_ids(self.tokenizer, self.iapo.probe_after)
        self.iapo_hold_texts = None  # --iapo.mi_hold_after: the vocabulary's texts, to find the marker in
        if self.iapo.mi_hold_after is not None and needs_mi(self.iapo):
            self.iapo_hold_texts = token_texts(self.tokenizer)
        if strategy.args.ds.ring_attn_size > 1 and (needs_mi(self.iapo) or needs_next_token_entropy(self.iapo)):
            raise ValueError(
                "--ds.ring_attn_size > 1: the IAPO estimator does not run under ring attention, "
                "expected --ds.ring_attn_size 1 (use --ds.tensor_parallel_size for long sequences)"
            )
        self.iapo_loss = install_loss_options(self, strategy.args)  # --ib.coef: IB term in the actor's loss

    def forward(
        self,
        sequences: torch.LongTensor,
        action_mask: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        packed_seq_lens=None,
        mm_train_inputs_list=None,
    ):
        if not (needs_mi(self.iapo) or needs_next_token_entropy(self.iapo)):
            return super().forward(sequences, action_mask, attention_mask, packed_seq_lens, mm_train_inputs_list)
        if mm_train_inputs_list and any(mm_train_inputs_list):
            raise ValueError("IAPO's MI estimator takes text-only batches; got multimodal inputs")
        device = _device()
        out = iapo_forward(self.actor, sequences.to(device), action_mask.to(device), attention_mask.to(device),
                           self.iapo, self.iapo_postfix_ids, getattr(self, "iapo_probe_after_ids", None),
                           getattr(self, "iapo_hold_texts", None))
        if not is_group_leader(self.strategy):
            return None
        return {key: value.to("cpu") for key, value in out.items()}


# What RayActorGroup instantiates (it calls .options(...).remote(...) on the class it is given).
IAPOPolicyModelActorRemote = ray.remote(num_gpus=1)(IAPOPolicyModelActor)

