"""The IAPO policy actor's forward on OpenRLHF's `Actor` over DeepSpeed engines on CPU.

Every batch is made by OpenRLHF's own code (`openrlhf_batches`: its agent executors, its samples
generator, `Experience.concat_experiences`): one unpadded rollout per row, right-padded, action
mask `mask[1:]` of width S - 1, single- and multi-turn. `iapo_forward` must give (1) the log-probs
OpenRLHF's own `Actor.forward` gives on the same engine and batch (pi_old, temperature-scaled),
column for column, and (2) the MI of the naive one-forward-per-prefix reference on a plain copy of
the weights at every action column and exactly 0 elsewhere; on ZeRO 0 (in process), ZeRO 3 with a
different batch per rank and AutoTP 2 (2 spawned gloo processes, as torchrun would start them),
padded and packed. The Ray actor class is driven without Ray.

Notes on OpenRLHF 0.11 used below:
- `Actor(model_instance, ...)` stores the model and the temperature only: `packing_samples` is set on
  the from_pretrained path alone, so the tests set it themselves.
- OpenRLHF's packed forward passes attention_mask=None and relies on the model to derive the
  per-sample mask from the restarting position ids. transformers does that for sdpa only when no
  cache object exists, i.e. with `config.use_cache = False`, which OpenRLHF's from_pretrained
  path sets (and which the models here set likewise); with use_cache=True the packed forward
  attends across samples. The IAPO estimator builds its own 4D mask and is unaffected.
"""

from __future__ import annotations

import copy
import os
import tempfile
from types import SimpleNamespace

import pytest
import torch

from iapo_openrlhf.openrlhf import cpu_stubs

cpu_stubs.install()  # before any openrlhf import: it imports flash_attn and vllm at module level

pytest.importorskip("openrlhf", reason="OpenRLHF is in the openrlhf extra; pip install -e '.[openrlhf]'")
deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is in the test extra; pip install -e '.[test]'")

import torch.distributed as dist  # noqa: E402
from openrlhf.models.actor import Actor  # noqa: E402
from openrlhf.trainer.ray.ppo_actor import PolicyModelActor  # noqa: E402

from iapo_openrlhf.config import ConfigError, IapoConfig  # noqa: E402
from iapo_openrlhf.core.mi import answer_entropy, token_mi  # noqa: E402
from iapo_openrlhf.core.parallel import parallel_layout  # noqa: E402
from iapo_openrlhf.openrlhf.actor import (  # noqa: E402
    IAPOPolicyModelActor,
    iapo_forward,
    is_group_leader,
    unwrap_ray_class,
)

from distributed import deepspeed_0198_overlay, run_distributed  # noqa: E402
from openrlhf_batches import TOKENIZER, VOCAB, micro_batch  # noqa: E402
from test_mi import _naive_hold, _naive_marker_column  # noqa: E402
from test_tp import POSTFIX, _engine, _model  # noqa: E402

T = 0.7  # the actor's sampling temperature: log-probs and entropies are of logits / T
ATOL = 1e-5
TP_RTOL = 1e-5
MI_KEYS = {"mi", "answer_entropy_first", "answer_entropy_last"}
# (config, keys iapo_forward must return besides action_log_probs)
VARIANTS = {
    "postfix": (IapoConfig(alpha=0.5, beta=0.1, chunk_tokens=12), MI_KEYS),  # 4 probes a forward
    "postfix+entropy": (IapoConfig(alpha=0.5, beta=0.1, exploration="entropy"), MI_KEYS | {"next_token_entropy"}),
    "next_token": (IapoConfig(alpha=0.5, beta=0.1, predict_mode="next_token"), MI_KEYS),
    "next_token+entropy": (IapoConfig(alpha=0.5, beta=0.1, predict_mode="next_token", exploration="entropy"),
                           MI_KEYS | {"next_token_entropy"}),
    "entropy-only": (IapoConfig(alpha=0.0, beta=0.1, exploration="entropy"), {"next_token_entropy"}),
    "stride+official+horizon": (
        IapoConfig(alpha=0.5, beta=0.0, probe_stride=2, mi_smoothing="official", mi_horizon=2, mi_decay=0.5), MI_KEYS,
    ),
}


