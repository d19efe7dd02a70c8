"""One config for every backend: YAML file + `--set section.key=value` overrides, validated up front.

Every problem is reported as a `ConfigError` whose message is one line saying what is wrong and
how to fix it; the CLIs print it and exit with code 2 before any model is loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

# Every method runs on the same code path (core/methods.py, README "Methods"); its knobs live in
# the section of its name (gfpo:, gtpo:, sgrpo:, significance:), except ib:, which adds its loss
# term to any method. IAPO's weights are iapo.alpha / iapo.beta (0 for every other method).
METHODS = ("iapo", "grpo", "dapo", "gfpo", "gtpo", "sgrpo", "ib", "significance")


class ConfigError(ValueError):
    """A bad configuration; the message is the one line shown to the user."""


@dataclass
class ModelConfig:
    path: str | None = None  # a saved HF model directory; None: a tiny model (warm-started on the synthetic task)
    dtype: str = "float32"  # float32 | bfloat16
    warmstart_steps: int = 1000  # SFT steps of the synthetic warm start when path is None
    warmstart_lr: float = 1e-2
    # Weight of the early-exit answer loss in that warm start (0: plain SFT; issue 18: > 0 trains the
    # answer after traces cut anywhere + iapo.postfix, so the estimator's probe is calibrated).
    warmstart_early_exit: float = 0.0


@dataclass
class DataConfig:
    task: str = "synthetic"  # synthetic | jsonl
    train_path: str | None = None  # jsonl: rows with input_key and label_key
    test_path: str | None = None
    # Validation prompts carved from the training data (scripts/prepare_data.py --holdout). When set,
    # the evaluations during training (local eval.every, OpenRLHF --eval.dataset) and iapo-eval's
    # checkpoint selection run on it, never on the test split, which only iapo-eval's final report reads.
    val_path: str | None = None
    input_key: str = "question"
    label_key: str = "answer"
    system_prompt: str = "r1"  # r1 | none | paper (the IAPO authors' chat prompt, prepare_data.py --style paper)
    redundancy: float = 0.8  # synthetic: chance that a warm-start trace is verbose at all
    variant: str = "classic"  # synthetic: which redundant segments traces have (tasks/synthetic.py VARIANTS)
    num_test: int = 64  # problems of the evaluation split used during training (0: whole split)


@dataclass
class RolloutConfig:
    prompts_per_step: int = 8
    n_samples_per_prompt: int = 8
    max_new_tokens: int = 96
    temperature: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 20
    lr: float = 1e-6
    kl_coef: float = 0.001
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    ppo_epochs: int = 1
    micro_batch_size: int = 16
    max_grad_norm: float = 1.0
    loss_agg: str = "token_mean"  # token_mean | seq_mean
    # Passes over the training prompts: each is train.steps / train.epochs steps over the first
    # (train.steps / train.epochs) * rollout.prompts_per_step prompts (OpenRLHF: --train.num_episodes).
    epochs: int = 1
    # Optimizer and schedule; null: each backend's default (local: torch AdamW betas (0.9, 0.999), a
    # constant lr, no warmup; OpenRLHF: betas (0.9, 0.95), cosine_with_min_lr, 3 % warmup).
    adam_betas: list[float] | None = None
    lr_scheduler: str | None = None  # constant | linear (to 0) | cosine_with_min_lr (to 10 %)
    lr_warmup_ratio: float | None = None  # share of the optimizer steps spent warming up


@dataclass
class IapoConfig:
    alpha: float = 0.5
    beta: float = 0.1
    postfix: str = "</think><answer>"
    predict_mode: str = "postfix"
    chunk_tokens: int | None = None
    probe_stride: int = 1
    # A regular expression: probe only after tokens whose text matches it (and at each response's
    # start and end), e.g. "\n" for one probe per line; None: every position (or probe_stride).
    probe_after: str | None = None
    mi_smoothing: str = "none"
    mi_horizon: int = 1
    mi_decay: float = 1.0
    # A text, e.g. "</think>": from the response token where it first begins on, the answer entropy
    # is held at its value before that token (MI 0 there and after): past it the probe appends the
    # postfix to a prefix that already ended the reasoning (issue 18). None: no hold.
    mi_hold_after: str | None = None
    # What the MI term does with the held tokens (the marker's token and after): "zero" keeps them
    # in the per-sequence normalisation as MI 0 (below the mean: they are shaped against);
    # "exclude" leaves them out of it, as padding (shaping 0: no measurement, no push either way).
    mi_held_tokens: str = "zero"
    exploration: str = "prob"
    shaping_norm: str = "zscore"  # zscore (the paper's formula) | l2 | authors (their released code)
    # The run's method as the OpenRLHF plugin sees it (--iapo.method). In the YAML the method is the
    # top-level `method:` key; this one may be left out (null) or must agree with it.
    method: str | None = None


def _knob(default: Any, help: str) -> Any:
    """A method knob: None in the config means "not given" (so a knob given to another method can
    be refused); `resolved_section` fills `default`."""
    return field(default=None, metadata={"default": default, "help": help})


@dataclass
class GfpoConfig:
    """GFPO: sample G = rollout.n_samples_per_prompt per prompt, train on the k best."""

    keep: int | None = _knob("G // 2 (at least 2)", "responses kept per prompt, k <= rollout.n_samples_per_prompt")
    metric: str | None = _knob("length", "length: keep the k shortest; reward_per_token: the k with the most reward per token")


@dataclass
class GtpoConfig:
    """GTPO / GRPO-S: entropy-weighted token (or sequence) rewards."""

    level: str | None = _knob("token", "token: GTPO; sequence: GRPO-S (mean entropy per completion)")
    reward_weight: float | None = _knob(1.0, "weight w1 of the completion's reward in each token reward")
    entropy_weight: float | None = _knob(1.0, "weight w2 of the entropy share (bonus if correct, penalty if wrong)")


@dataclass
class SgrpoConfig:
    """S-GRPO: the loss over a random subset of each completion's tokens."""

    keep_first: int | None = _knob(32, "leading response tokens always in the loss")
    keep_prob: float | None = _knob(0.3, "chance that each later token is in the loss")


