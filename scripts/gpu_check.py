#!/usr/bin/env python3
"""Prepared check of the MI estimator on one CUDA GPU at 7B scale (issue 14). About 3 minutes.

A Qwen2.5-7B-shaped model (28 layers, hidden 3584, 28 heads / 4 KV heads, vocabulary 152064)
with random bf16 weights, sdpa attention; batch 4 in OpenRLHF 0.11's layout (each rollout
prompt + response, right-padded, action mask of width S - 1), responses of L, L, 0.9 L, 0.75 L
tokens for L = 512 and 2048, a 6-token postfix. For each L it reports time and peak GPU memory of

  forward     one plain forward with fp32 log-probs (OpenRLHF's `Actor.forward` log-prob pass)
  fwd+bwd     one forward + backward with gradient checkpointing (a PPO micro-step)
  estimator   `answer_entropy(..., return_log_probs=True)`: h for every action column + pi_old

plus the chunk size it chose and, as a spot check, the largest difference to the naive
one-forward-per-prefix reference at 6 probed columns (bf16: differences of a few 0.01 nats are
rounding). Then, when DeepSpeed is importable, the same estimator call through a 1-GPU DeepSpeed
ZeRO-3 engine over NCCL: NCCL refuses CPU tensors, so finishing proves no CPU tensor reached a
collective; it reports the parameter bytes the call all-gathered against one plain forward's. The
collectives that only a TP rank (sliced LM head) or ZeRO-3's module-by-module fallback makes run
too, over the world group, with their entropies compared against the plain result.

Run on the GPU machine (torch with CUDA and transformers; no vLLM, Ray or flash-attn needed):

    python scripts/gpu_check.py --out gpu_check.json

DeepSpeed is optional; without it the ZeRO-3 part is skipped and says so. To carry it as
wheels (no network there), on this machine:

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        -d .whl hjson ninja py-cpuinfo msgpack   # plus: pip wheel --no-deps -w .whl deepspeed==0.19.6

and there: pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from iapo_openrlhf.core.chunked import default_chunk_tokens  # noqa: E402
from iapo_openrlhf.core.entropy import entropy_from_logits, log_probs_from_logits  # noqa: E402
from iapo_openrlhf.core.mi import answer_entropy  # noqa: E402
from iapo_openrlhf.core.parallel import EstimatorSession  # noqa: E402

QWEN25_7B = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
# --smoke: the same steps on the CPU with a tiny model of this shape, so CI keeps the script working.
SMOKE = dict(QWEN25_7B, vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
POSTFIX_LEN = 6
DEVICE = torch.device("cuda")


def build_model(shape: dict, layers: int | None) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = dict(shape, num_hidden_layers=layers or shape["num_hidden_layers"])
    config = Qwen2Config(**cfg, initializer_range=0.02)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with DEVICE:
        model = Qwen2ForCausalLM._from_config(config, torch_dtype=torch.bfloat16)
    model.config.use_cache = False  # as OpenRLHF's Actor sets it
    return model.eval()


def build_batch(length: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """OpenRLHF 0.11's micro-batch: prompt + response from column 0, right-padded; action_mask = mask[1:]."""
    g = torch.Generator().manual_seed(seed)
    prompts = [120, 96, 150, 110]
    responses = [length, length, int(0.9 * length), int(0.75 * length)]
    s = max(p + r for p, r in zip(prompts, responses))
    seq = torch.zeros(4, s, dtype=torch.long)
    att = torch.zeros(4, s, dtype=torch.long)
    act = torch.zeros(4, s - 1, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq[i, : p + r] = torch.randint(100, vocab - 100, (p + r,), generator=g)
        att[i, : p + r] = 1
        act[i, p - 1 : p + r - 1] = True
    postfix = torch.randint(100, vocab - 100, (POSTFIX_LEN,), generator=g)
    return {k: v.to(DEVICE) for k, v in dict(sequences=seq, attention_mask=att, action_mask=act, postfix=postfix).items()}


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(call, repeats: int = 2) -> dict:
    """Median wall seconds of warm calls (the first call when repeats=0) and the peak GPU memory of
    the first one above the memory allocated before it (None on the CPU)."""
    cuda = DEVICE.type == "cuda"
    _sync()
    base = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = call()
    _sync()
    first = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9 if cuda else None
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        _sync()
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2] if times else first
    return dict(seconds=seconds, first_seconds=first, peak_gb=peak), result


def plain_forward(model, b) -> torch.Tensor:
    """OpenRLHF's log-prob pass: full logits in fp32, log-softmax at the next tokens."""
    att = b["attention_mask"]
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=b["sequences"], attention_mask=att, position_ids=pos).logits.float()
        return log_probs_from_logits(logits[:, :-1], b["sequences"][:, 1:]) * b["action_mask"]


def forward_backward(model, b) -> None:
    att = b["attention_mask"]
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    model.train()
    logits = model(input_ids=b["sequences"], attention_mask=att, position_ids=pos).logits.float()
    loss = -(log_probs_from_logits(logits[:, :-1], b["sequences"][:, 1:]) * b["action_mask"]).sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()


def naive_spot_check(model, b, h: torch.Tensor, columns: int = 6) -> float:
    """Largest |h - naive| over a few probed columns of row 0 (one unpadded forward each)."""
    act = b["action_mask"][0].nonzero().flatten().tolist()
    picks = [act[int(i * (len(act) - 1) / (columns - 1))] for i in range(columns)]
    worst = 0.0
    for j in picks:
        prefix = b["sequences"][0, : j + 1]
        ids = torch.cat([prefix, b["postfix"]]).unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=DEVICE).unsqueeze(0)).logits
        worst = max(worst, abs(float(entropy_from_logits(logits[0, -1].float())) - float(h[0, j])))
    return worst


