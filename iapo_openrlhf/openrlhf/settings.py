"""IAPO settings inside an OpenRLHF run: `--iapo.*` options <-> the project's `IapoConfig`, and
the method options `--iapo.method NAME` plus `--gfpo.*`, `--gtpo.*`, `--sgrpo.*`, `--ib.*`,
`--significance.*` <-> the config's method sections.

The options, their defaults and their validation are those of the local backend's config
sections (`iapo_openrlhf.config`), so the two backends cannot drift apart. Method knobs default
to None ("not given") on both sides, so a knob given to another method is refused the same way.
"""

from __future__ import annotations

import dataclasses
import typing
from types import SimpleNamespace
from typing import Any

from ..config import (
    CHOICES,
    METHOD_SECTIONS,
    Config,
    ConfigError,
    IapoConfig,
    RolloutConfig,
    effective_weights,
    validate,
)

IAPO_FIELDS = {f.name: f for f in dataclasses.fields(IapoConfig)}
HELP = {
    "alpha": "weight of the normalised per-token MI term (0 disables the MI pass)",
    "beta": "weight of the normalised exploration term sign * pi_old(o_t)",
    "postfix": "early-exit probe appended after every prefix, e.g. '</think><answer>'",
    "predict_mode": "postfix: answer entropy after the probe; next_token: the policy's own next-token entropy",
    "chunk_tokens": "probe tokens per estimator forward (default: from a memory budget)",
    "probe_stride": "probe every k-th response position and interpolate the rest",
    "probe_after": "a regular expression: probe only after tokens whose text matches it (e.g. '\\n': one probe per "
                   "line) and at each response's start and end, interpolating in between (default: every position)",
    "mi_smoothing": "none: s_t = h_t - h_t+1; official: the authors' (h_t + h_t-1)/2 - h_t+1",
    "mi_horizon": "sum the MI of the next H tokens",
    "mi_decay": "discount of that sum",
    "mi_hold_after": "a text, e.g. '</think>': from the response token where it first begins on, hold the answer "
                     "entropy (MI 0 there and after; the probe is malformed past it) (default: no hold)",
    "mi_held_tokens": "zero: the held tokens stay in the MI term's per-sequence normalisation as MI 0; exclude: "
                      "they are left out of it, as padding (shaping 0 there); needs --iapo.mi_hold_after",
    "exploration": "prob: pi_old(o_t); entropy: the policy's next-token entropy",
    "shaping_norm": "per-sequence norm of each shaping term: zscore (the paper's formula), l2 (z-score / its L2 "
                    "norm), authors (their code: s - mean / (std + 1e-8), / L2 norm, valid tokens only)",
    "method": "the method (README 'Methods'): iapo, grpo, dapo, gfpo, gtpo, sgrpo, ib, significance; "
              "alpha and beta are 0 for every method but iapo",
}


def _parse_optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null", "") else int(text)


def _option_type(annotation):
    """argparse type of a config field: X | None -> X (None stays the default)."""
    plain = {float: float, int: int, str: str}.get(annotation)
    if plain is not None:
        return plain
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return {float: float, int: int, str: str}[args[0]]


def add_iapo_arguments(parser) -> None:
    """Register --iapo.<field> for every field of IapoConfig, with its default and type, and
    --<section>.<knob> for every method section (default None: not given)."""
    group = parser.add_argument_group("IAPO (iapo-openrlhf)")
    hints = typing.get_type_hints(IapoConfig)
    for name, f in IAPO_FIELDS.items():
        annotation = hints[name]
        kind = _parse_optional_int if name == "chunk_tokens" else _option_type(annotation)
        choices = CHOICES.get(f"iapo.{name}")
        shown = "iapo" if name == "method" else f.default
        group.add_argument(
            f"--iapo.{name}", type=kind, default=f.default, choices=choices,
            help=f"{HELP.get(name, '')} (default: {shown!r})",
        )
    for section, cls in METHOD_SECTIONS.items():
        group = parser.add_argument_group(f"{section} (iapo-openrlhf): {cls.__doc__.strip()}")
        section_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            group.add_argument(
                f"--{section}.{f.name}", type=_option_type(section_hints[f.name]), default=None,
                choices=CHOICES.get(f"{section}.{f.name}"),
                help=f"{f.metadata['help']} (default: {f.metadata['default']})",
            )


def _section(args: Any, section: str) -> dict[str, Any]:
    """{knob: value} of one section from OpenRLHF's hierarchised args or a flat namespace."""
    value = getattr(args, section, None)
    if isinstance(value, SimpleNamespace):
        return dict(vars(value))
    return {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith(section + ".")}


def _samples_per_prompt(args: Any) -> int | None:
    rollout = getattr(args, "rollout", None)
    if isinstance(rollout, SimpleNamespace):
        return getattr(rollout, "n_samples_per_prompt", None)
    return vars(args).get("rollout.n_samples_per_prompt")


def method_config_from_args(args: Any) -> Config:
    """The run's method settings as a validated `Config` (method, iapo and method sections,
    rollout.n_samples_per_prompt), from OpenRLHF's args. Raises ConfigError (one line)."""
    values = {"iapo": _section(args, "iapo"), **{s: _section(args, s) for s in METHOD_SECTIONS}}
    sections = {"iapo": IapoConfig, **METHOD_SECTIONS}
    for name, given in values.items():
        known = {f.name for f in dataclasses.fields(sections[name])}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ConfigError(f"--{name}.{unknown[0]}: unknown option, expected one of {sorted(known)}")
    built = {name: sections[name](**given) for name, given in values.items()}
    samples = _samples_per_prompt(args)
    rollout = RolloutConfig(n_samples_per_prompt=samples) if samples is not None and samples >= 2 else RolloutConfig()
    cfg = Config(method=built["iapo"].method or "iapo", rollout=rollout, **built)
    validate(cfg)
    return cfg


def iapo_config_from_args(args: Any) -> IapoConfig:
    """IapoConfig from OpenRLHF's hierarchised args (args.iapo) or a flat namespace ('iapo.x' keys),
    with the weights actually used: alpha = beta = 0 unless the method is iapo (as the local
    backend's `effective_weights`). `method` stays as given (None: iapo).

    Raises ConfigError (one line) for a value the local backend would also refuse.
    """
    cfg = method_config_from_args(args)
    alpha, beta = effective_weights(cfg)
    return dataclasses.replace(cfg.iapo, alpha=alpha, beta=beta)


def needs_mi(cfg: IapoConfig) -> bool:
    """The MI estimator's pass: IAPO with alpha != 0, or the significance reward."""
    method = cfg.method or "iapo"
    return (method == "iapo" and cfg.alpha != 0) or method == "significance"


def needs_next_token_entropy(cfg: IapoConfig) -> bool:
    """The policy's next-token entropy per response token: GTPO / GRPO-S, IAPO's entropy exploration."""
    method = cfg.method or "iapo"
    return (method == "iapo" and cfg.beta != 0 and cfg.exploration == "entropy") or method == "gtpo"


def postfix_token_ids(tokenizer, cfg: IapoConfig) -> list[int]:
    """Token ids of the probe; an empty result would make every answer entropy meaningless."""
    if cfg.predict_mode != "postfix" or not needs_mi(cfg):
        return []
    ids = tokenizer(cfg.postfix, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(
            f"--iapo.postfix {cfg.postfix!r} tokenizes to nothing with this tokenizer, "
            "expected text the model can read (e.g. '</think><answer>' or '\\nThe answer is')"
        )
    return list(ids)
