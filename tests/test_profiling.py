"""The collective byte counter (`iapo_openrlhf.profiling`, used by `scripts/bench_mi.py --tp`, the
TP tests and the GPU check): it must see the estimator's vocab-parallel reductions (called as
`dist.all_reduce` from the library, not from the caller) and count their bytes and shapes."""

from __future__ import annotations

import tempfile

import torch
import torch.distributed as dist

from iapo_openrlhf import profiling


def test_counter_sees_the_vocab_parallel_reductions(monkeypatch):
    from iapo_openrlhf.core.vocab_parallel import vocab_parallel_entropy, vocab_parallel_log_probs

    for op in profiling.COLLECTIVE_OPS:  # monkeypatch puts the unwrapped functions back afterwards
        if hasattr(dist, op):
            monkeypatch.setattr(dist, op, getattr(dist, op))
    counter = profiling.CollectiveCounter(record_shapes=True)
    counter.wrap_torch()
    rows, vocab = 7, 10
    logits = torch.randn(rows, vocab)
    labels = torch.randint(0, vocab, (rows,))
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            dist.all_reduce(torch.zeros(5))  # not counted: counter disabled
            counter.enabled = True
            vocab_parallel_entropy(logits, None)
            vocab_parallel_log_probs(logits, labels, 0, vocab, None)
            dist.all_reduce(torch.zeros(3))  # called from here, not from the library: "other"
            counter.enabled = False
        finally:
            dist.destroy_process_group()

    # each function: a max over ranks (rows floats) and one stacked sum (2 x rows floats)
    payload = 2 * (rows + 2 * rows) * 4
    estimator = counter.records["estimator"]
    assert estimator["calls"] == 4 and estimator["ops"] == {"all_reduce": 4}, estimator
    assert estimator["payload_bytes"] == payload, estimator
    assert estimator["wire_bytes"] == 0, estimator  # one rank sends nothing
    assert counter.records["other"]["calls"] == 1 and counter.records["other"]["payload_bytes"] == 12
    assert counter.total("all_reduce") == payload + 12 and counter.total("all_gather") == 0
    assert counter.total("all_reduce", categories=("estimator",)) == payload
    # shapes: the max (rows,) and the stacked sums (2, rows) of each function, then the caller's (3,)
    assert [shape for _, _, shape in counter.shapes] == [(rows,), (2, rows), (rows,), (2, rows), (3,)]
    # per rank on a ring of 2: an all-reduce sends its payload, an all-gather half its output
    assert profiling._wire_bytes("all_reduce", payload, 2) == payload
    assert profiling._wire_bytes("all_gather_into_tensor", 1000, 2) == 500
