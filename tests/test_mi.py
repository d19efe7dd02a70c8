"""The chunked and KV-copy estimators against the naive one-forward-per-prefix reference."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from iapo_openrlhf.core.entropy import entropy_from_logits
from iapo_openrlhf.core.advantages import iapo_advantages
from iapo_openrlhf.core.mi import answer_entropy, token_mi

from conftest import padded_batch, tiny_model

POSTFIX = [5, 6, 7]
# Mixed left padding (prompts 1..9 tokens) and right padding (responses 1..7 tokens).
MIXED = dict(prompt_lens=[4, 1, 9, 6], response_lens=[7, 1, 3, 5])


def _plain_forward_logits(model, seq, att):
    pos = att.cumsum(-1) - 1
    pos.masked_fill_(att == 0, 1)
    with torch.no_grad():
        return model(input_ids=seq, attention_mask=att, position_ids=pos).logits.float()


def _brute_force(model, seq, att, act, postfix, temperature: float = 1.0) -> torch.Tensor:
    """The definition, independent of the estimator's probe bookkeeping: for every column j that is
    an action or follows one, one unpadded forward of the attended tokens before column j's token
    (sequence column S - A + j) followed by the postfix; the entropy of its last logits."""
    b, s = seq.shape
    a = act.shape[1]
    out = torch.zeros(b, a + 1)
    for i in range(b):
        for j in range(a + 1):
            if not (j < a and act[i, j]) and not (j > 0 and act[i, j - 1]):
                continue
            prefix = seq[i, : s - a + j][att[i, : s - a + j].bool()]
            ids = torch.cat([prefix, torch.tensor(postfix)]).unsqueeze(0)
            with torch.no_grad():
                logits = model(input_ids=ids, position_ids=torch.arange(ids.shape[1]).unsqueeze(0)).logits[0, -1]
            out[i, j] = entropy_from_logits(logits.float(), temperature)
    return out


def _right_padded(prompt_lens, response_lens, seed: int = 1):
    """OpenRLHF 0.11's micro-batch layout: each row prompt + response from column 0, right-padded;
    action_mask = mask[1:] (width S - 1), zero over the prompt."""
    g = torch.Generator().manual_seed(seed)
    s = max(p + r for p, r in zip(prompt_lens, response_lens))
    b = len(prompt_lens)
    seq = torch.zeros(b, s, dtype=torch.long)
    att = torch.zeros(b, s, dtype=torch.long)
    act = torch.zeros(b, s - 1, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        seq[i, : p + r] = torch.randint(3, 80, (p + r,), generator=g)
        att[i, : p + r] = 1
        act[i, p - 1 : p + r - 1] = True
    return seq, att, act


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


def _boundaries(seq, act):
    """A third of the token ids that occur in the responses: the 'segment-ending' tokens of the
    boundary-probe tests (with random tokens, some spans get several boundaries, some none)."""
    return sorted(set(seq[:, -act.shape[1]:][act.bool()].tolist()))[::3]


def test_probe_after_ids_interpolates_naive(qwen, mixed_reference):
    """Probes only at span start, after each boundary token and at span end: the chunked estimator
    equals the naive reference on the same probes, probed columns equal the every-position naive
    entropies and the columns in between are their linear interpolation."""
    seq, att, act, ref = mixed_reference
    ids = _boundaries(seq, act)
    got = answer_entropy(qwen, seq, att, act, POSTFIX, probe_after_ids=ids, chunk_tokens=7)
    naive = answer_entropy(qwen, seq, att, act, POSTFIX, probe_after_ids=ids, method="naive")
    torch.testing.assert_close(got, naive, atol=1e-4, rtol=0)
    tokens = seq[:, -act.shape[1]:]
    fewer = 0
    for i, n in enumerate(act.sum(-1).tolist()):
        probed = sorted({0, n} | {t + 1 for t in range(n) if int(tokens[i, t]) in ids})
        fewer += len(probed) < n + 1
        for left, right in zip(probed, probed[1:]):
            for j in range(left, right + 1):
                w = (j - left) / (right - left)
                expect = ref[i, left] + w * (ref[i, right] - ref[i, left])
                assert abs(got[i, j] - expect) < 1e-4, (i, j)
    assert fewer > 0  # the test would prove nothing if every column were probed
    # the log-probs (pi_old, which the exploration term reads) do not depend on where it probes
    _, lp_boundary = answer_entropy(qwen, seq, att, act, POSTFIX, probe_after_ids=ids, chunk_tokens=7,
                                    return_log_probs=True)
    _, lp_every = answer_entropy(qwen, seq, att, act, POSTFIX, chunk_tokens=7, return_log_probs=True)
    torch.testing.assert_close(lp_boundary, lp_every, atol=1e-5, rtol=0)


def test_probe_after_ids_packed_and_multi_span(qwen):
    seq, att, act = _right_padded([3, 2, 5], [6, 4, 2])
    act[0, 4] = False  # row 0: two spans (a multi-turn rollout)
    ids = _boundaries(seq, act)
    padded = answer_entropy(qwen, seq, att, act, POSTFIX, probe_after_ids=ids, chunk_tokens=5)
    torch.testing.assert_close(answer_entropy(qwen, seq, att, act, POSTFIX, probe_after_ids=ids, packed=True),
                               padded, atol=1e-4, rtol=0)
    torch.testing.assert_close(answer_entropy(qwen, seq, att, act, POSTFIX, probe_after_ids=ids, method="naive"),
                               padded, atol=1e-4, rtol=0)


def test_span_probes_at_boundaries():
    from iapo_openrlhf.core.probes import span_probes

    assert span_probes(2, 9, 1, boundaries=[3, 5, 8]) == [2, 4, 6, 9]  # after the span's last token: its end
    assert span_probes(2, 9, 1, boundaries=[]) == [2, 9]
    assert span_probes(0, 1, 1, boundaries=[0]) == [0, 1]
    with pytest.raises(ValueError, match="stride 1"):
        span_probes(0, 5, 2, boundaries=[1])


def test_boundary_token_ids_of_the_synthetic_tokenizer():
    from iapo_openrlhf.core.probes import boundary_token_ids
    from iapo_openrlhf.tasks.synthetic import build_tokenizer

    tok = build_tokenizer()
    texts = [tok.decode([i]) for i in boundary_token_ids(tok, r"[.?]")]
    assert {" .", " ?"} <= set(texts) and all("." in t or "?" in t for t in texts)  # also the bare characters


PROBE_AFTER_TOY = ["model.warmstart_steps=3", "rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=2",
                   "rollout.max_new_tokens=24", "dapo.overlong_buffer=4", "data.num_test=2", "eval.k=[1]", "train.steps=1",
                   "train.micro_batch_size=4", "method=iapo"]


def test_probe_after_config_plumbing_local_backend(tmp_path, monkeypatch):
    """iapo.probe_after in the config reaches the local trainer's estimator as the ids of the
    tokens the pattern matches (and a pattern matching no token, a bad pattern, or one with a
    stride, is a one-line ConfigError)."""
    from iapo_openrlhf.config import ConfigError, load_config
    from iapo_openrlhf.core.probes import boundary_token_ids
    from iapo_openrlhf.local import trainer as trainer_mod
    from iapo_openrlhf.tasks.synthetic import build_tokenizer

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("probe_after_ids"))
        return answer_entropy(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "answer_entropy", spy)
    cfg = load_config("configs/local_tiny.yaml", [*PROBE_AFTER_TOY, f"output.dir={tmp_path}", "iapo.probe_after='[.?]'"])
    assert cfg.iapo.probe_after == "[.?]"
    trainer_mod.LocalTrainer(cfg, progress=False).train()
    assert seen[0] == boundary_token_ids(build_tokenizer(), "[.?]") and seen[0]
    for override, message in (("iapo.probe_after='('", "iapo.probe_after: '(' is not a regular expression"),
                              ("iapo.probe_after=[.?]", "the value is not valid YAML, expected it quoted"),
                              ("iapo.probe_stride=2", "iapo.probe_after: set with iapo.probe_stride=2")):
        extra = [override] if "probe_stride" not in override else [override, "iapo.probe_after=x"]
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            load_config("configs/local_tiny.yaml", extra)
        assert "\n" not in str(err.value)
    cfg = load_config("configs/local_tiny.yaml", [*PROBE_AFTER_TOY, f"output.dir={tmp_path / 'none'}",
                                                  "iapo.probe_after=zzzz"])
    with pytest.raises(ConfigError, match="iapo.probe_after: 'zzzz' matches no token"):
        trainer_mod.LocalTrainer(cfg, progress=False).train()


def test_probe_after_config_plumbing_openrlhf_backend():
    """The same option through the OpenRLHF backend: the config's pattern becomes
    --iapo.probe_after, OpenRLHF's parser keeps it and the actor's IapoConfig has it (the actor's
    forward with the matched ids, on OpenRLHF's own batches: test_openrlhf_actor.py)."""
    pytest.importorskip("openrlhf", reason="OpenRLHF is installed by .ci/run (pip install --no-deps openrlhf)")
    from pathlib import Path

    from iapo_openrlhf.config import load_config
    from iapo_openrlhf.openrlhf import cpu_stubs

    cpu_stubs.install()
    from iapo_openrlhf.openrlhf import launch
    from iapo_openrlhf.openrlhf.config_args import openrlhf_args
    from iapo_openrlhf.openrlhf.settings import iapo_config_from_args

    reward = str(Path(__file__).with_name("data") / "digits_reward.py")
    config = Path(__file__).resolve().parent.parent / "configs" / "ray_tiny.yaml"
    for pattern, expect in (("'\\n'", "\\n"), ('"[.?]"', "[.?]"), (None, None)):
        cfg = load_config(str(config), [] if pattern is None else [f"iapo.probe_after={pattern}"], local_files=False)
        argv = openrlhf_args(cfg, reward) + ["--cpu"]
        assert ("--iapo.probe_after" in argv) == (expect is not None)
        assert iapo_config_from_args(launch.parse_args(argv)).probe_after == expect


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
    h, lp = answer_entropy(qwen, seq, att, act, POSTFIX, chunk_tokens=chunk_tokens, return_log_probs=True, packed=True)
    torch.testing.assert_close(h, ref, atol=1e-4, rtol=0)
    _, lp_padded = answer_entropy(qwen, seq, att, act, POSTFIX, return_log_probs=True)
    torch.testing.assert_close(lp, lp_padded, atol=1e-5, rtol=0)
    strided = answer_entropy(qwen, seq, att, act, POSTFIX, probe_stride=3, packed=True)
    torch.testing.assert_close(strided, answer_entropy(qwen, seq, att, act, POSTFIX, probe_stride=3), atol=1e-4, rtol=0)
    nt = answer_entropy(qwen, seq, att, act, None, predict_mode="next_token", packed=True)
    torch.testing.assert_close(nt, answer_entropy(qwen, seq, att, act, None, predict_mode="next_token"), atol=1e-5, rtol=0)


# ---- OpenRLHF 0.11's layout (right-padded rows, action_mask = mask[1:]) and multi-turn spans --


def test_brute_force_reference_is_the_naive_method(qwen, mixed_reference):
    seq, att, act, ref = mixed_reference
    torch.testing.assert_close(_brute_force(qwen, seq, att, act.bool(), POSTFIX), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("chunk_tokens", [None, 5])
def test_right_padded_full_width_matches_brute_force(qwen, packed, chunk_tokens):
    seq, att, act = _right_padded([4, 1, 9, 6], [7, 1, 3, 5], seed=2)
    ref = _brute_force(qwen, seq, att, act, POSTFIX)
    h, lp = answer_entropy(qwen, seq, att, act, POSTFIX, chunk_tokens=chunk_tokens, return_log_probs=True, packed=packed)
    assert h.shape == (4, seq.shape[1]) and lp.shape == act.shape
    torch.testing.assert_close(h, ref, atol=1e-4, rtol=0)
    # log-probs column for column like OpenRLHF's Actor.forward: log p(token t + 1), 0 off the actions
    logits = _plain_forward_logits(qwen, seq, att)[:, :-1]
    expect = torch.log_softmax(logits, -1).gather(-1, seq[:, 1:, None]).squeeze(-1) * act
    torch.testing.assert_close(lp, expect, atol=1e-5, rtol=0)
    nt = answer_entropy(qwen, seq, att, act, None, predict_mode="next_token", packed=packed)
    probed = torch.zeros_like(nt, dtype=torch.bool)
    probed[:, :-1] |= act
    probed[:, 1:] |= act
    torch.testing.assert_close(nt, entropy_from_logits(_plain_forward_logits(qwen, seq, att)) * probed, atol=1e-5, rtol=0)


def test_right_padded_equals_left_padded_layout(qwen, mixed_reference):
    """The same samples in both layouts give the same entropies and MI, column for column."""
    seq_l, att_l, act_l, ref = mixed_reference
    b, s_l = seq_l.shape
    rows = [seq_l[i][att_l[i].bool()] for i in range(b)]
    s = max(len(r) for r in rows)
    seq = torch.zeros(b, s, dtype=torch.long)
    att = torch.zeros(b, s, dtype=torch.long)
    act = torch.zeros(b, s - 1, dtype=torch.bool)
    n = act_l.sum(-1)
    for i, r in enumerate(rows):
        seq[i, : len(r)], att[i, : len(r)] = r, 1
        act[i, len(r) - n[i] - 1 : len(r) - 1] = True
    h = answer_entropy(qwen, seq, att, act, POSTFIX, chunk_tokens=7)
    for i, r in enumerate(rows):
        p = len(r) - int(n[i])
        torch.testing.assert_close(h[i, p - 1 : p + int(n[i])], ref[i, : int(n[i]) + 1], atol=1e-4, rtol=0)
    mi = token_mi(h, act)
    mi_l = token_mi(ref, act_l)
    torch.testing.assert_close(mi[act], mi_l[act_l.bool()], atol=1e-4, rtol=0)


def _multi_turn():
    """Two rows with two action spans each (turn, observation, turn), one with a single span,
    right-padded: what a multi-turn agent executor produces."""
    seq, att, act = _right_padded([5, 3, 2], [12, 10, 4], seed=9)
    act[0, 8:11] = False  # row 0: actions 4..7, observation 8..10, actions 11..15
    act[1, 4:6] = False  # row 1: actions 2..3, observation 4..5, actions 6..11
    return seq, att, act


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("stride", [1, 2])
def test_multi_turn_spans_match_brute_force(qwen, packed, stride):
    seq, att, act = _multi_turn()
    h = answer_entropy(qwen, seq, att, act, POSTFIX, chunk_tokens=4, probe_stride=stride, packed=packed)
    ref = _brute_force(qwen, seq, att, act, POSTFIX)
    if stride == 1:
        torch.testing.assert_close(h, ref, atol=1e-4, rtol=0)
    else:  # every probed column exact, each span interpolated on its own
        for i in range(seq.shape[0]):
            cols = act[i].nonzero().flatten().tolist()
            spans, start = [], cols[0]
            for prev, cur in zip(cols, cols[1:] + [None]):
                if cur != prev + 1:
                    spans.append((start, prev + 1))
                    start = cur
            for start, end in spans:
                probed = sorted(set(range(start, end + 1, stride)) | {end})
                torch.testing.assert_close(h[i, probed], ref[i, probed], atol=1e-4, rtol=0)
    off = torch.ones_like(h, dtype=torch.bool)
    off[:, :-1] &= ~act
    off[:, 1:] &= ~act
    assert (h[off] == 0).all() and (h[~off] > 0).all()
    mi = token_mi(h, act)
    assert (mi[~act] == 0).all()  # observation tokens and padding get no MI


def test_row_without_actions_gives_zeros(qwen):
    seq, att, act = _right_padded([4, 3], [5, 2], seed=3)
    act[1] = False  # e.g. a prompt truncated to max_len: no response token left
    h, lp = answer_entropy(qwen, seq, att, act, POSTFIX, return_log_probs=True)
    assert (h[1] == 0).all() and (lp[1] == 0).all()
    torch.testing.assert_close(h[0], answer_entropy(qwen, seq[:1], att[:1], act[:1], POSTFIX)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [5, 7, 13])
def test_bf16_within_bf16_rounding_of_fp32(seed):
    """bf16 results depend on the shapes of the matrix multiplies (naive runs one unpadded row per
    probe, chunked runs probe blocks over the cache), so bf16 chunked and bf16 naive differ by
    rounding. Measured on 10 seeds of this model: naive bf16 is 0.04-0.15 nats from the same
    weights in fp32, chunked bf16 0.016-0.030 from naive bf16 and at most 1.3 x naive's own error
    from fp32. A fixed 2e-2 bound sat below that floor and failed on transformers 5.24. Here:
    chunked bf16 is as close to fp32 as naive bf16 is (1.5 x), and within that floor of it."""
    model = tiny_model("qwen2", dtype=torch.bfloat16, seed=seed)
    seq, att, act = padded_batch(**MIXED, seed=seed + 1)
    fp32 = answer_entropy(copy.deepcopy(model).float(), seq, att, act, POSTFIX, method="naive")
    naive = answer_entropy(model, seq, att, act, POSTFIX, method="naive")
    got = answer_entropy(model, seq, att, act, POSTFIX, chunk_tokens=7)
    assert got.dtype == torch.float32
    floor = (naive - fp32).abs().max()
    assert 0 < floor < 0.25, floor  # bf16 noise, not a wrong key or position (those move whole nats)
    assert (got - fp32).abs().max() <= 1.5 * floor
    assert (got - naive).abs().max() <= floor


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
        (dict(probe_stride=2, probe_after_ids=[5]), "probe_after_ids: given with probe_stride=2"),
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
    with pytest.raises(ValueError, match=r"expected \(B=2, A\) with 1 <= A <= S - 1"):
        answer_entropy(qwen, seq, att, torch.ones(2, seq.shape[1], dtype=torch.long), POSTFIX)
    no_prompt = att.clone()
    no_prompt[0, : seq.shape[1] - act.shape[1]] = 0
    with pytest.raises(ValueError, match="row 0 has no attended token before its first action"):
        answer_entropy(qwen, seq, no_prompt, act, POSTFIX)
    masked_action = att.clone()
    masked_action[1, -3] = 0  # row 1's response token 1 is an action but not attended
    with pytest.raises(ValueError, match=r"action_mask: rows \[1\] mark tokens that attention_mask masks out"):
        answer_entropy(qwen, seq, masked_action, act, POSTFIX)
    hole = att.clone()
    hole[0, 1] = 0  # row 0's prompt has a masked token between attended ones: fine padded, not packed
    answer_entropy(qwen, seq, hole, act, POSTFIX)
    with pytest.raises(ValueError, match=r"rows \[0\] have masked tokens between attended ones"):
        answer_entropy(qwen, seq, hole, act, POSTFIX, packed=True)


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


def test_token_mi_multi_turn_hand_computed():
    """Two spans (columns 0-1 and 3) with an observation at column 2: no MI there, and the
    official smoothing starts each span afresh (h[t - 1] := h[t] at a span's first token)."""
    h = torch.tensor([[3.0, 2.0, 1.5, 1.2, 0.2]])
    mask = torch.tensor([[1, 1, 0, 1]])
    torch.testing.assert_close(token_mi(h, mask), torch.tensor([[1.0, 0.5, 0.0, 1.0]]))
    torch.testing.assert_close(token_mi(h, mask, smoothing="official"), torch.tensor([[1.0, 1.0, 0.0, 1.0]]))
    torch.testing.assert_close(token_mi(h, mask, horizon=2, decay=0.5), torch.tensor([[1.25, 0.5, 0.0, 1.0]]))


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


# -- iapo.mi_hold_after: the answer entropy held from a marker text on ------------------------------


def _naive_marker_column(tok, response: list[int], marker: str) -> int:
    """Reference: index in the response of the first token whose decoded prefix reaches past the
    marker's first character in the decoded response (one decode per prefix)."""
    start = tok.decode(response).find(marker)
    if start < 0:
        return -1
    return next(j for j in range(len(response)) if len(tok.decode(response[: j + 1])) > start)


def _naive_hold(h: torch.Tensor, columns: list[int]) -> torch.Tensor:
    held = h.clone()
    for i, c in enumerate(columns):
        if c >= 0:
            for j in range(c + 1, h.shape[1]):
                held[i, j] = h[i, c]
    return held


def test_marker_columns_against_the_decoded_text():
    """On the layout of OpenRLHF 0.11's micro-batches, built here from texts (prompt + response from
    column 0, right-padded, action_mask = mask[1:]; OpenRLHF's own batches: test_openrlhf_actor.py):
    the action column where the marker begins, also mid-token (" +" of "+ 5 =") and
    across tokens; the first occurrence; a marker in the prompt only is not found."""
    from iapo_openrlhf.core.mi import marker_columns
    from iapo_openrlhf.core.probes import token_texts
    from iapo_openrlhf.tasks.synthetic import build_tokenizer

    tok = build_tokenizer()
    rows = [(" how many ?", " 7 + 5 = 12 . 3 + 5 = 8 .</think><answer>8</answer>"),
            (" how many ?</think>", " 1 + 2 = 3 ."),
            ("?", "</think><answer>3</answer>"),
            (" so , 3 + 5 =", " 8 .")]
    ids = [(tok(p, add_special_tokens=False).input_ids, tok(r, add_special_tokens=False).input_ids) for p, r in rows]
    s = max(len(p) + len(r) for p, r in ids)
    seq = torch.zeros(len(ids), s, dtype=torch.long)
    act = torch.zeros(len(ids), s - 1, dtype=torch.bool)
    for i, (p, r) in enumerate(ids):
        seq[i, : len(p) + len(r)] = torch.tensor(p + r)
        act[i, len(p) - 1 : len(p) + len(r) - 1] = True
    texts = token_texts(tok)
    for marker, expect_found in (("</think>", [1, 0, 1, 0]), ("+ 5 =", [1, 0, 0, 0]), ("12 . 3", [1, 0, 0, 0])):
        got = marker_columns(seq, act, texts, marker)
        expect = []
        for i, (p, r) in enumerate(ids):
            j = _naive_marker_column(tok, r, marker)
            expect.append(-1 if j < 0 else len(p) - 1 + j)
        assert got.tolist() == expect, marker
        assert [int(c >= 0) for c in expect] == expect_found, marker
    with pytest.raises(ValueError, match="marker: got an empty string"):
        marker_columns(seq, act, texts, "")


def test_hold_entropy_zeroes_the_mi_from_the_marker_on():
    from iapo_openrlhf.core.mi import hold_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.rand(4, 9, generator=g)
    act = torch.ones(4, 8, dtype=torch.bool)
    columns = [3, -1, 0, 7]
    held = hold_entropy(h, torch.tensor(columns))
    assert torch.equal(held, _naive_hold(h, columns))
    mi, mi_held = token_mi(h, act), token_mi(held, act)
    for i, c in enumerate(columns):
        if c < 0:
            assert torch.equal(mi_held[i], mi[i])
        else:
            assert torch.equal(mi_held[i, :c], mi[i, :c]) and not mi_held[i, c:].any() and mi[i, c:].any()


def test_before_columns_is_the_action_columns_before_the_marker():
    from iapo_openrlhf.core.mi import before_columns

    act = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
    got = before_columns(act, torch.tensor([3, -1, 4, 1]))
    expect = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]]).bool()
    assert torch.equal(got, expect)


