"""The estimator through DeepSpeed engines on 2 gloo processes (AutoTP and ZeRO-3) against the
single-process result of the same weights, with the collectives counted: under AutoTP no
collective carries a full-vocabulary tensor, under ZeRO-3 one call gathers about one forward's
worth of parameter bytes."""

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
    # persistence threshold 0: no parameter of this tiny model is kept whole on every rank, as none
    # of a 7B's matrices would be (DeepSpeed's default keeps parameters under 1e5 elements resident)
    zero_cfg = {"stage": zero, "stage3_param_persistence_threshold": 0} if zero == 3 else {"stage": zero}
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": zero_cfg}
    if tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": tp}
        if vocab_parallel is not None:
            cfg["tensor_parallel"]["vocab_parallel_lm_head"] = vocab_parallel
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


VOCAB = 101  # odd: the TP ranks hold uneven vocabulary slices (51 + 50)


def _counter():
    from iapo_openrlhf.profiling import CollectiveCounter

    counter = CollectiveCounter(record_shapes=True)
    counter.wrap_torch()
    counter.wrap_deepspeed()
    return counter


def _check(rank: int, world: int, zero: int, tp: int, tied: bool, vocab_parallel, same_data: bool,
           ds0198: bool = False, gather: str = "auto") -> None:
    from iapo_openrlhf.core.mi import answer_entropy
    from iapo_openrlhf.core.parallel import parallel_layout

    assert (deepspeed.__version__ == "0.19.8") == ds0198, deepspeed.__version__
    # "never-rank1": the variable reaches one process only; the ranks must still decide alike
    os.environ["IAPO_ZERO3_GATHER"] = "never" if gather == "never-rank1" and rank == 1 else gather
    model = _model(tied, vocab=VOCAB)
    seq, att, act = _batch(rank, same_data)
    ref_h, ref_lp = answer_entropy(copy.deepcopy(model), seq, att, act, POSTFIX, return_log_probs=True)
    ref_nt = answer_entropy(copy.deepcopy(model), seq, att, act, None, predict_mode="next_token")
    engine = _engine(model, zero, tp, vocab_parallel)
    layout = parallel_layout(engine)
    # DeepSpeed 0.19.8's vocab-parallel head (automatic for tied embeddings) returns this rank's
    # slice; any other head under AutoTP (0.19.6: column-parallel + all-gather, or replicated when
    # tied) is sliced by the estimator itself.
    expected = "model" if tp == 1 else ("vocab_parallel" if ds0198 and (tied or vocab_parallel) else "sliced")
    assert layout.head == expected and layout.vocab_parallel == (tp > 1), layout
    if tp > 1:
        widths = [layout.vocab_end - layout.vocab_start, VOCAB - (layout.vocab_end - layout.vocab_start)]
        assert sorted(widths) == [50, 51], layout
    counter = _counter()
    engine.train()
    with torch.no_grad():
        engine(input_ids=seq, attention_mask=att)  # ZeRO-3 records its trace on a first forward
        counter.enabled = True
        engine(input_ids=seq, attention_mask=att)  # one plain forward (OpenRLHF's log-prob pass)
        counter.enabled = False
    forward_gathered = counter.total("all_gather")
    counter.reset()
    counter.enabled = True
    h, lp = answer_entropy(engine, seq, att, act, POSTFIX, return_log_probs=True, chunk_tokens=5)
    counter.enabled = False
    assert engine.module.training  # restored
    if tp > 1:  # no collective carried a full-vocabulary tensor, nor a rank's slice of one
        carried = [shape for _, _, shape in counter.shapes if len(shape) >= 2]
        assert carried and not [s for s in carried if s[-1] in (VOCAB, 50, 51)], carried
    if zero == 3:
        gathered = counter.total("all_gather")
        if gather == "auto":  # the parameters once per call: within 1.2 x one plain forward's bytes
            assert 0 < gathered <= 1.2 * forward_gathered, (gathered, forward_gathered)
        else:  # module by module in each of the many probe forwards (chunk_tokens=5)
            assert gathered > 3 * forward_gathered, (gathered, forward_gathered)
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