@dataclass
class IbConfig:
    """Information-bottleneck regularisation: loss -= coef * mean(A_t * H_t); with any method."""

    coef: float | None = _knob("0.005 with method ib, else 0 (off)", "weight of the advantage-weighted entropy term")


@dataclass
class SignificanceConfig:
    """Significance-aware length reward, with our MI as the significance score."""

    selection: str | None = _knob("fraction", "fraction: the group's lowest-|MI| tokens; threshold: |MI| < threshold")
    fraction: float | None = _knob(0.5, "share of the group's tokens counted insignificant (selection=fraction)")
    threshold: float | None = _knob(0.01, "|MI| (nats) below which a token is insignificant (selection=threshold)")
    coef: float | None = _knob(0.5, "weight of the length reward (+-0.5 per completion before weighting)")
    schedule: str | None = _knob("dynamic", "dynamic: reward detail early, conciseness later; static: conciseness throughout")
    switch: float | None = _knob(0.5, "share of training after which conciseness is rewarded (schedule=dynamic)")


METHOD_SECTIONS = {"gfpo": GfpoConfig, "gtpo": GtpoConfig, "sgrpo": SgrpoConfig, "ib": IbConfig,
                   "significance": SignificanceConfig}
# The methods a section's knobs may be given with (ib: a loss option of every method).
SECTION_METHODS = {"gfpo": ("gfpo",), "gtpo": ("gtpo",), "sgrpo": ("sgrpo",), "ib": METHODS,
                   "significance": ("significance",)}


@dataclass
class DapoConfig:
    dynamic_sampling: bool = True
    max_resample_rounds: int = 3
    overlong_buffer: int = 16  # last tokens before max_new_tokens that are penalised linearly
    overlong_penalty: float = 1.0