def estimator(model, b):
    return answer_entropy(model, b["sequences"], b["attention_mask"], b["action_mask"], b["postfix"],
                          return_log_probs=True)


def zero3_check(model, b, h_plain: torch.Tensor) -> dict:
    try:
        import deepspeed
        from iapo_openrlhf.profiling import CollectiveCounter
    except ImportError as e:
        return dict(skipped=f"DeepSpeed not importable ({e}); carry it as a wheel (see the docstring)")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    backend = "nccl" if DEVICE.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    counter = CollectiveCounter()
    counter.wrap_torch()
    counter.wrap_deepspeed()
    att = b["attention_mask"]
    with torch.no_grad():
        engine(input_ids=b["sequences"], attention_mask=att)  # ZeRO-3 records its trace
        counter.enabled = True
        engine(input_ids=b["sequences"], attention_mask=att)
        counter.enabled = False
    forward_bytes = counter.total("all_gather")
    counter.reset()
    counter.enabled = True
    stats, (h, _) = timed(lambda: estimator(engine, b), repeats=0)
    counter.enabled = False
    with EstimatorSession(engine) as session:
        gathered_once = session.gathered
    # With one rank ZeRO-3 holds every parameter whole and DeepSpeed moves no bytes; the point here
    # is that every collective of the call (the estimator's own, DeepSpeed's) accepted its tensors.
    return dict(backend=backend, world_size=1, estimator=stats, gathered_once=gathered_once,
                gathered_bytes=counter.total("all_gather"), plain_forward_gathered_bytes=forward_bytes,
                max_diff_vs_plain=float((h - h_plain).abs().max()), **forced_collectives(engine, b, h_plain))


def forced_collectives(engine, b, h_plain: torch.Tensor) -> dict:
    """On one GPU the estimator skips the collectives of a TP rank (batch fingerprint, chunk-size
    agreement, vocab-parallel reductions of the sliced head) and of ZeRO-3's fallback (forward-count
    agreement). Run each over the world group anyway, so NCCL sees every tensor they send."""
    from unittest import mock

    import torch.distributed as dist
    from iapo_openrlhf.core import parallel

    vocab = engine.module.config.vocab_size
    as_tp_rank = parallel.ParallelLayout(tp_group=dist.group.WORLD, tp_size=1, head="sliced", vocab_start=0,
                                         vocab_end=vocab, zero_stage=3)
    with mock.patch.object(parallel, "parallel_layout", lambda model: as_tp_rank):
        h_tp, _ = estimator(engine, b)
    with mock.patch.dict(os.environ, IAPO_ZERO3_GATHER="never"), \
            mock.patch.object(parallel.EstimatorSession, "count_sync", property(lambda self: True)):
        h_fallback, _ = estimator(engine, b)
    return dict(tp_rank_paths_max_diff=float((h_tp - h_plain).abs().max()),
                zero3_fallback_max_diff=float((h_fallback - h_plain).abs().max()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick look (default 28)")
    ap.add_argument("--no-zero3", action="store_true", help="skip the DeepSpeed ZeRO-3 part")
    ap.add_argument("--smoke", action="store_true", help="CPU, a tiny model of the same shape, L = 32 (for CI)")
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args()
    global DEVICE
    shape = QWEN25_7B
    if args.smoke:
        DEVICE, shape, args.lengths = torch.device("cpu"), SMOKE, [32, 48]
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device, expected a machine with one GPU (or --smoke on a CPU)")
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (--smoke)"
    report = dict(device=name, torch=torch.__version__, lengths={})
    import transformers

    report["transformers"] = transformers.__version__
    model = build_model(shape, args.layers)
    report["model_gb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    h512 = b512 = None
    for length in args.lengths:
        b = build_batch(length, shape["vocab_size"], seed=length)
        row = {}
        row["forward"], lp_plain = timed(lambda: plain_forward(model, b))
        row["fwd+bwd"], _ = timed(lambda: forward_backward(model, b), repeats=1)
        row["estimator"], (h, lp) = timed(lambda: estimator(model, b))
        with EstimatorSession(model) as session:
            rows, key_len = b["sequences"].shape
            row["chunk_tokens"] = default_chunk_tokens(rows, key_len, POSTFIX_LEN, session)
        row["estimator_x_forward"] = row["estimator"]["seconds"] / row["forward"]["seconds"]
        row["log_probs_max_diff_vs_forward"] = float((lp - lp_plain.cpu()).abs().max())
        row["naive_spot_check_max_diff"] = naive_spot_check(model, b, h)
        report["lengths"][length] = row
        gb = lambda r: "-" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"  # noqa: E731
        print(f"L={length}: forward {row['forward']['seconds']:.3f} s / {gb(row['forward'])} GB, "
              f"fwd+bwd {row['fwd+bwd']['seconds']:.3f} s / {gb(row['fwd+bwd'])} GB, "
              f"estimator {row['estimator']['seconds']:.3f} s / {gb(row['estimator'])} GB "
              f"({row['estimator_x_forward']:.2f} x forward, {row['chunk_tokens']} probe tokens a forward), "
              f"naive spot check {row['naive_spot_check_max_diff']:.3f}", flush=True)
        if length == min(args.lengths):
            h512, b512 = h, b
        del b
    if not args.no_zero3:
        model.gradient_checkpointing_disable()
        report["zero3"] = zero3_check(model, b512, h512)
        print(f"ZeRO-3 (1 rank, {report['zero3'].get('backend', '-')}):", json.dumps(report["zero3"]), flush=True)
    report["wall_seconds"] = time.perf_counter() - t_start
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
