"""The project's YAML config as OpenRLHF `train_ppo_ray` options, so one file drives both backends.

Each config key maps to the OpenRLHF option that means the same thing; options that OpenRLHF
needs but the local backend has no notion of (GPU layout, ZeRO stage, vLLM engines) live in the
`cluster:` section. Whatever OpenRLHF option is not covered goes in `cluster.extra_args` or on the
command line after the config: later options win, as in any argparse command.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

from ..config import METHOD_SECTIONS, Config, ConfigError, group_size

CHECKPOINT_DIR = "ckpt"  # under output.dir: OpenRLHF's DeepSpeed checkpoints (resumed automatically)
EXPORT_DIR = "final"  # under output.dir: the HF-format model saved at the end
LOSS_AGG = {"token_mean": "token-mean", "seq_mean": "seq-mean-token-mean"}


def _flag(name: str, on: bool) -> list[str]:
    return [name] if on else []


def openrlhf_args(cfg: Config, reward_file: str) -> list[str]:
    """OpenRLHF options (a flat argv list) equivalent to `cfg` for a run on a GPU cluster."""
    if not cfg.model.path:
        raise ConfigError("model.path: required for iapo-train-ray, expected a HF model name or directory "
                          "(e.g. Qwen/Qwen2.5-7B-Instruct)")
    if cfg.data.task != "jsonl" or not cfg.data.train_path:
        raise ConfigError("data.task: iapo-train-ray reads prompt files, expected data.task=jsonl with "
                          "data.train_path from scripts/prepare_data.py")
    c, out = cfg.cluster, Path(cfg.output.dir)
    # samples the update sees per rollout step: GFPO trains on the k it keeps of the G it samples
    samples = cfg.rollout.prompts_per_step * group_size(cfg)
    alpha, beta = (cfg.iapo.alpha, cfg.iapo.beta) if cfg.method == "iapo" else (0.0, 0.0)
    # prepare_data.py writes the R1-formatted prompt under "prompt" (the authors' chat messages with
    # --style paper, rendered by the model's chat template); "none" uses the raw field.
    input_key = "prompt" if cfg.data.system_prompt in ("r1", "paper") else cfg.data.input_key
    epochs = cfg.train.epochs
    args = [
        "--actor.model_name_or_path", cfg.model.path,
        "--actor.num_nodes", c.nodes, "--actor.num_gpus_per_node", c.gpus_per_node,
        "--ref.num_nodes", c.nodes, "--ref.num_gpus_per_node", c.gpus_per_node,
        "--vllm.num_engines", c.vllm_engines, "--vllm.tensor_parallel_size", c.vllm_tensor_parallel_size,
        "--vllm.gpu_memory_utilization", c.vllm_gpu_memory_utilization,
        *_flag("--train.colocate_all", c.colocate_all), *_flag("--vllm.enable_sleep", c.colocate_all),
        *_flag("--ds.enable_sleep", c.colocate_all),
        "--ds.zero_stage", c.zero_stage, "--ds.tensor_parallel_size", c.tensor_parallel_size,
        "--ds.param_dtype", c.param_dtype,
        *_flag("--actor.gradient_checkpointing_enable", c.gradient_checkpointing),
        "--data.prompt_dataset", cfg.data.train_path,
        "--data.input_key", input_key, "--data.label_key", cfg.data.label_key,
        # train.steps / epochs rollout steps over these many prompts, epochs times
        "--data.max_samples", cfg.train.steps // epochs * cfg.rollout.prompts_per_step,
        "--data.max_len", c.max_prompt_tokens + cfg.rollout.max_new_tokens,
        "--train.num_episodes", epochs, "--train.seed", cfg.seed,
        "--rollout.batch_size", cfg.rollout.prompts_per_step,
        "--rollout.n_samples_per_prompt", cfg.rollout.n_samples_per_prompt,
        "--rollout.max_new_tokens", cfg.rollout.max_new_tokens,
        "--rollout.temperature", cfg.rollout.temperature,
        "--rollout.micro_batch_size", c.rollout_micro_batch_size,
        # one optimizer step per rollout batch and PPO epoch, like the local backend
        "--train.batch_size", samples, "--train.max_epochs", cfg.train.ppo_epochs,
        "--train.micro_batch_size", cfg.train.micro_batch_size,
        "--actor.adam.lr", cfg.train.lr, "--actor.max_norm", cfg.train.max_grad_norm,
        "--actor.eps_clip_low_high", cfg.train.clip_eps_low, cfg.train.clip_eps_high,
        "--actor.loss_agg_mode", LOSS_AGG[cfg.train.loss_agg],
        # KL to the reference as a k3 loss term, as the local backend and the paper (beta 0.001)
        "--algo.kl.init_coef", cfg.train.kl_coef, "--algo.kl.use_loss", "--algo.kl.estimator", "k3",
        "--algo.advantage.estimator", "group_norm",
        "--reward.remote_url", reward_file,
        "--ckpt.path", out / CHECKPOINT_DIR, "--ckpt.load_enable", "--ckpt.save_hf",
        "--ckpt.save_steps", cfg.output.save_every or -1, "--ckpt.output_dir", out / EXPORT_DIR,
        "--logger.tensorboard_dir", out / "tensorboard",
    ]
    if cfg.data.system_prompt == "paper":
        args.append("--data.apply_chat_template")
    if cfg.train.adam_betas is not None:
        args += ["--actor.adam.betas", *cfg.train.adam_betas]
    if cfg.train.lr_scheduler is not None:
        args += ["--actor.lr_scheduler", cfg.train.lr_scheduler]
    if cfg.train.lr_warmup_ratio is not None:
        args += ["--actor.lr_warmup_ratio", cfg.train.lr_warmup_ratio]
    # Evaluations during training: on the validation split when there is one (OpenRLHF also keeps a
    # "best" checkpoint by them), never on test when a validation split exists.
    eval_path = cfg.data.val_path or cfg.data.test_path
    if eval_path:
        args += ["--eval.dataset", eval_path, "--eval.steps", cfg.eval.every or -1,
                 "--eval.temperature", cfg.eval.temperature, "--eval.n_samples_per_prompt", max(cfg.eval.k)]
    if cfg.method == "dapo":  # each part as the local backend applies it (dapo.*: off when disabled)
        if cfg.dapo.dynamic_sampling:
            args += ["--algo.dynamic_filtering_enable", "--algo.dynamic_filtering_range", 0, 1]
        if cfg.dapo.overlong_penalty > 0:
            args += ["--reward.overlong_buffer_len", cfg.dapo.overlong_buffer,
                     "--reward.overlong_penalty_factor", cfg.dapo.overlong_penalty]
    for name in ("postfix", "predict_mode", "chunk_tokens", "probe_stride", "mi_smoothing", "mi_horizon",
                 "mi_decay", "mi_held_tokens", "exploration", "shaping_norm"):
        args += [f"--iapo.{name}", getattr(cfg.iapo, name)]
    for name in ("probe_after", "mi_hold_after"):
        if getattr(cfg.iapo, name) is not None:
            args += [f"--iapo.{name}", getattr(cfg.iapo, name)]
    args += ["--iapo.alpha", alpha, "--iapo.beta", beta, "--iapo.method", cfg.method]
    for section, cls in METHOD_SECTIONS.items():  # the knobs the config gives (the rest: defaults)
        for f in dataclasses.fields(cls):
            value = getattr(getattr(cfg, section), f.name)
            if value is not None:
                args += [f"--{section}.{f.name}", value]
    return [str(a) for a in args] + shlex.split(c.extra_args)
