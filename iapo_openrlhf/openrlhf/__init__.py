"""The OpenRLHF plugin: IAPO inside OpenRLHF's Ray PPO pipeline (vLLM rollouts, DeepSpeed actor).

Modules: `actor` (policy actor whose forward also returns the per-token MI), `experience_maker`
(adds the information shaping to OpenRLHF's advantages), `launch` (`iapo-train-ray`: OpenRLHF's
own `train_ppo_ray` entry point with these classes and `--iapo.*` options), `reward_func` (the file
for `--reward.remote_url`), `cpu_stubs` (import-time stand-ins for flash_attn / vllm on CPU).

Nothing here imports OpenRLHF at package import time: `import iapo_openrlhf` must work without it.
"""

from __future__ import annotations

SUPPORTED = (0, 11)  # OpenRLHF 0.11.x: the classes and hooks subclassed here are those of 0.11
SUPPORTED_TEXT = ">=0.11,<0.12"


class OpenRLHFVersionError(RuntimeError):
    pass


def check_openrlhf_version() -> str:
    """The installed OpenRLHF version; raises a one-line error when it is missing or unsupported."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("openrlhf")
    except PackageNotFoundError:
        raise OpenRLHFVersionError(
            f"OpenRLHF is not installed: pip install --no-deps 'openrlhf{SUPPORTED_TEXT}' and pip install -e '.[openrlhf]'"
        ) from None
    parts = tuple(int(p) for p in found.split(".")[:2] if p.isdigit())
    if parts != SUPPORTED:
        raise OpenRLHFVersionError(
            f"OpenRLHF {found} is installed, this plugin supports openrlhf{SUPPORTED_TEXT}: "
            f"pip install --no-deps 'openrlhf{SUPPORTED_TEXT}'"
        )
    return found
