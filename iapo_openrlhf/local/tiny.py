"""A tiny random Qwen2 with a BPE tokenizer trained on the data, for running a real-data config
(GSM8K) end to end on a machine without a model hub. It cannot solve the task; it exercises the
path: prompts, generation, reward parsing, the estimator and the update."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from ..data import jsonl_texts
from ..rewards import R1_SYSTEM_PROMPT

SPECIAL = ["<pad>", "<eos>"]
# Added but not special: decode(skip_special_tokens=True) must keep them for the answer parser.
TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<|im_start|>", "<|im_end|>"]
# Qwen's ChatML layout, so that chat-message prompts (data.system_prompt: paper) render as they
# would for Qwen2.5-Instruct.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_model_from_texts(out_dir: str | Path, cfg, *, seed: int = 0, vocab_size: int = 1024) -> Path:
    """Train a byte-level BPE on the training file, build a 2-layer Qwen2, save both."""
    texts = jsonl_texts(cfg.data.train_path, cfg.data.input_key, cfg.data.label_key)
    texts.append(R1_SYSTEM_PROMPT)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens(TAGS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=2048,
            tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """`python -m iapo_openrlhf.local.tiny --config FILE`: write the config's tiny model to model.path
    (the tokenizer is trained on data.train_path), e.g. for `iapo-train-ray --cpu` (configs/ray_tiny.yaml)."""
    import argparse
    import sys

    from ..config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="python -m iapo_openrlhf.local.tiny", description=main.__doc__)
    parser.add_argument("--config", required=True, help="YAML config with data.train_path and model.path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--out", help="output directory (default: the config's model.path)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set, local_files=False)
        out = args.out or cfg.model.path
        if not out:
            raise ConfigError("model.path: not set, expected the directory to write the tiny model to (or --out DIR)")
        if cfg.data.task != "jsonl" or not cfg.data.train_path or not os.path.isfile(cfg.data.train_path):
            raise ConfigError(f"data.train_path: {cfg.data.train_path} is not a file, expected the prompt JSONL the "
                              "tokenizer is trained on (scripts/prepare_data.py writes it)")
    except ConfigError as e:
        print(f"iapo_openrlhf.local.tiny: error: {e}", file=sys.stderr)
        return 2
    path = tiny_model_from_texts(out, cfg, seed=cfg.seed)
    print(f"wrote a tiny Qwen2 and its tokenizer to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
