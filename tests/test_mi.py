"""The chunked and KV-copy estimators against the naive one-forward-per-prefix reference."""

from __future__ import annotations

import pytest
import torch

from iapo_openrlhf.core.entropy import entropy_from_logits
from iapo_openrlhf.core.mi import answer_entropy, answer_entropy_packed, token_mi

from conftest import padded_batch, tiny_model

POSTFIX = [5, 6, 7]
# Mixed left padding (prompts 1..9 tokens) and right padding (responses 1..7 tokens).
MIXED = dict(prompt_lens=[4, 1, 9, 6], response_lens=[7, 1, 3, 5])


def _plain_forward_logits(model, seq, att):
    pos = att.cumsum(-1) - 1
    pos.masked_fill_(att == 0, 1)
    with torch.no_grad():
        return model(input_ids=seq, attention_mask=att, position_ids=pos).logits.float()


def _pack(seq, att, act):
    rows = [seq[i][att[i].bool()] for i in range(seq.shape[0])]
    lens = [len(r) for r in rows]
    resp = act.sum(-1).tolist()
    packed = torch.cat(rows + [torch.zeros(3, dtype=torch.long)]).unsqueeze(0)  # trailing padding
    return packed, lens, resp


@pytest.fixture(scope="module")
def mixed_reference(qwen):
    seq, att, act = padded_batch(**MIXED)
    return seq, att, act, answer_entropy(qwen, seq, att, act, POSTFIX, method="naive")


def test_reference_varies(mixed_reference):
    """Guard against a degenerate model: if all entropies were equal, equality would prove nothing."""
    *_, ref = mixed_reference
    valid = ref[ref != 0]
    assert valid.max() - valid.min() > 0.5


@pytest.mark.parametrize("chunk_tokens", [None, 1, 7, 100_000])
def test_chunked_equals_naive_qwen(qwen, mixed_reference, chunk_tokens):
    seq, att, act, ref = mixed_reference
    got = answer_entropy(qwen, seq, att, act, POSTFIX, chunk_tokens=chunk_tokens)
    assert got.shape == (4, act.shape[1] + 1)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("qwen2", "eager"), ("llama", "eager")])
def test_chunked_equals_naive_other_models(arch, attn):
    model = tiny_model(arch, attn, seed=3)
    seq, att, act = padded_batch(**MIXED, seed=4)
    ref = answer_entropy(model, seq, att, act, POSTFIX, method="naive")
    got = answer_entropy(model, seq, att, act, POSTFIX, chunk_tokens=7)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_kv_copy_equals_naive(qwen, mixed_reference):
    seq, att, act, ref = mixed_reference
    torch.testing.assert_close(answer_entropy(qwen, seq, att, act, POSTFIX, method="kv_copy"), ref, atol=1e-4, rtol=0)


def test_columns_after_response_are_zero(mixed_reference):
    *_, act, ref = mixed_reference
    n = act.sum(-1)
    for i in range(ref.shape[0]):
        assert (ref[i, n[i] + 1 :] == 0).all()
        assert (ref[i, : n[i] + 1] > 0).all()


def test_single_token_postfix_and_single_row(qwen):
    seq, att, act = padded_batch([1], [1])
    ref = answer_entropy(qwen, seq, att, act, [9], method="naive")
    torch.testing.assert_close(answer_entropy(qwen, seq, att, act, [9]), ref, atol=1e-4, rtol=0)


def test_probe_stride_one_is_default_exactly(qwen, mixed_reference):
    seq, att, act, _ = mixed_reference
    a = answer_entropy(qwen, seq, att, act, POSTFIX, chunk_tokens=7)
    b = answer_entropy(qwen, seq, att, act, POSTFIX, chunk_tokens=7, probe_stride=1)
    assert torch.equal(a, b)


