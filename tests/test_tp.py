"""The estimator through DeepSpeed engines on 2 gloo processes (AutoTP and ZeRO-3) against the
single-process result of the same weights."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from distributed import deepspeed_0198_overlay, run_distributed

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is in the test extra; pip install -e '.[test]'")

POSTFIX = [5, 6, 7]


def _model(tied: bool, vocab: int = 96):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied, initializer_range=0.3, max_position_embeddings=256,
    )
    model = Qwen2ForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def _batch(rank: int, same_data: bool):
    from conftest import padded_batch

    # different ranks may hold different lengths (ZeRO-3 data parallel)
    lens = ([4, 1, 6], [5, 1, 3]) if same_data or rank == 0 else ([2, 3], [9, 2])
    return padded_batch(*lens, seed=11 if same_data else 11 + rank)


def _engine(model, zero: int, tp: int, vocab_parallel: bool | None):
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": zero}}
    if tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": tp}
        if vocab_parallel is not None:
            cfg["tensor_parallel"]["vocab_parallel_lm_head"] = vocab_parallel
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def _check(rank: int, world: int, zero: int, tp: int, tied: bool, vocab_parallel, same_data: bool,
           ds0198: bool = False) -> None:
    from iapo_openrlhf.core.mi import answer_entropy, parallel_layout

    assert (deepspeed.__version__ == "0.19.8") == ds0198, deepspeed.__version__

    model = _model(tied)
    seq, att, act = _batch(rank, same_data)
    ref_h, ref_lp = answer_entropy(copy.deepcopy(model), seq, att, act, POSTFIX, return_log_probs=True)
    ref_nt = answer_entropy(copy.deepcopy(model), seq, att, act, None, predict_mode="next_token")
    engine = _engine(model, zero, tp, vocab_parallel)
    layout = parallel_layout(engine)
    # DeepSpeed 0.19.8 makes a tied head vocab-parallel by itself; 0.19.6 has no vocab-parallel head
    assert layout.vocab_parallel == (ds0198 and tp > 1 and (tied or bool(vocab_parallel))), layout
    engine.train()
    h, lp = answer_entropy(engine, seq, att, act, POSTFIX, return_log_probs=True, chunk_tokens=5)
    assert engine.module.training  # restored
    engine.eval()
    answer_entropy(engine, seq, att, act, POSTFIX, chunk_tokens=5)
    assert not engine.module.training  # an engine in eval mode stays there
    nt = answer_entropy(engine, seq, att, act, None, predict_mode="next_token")
    torch.testing.assert_close(h, ref_h, atol=1e-4, rtol=0)
    torch.testing.assert_close(lp, ref_lp, atol=1e-4, rtol=0)
    torch.testing.assert_close(nt, ref_nt, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "tied,vocab_parallel,ds0198",
    [(False, None, False), (True, None, False), (True, None, True), (False, True, True)],
    ids=["replicated-head", "tied-head", "tied-auto-vocab-parallel-ds0.19.8", "explicit-vocab-parallel-ds0.19.8"],
)
def test_autotp2_matches_single_process(tied, vocab_parallel, ds0198):
    overlay = deepspeed_0198_overlay() if ds0198 else None
    run_distributed(_check, 2, 300.0, 0, 2, tied, vocab_parallel, True, ds0198, pythonpath=overlay)


def test_zero3_uneven_lengths_match_single_process():
    run_distributed(_check, 2, 300.0, 3, 1, False, None, False)


def _mismatch(rank: int, world: int) -> None:
    from iapo_openrlhf.core.mi import answer_entropy

    engine = _engine(_model(False), 0, 2, None)
    seq, att, act = _batch(rank, same_data=False)  # TP ranks must share the batch: they do not
    with pytest.raises(ValueError, match="tensor-parallel ranks hold different batches"):
        answer_entropy(engine, seq, att, act, POSTFIX)


def test_tp_batch_mismatch_is_an_error_not_a_hang():
    run_distributed(_mismatch, 2, 120.0)
