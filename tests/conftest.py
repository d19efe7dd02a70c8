"""Shared fixtures: tiny random models built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 89


def tiny_model(arch: str = "qwen2", attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A 2-layer model whose logits are far from uniform (initializer_range 0.3), so entropies
    vary by whole nats between positions and a wrong key or position shows up in the numbers."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3,
    )
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.config._attn_implementation = attn
    return model.to(dtype).eval()


def padded_batch(prompt_lens, response_lens, width=None, seed: int = 1):
    """OpenRLHF layout: left-padded prompts, right-padded responses in the last A columns."""
    g = torch.Generator().manual_seed(seed)
    p_max = max(prompt_lens)
    a = width or max(response_lens)
    b = len(prompt_lens)
    seq = torch.randint(3, VOCAB, (b, p_max + a), generator=g)
    att = torch.zeros(b, p_max + a, dtype=torch.long)
    act = torch.zeros(b, a, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        att[i, p_max - p : p_max + r] = 1
        act[i, :r] = 1
        seq[i, : p_max - p] = 0
        seq[i, p_max + r :] = 0
    return seq, att, act


@pytest.fixture(scope="session")
def qwen():
    return tiny_model("qwen2")


@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def ray_cpu_inputs(tmp_path_factory):
    """GSM8K prompts and the tiny model of configs/ray_tiny.yaml for the real `iapo-train-ray --cpu`
    runs (tests/ray_cpu.py), made once for the session's test modules that run it."""
    from ray_cpu import GSM8K, prepare_inputs

    if not (GSM8K / "train.jsonl").exists():
        pytest.skip("../shared/data/gsm8k not beside the checkout")
    return prepare_inputs(tmp_path_factory.mktemp("ray_cpu"))