@pytest.mark.parametrize("gather", ["auto", "never", "never-rank1"],
                         ids=["gathered-once", "fallback-module-hooks", "fallback-set-on-one-rank"])
def test_zero3_uneven_lengths_match_single_process(gather):
    run_distributed(_check, 2, 300.0, 3, 1, False, None, False, False, gather)


def _mismatch(rank: int, world: int) -> None:
    from iapo_openrlhf.core.mi import answer_entropy

    engine = _engine(_model(False), 0, 2, None)
    seq, att, act = _batch(rank, same_data=False)  # TP ranks must share the batch: they do not
    with pytest.raises(ValueError, match="tensor-parallel ranks hold different batches"):
        answer_entropy(engine, seq, att, act, POSTFIX)


def test_tp_batch_mismatch_is_an_error_not_a_hang():
    run_distributed(_mismatch, 2, 120.0)


def _budgets_differ(rank: int, world: int) -> None:
    import iapo_openrlhf.core.mi as mi
    from iapo_openrlhf.core.mi import answer_entropy

    model = _model(False, vocab=VOCAB)
    seq, att, act = _batch(rank, same_data=True)
    ref = answer_entropy(copy.deepcopy(model), seq, att, act, POSTFIX, chunk_tokens=5)
    engine = _engine(model, 0, 2, None)
    # On a GPU the automatic chunk size follows each rank's free memory and vocabulary slice: here
    # rank 0 would take 1 probe per row and forward, rank 1 every probe in one forward.
    rows = seq.shape[0]
    mi.default_chunk_tokens = lambda *a, **k: rows * len(POSTFIX) * (1 if rank == 0 else 64)
    h = answer_entropy(engine, seq, att, act, POSTFIX)
    torch.testing.assert_close(h, ref, atol=1e-4, rtol=0)


def test_tp_ranks_agree_on_an_automatic_chunk_size():
    """Without the agreement rank 0 runs more probe forwards than rank 1 and the ranks' layer
    all-reduces no longer pair up (a hang until the deadline, or wrong numbers)."""
    run_distributed(_budgets_differ, 2, 120.0)


def _one_rank_fails(rank: int, world: int) -> None:
    import time

    from iapo_openrlhf.core.mi import answer_entropy
    from iapo_openrlhf.core.parallel import EstimatorSession

    engine = _engine(_model(False), 0, 2, None)
    seq, att, act = _batch(rank, same_data=True)
    if rank == 1:
        def out_of_memory(self, **kwargs):
            raise RuntimeError("CUDA out of memory (simulated on rank 1)")

        EstimatorSession.forward = out_of_memory  # this process only: its preload forward fails
        with pytest.raises(RuntimeError, match="simulated on rank 1"):
            answer_entropy(engine, seq, att, act, POSTFIX)
        time.sleep(120)  # alive, as a Ray actor whose method raised: its process group lives on
        return
    answer_entropy(engine, seq, att, act, POSTFIX)  # waits in the first layer's all-reduce
    raise AssertionError("rank 0's estimator call returned although rank 1 never joined its collectives")


def test_a_rank_failing_inside_the_estimator_ends_the_others_within_seconds(capfd):
    """Without the peer-failure watch rank 0 would wait in its collective for the process group's
    timeout (30 min for gloo, 60 min in OpenRLHF); with it, rank 0 logs rank 1's error and ends."""
    import time

    t0 = time.monotonic()
    with pytest.raises(Exception, match="process 0 terminated with exit code 1"):
        run_distributed(_one_rank_fails, 2, 110.0)
    elapsed = time.monotonic() - t0
    err = capfd.readouterr().err
    assert "[rank 0] IAPO estimator: rank 1 failed inside the estimator: RuntimeError: CUDA out of memory " \
           "(simulated on rank 1); aborting this rank" in err, err[-3000:]
    assert elapsed < 100, elapsed  # rank 1 sleeps 120 s: rank 0 ended on its own
