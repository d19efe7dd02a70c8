"""What the estimator needs to know about the model it is given, and how it puts it in eval mode.

The model may be a transformers causal LM, a DeepSpeed engine wrapping one (`.module`) or an
OpenRLHF Actor (`.model`); these helpers find the transformers module and its text config.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from transformers import PretrainedConfig


def hf_model(model) -> torch.nn.Module:
    """The transformers module behind `model`: itself, or what a DeepSpeed engine (`.module`) or an
    OpenRLHF Actor (`.model`) wraps. DeepSpeed engines expose their own dict as `.config`."""
    inner = model
    for _ in range(4):
        if isinstance(getattr(inner, "config", None), PretrainedConfig):
            return inner
        inner = getattr(inner, "module", None) or getattr(inner, "model", None)
        if inner is None:
            break
    raise ValueError(
        f"model: got {type(model).__name__}, expected a transformers causal LM or a DeepSpeed engine wrapping one"
    )


def deepspeed_engine(model):
    """The DeepSpeed engine in the `.model` / `.module` chain of `model`, or None."""
    inner = model
    for _ in range(4):
        if inner is None or hasattr(inner, "zero_optimization_stage"):
            return inner
        inner = getattr(inner, "model", None) if not hasattr(inner, "module") else inner.module
    return None


def text_config(model):
    cfg = hf_model(model).config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


@contextlib.contextmanager
def inference(model) -> Iterator[None]:
    """no_grad + eval mode, restoring train mode after (the actor is mid-training when called).

    The mode is read off the transformers module: a DeepSpeed engine's own `training` flag stays
    True whatever `eval()` did to the module it wraps."""
    was_training = hf_model(model).training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def uses_flash_attention(model) -> bool:
    impl = getattr(hf_model(model).config, "_attn_implementation", None)
    return isinstance(impl, str) and impl.startswith(("flash", "flex"))


@contextlib.contextmanager
def sdpa_attention(model) -> Iterator[None]:
    """Flash-attention kernels take no 4D mask: the probe forwards run through sdpa on the same
    weights and the same cache layout, the preload keeps the model's own kernel."""
    cfg = hf_model(model).config
    impl = cfg._attn_implementation
    swap = uses_flash_attention(model)
    if swap:
        cfg._attn_implementation = "sdpa"
    try:
        yield
    finally:
        if swap:
            cfg._attn_implementation = impl


def param_dtype(model) -> torch.dtype:
    for p in hf_model(model).parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def check_no_sliding_window(model) -> None:
    cfg = text_config(model)
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(
            f"model: has attention layer types {sorted(set(layer_types))}; the chunked estimator supports "
            "full attention only, use method='naive' for sliding-window models"
        )


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (.., q, k) -> 0 / dtype-min float mask (eager adds it, sdpa accepts it)."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)