@dataclass
class RewardConfig:
    scheme: str = "paper"  # paper | correctness | correctness_pm1
    format: str = "r1"  # r1 (ours) | authors (the IAPO authors' one-line check, rewards/format.py)


@dataclass
class EvalConfig:
    every: int = 10  # steps between evaluations (0: only before and after training)
    k: list[int] = field(default_factory=lambda: [1, 4, 8])
    temperature: float = 1.0
    max_new_tokens: int | None = None  # default: rollout.max_new_tokens


@dataclass
class OutputConfig:
    dir: str = "runs/local"
    save_every: int = 10  # steps between checkpoints (0: only at the end)


@dataclass
class ClusterConfig:
    """Only `iapo-train-ray` / `iapo-slurm` read this: the Ray/DeepSpeed/vLLM layout on GPUs."""

    nodes: int = 1  # actor (and reference) nodes
    gpus_per_node: int = 8
    zero_stage: int = 2
    tensor_parallel_size: int = 1  # DeepSpeed AutoTP of the actor (and reference)
    vllm_engines: int = 8
    vllm_tensor_parallel_size: int = 1
    vllm_gpu_memory_utilization: float = 0.5
    colocate_all: bool = True  # actor, reference and vLLM share the GPUs (vLLM sleeps during training)
    param_dtype: str = "bf16"
    gradient_checkpointing: bool = True
    rollout_micro_batch_size: int = 8  # per GPU, experience (log-prob + MI) forwards
    max_prompt_tokens: int = 1024  # data.max_len = this + rollout.max_new_tokens
    extra_args: str = ""  # raw OpenRLHF options appended last, e.g. "--ds.packing_samples"


@dataclass
class Config:
    method: str = "iapo"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    iapo: IapoConfig = field(default_factory=IapoConfig)
    dapo: DapoConfig = field(default_factory=DapoConfig)
    gfpo: GfpoConfig = field(default_factory=GfpoConfig)
    gtpo: GtpoConfig = field(default_factory=GtpoConfig)
    sgrpo: SgrpoConfig = field(default_factory=SgrpoConfig)
    ib: IbConfig = field(default_factory=IbConfig)
    significance: SignificanceConfig = field(default_factory=SignificanceConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # Settings applied only when the run's method is the key, e.g. {"gfpo": {"gfpo": {"keep": 6}}}:
    # merged over the file before --set overrides (which win), see load_config.
    per_method: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "method": METHODS,
    "device": ("auto", "cpu", "cuda"),
    "model.dtype": ("float32", "bfloat16"),
    "data.task": ("synthetic", "jsonl"),
    "data.system_prompt": ("r1", "none", "paper"),
    "data.variant": ("classic", "neutral", "preamble"),
    "train.loss_agg": ("token_mean", "seq_mean"),
    "iapo.predict_mode": ("postfix", "next_token"),
    "iapo.mi_smoothing": ("none", "official"),
    "iapo.exploration": ("prob", "entropy"),
    "iapo.mi_held_tokens": ("zero", "exclude"),
    "iapo.shaping_norm": ("zscore", "l2", "authors"),
    "iapo.method": METHODS,
    "gfpo.metric": ("length", "reward_per_token"),
    "gtpo.level": ("token", "sequence"),
    "significance.selection": ("fraction", "threshold"),
    "significance.schedule": ("dynamic", "static"),
    "reward.scheme": ("paper", "correctness", "correctness_pm1"),
    "reward.format": ("r1", "authors"),
    "train.lr_scheduler": ("constant", "linear", "cosine_with_min_lr"),
    "cluster.param_dtype": ("bf16", "fp16", "fp32"),
    "cluster.zero_stage": (0, 1, 2, 3),
}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation (str, int, float, bool, X | None, list[int])."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if value is None:
            return None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            if isinstance(value, str):
                try:
                    value = [item(v) for v in value.split(",")]
                except ValueError:
                    raise ConfigError(f"{key}: got {value!r}, expected comma-separated {item.__name__}s") from None
            else:
                value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: got {value!r}, expected a list like [1, 4, 8]")
        return [_coerce(v, item, key) for v in value]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads 5e-5 (no dot) as a string; users write it that way all the time.
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: got {value!r}, expected true or false")
    if annotation in (int, float) and isinstance(value, bool) or not isinstance(value, annotation):
        raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}), expected {annotation.__name__}")
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            where = f"{prefix}{key}"
            raise ConfigError(f"{where}: unknown key, expected one of {sorted(names)} under '{prefix or 'top level'}'")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            sub = raw[name] or {}
            if not isinstance(sub, dict):
                raise ConfigError(f"{prefix}{name}: got {sub!r}, expected a mapping of keys")
            kwargs[name] = _build(annotation, sub, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(raw[name], annotation, f"{prefix}{name}")
    return cls(**kwargs)


def _apply_override(raw: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"--set {override}: expected key=value, e.g. --set iapo.alpha=0.5")
    key, text = override.split("=", 1)
    # A value YAML cannot parse (a regular expression such as "[.?]" reads as a broken list) is
    # a one-line error naming the fix, not a parser traceback.
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {override}: the value is not valid YAML, expected it quoted, "
                          f"e.g. --set \"{key}='{text}'\"") from None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override}: '{part}' is not a section")
    node[parts[-1]] = value