def _tiny(tied: bool = False):
    """test_tp's model over the batches' vocabulary, with the cache off as OpenRLHF's Actor sets
    it (see the module notes)."""
    model = _model(tied, vocab=VOCAB)
    model.config.use_cache = False
    return model


def _actor(model, temperature: float = T, packing: bool = False) -> Actor:
    actor = Actor(model, temperature=temperature)  # an instance: no download, no from_pretrained
    actor.packing_samples = packing  # only the from_pretrained path sets it
    return actor


def _openrlhf_log_probs(actor: Actor, seq, act, att) -> torch.Tensor:
    with torch.no_grad():
        return actor(seq, act, att)


def _expected(plain, seq, att, act, cfg: IapoConfig) -> dict[str, torch.Tensor]:
    """What iapo_forward must return: OpenRLHF's Actor.forward for pi_old, the naive reference
    (one forward per prefix) for the answer entropies, on a plain copy of the weights."""
    valid = act.bool()
    out = {"action_log_probs": _openrlhf_log_probs(_actor(plain), seq, act, att)}
    common = dict(temperature=T)
    if cfg.alpha:
        if cfg.predict_mode == "postfix":
            h = answer_entropy(plain, seq, att, act, POSTFIX, probe_stride=cfg.probe_stride, method="naive", **common)
        else:
            h = answer_entropy(plain, seq, att, act, None, predict_mode="next_token", **common)
        out["mi"] = token_mi(h, valid, smoothing=cfg.mi_smoothing, horizon=cfg.mi_horizon, decay=cfg.mi_decay)
        cols = [row.nonzero().flatten() for row in valid]
        out["answer_entropy_first"] = torch.stack([h[i, c[0]] for i, c in enumerate(cols)])
        out["answer_entropy_last"] = torch.stack([h[i, c[-1] + 1] for i, c in enumerate(cols)])
    if cfg.beta and cfg.exploration == "entropy":
        h_next = answer_entropy(plain, seq, att, act, None, predict_mode="next_token", **common)
        out["next_token_entropy"] = torch.where(valid, h_next[:, :-1], 0.0)
    return out


def _assert_matches(got: dict, want: dict, act: torch.Tensor, atol: float = ATOL, rtol: float = 0.0) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    masked = ~act.bool()
    for key, value in got.items():
        assert value.dtype == torch.float32 and value.device.type == "cpu", (key, value.dtype, value.device)
        torch.testing.assert_close(value, want[key].float(), atol=atol, rtol=rtol, msg=lambda m: f"{key}: {m}")
        if value.shape == act.shape:
            assert (value[masked] == 0).all(), f"{key}: nonzero on padding"


def _strategy(packing: bool = False, tp: int = 1, ring: int = 1):
    ds = SimpleNamespace(packing_samples=packing, ring_attn_size=ring, tensor_parallel_size=tp)
    return SimpleNamespace(args=SimpleNamespace(ds=ds), ring_attn_group=None)


def _policy_actor(actor: Actor, cfg: IapoConfig, **strategy) -> IAPOPolicyModelActor:
    """The Ray actor's plain class, set up the way init_model_from_pretrained leaves it."""
    obj = IAPOPolicyModelActor.__new__(IAPOPolicyModelActor)
    obj.actor = actor
    obj.strategy = _strategy(**strategy)
    obj.iapo = cfg
    obj.iapo_postfix_ids = list(POSTFIX) if cfg.predict_mode == "postfix" and cfg.alpha else []
    return obj


