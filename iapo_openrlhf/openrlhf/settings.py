"""IAPO settings inside an OpenRLHF run: `--iapo.*` options <-> the project's `IapoConfig`.

The options, their defaults and their validation are those of the local backend's `iapo:`
config section (`iapo_openrlhf.config`), so the two backends cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import typing
from types import SimpleNamespace
from typing import Any

from ..config import CHOICES, Config, ConfigError, IapoConfig, validate

IAPO_FIELDS = {f.name: f for f in dataclasses.fields(IapoConfig)}
HELP = {
    "alpha": "weight of the normalised per-token MI term (0 disables the MI pass)",
    "beta": "weight of the normalised exploration term sign * pi_old(o_t)",
    "postfix": "early-exit probe appended after every prefix, e.g. '</think><answer>'",
    "predict_mode": "postfix: answer entropy after the probe; next_token: the policy's own next-token entropy",
    "chunk_tokens": "probe tokens per estimator forward (default: from a memory budget)",
    "probe_stride": "probe every k-th response position and interpolate the rest",
    "mi_smoothing": "none: s_t = h_t - h_t+1; official: the authors' (h_t + h_t-1)/2 - h_t+1",
    "mi_horizon": "sum the MI of the next H tokens",
    "mi_decay": "discount of that sum",
    "exploration": "prob: pi_old(o_t); entropy: the policy's next-token entropy",
}


def _parse_optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null", "") else int(text)


def add_iapo_arguments(parser) -> None:
    """Register --iapo.<field> for every field of IapoConfig, with its default and type."""
    group = parser.add_argument_group("IAPO (iapo-openrlhf)")
    hints = typing.get_type_hints(IapoConfig)
    for name, f in IAPO_FIELDS.items():
        annotation = hints[name]
        kind = {float: float, int: int, str: str}.get(annotation, _parse_optional_int)
        choices = CHOICES.get(f"iapo.{name}")
        group.add_argument(
            f"--iapo.{name}", type=kind, default=f.default, choices=choices,
            help=f"{HELP.get(name, '')} (default: {f.default!r})",
        )


def iapo_config_from_args(args: Any) -> IapoConfig:
    """IapoConfig from OpenRLHF's hierarchised args (args.iapo) or a flat namespace ('iapo.x' keys).

    Raises ConfigError (one line) for a value the local backend would also refuse.
    """
    section = getattr(args, "iapo", None)
    if isinstance(section, SimpleNamespace):
        values = vars(section)
    else:
        values = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("iapo.")}
    unknown = sorted(set(values) - set(IAPO_FIELDS))
    if unknown:
        raise ConfigError(f"--iapo.{unknown[0]}: unknown option, expected one of {sorted(IAPO_FIELDS)}")
    cfg = IapoConfig(**values)
    validate(Config(method="iapo", iapo=cfg))
    return cfg


def needs_mi(cfg: IapoConfig) -> bool:
    return cfg.alpha != 0


def needs_next_token_entropy(cfg: IapoConfig) -> bool:
    return cfg.beta != 0 and cfg.exploration == "entropy"


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