def _check_per_method(per_method: Any) -> None:
    if not isinstance(per_method, dict):
        raise ConfigError(f"per_method: got {per_method!r}, expected a mapping of method -> settings")
    for method, settings in per_method.items():
        if method not in METHODS:
            raise ConfigError(f"per_method.{method}: unknown method, expected one of {list(METHODS)}")
        if not isinstance(settings, dict) or "method" in settings or "per_method" in settings:
            raise ConfigError(f"per_method.{method}: expected a mapping of sections like {{train: {{clip_eps_high: 0.2}}}} "
                              "(no method / per_method key)")


def _merge(base: dict, extra: dict) -> None:
    """Deep-merge mapping `extra` into `base` (extra wins)."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def load_config(path: str | None, overrides: list[str] | None = None, *, local_files: bool = True) -> Config:
    """Read YAML (None: defaults), apply `section.key=value` overrides, validate.

    local_files=False skips the checks that data/model paths exist on this machine: the Ray
    backend resolves them on the cluster (or as hub names), and --dry-run runs anywhere.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path}: no such file, expected a YAML config (see configs/)")
        with open(path, encoding="utf-8") as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                line = getattr(getattr(e, "problem_mark", None), "line", -1) + 1
                raise ConfigError(f"--config {path}: not valid YAML (line {line}), fix the syntax") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {path}: expected a mapping of sections at the top level")
    per_method = raw.pop("per_method", None) or {}
    _check_per_method(per_method)
    for override in overrides or []:
        if override.split("=", 1)[0].strip().split(".")[0] == "per_method":
            raise ConfigError(f"--set {override}: per_method is set in the file only; set the key itself instead "
                              "(--set section.key=value applies to this run whatever its method)")
    probe = copy.deepcopy(raw)
    for override in overrides or []:
        _apply_override(probe, override)
    method = probe.get("method", Config.method)
    _merge(raw, copy.deepcopy(per_method.get(method, {})))  # the method's settings, then --set over them
    for override in overrides or []:
        _apply_override(raw, override)
    cfg = _build(Config, raw, "")
    cfg.per_method = per_method
    validate(cfg, local_files=local_files)
    return cfg