# ---------------------------------------------------------------------------------------------
# ZeRO 0, in this process (a 1-rank gloo world: deepspeed.initialize needs torch.distributed)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero0():
    if deepspeed.get_accelerator().device_name() != "cpu":
        pytest.skip("in-process engine tests run on DeepSpeed's CPU accelerator; the spawned ones force it")
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    init_file = None
    if not dist.is_initialized():
        init_file = tempfile.mktemp(prefix="iapo_gloo_")
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    try:
        model = _tiny()
        plain = copy.deepcopy(model)  # the reference: same weights, no engine
        engine = _engine(model, 0, 1, None)
        assert isinstance(engine, deepspeed.DeepSpeedEngine) and engine.zero_optimization_stage() == 0
        seq, att, act = micro_batch([7, 1, 3, 5])  # one prompt fills the width: no padding in that row
        multi = micro_batch([4, 3, 2], multi_turn=True, seed=7)  # two action spans per row
        yield SimpleNamespace(engine=engine, plain=plain, seq=seq, att=att, act=act, multi=multi)
    finally:
        if init_file is not None:
            dist.destroy_process_group()
            if os.path.exists(init_file):
                os.unlink(init_file)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zero0_matches_openrlhf_actor_and_core_estimator(zero0, variant):
    cfg, keys = VARIANTS[variant]
    z = zero0
    actor = _actor(z.engine)
    modes = []  # the HF module's mode at each forward: eval throughout
    hook = z.engine.module.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    actor.train()
    try:
        got = iapo_forward(actor, z.seq, z.act, z.att, cfg, POSTFIX)
    finally:
        hook.remove()
    assert modes and not any(modes)
    # restored: the actor is mid-training when called (DeepSpeedEngine.train/eval only set the
    # wrapped module's flag, never the engine's own `training`, so read the module's)
    assert actor.training and z.engine.module.training
    assert set(got) == keys | {"action_log_probs"}
    # pi_old: what OpenRLHF's own forward gives on the same engine
    torch.testing.assert_close(got["action_log_probs"], _openrlhf_log_probs(actor, z.seq, z.act, z.att),
                               atol=ATOL, rtol=0)
    _assert_matches(got, _expected(z.plain, z.seq, z.att, z.act, cfg), z.act)
    actor.eval()
    iapo_forward(actor, z.seq, z.act, z.att, cfg, POSTFIX)
    assert not actor.training and not z.engine.module.training