def test_probe_stride_three_interpolates_naive(qwen, mixed_reference):
    seq, att, act, ref = mixed_reference
    got = answer_entropy(qwen, seq, att, act, POSTFIX, probe_stride=3)
    naive_strided = answer_entropy(qwen, seq, att, act, POSTFIX, probe_stride=3, method="naive")
    torch.testing.assert_close(got, naive_strided, atol=1e-4, rtol=0)
    for i, n in enumerate(act.sum(-1).tolist()):
        probed = sorted(set(range(0, n + 1, 3)) | {n})
        for left, right in zip(probed, probed[1:]):
            for j in range(left, right + 1):
                w = (j - left) / (right - left)
                expect = ref[i, left] + w * (ref[i, right] - ref[i, left])
                assert abs(got[i, j] - expect) < 1e-4, (i, j)


def test_log_probs_equal_plain_forward(qwen, mixed_reference):
    seq, att, act, ref = mixed_reference
    h, lp = answer_entropy(qwen, seq, att, act, POSTFIX, return_log_probs=True, temperature=0.7)
    a = act.shape[1]
    logits = _plain_forward_logits(qwen, seq, att)[:, -a - 1 : -1] / 0.7
    expect = torch.log_softmax(logits, -1).gather(-1, seq[:, -a:, None]).squeeze(-1) * act
    torch.testing.assert_close(lp, expect, atol=1e-5, rtol=0)
    h_t = answer_entropy(qwen, seq, att, act, POSTFIX, method="naive", temperature=0.7)
    torch.testing.assert_close(h, h_t, atol=1e-4, rtol=0)
    assert not torch.allclose(h_t, ref, atol=1e-2)  # the temperature reached the entropy


def test_next_token_mode_is_policy_entropy(qwen, mixed_reference):
    seq, att, act, _ = mixed_reference
    got = answer_entropy(qwen, seq, att, act, None, predict_mode="next_token")
    a = act.shape[1]
    expect = entropy_from_logits(_plain_forward_logits(qwen, seq, att)[:, -a - 1 :])
    expect = expect * (torch.arange(a + 1) <= act.sum(-1, keepdim=True))
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_tokens", [None, 2, 11])
def test_packed_equals_padded(qwen, mixed_reference, chunk_tokens):
    seq, att, act, ref = mixed_reference
    packed, lens, resp = _pack(seq, att, act)
    h, lp = answer_entropy_packed(
        qwen, packed, lens, resp, POSTFIX, response_width=act.shape[1], chunk_tokens=chunk_tokens,
        return_log_probs=True,
    )
    torch.testing.assert_close(h, ref, atol=1e-4, rtol=0)
    _, lp_padded = answer_entropy(qwen, seq, att, act, POSTFIX, return_log_probs=True)
    torch.testing.assert_close(lp, lp_padded, atol=1e-5, rtol=0)
    strided = answer_entropy_packed(qwen, packed, lens, resp, POSTFIX, response_width=act.shape[1], probe_stride=3)
    torch.testing.assert_close(strided, answer_entropy(qwen, seq, att, act, POSTFIX, probe_stride=3), atol=1e-4, rtol=0)
    nt = answer_entropy_packed(qwen, packed, lens, resp, None, response_width=act.shape[1], predict_mode="next_token")
    torch.testing.assert_close(nt, answer_entropy(qwen, seq, att, act, None, predict_mode="next_token"), atol=1e-5, rtol=0)


def test_bf16_close_to_naive():
    model = tiny_model("qwen2", dtype=torch.bfloat16, seed=5)
    seq, att, act = padded_batch(**MIXED, seed=6)
    ref = answer_entropy(model, seq, att, act, POSTFIX, method="naive")
    got = answer_entropy(model, seq, att, act, POSTFIX, chunk_tokens=7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=0)


def test_restores_train_mode_and_keeps_no_grad(qwen):
    seq, att, act = padded_batch([3, 2], [2, 4])
    qwen.train()
    try:
        h = answer_entropy(qwen, seq, att, act, POSTFIX)
        assert qwen.training and not h.requires_grad
    finally:
        qwen.eval()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(postfix_ids=[]), "postfix_ids: got an empty postfix"),
        (dict(method="fast"), "method: got 'fast'"),
        (dict(probe_stride=0), "probe_stride: got 0"),
        (dict(chunk_tokens=0), "chunk_tokens: got 0"),
        (dict(temperature=0.0), "temperature: got 0.0"),
        (dict(predict_mode="answer"), "predict_mode: got 'answer'"),
        (dict(method="naive", return_log_probs=True), "return_log_probs: needs method='chunked'"),
    ],
)
def test_bad_arguments(qwen, kwargs, match):
    seq, att, act = padded_batch([3, 2], [2, 4])
    args = dict(postfix_ids=POSTFIX)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        answer_entropy(qwen, seq, att, act, **args)


