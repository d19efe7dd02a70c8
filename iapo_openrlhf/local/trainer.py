"""Single-process RL trainer: every method of core/methods.py on one code path (DESIGN section 6).

One step: sample G completions for each of N prompts (HF generate), score them, run the MI
estimator when the method needs it (it also returns pi_old from its preload forward), compute the
method's advantages, and take a PPO step with a KL penalty to the frozen initial policy. GRPO is
IAPO with alpha = beta = 0; DAPO adds clip-higher (a config value), dynamic sampling and the
overlong penalty; GFPO keeps k of the G completions of a prompt before anything else; GTPO /
GRPO-S weight rewards by the policy's next-token entropy; S-GRPO restricts the loss to a random
subset of tokens; the significance reward adds a length reward over low-MI tokens to the rewards;
`ib.coef` adds the advantage-weighted entropy term to the loss of any method.

Determinism: the data position, the optimizer and every RNG are checkpointed, and evaluation runs
under a forked RNG, so `--resume` continues exactly where an uninterrupted run would be.

Preemption (`iapo-train` on SIGTERM / SIGUSR1, preemption.py): the step in progress ends, its
checkpoint is saved, and the process exits with 128 + the signal; `--resume` continues at the
next step, with the same result as a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..config import (
    Config,
    ConfigError,
    effective_weights,
    group_size,
    ib_coef,
    needs_entropy,
    needs_mi,
    resolved_section,
)
from ..core.advantages import iapo_advantages
from ..core.entropy import entropy_from_logits, log_probs_from_logits
from ..core.loss import ib_regularizer, kl_k3, masked_mean, ppo_policy_loss
from ..core.methods import (
    get_advantage_fn,
    gfpo_keep_mask,
    insignificant_tokens,
    sgrpo_token_mask,
    significance_length_reward,
    significance_phase,
)
from ..core.mi import answer_entropy, before_columns, hold_entropy, marker_columns, token_mi
from ..data import Example, load_jsonl, render_chat, synthetic_examples, think_in_prompt
from ..eval.generation import evaluate_model
from ..preemption import Preempted
from ..rewards import R1_SYSTEM_PROMPT, batch_rewards
from .rollout import Rollout, generate

CHECKPOINTS = "checkpoints"


def sequence_log_probs(model, sequences, attention_mask, response_width: int, temperature: float) -> torch.Tensor:
    """(B, A) log-probs of the response tokens, OpenRLHF's actor forward (same position ids)."""
    return sequence_log_probs_and_entropy(model, sequences, attention_mask, response_width, temperature)[0]