@pytest.mark.parametrize("alpha, held_tokens", [(None, "zero"), (0, "zero"), (None, "exclude")])
def test_mi_hold_after_config_plumbing_local_backend(tmp_path, monkeypatch, alpha, held_tokens):
    """iapo.mi_hold_after reaches the local trainer: the entropies its token_mi gets are the
    estimator's, held from the marker on (checked against the decoding reference), also with
    alpha = 0 (the pass still runs for pi_old and its MI statistics); with iapo.mi_held_tokens
    exclude the advantages get the MI term's mask: the action columns before the reference's
    marker column (none without it); bad values are one-line ConfigErrors."""
    from iapo_openrlhf.config import ConfigError, load_config
    from iapo_openrlhf.local import trainer as trainer_mod
    from iapo_openrlhf.tasks.synthetic import build_tokenizer

    raw, given = [], []

    def spy_entropy(*args, **kwargs):
        out = answer_entropy(*args, **kwargs)
        raw.append((args[1].cpu(), args[3].cpu(), out[0].clone()))
        return out

    def spy_mi(h, *args, **kwargs):
        given.append(h.clone())
        return token_mi(h, *args, **kwargs)

    masks = []

    def spy_advantages(*args, **kwargs):
        masks.append(kwargs.get("mi_mask"))
        return iapo_advantages(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "answer_entropy", spy_entropy)
    monkeypatch.setattr(trainer_mod, "token_mi", spy_mi)
    monkeypatch.setattr(trainer_mod, "iapo_advantages", spy_advantages)
    marker = " "  # the synthetic task's most frequent token: most rows hold somewhere
    cfg = load_config("configs/local_tiny.yaml", [*PROBE_AFTER_TOY, f"output.dir={tmp_path}",
                                                  f"iapo.mi_hold_after='{marker}'", f"iapo.mi_held_tokens={held_tokens}"]
                      + ([] if alpha is None else [f"iapo.alpha={alpha}"]))
    trainer_mod.LocalTrainer(cfg, progress=False).train()
    tok = build_tokenizer()
    (seq, act, h), held = raw[0], given[0]
    a = act.shape[1]
    columns = []
    for i in range(len(seq)):
        cols = act[i].nonzero().flatten()
        j = _naive_marker_column(tok, seq[i, -a:][cols].tolist(), marker)
        columns.append(-1 if j < 0 else int(cols[j]))
    assert any(c >= 0 for c in columns) and not torch.equal(held, h)
    assert torch.equal(held, _naive_hold(h, columns))
    if held_tokens == "zero":
        assert masks[0] is None
    else:
        expect = torch.zeros(act.shape, dtype=torch.bool)
        for i, c in enumerate(columns):
            for j in range(act.shape[1]):
                expect[i, j] = bool(act[i, j]) and (c < 0 or j < c)
        assert torch.equal(masks[0], expect) and not torch.equal(expect, act.bool())
    for override, message in (("iapo.mi_hold_after=''", "iapo.mi_hold_after: got an empty text"),
                              ("iapo.predict_mode=next_token", "iapo.mi_hold_after: set with iapo.predict_mode=next_token")):
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            load_config("configs/local_tiny.yaml", [override, "iapo.mi_hold_after='</think>'"][: 1 + ("predict" in override)])
        assert "\n" not in str(err.value)
    for override, message in (("iapo.mi_held_tokens=exclude", "iapo.mi_held_tokens: exclude without iapo.mi_hold_after"),
                              ("iapo.mi_held_tokens=drop", "iapo.mi_held_tokens: got 'drop', expected one of")):
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            load_config("configs/local_tiny.yaml", [override])
        assert "\n" not in str(err.value)