@pytest.mark.parametrize("turns, held_tokens", [("single", "zero"), ("multi", "zero"), ("multi", "exclude")])
def test_zero0_mi_hold_after_on_openrlhf_batches(zero0, turns, held_tokens):
    """--iapo.mi_hold_after on OpenRLHF's own micro-batches, single- and multi-turn (the marker is
    searched in the action tokens only): iapo_forward's MI is token_mi of the naive reference held
    from the action column where the marker first begins (decode-per-prefix reference); with
    --iapo.mi_held_tokens exclude it also returns the MI term's mask: the action columns before it."""
    from iapo_openrlhf.core.probes import token_texts

    seq, att, act = (zero0.seq, zero0.att, zero0.act) if turns == "single" else zero0.multi
    texts = token_texts(TOKENIZER)
    cols = [row.nonzero().flatten() for row in act.bool()]
    marker = texts[int(seq[0, int(cols[0][len(cols[0]) // 2]) + 1])]  # the text of a token mid-way in row 0
    cfg = IapoConfig(alpha=0.5, beta=0.0, mi_hold_after=marker, mi_held_tokens=held_tokens)
    got = iapo_forward(_actor(zero0.engine), seq, act, att, cfg, POSTFIX, None, texts)
    columns = []
    for i, c in enumerate(cols):
        j = _naive_marker_column(TOKENIZER, seq[i, c + 1].tolist(), marker)
        columns.append(-1 if j < 0 else int(c[j]))
    assert 0 <= columns[0] <= int(cols[0][len(cols[0]) // 2])
    h = answer_entropy(zero0.plain, seq, att, act, POSTFIX, method="naive", temperature=T)
    torch.testing.assert_close(got["mi"], token_mi(_naive_hold(h, columns), act.bool()), atol=ATOL, rtol=0)
    assert not got["mi"][0, columns[0]:].any() and got["mi"][0, : columns[0]].any()
    if held_tokens == "zero":
        assert "mi_mask" not in got
    else:
        expect = act.bool().cpu().clone()
        for i, c in enumerate(columns):
            if c >= 0:
                expect[i, c:] = False
        assert torch.equal(got["mi_mask"], expect) and not torch.equal(expect, act.bool().cpu())


@pytest.mark.parametrize("turns", ["single", "multi"])
def test_zero0_probe_after_on_openrlhf_batches(zero0, turns):
    """--iapo.probe_after on OpenRLHF's own micro-batches: the ids the actor derives from the
    pattern (`boundary_token_ids`, as `init_model_from_pretrained` does) reach the estimator, and
    iapo_forward's MI is token_mi of the naive reference probed after those ids only."""
    import re

    from iapo_openrlhf.core.probes import boundary_token_ids, token_texts

    seq, att, act = (zero0.seq, zero0.att, zero0.act) if turns == "single" else zero0.multi
    texts = token_texts(TOKENIZER)
    occurring = sorted(set(seq[:, 1:][act.bool()].tolist()))
    pattern = "|".join(re.escape(texts[t]) for t in occurring[::3])  # about a third of them end a segment
    ids = boundary_token_ids(TOKENIZER, pattern)
    assert set(occurring[::3]) <= set(ids) and not set(occurring) <= set(ids)
    cfg = IapoConfig(alpha=0.5, beta=0.0, probe_after=pattern)
    got = iapo_forward(_actor(zero0.engine), seq, act, att, cfg, POSTFIX, ids)
    h = answer_entropy(zero0.plain, seq, att, act, POSTFIX, probe_after_ids=ids, method="naive", temperature=T)
    torch.testing.assert_close(got["mi"], token_mi(h, act.bool()), atol=ATOL, rtol=0)
    every = iapo_forward(_actor(zero0.engine), seq, act, att, cfg, POSTFIX, None)
    assert not torch.allclose(every["mi"], got["mi"], atol=1e-3)  # the ids were used


def test_zero0_temperature_is_applied(zero0):
    """Guard: with T = 0.7 the results differ from T = 1 by far more than the tolerance."""
    z = zero0
    cfg = VARIANTS["postfix+entropy"][0]
    got = iapo_forward(_actor(z.engine), z.seq, z.act, z.att, cfg, POSTFIX)
    at_one = iapo_forward(_actor(z.engine, temperature=1.0), z.seq, z.act, z.att, cfg, POSTFIX)
    for key in ("action_log_probs", "answer_entropy_first", "next_token_entropy"):
        assert (got[key] - at_one[key]).abs().max() > 0.05, key
    h = answer_entropy(z.plain, z.seq, z.att, z.act, POSTFIX, temperature=T)
    valid = h[:, 1:][z.act]
    assert valid.max() - valid.min() > 0.5  # entropies vary: equality above is not trivial


@pytest.mark.parametrize("cfg", [IapoConfig(alpha=0.0, beta=0.1, exploration="prob"), IapoConfig(alpha=0.0, beta=0.0)],
                         ids=["prob-exploration", "all-off"])
def test_nothing_to_estimate_is_an_error(zero0, cfg):
    with pytest.raises(ValueError, match="nothing to estimate"):
        iapo_forward(_actor(zero0.engine), zero0.seq, zero0.act, zero0.att, cfg, POSTFIX)


@pytest.mark.parametrize("variant", ["postfix+entropy", "next_token", "stride+official+horizon"])
def test_zero0_packed_matches_padded(zero0, variant):
    cfg, _ = VARIANTS[variant]
    z = zero0
    padded = iapo_forward(_actor(z.engine), z.seq, z.act, z.att, cfg, POSTFIX)
    packed = iapo_forward(_actor(z.engine, packing=True), z.seq, z.act, z.att, cfg, POSTFIX)
    _assert_matches(packed, padded, z.act)
    _assert_matches(packed, _expected(z.plain, z.seq, z.att, z.act, cfg), z.act)


def test_zero0_packed_log_probs_match_openrlhf_packed_forward(zero0):
    """OpenRLHF's packing_samples forward (unpad via the flash_attn stand-in, one row, sdpa with
    the per-sample mask from position ids) gives the same pi_old as the padded one and as ours,
    column for column (response token j of a row at column prompt_len - 1 + j)."""
    z = zero0
    openrlhf_packed = _openrlhf_log_probs(_actor(z.engine, packing=True), z.seq, z.act, z.att)
    openrlhf_padded = _openrlhf_log_probs(_actor(z.engine), z.seq, z.act, z.att)
    torch.testing.assert_close(openrlhf_packed, openrlhf_padded, atol=ATOL, rtol=0)
    ours = iapo_forward(_actor(z.engine, packing=True), z.seq, z.act, z.att, VARIANTS["postfix"][0], POSTFIX)
    torch.testing.assert_close(ours["action_log_probs"], openrlhf_packed, atol=ATOL, rtol=0)
    assert (openrlhf_packed[z.act.bool()] != 0).all() and (ours["action_log_probs"][~z.act.bool()] == 0).all()


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("variant", ["postfix+entropy", "stride+official+horizon"])
def test_zero0_multi_turn_rollouts(zero0, variant, packing):
    """MultiTurnAgentExecutor rollouts (action, observation, action): a probe after every action
    token, observation tokens get 0 MI, log-probs as OpenRLHF's on both turns."""
    cfg, _ = VARIANTS[variant]
    z = zero0
    seq, att, act = z.multi
    spans = [int(((row[1:] != row[:-1]) & row[1:].bool()).sum() + row[0]) for row in act]
    assert spans == [2, 2, 2]
    got = iapo_forward(_actor(z.engine, packing=packing), seq, act, att, cfg, POSTFIX)
    _assert_matches(got, _expected(z.plain, seq, att, act, cfg), act)
    observation = torch.zeros_like(act, dtype=torch.bool)
    for i, row in enumerate(act.bool()):
        cols = row.nonzero().flatten()
        observation[i, cols[0] : cols[-1]] = ~row[cols[0] : cols[-1]]
    assert observation.any() and (got["mi"][observation] == 0).all()
    assert (got["mi"][act.bool()] != 0).sum() > act.sum() // 2


# ---------------------------------------------------------------------------------------------
# The Ray actor class, without Ray
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_policy_actor_forward_returns_iapo_forward(zero0, packing):
    z = zero0
    cfg = VARIANTS["postfix+entropy"][0]
    actor = _actor(z.engine, packing=packing)
    obj = _policy_actor(actor, cfg, packing=packing)
    got = obj.forward(z.seq, z.act, z.att)
    assert isinstance(got, dict)
    want = iapo_forward(actor, z.seq, z.act, z.att, cfg, POSTFIX)
    _assert_matches(got, want, z.act, atol=0)
    _assert_matches(got, _expected(z.plain, z.seq, z.att, z.act, cfg), z.act)
    with pytest.raises(ValueError, match="text-only"):
        obj.forward(z.seq, z.act, z.att, mm_train_inputs_list=[{"pixel_values": torch.zeros(1)}])


def test_policy_actor_without_iapo_terms_is_openrlhfs_forward(zero0, monkeypatch):
    """alpha = 0 and no entropy exploration: the parent's forward, arguments untouched (on CPU it
    would call torch.cuda.current_device(), so it is replaced by a recorder)."""
    parent = unwrap_ray_class(PolicyModelActor)
    assert issubclass(IAPOPolicyModelActor, parent)
    calls = []

    def recorder(self, *args):
        calls.append((self, args))
        return "parent"

    monkeypatch.setattr(parent, "forward", recorder)
    z = zero0
    for cfg in (IapoConfig(alpha=0.0, beta=0.0), IapoConfig(alpha=0.0, beta=0.1, exploration="prob")):
        obj = _policy_actor(_actor(z.engine), cfg)
        assert obj.forward(z.seq, z.act, z.att, [9], None) == "parent"
        assert calls[-1][0] is obj and calls[-1][1][0] is z.seq and calls[-1][1][1] is z.act
        assert calls[-1][1][2] is z.att and calls[-1][1][3] == [9]
    assert len(calls) == 2


def test_policy_actor_init_reads_iapo_args(monkeypatch):
    """init_model_from_pretrained: --iapo.* into IapoConfig, the postfix tokenized, ring attention refused."""
    parent = unwrap_ray_class(PolicyModelActor)

    def fake_init(self, strategy, pretrain, max_steps=None, vllm_engines=None):
        self.tokenizer = lambda text, add_special_tokens: {"input_ids": [ord(c) % 50 for c in text]}

    monkeypatch.setattr(parent, "init_model_from_pretrained", fake_init)
    strategy = _strategy()
    strategy.args.iapo = SimpleNamespace(alpha=0.3, beta=0.2, postfix="ab", exploration="entropy")
    obj = IAPOPolicyModelActor.__new__(IAPOPolicyModelActor)
    obj.init_model_from_pretrained(strategy, "unused")
    assert obj.iapo == IapoConfig(alpha=0.3, beta=0.2, postfix="ab", exploration="entropy")
    assert obj.iapo_postfix_ids == [ord("a") % 50, ord("b") % 50]
    strategy.args.iapo = SimpleNamespace(alpha=-1.0)
    with pytest.raises(ConfigError, match="iapo.alpha"):
        obj.init_model_from_pretrained(strategy, "unused")
    strategy = _strategy(ring=2)
    strategy.args.iapo = SimpleNamespace(alpha=0.5)
    with pytest.raises(ValueError, match="ring_attn_size"):
        obj.init_model_from_pretrained(strategy, "unused")


def test_is_group_leader_without_torch_distributed(monkeypatch):
    """No process group (a 1-GPU actor without torchrun): the only rank keeps its results."""
    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # the zero0 fixture may have one up
    assert is_group_leader(_strategy(tp=2, ring=2))


# ---------------------------------------------------------------------------------------------
# CUDA inputs (what the Ray actor passes on a GPU): results come back as CPU tensors
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs():
    model = _tiny()
    cfg = VARIANTS["postfix+entropy"][0]
    seq, att, act = micro_batch([7, 1, 3, 5])
    want = iapo_forward(_actor(model), seq, act, att, cfg, POSTFIX)
    gpu = _actor(copy.deepcopy(model).cuda())
    got = iapo_forward(gpu, seq.cuda(), act.cuda(), att.cuda(), cfg, POSTFIX)
    _assert_matches(got, want, act, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# 2 spawned gloo processes: ZeRO 3 (a different batch per rank) and AutoTP 2
# ---------------------------------------------------------------------------------------------


def _zero3_rank(rank: int, world: int) -> None:
    model = _tiny()
    plain = copy.deepcopy(model)
    # a different batch per rank (data parallel): rank 0 3 rows, rank 1 2 rows of other lengths
    seq, att, act = micro_batch([4, 1, 6] if rank == 0 else [9, 2], seed=11 + rank)
    # 12 probe tokens a forward: rank 0 runs 7 probe forwards (3 rows), rank 1 runs 5 (ZeRO-3 gathered
    # once per call: no empty forwards to match)
    cfgs = [IapoConfig(alpha=0.5, beta=0.1, exploration="entropy", chunk_tokens=12), VARIANTS["next_token"][0]]
    want = [_expected(plain, seq, att, act, cfg) for cfg in cfgs]
    engine = _engine(model, 3, 1, None)
    assert engine.zero_optimization_stage() == 3
    actor = _actor(engine)
    actor.train()
    for cfg, expected in zip(cfgs, want):
        got = iapo_forward(actor, seq, act, att, cfg, POSTFIX)
        assert actor.training
        _assert_matches(got, expected, act)
        # packed: other attention shapes, other fp32 summation order (1.6e-5 seen at a log-prob of -5.7)
        _assert_matches(iapo_forward(_actor(engine, packing=True), seq, act, att, cfg, POSTFIX), expected, act,
                        rtol=TP_RTOL)
    torch.testing.assert_close(got["action_log_probs"], _openrlhf_log_probs(actor, seq, act, att), atol=ATOL, rtol=0)
    packed_actor = _actor(engine, packing=True)
    torch.testing.assert_close(got["action_log_probs"], _openrlhf_log_probs(packed_actor, seq, act, att),
                               atol=ATOL, rtol=TP_RTOL)  # OpenRLHF's packed vs padded: fp32 order
    # data parallel only: every rank's results are kept
    assert is_group_leader(_strategy(tp=1))
    result = _policy_actor(actor, cfgs[0]).forward(seq, act, att)
    _assert_matches(result, want[0], act)


def test_zero3_uneven_batches_match_single_process():
    run_distributed(_zero3_rank, 2, 300.0)


def _autotp_rank(rank: int, world: int, ds0198: bool) -> None:
    assert (deepspeed.__version__ == "0.19.8") == ds0198, deepspeed.__version__
    cfg = VARIANTS["postfix+entropy"][0]
    strategy = dict(tp=2)
    assert is_group_leader(_strategy(**strategy)) == (rank == 0)
    for tied in (False, True):  # replicated LM head; tied embeddings (vocab-parallel on DeepSpeed 0.19.8)
        model = _tiny(tied)
        plain = copy.deepcopy(model)
        seq, att, act = micro_batch([4, 1, 6], seed=11)  # a TP group shares its batch
        want = _expected(plain, seq, att, act, cfg)
        engine = _engine(model, 0, 2, None)
        layout = parallel_layout(engine)
        # DeepSpeed 0.19.8 makes a tied head vocab-parallel; every other head is sliced by the estimator
        module_vocab_parallel = tied and ds0198
        assert layout.tp_size == 2 and layout.head == ("vocab_parallel" if module_vocab_parallel else "sliced"), layout
        actor = _actor(engine)
        actor.train()
        got = iapo_forward(actor, seq, act, att, cfg, POSTFIX)
        assert actor.training
        # TP splits the reductions of every layer: agreement to fp32 relative precision (log-probs
        # reach -15 here, where 1 ulp is 1e-6)
        _assert_matches(got, want, act, rtol=TP_RTOL)
        _assert_matches(iapo_forward(_actor(engine, packing=True), seq, act, att, cfg, POSTFIX), want, act,
                        rtol=TP_RTOL)
        if not module_vocab_parallel:  # the head module gives full logits: OpenRLHF's own forward applies
            torch.testing.assert_close(got["action_log_probs"], _openrlhf_log_probs(actor, seq, act, att),
                                       atol=ATOL, rtol=0)
        # (tied: the head returns this rank's half of the vocabulary, OpenRLHF's log_probs_from_logits
        # indexes it with full-vocabulary labels and fails; iapo_forward's are checked above)
        result = _policy_actor(actor, cfg, **strategy).forward(seq, act, att)
        if rank == 0:
            _assert_matches(result, got, act, atol=0)
        else:
            assert result is None  # OpenRLHF keeps the first rank of each TP block


def test_autotp2_matches_single_process():
    run_distributed(_autotp_rank, 2, 300.0, False)


def test_autotp2_vocab_parallel_head_deepspeed_0198():
    run_distributed(_autotp_rank, 2, 300.0, True, pythonpath=deepspeed_0198_overlay())