def sequence_log_probs_and_entropy(
    model, sequences, attention_mask, response_width: int, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, A) log-probs of the response tokens and, with_entropy, the (B, A) entropy of the
    distribution each was sampled from (temperature-scaled, differentiable), from one forward."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    logits = model(
        input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids,
        logits_to_keep=response_width + 1,
    ).logits[:, :-1]
    log_probs = log_probs_from_logits(logits, sequences[:, -response_width:], temperature)
    return log_probs, (entropy_from_logits(logits, temperature) if with_entropy else None)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max - buffer, then linearly down to -factor."""
    start = max_new_tokens - buffer
    return -factor * ((lengths.float() - start).clamp(min=0) / max(buffer, 1)).clamp(max=1)


@dataclass
class Batch:
    rollout: Rollout
    rewards: torch.Tensor
    correct: torch.Tensor
    format_ok: torch.Tensor
    prompts: int
    extra: dict = field(default_factory=dict)


class LocalTrainer:
    def __init__(self, cfg: Config, *, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.out = Path(cfg.output.dir)
        self.device = torch.device(
            "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
        )
        self.alpha, self.beta = effective_weights(cfg)
        self.group = group_size(cfg)  # completions per prompt in the update (GFPO: k of the G sampled)
        self.ib_coef = ib_coef(cfg)
        self.log_path = self.out / "metrics.jsonl"

    # -- setup ---------------------------------------------------------------------------------

    def _initial_model_dir(self) -> Path:
        """The policy RL starts from (and the KL reference): a given path, or a warm start."""
        cfg = self.cfg
        if cfg.model.path is not None:
            return Path(cfg.model.path)
        target = self.out / "initial"
        if (target / "config.json").exists():
            return target
        if cfg.data.task == "synthetic":
            from ..tasks.warmstart import warm_start

            warm_start(target, seed=cfg.seed, steps=cfg.model.warmstart_steps, lr=cfg.model.warmstart_lr,
                       task=self.task, progress=self.progress, early_exit_weight=cfg.model.warmstart_early_exit,
                       early_exit_postfix=cfg.iapo.postfix)
        else:
            from .tiny import tiny_model_from_texts

            tiny_model_from_texts(target, cfg, seed=cfg.seed)
        return target

    def setup(self, resume: bool) -> None:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.data.task == "synthetic":
            from ..tasks.synthetic import SyntheticTask

            self.task = SyntheticTask(cfg.seed, redundancy=cfg.data.redundancy, variant=cfg.data.variant)
            self.train_examples = synthetic_examples(self.task, "train", 4096)
            self.test_examples = synthetic_examples(self.task, "test", cfg.data.num_test or 256)
        else:
            system = R1_SYSTEM_PROMPT if cfg.data.system_prompt == "r1" else None
            chat = cfg.data.system_prompt == "paper"
            self.train_examples = load_jsonl(cfg.data.train_path, cfg.data.input_key, cfg.data.label_key, system,
                                             chat=chat)
            if cfg.train.epochs > 1:  # each pass covers the same first prompts, as OpenRLHF's --data.max_samples
                per_epoch = cfg.train.steps // cfg.train.epochs * cfg.rollout.prompts_per_step
                if len(self.train_examples) < per_epoch:
                    raise ConfigError(
                        f"train.steps: {cfg.train.steps} steps in {cfg.train.epochs} epochs take {per_epoch} prompts "
                        f"per epoch, {cfg.data.train_path} has {len(self.train_examples)}; expected train.steps <= "
                        f"{cfg.train.epochs * (len(self.train_examples) // cfg.rollout.prompts_per_step)}")
                self.train_examples = self.train_examples[:per_epoch]
            # Evaluations during training read the validation split when there is one, never test then.
            held = load_jsonl(cfg.data.val_path or cfg.data.test_path, cfg.data.input_key, cfg.data.label_key,
                              system, chat=chat)
            self.test_examples = held[: cfg.data.num_test] if cfg.data.num_test else held
        self.initial_dir = self._initial_model_dir()
        dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
        checkpoint = self._latest_checkpoint() if resume else None
        if resume and checkpoint is None:
            raise ConfigError(f"--resume: no checkpoint under {self.out / CHECKPOINTS}, run without --resume first")
        source = checkpoint or self.initial_dir
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.train_examples = render_chat(self.train_examples, self.tokenizer)
        self.test_examples = render_chat(self.test_examples, self.tokenizer)
        self.think_in_prompt = think_in_prompt([e.prompt for e in self.train_examples])
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(self.device)
        self.model.config.use_cache = False
        self.ref = None
        if cfg.train.kl_coef > 0:
            self.ref = AutoModelForCausalLM.from_pretrained(self.initial_dir, dtype=dtype).to(self.device).eval()
            self.ref.requires_grad_(False)
        postfix = self.tokenizer(cfg.iapo.postfix, add_special_tokens=False).input_ids
        if needs_mi(cfg) and cfg.iapo.predict_mode == "postfix" and not postfix:
            raise ConfigError(f"iapo.postfix: {cfg.iapo.postfix!r} tokenizes to nothing, expected a postfix with tokens")
        self.postfix_ids = postfix
        self.probe_after_ids = None
        if needs_mi(cfg) and cfg.iapo.probe_after is not None and cfg.iapo.predict_mode == "postfix":
            from ..core.probes import boundary_token_ids

            self.probe_after_ids = boundary_token_ids(self.tokenizer, cfg.iapo.probe_after)
            if not self.probe_after_ids:
                raise ConfigError(f"iapo.probe_after: {cfg.iapo.probe_after!r} matches no token of the tokenizer, "
                                  "expected a pattern that some tokens contain (e.g. '\\n')")
        # iapo.mi_hold_after: the vocabulary's texts, to find the marker in. Also without the MI term
        # (alpha = 0, beta > 0): the entropy pass still runs for pi_old and logs the MI's statistics.
        self.hold_texts = None
        if cfg.iapo.mi_hold_after is not None:
            from ..core.probes import token_texts

            self.hold_texts = token_texts(self.tokenizer)
        betas = tuple(cfg.train.adam_betas) if cfg.train.adam_betas is not None else (0.9, 0.999)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, betas=betas, weight_decay=0.0)
        self.scheduler = self._scheduler()
        self.step = 0
        self.position = 0
        if checkpoint is not None:
            self._load_state(checkpoint)
        else:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
            self.log_path.unlink(missing_ok=True)
        # The run's settings beside its metrics (scripts/collect_results.py names rows by method).
        (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")

    def _scheduler(self):
        """The lr schedule over every optimizer step of the run (train.steps x train.ppo_epochs)."""
        from transformers import get_scheduler

        cfg = self.cfg
        name = cfg.train.lr_scheduler or "constant"
        total = cfg.train.steps * cfg.train.ppo_epochs
        warmup = round(total * (cfg.train.lr_warmup_ratio or 0.0))
        if name == "constant":
            name = "constant_with_warmup"
        extra = {"min_lr_rate": 0.1} if name == "cosine_with_min_lr" else None  # OpenRLHF's min_lr_ratio
        return get_scheduler(name, self.optimizer, num_warmup_steps=warmup, num_training_steps=total,
                             scheduler_specific_kwargs=extra)

    # -- data ----------------------------------------------------------------------------------

    def _next_prompts(self, n: int) -> list[Example]:
        """Epoch-wise seeded permutation; the position alone decides what comes next."""
        out = []
        size = len(self.train_examples)
        for _ in range(n):
            epoch, index = divmod(self.position, size)
            perm = torch.randperm(size, generator=torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch))
            out.append(self.train_examples[int(perm[index])])
            self.position += 1
        return out

    # -- one step ------------------------------------------------------------------------------

    def _sample(self, examples: list[Example]) -> Batch:
        cfg = self.cfg
        g = cfg.rollout.n_samples_per_prompt
        prompts = [e.prompt for e in examples for _ in range(g)]
        golds = [e.label for e in examples for _ in range(g)]
        rollout = generate(self.model, self.tokenizer, prompts, max_new_tokens=cfg.rollout.max_new_tokens,
                           temperature=cfg.rollout.temperature)
        results = batch_rewards(rollout.completions, golds, cfg.reward.scheme, think_in_prompt=self.think_in_prompt,
                                format_check=cfg.reward.format)
        rewards = torch.tensor([r.reward for r in results], dtype=torch.float32)
        if cfg.method == "dapo":
            rewards = rewards + overlong_penalty(rollout.lengths, cfg.rollout.max_new_tokens,
                                                 cfg.dapo.overlong_buffer, cfg.dapo.overlong_penalty)
        return Batch(rollout, rewards, torch.tensor([r.correct for r in results]),
                     torch.tensor([r.format_ok for r in results]), len(examples))

    def _rollout(self) -> tuple[Batch, dict]:
        """The step's groups; GFPO then keeps k of each group's G completions (`gfpo_keep_mask`)."""
        batch, info = self._sample_groups()
        if self.cfg.method != "gfpo":
            return batch, info
        g, gfpo = self.cfg.rollout.n_samples_per_prompt, resolved_section(self.cfg, "gfpo")
        keep = gfpo_keep_mask(batch.rewards, batch.rollout.lengths, group_size=g, keep=gfpo.keep, metric=gfpo.metric)
        info.update(gfpo_sampled_length=float(batch.rollout.lengths.float().mean()),
                    gfpo_sampled_accuracy=float(batch.correct.float().mean()),
                    gfpo_kept_length=float(batch.rollout.lengths[keep].float().mean()))
        return _select(batch, keep), info

    def _sample_groups(self) -> tuple[Batch, dict]:
        """Sample the step's groups; DAPO keeps only groups whose rewards differ and refills."""
        cfg = self.cfg
        n, g = cfg.rollout.prompts_per_step, cfg.rollout.n_samples_per_prompt
        batch = self._sample(self._next_prompts(n))
        info = {"sampled_groups": n}
        if cfg.method != "dapo" or not cfg.dapo.dynamic_sampling:
            return batch, info
        kept = [batch]
        for _ in range(cfg.dapo.max_resample_rounds + 1):
            groups = [_keep_varied_groups(b, g) for b in kept]
            if sum(int(k.sum()) for k in groups) // g >= n:
                break
            extra = self._sample(self._next_prompts(n))
            info["sampled_groups"] += n
            kept.append(extra)
        merged = _merge([_select(b, _keep_varied_groups(b, g)) for b in kept], self.tokenizer.pad_token_id)
        if merged is None:  # every group had identical rewards: nothing to learn, keep the batch
            return batch, info
        keep_rows = min(merged.rewards.shape[0], n * g)
        return _select(merged, torch.arange(merged.rewards.shape[0]) < keep_rows), info

    def _advantages(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """pi_old log-probs, the method's advantages and its loss mask (B, A).

        The MI pass (when the method needs MI) is also the forward that gives pi_old."""
        cfg, r = self.cfg, batch.rollout
        seq, att, act = (t.to(self.device) for t in (r.sequences, r.attention_mask, r.action_mask))
        stats = {}
        mi = mi_mask = None
        if needs_mi(cfg) or (self.beta > 0 and cfg.iapo.exploration == "prob"):
            h, old_lp = answer_entropy(
                self.model, seq, att, act, self.postfix_ids if cfg.iapo.predict_mode == "postfix" else None,
                chunk_tokens=cfg.iapo.chunk_tokens, temperature=cfg.rollout.temperature,
                probe_stride=cfg.iapo.probe_stride, predict_mode=cfg.iapo.predict_mode, return_log_probs=True,
                probe_after_ids=self.probe_after_ids,
            )
            if cfg.iapo.mi_hold_after is not None:
                columns = marker_columns(seq, act, self.hold_texts, cfg.iapo.mi_hold_after)
                h = hold_entropy(h, columns)
                if cfg.iapo.mi_held_tokens == "exclude":
                    mi_mask = before_columns(act.cpu(), columns)
                    stats["mi_held_frac"] = float(1 - mi_mask.sum() / act.cpu().sum())
            mi = token_mi(h, act.cpu(), smoothing=cfg.iapo.mi_smoothing, horizon=cfg.iapo.mi_horizon,
                          decay=cfg.iapo.mi_decay)
            valid = act.cpu().bool()
            stats.update(mi_mean=float(mi[valid].mean()), mi_std=float(mi[valid].std()),
                         mi_pos_frac=float((mi[valid] > 0).float().mean()),
                         answer_entropy_start=float(h[:, 0].mean()))
        else:
            with torch.no_grad():
                old_lp = sequence_log_probs(self.model, seq, att, act.shape[1], cfg.rollout.temperature).cpu()
            old_lp = old_lp * act.cpu()
        valid = act.cpu().bool()
        entropy = None
        if needs_entropy(cfg):  # the policy's next-token entropy at every response token
            entropy = answer_entropy(self.model, seq, att, act, None, predict_mode="next_token",
                                     temperature=cfg.rollout.temperature)[:, :-1]
            entropy = torch.where(valid, entropy, 0.0)
            stats["entropy_mean"] = float(entropy[valid].mean())
        explore = None
        if self.beta > 0:
            explore = old_lp.exp() if cfg.iapo.exploration == "prob" else entropy
        rewards = batch.rewards
        if cfg.method == "significance":
            rewards, sig_stats = self._significance_rewards(batch, mi, valid)
            stats.update(sig_stats)
        if cfg.method == "gtpo":
            gtpo = resolved_section(cfg, "gtpo")
            estimator = get_advantage_fn("gtpo" if gtpo.level == "token" else "grpo_s")
            adv = estimator(rewards, valid, group_size=self.group, correct=batch.correct, entropy=entropy,
                            reward_weight=gtpo.reward_weight, entropy_weight=gtpo.entropy_weight)
        else:
            adv = iapo_advantages(rewards, mi, explore, valid, group_size=self.group, alpha=self.alpha, beta=self.beta,
                                  correct=batch.correct, exploration=cfg.iapo.exploration,
                                  shaping_norm=cfg.iapo.shaping_norm, mi_mask=mi_mask)
        loss_mask = valid
        if cfg.method == "sgrpo":  # drawn from the global RNG, which checkpoints carry
            sgrpo = resolved_section(cfg, "sgrpo")
            loss_mask = sgrpo_token_mask(valid, keep_first=sgrpo.keep_first, keep_prob=sgrpo.keep_prob)
            stats["sgrpo_kept_frac"] = float(loss_mask.sum() / valid.sum())
        return old_lp, adv, loss_mask, stats

    def _significance_rewards(self, batch: Batch, mi: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Rewards plus the length reward counted over insignificant (low-|MI|) tokens."""
        sig = resolved_section(self.cfg, "significance")
        low = insignificant_tokens(mi, valid, group_size=self.group, selection=sig.selection, fraction=sig.fraction,
                                   threshold=sig.threshold)
        phase = significance_phase(self.step / self.cfg.train.steps, sig.schedule, sig.switch)
        bonus = significance_length_reward(low, valid, batch.correct, group_size=self.group, phase=phase, coef=sig.coef)
        stats = {"significance_phase": phase, "insignificant_frac": float(low.sum() / valid.sum()),
                 "length_reward_mean": float(bonus.mean()), "length_reward_abs_mean": float(bonus.abs().mean())}
        return batch.rewards + bonus, stats

    def _update(self, batch: Batch, old_lp: torch.Tensor, adv: torch.Tensor, loss_mask: torch.Tensor) -> dict:
        """PPO epochs over the batch; every per-token term of the loss counts the loss_mask's tokens
        (the action mask, or S-GRPO's subset), micro-batches weighted by their share of them."""
        cfg = self.cfg
        r = batch.rollout
        b, a = r.action_mask.shape
        ref_lp = None
        if self.ref is not None:
            with torch.no_grad():
                ref_lp = sequence_log_probs(self.ref, r.sequences.to(self.device), r.attention_mask.to(self.device),
                                            a, cfg.rollout.temperature)
        self.model.train()
        stats: dict[str, float] = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0}
        if self.ib_coef > 0:
            stats["ib_term"] = 0.0
        total_tokens = float(loss_mask.sum())
        updates = 0
        for _ in range(cfg.train.ppo_epochs):
            perm = torch.randperm(b)
            self.optimizer.zero_grad(set_to_none=True)
            for start in range(0, b, cfg.train.micro_batch_size):
                idx = perm[start : start + cfg.train.micro_batch_size]
                seq, att, act = (t[idx].to(self.device) for t in (r.sequences, r.attention_mask, r.action_mask))
                lm = loss_mask[idx].to(self.device)
                # Trim right padding shared by the micro-batch: it only costs compute.
                width = int(act.sum(-1).max())
                cut = a - width
                if cut:
                    seq, att, act, lm = seq[:, :-cut], att[:, :-cut], act[:, :width], lm[:, :width]
                lp, entropy = sequence_log_probs_and_entropy(self.model, seq, att, width, cfg.rollout.temperature,
                                                             with_entropy=self.ib_coef > 0)
                mb_adv = adv[idx, :width].to(self.device)
                loss, s = ppo_policy_loss(
                    lp, old_lp[idx, :width].to(self.device), mb_adv, lm,
                    clip_eps_low=cfg.train.clip_eps_low, clip_eps_high=cfg.train.clip_eps_high, agg=cfg.train.loss_agg,
                )
                if ref_lp is not None:
                    kl = masked_mean(kl_k3(lp, ref_lp[idx, :width]), lm, cfg.train.loss_agg)
                    loss = loss + cfg.train.kl_coef * kl
                    stats["kl"] += float(kl.detach()) * float(lm.sum()) / total_tokens
                if self.ib_coef > 0:  # IB: reward entropy where A > 0, penalise it where A < 0
                    ib = ib_regularizer(mb_adv, entropy, lm, cfg.train.loss_agg)
                    loss = loss - self.ib_coef * ib
                    stats["ib_term"] += float(ib.detach()) * float(lm.sum()) / total_tokens
                # Micro-batches are weighted by their share of tokens, so the accumulated
                # gradient equals the token mean over the whole batch.
                weight = float(lm.sum()) / total_tokens if cfg.train.loss_agg == "token_mean" else len(idx) / b
                (loss * weight).backward()
                stats["loss"] += float(loss.detach()) * weight
                stats["clip_frac"] += s["clip_frac"] * weight
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.max_grad_norm)
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this update used
            self.optimizer.step()
            self.scheduler.step()
            updates += 1
        self.model.eval()
        stats = {k: v / updates for k, v in stats.items()}
        stats["grad_norm"] = float(grad_norm)
        stats["lr"] = float(lr)
        return stats

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        batch, info = self._rollout()
        t1 = time.perf_counter()
        old_lp, adv, loss_mask, mi_stats = self._advantages(batch)
        t2 = time.perf_counter()
        update = self._update(batch, old_lp, adv, loss_mask)
        t3 = time.perf_counter()
        r = batch.rollout
        return {
            "step": self.step + 1,
            "reward": float(batch.rewards.mean()),
            "accuracy": float(batch.correct.float().mean()),
            "format_ok": float(batch.format_ok.float().mean()),
            "mean_length": float(r.lengths.float().mean()),
            "truncated_frac": float(r.truncated.float().mean()),
            "groups": int(batch.rewards.shape[0] // self.group),
            **info,
            **mi_stats,
            **update,
            "time_rollout": t1 - t0,
            "time_mi": t2 - t1,
            "time_update": t3 - t2,
        }

    # -- evaluation, checkpoints ---------------------------------------------------------------

    def evaluate(self) -> dict:
        cfg = self.cfg
        return evaluate_model(
            self.model, self.tokenizer, self.test_examples, ks=cfg.eval.k, temperature=cfg.eval.temperature,
            max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens, reward_scheme=cfg.reward.scheme,
            format_check=cfg.reward.format, seed=cfg.seed + 12345,
        )

    def _log(self, record: dict) -> None:
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _latest_checkpoint(self) -> Path | None:
        root = self.out / CHECKPOINTS
        # step_N only: a save interrupted by SIGTERM (preemption) leaves a step_N.tmp behind
        steps = sorted(int(p.name[5:]) for p in root.glob("step_*")
                       if p.name[5:].isdigit() and (p / "trainer_state.pt").exists()) if root.exists() else []
        return root / f"step_{steps[-1]}" if steps else None

    def save_checkpoint(self) -> Path:
        path = self.out / CHECKPOINTS / f"step_{self.step}"
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        torch.save(
            {
                "step": self.step,
                "position": self.position,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
                "numpy_rng": np.random.get_state(),
                "config": self.cfg.to_dict(),
            },
            tmp / "trainer_state.pt",
        )
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)  # a checkpoint is either complete or absent
        return path

    def _load_state(self, checkpoint: Path) -> None:
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        self.step, self.position = state["step"], state["position"]
        self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        # Drop log lines of steps after the checkpoint: they are about to be redone.
        if self.log_path.exists():
            lines = [line for line in self.log_path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            self.log_path.write_text("".join(line + "\n" for line in lines))

    # -- the loop ------------------------------------------------------------------------------

    def train(self, resume: bool = False, stop=None) -> dict:
        """Run (or, with resume, continue) the training. `stop`: an object whose `requested` is
        set to a signal number when the process must stop (preemption.StopSignals): the step in
        progress ends, its checkpoint is saved, and `preemption.Preempted` is raised."""
        cfg = self.cfg
        self.setup(resume)
        history = {}
        if self.step == 0:
            history["before"] = self.evaluate()
            self._log({"step": 0, "eval": history["before"]})
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc=f"{cfg.method} RL", disable=not self.progress)
        while self.step < cfg.train.steps:
            if stop is not None and stop.requested is not None:  # before this run's first step
                bar.close()
                raise Preempted(stop.requested, self.step)
            record = self.train_step()
            self.step += 1
            self._log(record)
            bar.update(1)
            bar.set_postfix(acc=f"{record['accuracy']:.2f}", len=f"{record['mean_length']:.1f}",
                            reward=f"{record['reward']:.2f}")
            last = self.step == cfg.train.steps
            if last or (cfg.eval.every and self.step % cfg.eval.every == 0):
                result = self.evaluate()
                self._log({"step": self.step, "eval": result})
                history["after"] = result
            saved = last or bool(cfg.output.save_every and self.step % cfg.output.save_every == 0)
            if saved:
                self.save_checkpoint()
            if stop is not None and stop.requested is not None and not last:
                if not saved:
                    self.save_checkpoint()
                bar.close()
                raise Preempted(stop.requested, self.step, saved=True)
        bar.close()
        final = self.out / "final"
        shutil.rmtree(final, ignore_errors=True)
        self.model.save_pretrained(final)
        self.tokenizer.save_pretrained(final)
        # A resumed run takes what it did not evaluate itself from the log (a finished run
        # resumed again runs no step at all).
        evals = _logged_evals(self.log_path)
        if "before" not in history:
            history["before"] = next((e for step, e in evals if step == 0), None)
        if "after" not in history:
            history["after"] = evals[-1][1] if evals else None
        return history


def _logged_evals(log_path: Path) -> list[tuple[int, dict]]:
    """(step, evaluation) records of metrics.jsonl, in order."""
    records = (json.loads(line) for line in log_path.read_text().splitlines() if line.strip())
    return [(r["step"], r["eval"]) for r in records if "eval" in r]


def _keep_varied_groups(batch: Batch, g: int) -> torch.Tensor:
    """(B,) bool: rows of groups whose rewards are not all equal (they carry a learning signal)."""
    r = batch.rewards.reshape(-1, g)
    return (r.amax(-1) != r.amin(-1)).repeat_interleave(g)


def _select(batch: Batch, rows: torch.Tensor) -> Batch:
    r = batch.rollout
    idx = rows.nonzero().flatten()
    rollout = Rollout(
        sequences=r.sequences[idx], attention_mask=r.attention_mask[idx], action_mask=r.action_mask[idx],
        completions=[r.completions[i] for i in idx.tolist()], lengths=r.lengths[idx], truncated=r.truncated[idx],
    )
    return Batch(rollout, batch.rewards[idx], batch.correct[idx], batch.format_ok[idx], len(idx))


def _merge(batches: list[Batch], pad_id: int) -> Batch | None:
    """Concatenate batches of different prompt/response widths (re-padding both sides)."""
    batches = [b for b in batches if b.rewards.numel()]
    if not batches:
        return None
    a = max(b.rollout.action_mask.shape[1] for b in batches)
    p = max(b.rollout.sequences.shape[1] - b.rollout.action_mask.shape[1] for b in batches)
    seqs, atts, acts = [], [], []
    for b in batches:
        r = b.rollout
        pa, ra = r.sequences.shape[1] - r.action_mask.shape[1], r.action_mask.shape[1]
        pad = (p - pa, a - ra)
        seqs.append(torch.nn.functional.pad(r.sequences, pad, value=pad_id))
        atts.append(torch.nn.functional.pad(r.attention_mask, pad, value=0))
        acts.append(torch.nn.functional.pad(r.action_mask, (0, a - ra), value=0))
    rollout = Rollout(
        sequences=torch.cat(seqs), attention_mask=torch.cat(atts), action_mask=torch.cat(acts),
        completions=[c for b in batches for c in b.rollout.completions],
        lengths=torch.cat([b.rollout.lengths for b in batches]),
        truncated=torch.cat([b.rollout.truncated for b in batches]),
    )
    return Batch(rollout, torch.cat([b.rewards for b in batches]), torch.cat([b.correct for b in batches]),
                 torch.cat([b.format_ok for b in batches]), sum(b.prompts for b in batches))