def test_bad_layouts(qwen):
    seq, att, act = padded_batch([3, 2], [2, 4])
    with pytest.raises(ValueError, match="attention_mask: got shape"):
        answer_entropy(qwen, seq, att[:, 1:], act, POSTFIX)
    with pytest.raises(ValueError, match="action_mask: got shape"):
        answer_entropy(qwen, seq, att, act[:1], POSTFIX)
    empty = act.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"action_mask: rows \[1\] have no valid token"):
        answer_entropy(qwen, seq, att, empty, POSTFIX)
    holes = act.clone()
    holes[1, 1] = 0
    with pytest.raises(ValueError, match="not a prefix of ones"):
        answer_entropy(qwen, seq, att, holes, POSTFIX)
    no_prompt = att.clone()
    no_prompt[0, : seq.shape[1] - act.shape[1]] = 0
    with pytest.raises(ValueError, match=r"rows \[0\] have an empty prompt"):
        answer_entropy(qwen, seq, no_prompt, act, POSTFIX)
    packed = torch.randint(3, 50, (1, 10))
    with pytest.raises(ValueError, match="seq_lens: sum 12 exceeds"):
        answer_entropy_packed(qwen, packed, [6, 6], [2, 2], POSTFIX)
    with pytest.raises(ValueError, match="sample 1 has response 4 in a sequence of 4"):
        answer_entropy_packed(qwen, packed, [6, 4], [2, 4], POSTFIX)


# ---- token_mi -------------------------------------------------------------------------------


def test_token_mi_hand_computed():
    h = torch.tensor([[3.0, 2.5, 1.0, 0.5, 0.0], [2.0, 1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    s = token_mi(h, mask)
    torch.testing.assert_close(s, torch.tensor([[0.5, 1.5, 0.5, 0.5], [1.0, 1.0, 0.0, 0.0]]))
    # official smoothing: (h_t + h_{t-1}) / 2 - h_{t+1}, h_{-1} := h_0
    s = token_mi(h, mask, smoothing="official")
    torch.testing.assert_close(s, torch.tensor([[0.5, 1.75, 1.25, 0.75], [1.0, 1.5, 0.0, 0.0]]))
    # horizon 2, decay 0.5: s_t + 0.5 s_{t+1}, future MI beyond the response is 0
    s = token_mi(h, mask, horizon=2, decay=0.5)
    torch.testing.assert_close(s, torch.tensor([[1.25, 1.75, 0.75, 0.5], [1.5, 1.0, 0.0, 0.0]]))


def test_token_mi_telescopes_to_total_drop(mixed_reference):
    *_, act, ref = mixed_reference
    s = token_mi(ref, act)
    n = act.sum(-1)
    total = ref[:, 0] - ref[torch.arange(len(n)), n]
    torch.testing.assert_close(s.sum(-1), total, atol=1e-5, rtol=0)


def test_token_mi_bad_input():
    with pytest.raises(ValueError, match="h: got shape"):
        token_mi(torch.zeros(2, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="smoothing: got 'x'"):
        token_mi(torch.zeros(2, 5), torch.ones(2, 4), smoothing="x")
    with pytest.raises(ValueError, match="horizon: got 0"):
        token_mi(torch.zeros(2, 5), torch.ones(2, 4), horizon=0)


def test_long_stride_with_uneven_rows(qwen):
    """Regression: with stride 8 a long row's positions exceed the probe count, which once made
    probes of different rows collide in the chunk schedule."""
    seq, att, act = padded_batch([3, 2, 5], [40, 1, 17], seed=8)
    ref = answer_entropy(qwen, seq, att, act, POSTFIX, probe_stride=8, method="naive")
    for chunk_tokens in (None, 7):
        got = answer_entropy(qwen, seq, att, act, POSTFIX, probe_stride=8, chunk_tokens=chunk_tokens)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
