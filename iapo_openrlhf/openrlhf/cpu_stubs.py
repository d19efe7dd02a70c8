"""Import-time stand-ins for OpenRLHF's two GPU-only dependencies, for CPU machines.

Why: OpenRLHF 0.11 imports `flash_attn` (no CPU build exists) in `openrlhf.models` and `vllm` in
`openrlhf.trainer.ray` at module level, so on a CPU box none of its classes can even be imported.
The tests, `iapo-train-ray --help` and `--dry-run` need OpenRLHF's real classes and parser, not
a copy. `install()` registers, only for a package that is missing:

- `flash_attn.bert_padding` / `flash_attn.utils.distributed`: our own pure-torch versions of the
  padding helpers OpenRLHF's packed-sample path calls (unpad_input, pad_input, index_first_axis,
  rearrange, all_gather). They compute real results, so the packed path runs on CPU with sdpa.
- `vllm`: only the names OpenRLHF imports (SamplingParams, TokensPrompt, random_uuid); any
  attempt to build an engine or sample fails with a message saying vLLM is not installed.

A real training run never uses them: `iapo-train-ray` refuses to start a run while a stand-in is
registered (`missing_gpu_packages()`), and installs them only for --help / --dry-run.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import uuid

import torch

STUB_ATTR = "__iapo_cpu_stub__"


def _is_stub(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and getattr(module, STUB_ATTR, False)


def missing_gpu_packages() -> list[str]:
    """GPU-only packages that are absent or replaced by a stand-in in this process."""
    missing = []
    for name in ("flash_attn", "vllm"):
        if _is_stub(name) or (name not in sys.modules and importlib.util.find_spec(name) is None):
            missing.append(name)
    return missing


# ── flash_attn.bert_padding, in plain torch ──


def rearrange(tensor: torch.Tensor, pattern: str, **axes) -> torch.Tensor:
    from einops import rearrange as einops_rearrange

    return einops_rearrange(tensor, pattern, **axes)


def index_first_axis(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tensor[indices] along dim 0: (N, ...) -> (len(indices), ...)."""
    return tensor.reshape(tensor.shape[0], -1)[indices].reshape(len(indices), *tensor.shape[1:])


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask: torch.Tensor | None = None):
    """(B, S, ...) + (B, S) mask -> (tokens, ...), flat indices, cu_seqlens, max_seqlen, seqused.

    Same return arity as flash_attn 2.8 (OpenRLHF unpacks five values)."""
    mask = attention_mask.bool() if unused_mask is None else (attention_mask.bool() | unused_mask.bool())
    seqlens = mask.sum(-1, dtype=torch.int32)
    used = attention_mask.bool().sum(-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, int(seqlens.max()), used


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of unpad_input: (tokens, ...) -> (batch, seqlen, ...), zeros elsewhere."""
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out[indices] = hidden_states
    return out.reshape(batch, seqlen, *hidden_states.shape[1:])


def all_gather(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0 (ring attention's gather)."""
    world = torch.distributed.get_world_size(group)
    parts = [torch.empty_like(tensor) for _ in range(world)]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=0)


# ── vllm: names only ──


class _VllmMissing:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            "vLLM is not installed (a CPU import stand-in is active); install the GPU extra: pip install -e '.[gpu]'"
        )


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    setattr(module, STUB_ATTR, True)
    module.__spec__ = importlib.util.spec_from_loader(name, loader=None)
    return module


def install() -> list[str]:
    """Register stand-ins for whichever of flash_attn / vllm cannot be imported; return their names."""
    installed = []
    if "flash_attn" not in sys.modules and importlib.util.find_spec("flash_attn") is None:
        padding = _module(
            "flash_attn.bert_padding",
            index_first_axis=index_first_axis, pad_input=pad_input, unpad_input=unpad_input, rearrange=rearrange,
        )
        distributed = _module("flash_attn.utils.distributed", all_gather=all_gather)
        utils = _module("flash_attn.utils", distributed=distributed)
        root = _module("flash_attn", bert_padding=padding, utils=utils, __version__="0.0.0+cpu-stub")
        root.__path__ = []  # a package, so `import flash_attn.x` consults sys.modules
        utils.__path__ = []
        sys.modules.update({
            "flash_attn": root, "flash_attn.bert_padding": padding,
            "flash_attn.utils": utils, "flash_attn.utils.distributed": distributed,
        })
        installed.append("flash_attn")
    if "vllm" not in sys.modules and importlib.util.find_spec("vllm") is None:
        inputs = _module("vllm.inputs", TokensPrompt=dict)
        utils = _module("vllm.utils", random_uuid=lambda: uuid.uuid4().hex)
        root = _module("vllm", SamplingParams=_VllmMissing, LLM=_VllmMissing, inputs=inputs, utils=utils,
                       __version__="0.0.0+cpu-stub")
        root.__path__ = []
        sys.modules.update({"vllm": root, "vllm.inputs": inputs, "vllm.utils": utils})
        installed.append("vllm")
    return installed