def validate(cfg: Config, *, local_files: bool = True) -> None:
    """Impossible combinations, each with the fix in the message."""
    for key, choices in CHOICES.items():
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        if value is None and (section in METHOD_SECTIONS or key in ("iapo.method", "train.lr_scheduler")):
            continue  # a knob left out: its default applies
        if value not in choices:
            raise ConfigError(f"{key}: got {value!r}, expected one of {list(choices)}")
    positive = {
        "rollout.prompts_per_step": cfg.rollout.prompts_per_step,
        "rollout.max_new_tokens": cfg.rollout.max_new_tokens,
        "train.steps": cfg.train.steps,
        "train.ppo_epochs": cfg.train.ppo_epochs,
        "train.epochs": cfg.train.epochs,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "iapo.probe_stride": cfg.iapo.probe_stride,
        "iapo.mi_horizon": cfg.iapo.mi_horizon,
        "model.warmstart_steps": cfg.model.warmstart_steps,
        "cluster.nodes": cfg.cluster.nodes,
        "cluster.gpus_per_node": cfg.cluster.gpus_per_node,
        "cluster.tensor_parallel_size": cfg.cluster.tensor_parallel_size,
        "cluster.vllm_engines": cfg.cluster.vllm_engines,
        "cluster.vllm_tensor_parallel_size": cfg.cluster.vllm_tensor_parallel_size,
        "cluster.rollout_micro_batch_size": cfg.cluster.rollout_micro_batch_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: got {value}, expected an integer >= 1")
    non_negative = {
        "iapo.alpha": cfg.iapo.alpha,
        "iapo.beta": cfg.iapo.beta,
        "train.kl_coef": cfg.train.kl_coef,
        "train.clip_eps_low": cfg.train.clip_eps_low,
        "train.clip_eps_high": cfg.train.clip_eps_high,
        "dapo.overlong_penalty": cfg.dapo.overlong_penalty,
        "eval.every": cfg.eval.every,
        "output.save_every": cfg.output.save_every,
        "data.num_test": cfg.data.num_test,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: got {value}, expected a value >= 0")
    for key, value in {"train.lr": cfg.train.lr, "rollout.temperature": cfg.rollout.temperature,
                       "eval.temperature": cfg.eval.temperature}.items():
        if not value > 0:
            raise ConfigError(f"{key}: got {value}, expected a number > 0")
    if cfg.rollout.n_samples_per_prompt < 2:
        raise ConfigError(
            f"rollout.n_samples_per_prompt: got {cfg.rollout.n_samples_per_prompt}, expected >= 2 "
            f"({cfg.method} normalises rewards within the group of samples of one prompt)"
        )
    if cfg.iapo.probe_after is not None:
        import re

        try:
            re.compile(cfg.iapo.probe_after)
        except re.error as e:
            raise ConfigError(f"iapo.probe_after: {cfg.iapo.probe_after!r} is not a regular expression ({e}), "
                              "expected e.g. '\\n' (probe after every token with a newline)") from None
        if cfg.iapo.probe_stride != 1:
            raise ConfigError(f"iapo.probe_after: set with iapo.probe_stride={cfg.iapo.probe_stride}, expected "
                              "probe_stride 1 (probe at segment boundaries or every k-th position, not both)")
    if cfg.iapo.mi_hold_after is not None:
        if not cfg.iapo.mi_hold_after:
            raise ConfigError("iapo.mi_hold_after: got an empty text, expected e.g. '</think>' (or null: no hold)")
        if cfg.iapo.predict_mode != "postfix":
            raise ConfigError(f"iapo.mi_hold_after: set with iapo.predict_mode={cfg.iapo.predict_mode}, expected "
                              "predict_mode postfix (it holds the postfix probe's answer entropy)")
    if cfg.iapo.mi_held_tokens != "zero" and cfg.iapo.mi_hold_after is None:
        raise ConfigError(f"iapo.mi_held_tokens: {cfg.iapo.mi_held_tokens} without iapo.mi_hold_after, expected "
                          "iapo.mi_hold_after set too (e.g. '</think>': the tokens from it on are the held ones)")
    if cfg.model.warmstart_early_exit < 0:
        raise ConfigError(f"model.warmstart_early_exit: got {cfg.model.warmstart_early_exit}, expected a value >= 0")
    if not 0 <= cfg.iapo.mi_decay <= 1:
        raise ConfigError(f"iapo.mi_decay: got {cfg.iapo.mi_decay}, expected a number in [0, 1]")
    if cfg.iapo.predict_mode == "postfix" and cfg.method in ("iapo", "significance") and not cfg.iapo.postfix:
        raise ConfigError("iapo.postfix: got an empty postfix, expected e.g. '</think><answer>' (or predict_mode=next_token)")
    if cfg.train.epochs > 1 and cfg.train.steps % cfg.train.epochs:
        raise ConfigError(f"train.steps: got {cfg.train.steps} with train.epochs {cfg.train.epochs}, expected a multiple "
                          "of the epochs (each pass over the training prompts is train.steps / train.epochs steps)")
    betas = cfg.train.adam_betas
    if betas is not None and (len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
        raise ConfigError(f"train.adam_betas: got {betas}, expected two numbers in [0, 1) like [0.9, 0.99]")
    if cfg.train.lr_warmup_ratio is not None and not 0 <= cfg.train.lr_warmup_ratio < 1:
        raise ConfigError(f"train.lr_warmup_ratio: got {cfg.train.lr_warmup_ratio}, expected a number in [0, 1)")
    if cfg.data.system_prompt == "paper" and cfg.data.task != "jsonl":
        raise ConfigError("data.system_prompt: paper is a prompt file's chat messages, expected data.task=jsonl "
                          "(files from scripts/prepare_data.py --style paper)")
    if cfg.data.val_path and cfg.data.test_path and os.path.abspath(cfg.data.val_path) == os.path.abspath(cfg.data.test_path):
        raise ConfigError(f"data.val_path: {cfg.data.val_path} is the test split; checkpoints are selected on a "
                          "validation split carved from the training data (scripts/prepare_data.py --holdout), "
                          "never on test")
    if any(k < 1 for k in cfg.eval.k):
        raise ConfigError(f"eval.k: got {cfg.eval.k}, expected positive integers")
    if cfg.data.task == "jsonl" and local_files:
        for key in ("train_path", "test_path", "val_path"):
            path = getattr(cfg.data, key)
            if path is None and key == "val_path":
                continue
            if path is None:
                raise ConfigError(f"data.{key}: missing, expected a JSONL file for data.task=jsonl")
            if not os.path.isfile(path):
                raise ConfigError(f"data.{key}: {path} does not exist, expected a JSONL file of prompts")
    if local_files and cfg.model.path is not None and not os.path.isdir(cfg.model.path):
        raise ConfigError(f"model.path: {cfg.model.path} is not a directory, expected a saved HF model (save_pretrained)")
    if cfg.dapo.overlong_buffer >= cfg.rollout.max_new_tokens:
        raise ConfigError(
            f"dapo.overlong_buffer: got {cfg.dapo.overlong_buffer}, expected < rollout.max_new_tokens "
            f"({cfg.rollout.max_new_tokens})"
        )
    _validate_methods(cfg)


def _given(cfg: Config, section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(METHOD_SECTIONS[section]) if getattr(getattr(cfg, section), f.name) is not None]


def _validate_methods(cfg: Config) -> None:
    """Method knobs: given only with their method, in range, and no option of another option."""
    if cfg.iapo.method is not None and cfg.iapo.method != cfg.method:
        raise ConfigError(f"iapo.method: got {cfg.iapo.method!r} with method {cfg.method!r}, expected the same method "
                          "(set it once, with the top-level key `method:`)")
    for section, owners in SECTION_METHODS.items():
        given = _given(cfg, section)
        if given and cfg.method not in owners:
            raise ConfigError(f"{section}.{given[0]}: set, but the method is {cfg.method!r}; {section}.* applies to "
                              f"method {section!r} only (set method: {section}, or drop the key)")
    g = cfg.rollout.n_samples_per_prompt
    keep = cfg.gfpo.keep
    if keep is not None and keep < 2:
        raise ConfigError(f"gfpo.keep: got {keep}, expected an integer >= 2 (the kept responses are the group "
                          "whose rewards are normalised)")
    if keep is not None and keep > g:
        raise ConfigError(f"gfpo.keep: got {keep}, expected <= rollout.n_samples_per_prompt ({g}), the responses "
                          "sampled per prompt (GFPO keeps k of the G it samples)")
    non_negative = {"gtpo.reward_weight": cfg.gtpo.reward_weight, "gtpo.entropy_weight": cfg.gtpo.entropy_weight,
                    "ib.coef": cfg.ib.coef, "significance.coef": cfg.significance.coef,
                    "significance.threshold": cfg.significance.threshold}
    for key, value in non_negative.items():
        if value is not None and not value >= 0:
            raise ConfigError(f"{key}: got {value}, expected a value >= 0")
    gtpo = resolved_section(cfg, "gtpo")
    if cfg.method == "gtpo" and gtpo.reward_weight == 0 and gtpo.entropy_weight == 0:
        raise ConfigError("gtpo.reward_weight, gtpo.entropy_weight: both 0, expected at least one > 0 (all advantages would be 0)")
    if cfg.sgrpo.keep_first is not None and cfg.sgrpo.keep_first < 1:
        raise ConfigError(f"sgrpo.keep_first: got {cfg.sgrpo.keep_first}, expected an integer >= 1 "
                          "(every completion keeps its first tokens in the loss)")
    for key, value in {"sgrpo.keep_prob": cfg.sgrpo.keep_prob, "significance.fraction": cfg.significance.fraction,
                       "significance.switch": cfg.significance.switch}.items():
        if value is not None and not 0 <= value <= 1:
            raise ConfigError(f"{key}: got {value}, expected a number in [0, 1]")
    sig = resolved_section(cfg, "significance")
    for knob, option, needed in (("threshold", "selection", "threshold"), ("fraction", "selection", "fraction"),
                                 ("switch", "schedule", "dynamic")):
        if getattr(cfg.significance, knob) is not None and getattr(sig, option) != needed:
            raise ConfigError(f"significance.{knob}: set with significance.{option}={getattr(sig, option)}, "
                              f"expected significance.{option}: {needed} (or drop the key)")


def resolved_section(cfg: Config, section: str) -> Any:
    """The method section with every knob left out replaced by its default (see the dataclasses)."""
    cls = METHOD_SECTIONS[section]
    current = getattr(cfg, section)
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(current, f.name)
        if value is None:
            value = f.metadata["default"]
            if (section, f.name) == ("gfpo", "keep"):
                value = max(2, cfg.rollout.n_samples_per_prompt // 2)
            elif (section, f.name) == ("ib", "coef"):
                value = 0.005 if cfg.method == "ib" else 0.0
        values[f.name] = value
    return cls(**values)


def ib_coef(cfg: Config) -> float:
    """Weight of the IB loss term actually used (0: off)."""
    return float(resolved_section(cfg, "ib").coef)


def group_size(cfg: Config) -> int:
    """Completions per prompt in the update: GFPO's k, otherwise the G sampled."""
    return resolved_section(cfg, "gfpo").keep if cfg.method == "gfpo" else cfg.rollout.n_samples_per_prompt


def needs_mi(cfg: Config) -> bool:
    """Whether the MI estimator's pass runs (IAPO with alpha != 0, the significance reward)."""
    return cfg.method == "significance" or effective_weights(cfg)[0] != 0


def needs_entropy(cfg: Config) -> bool:
    """Whether the policy's next-token entropy of every response token is needed (GTPO / GRPO-S,
    IAPO's entropy exploration term)."""
    alpha, beta = effective_weights(cfg)
    return cfg.method == "gtpo" or (beta != 0 and cfg.iapo.exploration == "entropy")


def effective_weights(cfg: Config) -> tuple[float, float]:
    """(alpha, beta) actually used: GRPO and DAPO are IAPO with both weights at 0."""
    return (cfg.iapo.alpha, cfg.iapo.beta) if cfg.method == "iapo" else (0.0, 0.0)