def test_mi_hold_after_config_plumbing_openrlhf_backend():
    """The same option through the OpenRLHF backend: the config's text becomes --iapo.mi_hold_after
    and OpenRLHF's parser keeps it into the actor's IapoConfig (the actor's forward with it, on
    OpenRLHF's own batches: test_openrlhf_actor.py)."""
    pytest.importorskip("openrlhf", reason="OpenRLHF is installed by .ci/run (pip install --no-deps openrlhf)")
    from pathlib import Path

    from iapo_openrlhf.config import load_config
    from iapo_openrlhf.openrlhf import cpu_stubs

    cpu_stubs.install()
    from iapo_openrlhf.openrlhf import launch
    from iapo_openrlhf.openrlhf.config_args import openrlhf_args
    from iapo_openrlhf.openrlhf.settings import iapo_config_from_args

    reward = str(Path(__file__).with_name("data") / "digits_reward.py")
    config = Path(__file__).resolve().parent.parent / "configs" / "ray_tiny.yaml"
    cfg = load_config(str(config), ["iapo.mi_hold_after='</think>'"], local_files=False)
    argv = openrlhf_args(cfg, reward) + ["--cpu"]
    assert argv[argv.index("--iapo.mi_hold_after") + 1] == "</think>"
    assert iapo_config_from_args(launch.parse_args(argv)).mi_hold_after == "</think>"
    plain = openrlhf_args(load_config(str(config), [], local_files=False), reward) + ["--cpu"]
    assert "--iapo.mi_hold_after" not in plain and iapo_config_from_args(launch.parse_args(plain)).mi_hold_after is None
    # iapo.mi_held_tokens: config -> --iapo.mi_held_tokens -> the actor's and experience maker's IapoConfig
    cfg = load_config(str(config), ["iapo.mi_hold_after='</think>'", "iapo.mi_held_tokens=exclude"], local_files=False)
    argv = openrlhf_args(cfg, reward) + ["--cpu"]
    assert argv[argv.index("--iapo.mi_held_tokens") + 1] == "exclude"
    assert iapo_config_from_args(launch.parse_args(argv)).mi_held_tokens == "exclude"
    assert iapo_config_from_args(launch.parse_args(plain)).mi_held_tokens == "zero"
    with pytest.raises(launch.UsageError, match=re.escape("--iapo.mi_held_tokens: exclude without iapo.mi_hold_after")):
        launch.parse_args(plain + ["--iapo.mi_held_tokens", "exclude"])
