#!/usr/bin/env python
"""Benchmark of the early-exit answer-entropy (MI) estimator, `iapo_openrlhf.core.mi.answer_entropy`.

Why
---
IAPO needs h[i, j] = H(answer | prompt_i, response_i[:j]) at every response position j, read off the
model after a postfix of P tokens appended to each prefix. Done naively that is one forward per
position; the paper's authors copy a KV-cache prefix per position (`kv_copy`). Our `chunked` method
preloads the cache once and pushes blocks of probes through it with a 4D mask. The claims to check:

  1. chunked is >= 20x faster than naive at response length L = 512;
  2. chunked costs at most 1.5 x (P + 1) plain forwards of the same batch at L = 1024;
  3. chunked is faster and lighter in peak memory than kv_copy at every L >= 512.

The unit is ONE plain forward of the batch with full logits,
`model(input_ids, attention_mask, position_ids)`: what OpenRLHF's actor runs to get log-probs.

How
---
Model: a Qwen2 built from a config with random weights (no download): 4 layers, hidden 256,
intermediate 688, 4 query / 2 key-value heads, vocab 32000 (so the LM head matters, as in a real
model), fp32, sdpa attention, seeded with `torch.manual_seed`.
Batch (OpenRLHF padded layout): B rows of a left-padded prompt (about --prompt-len tokens, rows
differ a little) and a right-padded response of L, L, 0.9 L, 0.75 L, ... valid tokens; random ids.
Methods: the plain forward, naive, kv_copy, chunked and chunked with probe_stride=4, all through
`answer_entropy` with its defaults (automatic chunk size), nothing reimplemented here.

Naive is run only where it takes under --naive-max-seconds: it is first timed with a large probe
stride (about 8 probes per row, spread evenly over the response, so they have the full run's mix
of prefix lengths) and that time is scaled by (all probes / timed probes). Beyond the limit the
row says "skipped: est. N s" and speed-ups against naive use the estimate (marked "~").

Time: wall clock (`time.perf_counter`) of one call. The first call of each measurement is cold; if
it took under --warmup-below seconds it is discarded as a warm-up and the median of the timed
calls after it is reported (3 of them when the call takes under 2 s, else 1, unless --repeats is
given); a longer cold call counts as the first timed call (its one-off costs are negligible).

Memory: every (L, method) measurement runs in a fresh child process, forked from a forkserver that
has only imported torch/transformers (no tensor allocated, no thread pool started). The child
builds the model and the batch, resets the kernel's peak-RSS counter to the current RSS (writes
"5" to /proc/self/clear_refs, Linux >= 4.0), runs the first call and reads VmHWM from
/proc/self/status. "peak MB" = VmHWM after the call - VmRSS before it: the extra resident memory
the call needed at its peak (activations, caches, copies, logits, allocator overhead). Measuring
the first call of a fresh process keeps memory that an earlier call left cached in the allocator
from hiding the cost. Where clear_refs is not writable the counter cannot be reset; the JSON then
says memory_method "hwm_no_reset" (an upper bound: the setup's own peak may dominate).

Shared machines: every timed call also records the share of the CPUs that OTHER processes used
meanwhile (/proc/stat minus this process's CPU time); rows measured while others left fewer idle
CPUs than our thread count are flagged "noisy" in the note column. Two OpenMP threads slow down
many-fold when another process holds one of two cores (each parallel region waits for the
descheduled thread), so on a busy machine wait for it (--wait-idle S: up to S seconds per
measurement) or compare with --threads 1 (recorded in the JSON). By default torch's thread count
is left as it is.

Output: a Markdown table on stdout, the target checks with PASS / FAIL / n.a., and a JSON file
(--out) with every number, the timings of each call, versions, thread count, CPU and the load.

    python scripts/bench_mi.py --quick   # L = 128, 256: about 1.5 min on 2 CPU cores
    python scripts/bench_mi.py           # L = 128 .. 2048: about 7-10 min (kv_copy at 2048: 2-4 min)

Tensor parallel (--tp N, issue 4)
---------------------------------
    python scripts/bench_mi.py --tp 2    # L = 512: about 2 min on 2 idle CPU cores; JSON bench_mi_tp.json

The same model (seeded, so the same weights) and batch, with
`answer_entropy(model, ..., return_log_probs=True)` (chunked, automatic chunk size: what the
actor calls). The script re-launches itself once per case, each in fresh processes, with
DS_ACCELERATOR=cpu:
  tp1                      the plain transformers model in one process, 1 thread (the reference)
  tp1_same_cores           the same with N threads (as many cores as the TP ranks use together)
  tpN_replicated_head      `python -m torch.distributed.run --standalone --nproc_per_node N ...`:
                           gloo, `deepspeed.initialize(model, AdamW, {"zero_optimization":
                           {"stage": 0}, "tensor_parallel": {"autotp_size": N,
                           "vocab_parallel_lm_head": False}})`, 1 thread per rank. DeepSpeed's
                           training-mode AutoTP makes the LM head column-parallel and all-gathers
                           its output: every rank gets the full logits (the "gather" baseline).
  tpN_vocab_parallel_head  the same with "vocab_parallel_lm_head": True: each rank keeps its
                           vocabulary shard and the estimator reduces max / sum-exp partial sums.
The estimator finds the layout on the engine itself (`parallel_layout`). Per rank: the first
estimator call measures the memory (VmHWM after it - VmRSS before it, clear_refs reset as above),
then --repeats (default 3) timed calls (median) and as many plain forwards of the batch through
the engine. Ranks start every call together (barrier); "noisy" flags a call during which
processes other than the ranks used >= 10% of the CPUs. Correctness: the largest |difference| of
every rank's entropies and log-probs from tp1's.

Bytes: the script wraps the collectives in its own processes (no library code changed):
`torch.distributed.{all_reduce, all_gather, all_gather_into_tensor, ...}` and the same methods of
DeepSpeed's comm backend, plus `inference_all_reduce` (AutoTP's row-parallel all-reduce in eval
mode, which may run in DeepSpeed's shared-memory kernel and never reach torch.distributed). Each
call is filed as "estimator" (called from iapo_openrlhf: the batch fingerprint all-gather and the
vocab-parallel reductions), "lm_head" (DeepSpeed collectives while the LM head runs: the logit
all-gather) or "body" (AutoTP's row-parallel all-reduces of o_proj / down_proj outputs, the same
in both TP cases). Bytes per rank as a ring moves them: all-reduce 2 (p-1)/p x tensor bytes,
all-gather (p-1)/p x output bytes. Reference: gathering the fp32 logits of the rows that went
through the LM head in the same call (counted by a forward hook) moves
rows x vocab x 4 B x (p-1)/p per rank; the tpN_replicated_head row measures that gather for real.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

from iapo_openrlhf.core.mi import answer_entropy
from iapo_openrlhf.profiling import CollectiveCounter

MODEL_CONFIG: dict[str, Any] = dict(
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
ROW_RESPONSE_FRACTIONS = (1.0, 1.0, 0.9, 0.75)  # realistic: rows finish at different lengths
ROW_PROMPT_FRACTIONS = (1.0, 0.875, 1.0, 0.75)
FULL_LENGTHS = (128, 256, 512, 1024, 2048)
QUICK_LENGTHS = (128, 256)
NAIVE_ESTIMATE_PROBES_PER_ROW = 8
SHORT_CALL_SECONDS = 2.0  # calls shorter than this get 3 timed repeats by default


# ---------------------------------------------------------------------------------------------
# Jobs: one (L, method) measurement, run in its own child process
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    length: int
    method: str  # "forward" | "naive" | "kv_copy" | "chunked"
    probe_stride: int = 1
    batch: int = 4
    prompt_len: int = 64
    postfix_len: int = 4
    seed: int = 0
    chunk_tokens: int | None = None
    threads: int | None = None
    repeats: int | None = None
    warmup_below: float = 5.0
    measure_memory: bool = True


@dataclass
class Measurement:
    seconds: float  # median of `times`
    times: list[float]  # wall seconds of the timed calls
    cpu_times: list[float]  # process CPU seconds (all threads) of the same calls
    others_cpu: list[float]  # share of all CPUs that other processes used during each call
    cold_seconds: float
    warmed_up: bool
    peak_mb: float | None
    memory_method: str


def response_lengths(batch: int, length: int) -> list[int]:
    return [max(1, round(length * ROW_RESPONSE_FRACTIONS[i % len(ROW_RESPONSE_FRACTIONS)])) for i in range(batch)]


def prompt_lengths(batch: int, prompt_len: int) -> list[int]:
    return [max(1, round(prompt_len * ROW_PROMPT_FRACTIONS[i % len(ROW_PROMPT_FRACTIONS)])) for i in range(batch)]


def n_probes(lengths: list[int], stride: int) -> int:
    """Probes answer_entropy runs at this stride: positions 0, stride, ... and always n."""
    return sum(n // stride + 1 + (1 if n % stride else 0) for n in lengths)


def naive_estimate_stride(length: int) -> int:
    return max(1, length // NAIVE_ESTIMATE_PROBES_PER_ROW)


def build_model(seed: int, max_positions: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(**MODEL_CONFIG, max_position_embeddings=max_positions)
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config).float().eval()


def build_batch(job: Job) -> dict[str, torch.Tensor]:
    """OpenRLHF padded layout: (B, S) = left-padded prompt, then the response in the last L columns."""
    gen = torch.Generator().manual_seed(job.seed + job.length)
    vocab = MODEL_CONFIG["vocab_size"]
    s = job.prompt_len + job.length
    sequences = torch.zeros(job.batch, s, dtype=torch.long)
    attention_mask = torch.zeros(job.batch, s, dtype=torch.long)
    action_mask = torch.zeros(job.batch, job.length, dtype=torch.long)
    for i, (p, n) in enumerate(zip(prompt_lengths(job.batch, job.prompt_len), response_lengths(job.batch, job.length))):
        sequences[i, job.prompt_len - p : job.prompt_len + n] = torch.randint(1, vocab, (p + n,), generator=gen)
        attention_mask[i, job.prompt_len - p : job.prompt_len + n] = 1
        action_mask[i, :n] = 1
    position_ids = attention_mask.cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    postfix = torch.randint(1, vocab, (job.postfix_len,), generator=gen)
    return dict(
        sequences=sequences,
        attention_mask=attention_mask,
        action_mask=action_mask,
        position_ids=position_ids,
        postfix=postfix,
    )


def make_call(model: Qwen2ForCausalLM, batch: dict[str, torch.Tensor], job: Job) -> Callable[[], Any]:
    if job.method == "forward":

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return model(
                    input_ids=batch["sequences"],
                    attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"],
                ).logits

        return forward

    def estimate() -> torch.Tensor:
        return answer_entropy(
            model,
            batch["sequences"],
            batch["attention_mask"],
            batch["action_mask"],
            batch["postfix"],
            method=job.method,
            probe_stride=job.probe_stride,
            chunk_tokens=job.chunk_tokens if job.method == "chunked" else None,
        )

    return estimate


def _status_kb(field_name: str) -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    total = sum(ticks[:8])  # guest time is already counted in user
    return total - idle, total


def _timed(call: Callable[[], Any]) -> tuple[float, float, float]:
    """(wall s, CPU s of this process, share of the machine's CPU used by OTHER processes)."""
    busy0, total0 = _cpu_jiffies()
    t0, c0 = time.perf_counter(), time.process_time()
    result = call()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    busy1, total1 = _cpu_jiffies()
    del result
    hz = os.sysconf("SC_CLK_TCK")
    others = max(0.0, (busy1 - busy0) - cpu * hz) / max(1, total1 - total0)
    return wall, cpu, min(1.0, others)


def measure(job: Job) -> Measurement:
    """Runs in a fresh child: build, reset the peak-RSS counter, cold call (memory), timed calls."""
    if job.threads:
        torch.set_num_threads(job.threads)
    batch = build_batch(job)
    model = build_model(job.seed, job.prompt_len + job.length + job.postfix_len + 8)
    call = make_call(model, batch, job)

    memory_method = "clear_refs" if _reset_peak_rss() else "hwm_no_reset"
    rss_before = _status_kb("VmRSS")
    cold = _timed(call)  # the result is freed inside, after the peak
    hwm_after = _status_kb("VmHWM")
    peak_mb = None
    if job.measure_memory and rss_before is not None and hwm_after is not None:
        peak_mb = max(0, hwm_after - rss_before) / 1024
    else:
        memory_method = "none"

    warmed_up = cold[0] < job.warmup_below
    repeats = job.repeats or (3 if cold[0] < SHORT_CALL_SECONDS else 1)
    calls = [] if warmed_up else [cold]
    while len(calls) < repeats:
        calls.append(_timed(call))
    times, cpu_times, others = (list(x) for x in zip(*calls))
    return Measurement(statistics.median(times), times, cpu_times, others, cold[0], warmed_up, peak_mb, memory_method)


def wait_for_idle(max_wait: float, threshold: float = 0.1) -> float:
    """Wait up to max_wait s until other processes use < threshold of the CPUs over 1 s; returns
    the last busy share seen (this process and the idle forkserver use none)."""
    deadline = time.monotonic() + max_wait
    while True:
        busy0, total0 = _cpu_jiffies()
        time.sleep(1.0)
        busy1, total1 = _cpu_jiffies()
        busy = (busy1 - busy0) / max(1, total1 - total0)
        if busy < threshold or time.monotonic() >= deadline:
            return busy


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    length: int
    method: str  # label shown in the table
    seconds: float | None = None
    peak_mb: float | None = None
    x_forward: float | None = None
    speedup_vs_naive: float | None = None
    speedup_estimated: bool = False
    probes: int | None = None
    note: str = ""
    measurement: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_job(pool: Callable[[Job], Measurement], job: Job, label: str) -> Measurement:
    t0 = time.perf_counter()
    m = pool(job)
    peak = f"{m.peak_mb:.0f} MB" if m.peak_mb is not None else "-"
    print(
        f"[bench_mi] L={job.length:<5} {label:<16} {m.seconds:9.3f} s  peak {peak:>9}  "
        f"(calls {['%.3f' % t for t in m.times]}, cold {m.cold_seconds:.3f} s, "
        f"others {max(m.others_cpu):.0%} CPU, job {time.perf_counter() - t0:.1f} s)",
        file=sys.stderr,
        flush=True,
    )
    return m


def busy_note(m: Measurement, threads: int) -> str:
    """Flags timings taken while other processes left fewer idle CPUs than the threads we run
    (with a 10% margin of the machine)."""
    busy = max(m.others_cpu)
    spare = 1 - threads / (os.cpu_count() or 1)
    return f"noisy: other processes used {busy:.0%} of the CPUs" if busy >= spare + 0.1 else ""


def bench_length(run: Callable[[Job], Measurement], args: argparse.Namespace, length: int) -> list[Row]:
    base = dict(
        length=length,
        batch=args.batch,
        prompt_len=args.prompt_len,
        postfix_len=args.postfix_len,
        seed=args.seed,
        chunk_tokens=args.chunk_tokens,
        threads=args.threads,
        repeats=args.repeats,
        warmup_below=args.warmup_below,
    )
    ns = response_lengths(args.batch, length)
    threads = args.threads or torch.get_num_threads()
    rows: list[Row] = []

    def measured(label: str, job: Job) -> Row:
        m = run_job(run, job, label)
        probes = n_probes(ns, job.probe_stride) if job.method != "forward" else None
        note = busy_note(m, threads)
        return Row(length, label, m.seconds, m.peak_mb, probes=probes, note=note, measurement=asdict(m))

    forward = measured("forward", Job(method="forward", **base))
    rows.append(forward)

    # naive: estimate from a strided run, run for real only under the time limit
    stride = naive_estimate_stride(length)
    est_job = Job(method="naive", probe_stride=stride, measure_memory=False, **base)
    est_m = run_job(run, est_job, f"naive (est, s={stride})")
    est_probes = n_probes(ns, stride)
    naive_est = est_m.seconds * n_probes(ns, 1) / est_probes
    if naive_est <= args.naive_max_seconds:
        naive = measured("naive", Job(method="naive", **base))
        naive.extra = {"estimate_seconds": naive_est}
        naive_seconds, naive_estimated = naive.seconds, False
    else:
        note = "; ".join(x for x in (f"skipped: est. {naive_est:.0f} s", busy_note(est_m, threads)) if x)
        naive = Row(length, "naive", probes=n_probes(ns, 1), note=note)
        naive.extra = {"estimate_seconds": naive_est, "estimate_timed_probes": est_probes, "estimate_stride": stride}
        naive_seconds, naive_estimated = naive_est, True
    rows.append(naive)

    rows.append(measured("kv_copy", Job(method="kv_copy", **base)))
    rows.append(measured("chunked", Job(method="chunked", **base)))
    rows.append(measured(f"chunked s={args.stride}", Job(method="chunked", probe_stride=args.stride, **base)))

    for row in rows:
        if row.seconds is None:
            continue
        row.x_forward = row.seconds / forward.seconds
        if row.method not in ("forward", "naive"):
            row.speedup_vs_naive = naive_seconds / row.seconds
            row.speedup_estimated = naive_estimated
    return rows


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| L | method | probes | seconds | peak MB | x forward | speed-up vs naive | note |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        speedup = fmt(r.speedup_vs_naive, ".1f", "x")
        if r.speedup_vs_naive is not None and r.speedup_estimated:
            speedup = "~" + speedup
        lines.append(
            f"| {r.length} | {r.method} | {fmt(r.probes, 'd')} | {fmt(r.seconds, '.3f')} | {fmt(r.peak_mb, '.0f')} | "
            f"{fmt(r.x_forward, '.2f')} | {speedup} | {r.note} |"
        )
    return "\n".join(lines)


def find(rows: list[Row], length: int, method: str) -> Row | None:
    return next((r for r in rows if r.length == length and r.method == method), None)


def check_targets(rows: list[Row], postfix_len: int) -> list[dict[str, str]]:
    targets = []

    chunked, naive = find(rows, 512, "chunked"), find(rows, 512, "naive")
    name = "(1) chunked >= 20x faster than naive at L=512"
    if chunked is None or chunked.speedup_vs_naive is None:
        targets.append(dict(target=name, status="n.a.", detail="L=512 not benchmarked"))
    else:
        if chunked.speedup_estimated:
            how = (
                f"naive estimated at {naive.extra['estimate_seconds']:.0f} s from "
                f"{naive.extra['estimate_timed_probes']} of {naive.probes} probes"
            )
        else:
            how = "naive measured"
        status = "PASS" if chunked.speedup_vs_naive >= 20 else "FAIL"
        targets.append(dict(target=name, status=status, detail=f"{chunked.speedup_vs_naive:.1f}x ({how})"))

    limit = 1.5 * (postfix_len + 1)
    chunked = find(rows, 1024, "chunked")
    name = f"(2) chunked within 1.5 x (P+1) = {limit:g} plain forwards at L=1024"
    if chunked is None:
        targets.append(dict(target=name, status="n.a.", detail="L=1024 not benchmarked"))
    else:
        status = "PASS" if chunked.x_forward <= limit else "FAIL"
        targets.append(dict(target=name, status=status, detail=f"{chunked.x_forward:.2f} forwards"))

    name = "(3) chunked faster and lighter in peak memory than kv_copy at every L >= 512"
    lengths = sorted({r.length for r in rows if r.length >= 512})
    if not lengths:
        targets.append(dict(target=name, status="n.a.", detail="no L >= 512 benchmarked"))
    else:
        details, ok = [], True
        for length in lengths:
            c, k = find(rows, length, "chunked"), find(rows, length, "kv_copy")
            faster = c.seconds < k.seconds
            lighter = c.peak_mb is not None and k.peak_mb is not None and c.peak_mb < k.peak_mb
            ok &= faster and lighter
            details.append(
                f"L={length}: {k.seconds / c.seconds:.1f}x faster{'' if faster else ' (FAIL)'}, "
                f"{fmt(c.peak_mb, '.0f')} vs {fmt(k.peak_mb, '.0f')} MB{'' if lighter else ' (FAIL)'}"
            )
        targets.append(dict(target=name, status="PASS" if ok else "FAIL", detail="; ".join(details)))
    return targets


# ---------------------------------------------------------------------------------------------
# Tensor parallel (--tp N): the estimator on a DeepSpeed AutoTP engine against one process
# ---------------------------------------------------------------------------------------------

# "tp1*": the plain model in one process; "tpN*": the AutoTP engine on N ranks (N = --tp).
TP_CASES = ("tp1", "tp1_same_cores", "tpN_replicated_head", "tpN_vocab_parallel_head", "zero3_gathered",
            "zero3_module_hooks")
TP_DEFAULT_LENGTHS = (512,)
def _tp_case_setup(case: str, tp: int) -> tuple[int, int, bool | None, int]:
    """(processes, tensor-parallel size, vocab_parallel_lm_head, ZeRO stage) of a case. The
    zero3_* cases run ZeRO-3 data parallel on N ranks: the estimator's parameters gathered once per
    call (zero3_gathered) or module by module in every forward (zero3_module_hooks, the behaviour
    before issue 14, forced with IAPO_ZERO3_GATHER=never)."""
    return {
        "tp1": (1, 1, None, 0),
        "tp1_same_cores": (1, 1, None, 0),
        "tpN_replicated_head": (tp, tp, False, 0),
        "tpN_vocab_parallel_head": (tp, tp, True, 0),
        "zero3_gathered": (tp, 1, None, 3),
        "zero3_module_hooks": (tp, 1, None, 3),
    }[case]


def _tp_cases() -> tuple[str, ...]:
    """The vocab-parallel-head case needs DeepSpeed >= 0.19.8 (run with its overlay on PYTHONPATH)."""
    version = _deepspeed_version() or "0"
    has_vocab_parallel = tuple(int(x) for x in version.split(".")[:3] if x.isdigit()) >= (0, 19, 8)
    return tuple(c for c in TP_CASES if c != "tpN_vocab_parallel_head" or has_vocab_parallel)


def _case_threads(case: str, tp: int, threads: int | None) -> int:
    """torch threads per process: --threads (default 1) per rank; tp1_same_cores runs one process
    with as many threads as the TP ranks have together."""
    return (threads or 1) * (tp if case == "tp1_same_cores" else 1)


def tp_worker(args: argparse.Namespace) -> None:
    """One case at one length, in fresh processes: the plain model in one process (tp1*) or the
    AutoTP engine on every rank of a torchrun launch. Writes its results to args.tp_part (JSON,
    rank 0, every rank's record) and the entropies / log-probs of each rank to .rank{r}.pt."""
    case, length = args.tp_case, args.lengths[0]
    procs, tp, vocab_parallel, zero = _tp_case_setup(case, args.tp)
    if case == "zero3_module_hooks":
        os.environ["IAPO_ZERO3_GATHER"] = "never"
    threads = _case_threads(case, args.tp, args.threads)
    torch.set_num_threads(threads)
    counter = CollectiveCounter()
    counter.wrap_torch()
    rank, world = 0, 1
    if procs > 1:
        import deepspeed
        import torch.distributed as dist

        counter.wrap_deepspeed()
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if world != procs:
            raise SystemExit(f"--tp {args.tp}: launched with {world} processes, expected {procs}")

    job = Job(length=length, method="chunked", batch=args.batch, prompt_len=args.prompt_len,
              postfix_len=args.postfix_len, seed=args.seed, chunk_tokens=args.chunk_tokens)
    batch = build_batch(job)
    model = build_model(args.seed, job.prompt_len + length + job.postfix_len + 8)
    if procs > 1:
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            # ZeRO-3: no parameter kept whole on every rank (DeepSpeed's default threshold keeps the
            # small ones of this model resident; none of a 7B's matrices would be)
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0} if zero == 3 else {"stage": 0},
        }
        if tp > 1:
            config["tensor_parallel"] = {"autotp_size": tp}
            if vocab_parallel:
                config["tensor_parallel"]["vocab_parallel_lm_head"] = True
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        hf, target = engine.module, engine

        def sync() -> None:
            dist.barrier()

        def all_sum(x: float) -> float:
            t = torch.tensor([x], dtype=torch.float64)
            dist.all_reduce(t)
            return float(t)
    else:
        hf = target = model

        def sync() -> None:
            pass

        def all_sum(x: float) -> float:
            return x

    from iapo_openrlhf.core.parallel import parallel_layout

    layout = parallel_layout(target)
    head = hf.get_output_embeddings()
    counter.watch_lm_head(head)

    def estimate() -> tuple[torch.Tensor, torch.Tensor]:
        return answer_entropy(target, batch["sequences"], batch["attention_mask"], batch["action_mask"],
                              batch["postfix"], return_log_probs=True, chunk_tokens=args.chunk_tokens)

    def forward() -> torch.Tensor:
        target.eval()
        with torch.no_grad():
            return target(input_ids=batch["sequences"], attention_mask=batch["attention_mask"],
                          position_ids=batch["position_ids"]).logits

    hz = os.sysconf("SC_CLK_TCK")

    def timed(call: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
        """Wall s of this rank's call; the share of the CPUs that processes other than the ranks of
        this launch used over it (the ranks' CPU time summed); collectives counted over the call."""
        sync()
        counter.reset()
        busy0, total0 = _cpu_jiffies()
        c0, t0 = time.process_time(), time.perf_counter()
        counter.enabled = True
        result = call()
        counter.enabled = False
        wall = time.perf_counter() - t0
        sync()
        busy1, total1 = _cpu_jiffies()
        ours = all_sum(time.process_time() - c0)
        others = max(0.0, (busy1 - busy0) - ours * hz) / max(1, total1 - total0)
        return dict(seconds=wall, others_cpu=min(1.0, others), collectives=counter.snapshot()), result

    # Estimator: the first call of the process measures the memory, then warm timed calls.
    sync()
    memory_method = "clear_refs" if _reset_peak_rss() else "hwm_no_reset"
    rss_before = _status_kb("VmRSS")
    cold, (h, lp) = timed(estimate)
    hwm = _status_kb("VmHWM")
    calls = [timed(estimate)[0] for _ in range(args.repeats or 3)]
    forward_cold, logits = timed(forward)
    logits_width = logits.shape[-1]
    del logits
    forward_calls = [timed(forward)[0] for _ in range(args.repeats or 3)]

    # Counts of a warm call; the first forward of an engine may add one-off collectives.
    same_counts = all(c["collectives"] == calls[0]["collectives"] for c in calls)
    record = dict(
        rank=rank,
        world=world,
        threads=threads,
        case=case,
        length=length,
        layout=dict(tp_size=layout.tp_size, head=layout.head, vocab_parallel=layout.vocab_parallel,
                    vocab_start=layout.vocab_start,
                    vocab_end=layout.vocab_end),
        lm_head_class=type(head).__name__,
        logits_width=logits_width,
        estimator=dict(
            seconds=statistics.median(c["seconds"] for c in calls),
            times=[c["seconds"] for c in calls],
            others_cpu=[c["others_cpu"] for c in calls],
            cold_seconds=cold["seconds"],
            collectives=calls[-1]["collectives"],
            collectives_cold_call=cold["collectives"],
            collectives_same_every_call=same_counts,
            collectives_of_timed_calls=None if same_counts else [c["collectives"] for c in calls],
        ),
        forward=dict(
            seconds=statistics.median(c["seconds"] for c in forward_calls),
            times=[c["seconds"] for c in forward_calls],
            others_cpu=[c["others_cpu"] for c in forward_calls],
            cold_seconds=forward_cold["seconds"],
            collectives=forward_calls[-1]["collectives"],
        ),
        rss_before_mb=None if rss_before is None else rss_before / 1024,
        hwm_mb=None if hwm is None else hwm / 1024,
        peak_mb=None if rss_before is None or hwm is None else max(0, hwm - rss_before) / 1024,
        memory_method=memory_method,
    )
    if procs > 1:
        import deepspeed.comm.comm as ds_comm

        record["shm_vector_kernel_level"] = getattr(ds_comm.cdb, "shm_vector_kernel_level", None)
        records: list[Any] = [None] * world
        dist.all_gather_object(records, record)
    else:
        records = [record]
    torch.save(dict(h=h, log_probs=lp), f"{args.tp_part}.rank{rank}.pt")
    if rank == 0:
        Path(args.tp_part).write_text(json.dumps(dict(ranks=records, deepspeed=_deepspeed_version()), indent=2) + "\n")
    if procs > 1:
        dist.barrier()
        dist.destroy_process_group()


def _deepspeed_version() -> str | None:
    try:
        import deepspeed

        return deepspeed.__version__
    except ImportError:
        return None


def _launch_case(args: argparse.Namespace, case: str, length: int, part: Path) -> dict[str, Any]:
    procs, *_ = _tp_case_setup(case, args.tp)
    script = str(Path(__file__).resolve())
    worker = [script, "--tp-worker", "--tp", str(args.tp), "--tp-case", case, "--tp-part", str(part),
              "--lengths", str(length), "--batch", str(args.batch), "--prompt-len", str(args.prompt_len),
              "--postfix-len", str(args.postfix_len), "--seed", str(args.seed)]
    for flag, value in (("--chunk-tokens", args.chunk_tokens), ("--repeats", args.repeats), ("--threads", args.threads)):
        if value is not None:
            worker += [flag, str(value)]
    if procs > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *worker]
    else:
        command = [sys.executable, *worker]
    threads = _case_threads(case, args.tp, args.threads)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads))
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)
    t0 = time.perf_counter()
    # Own session: on a timeout the whole launch (torchrun and its ranks) is killed, not just torchrun.
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=args.tp_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        proc.returncode = f"timeout after {args.tp_timeout:.0f} s"
    if proc.returncode != 0 or not part.exists():
        sys.stderr.write(output[-12000:])
        raise SystemExit(f"[bench_mi] {case} L={length} failed (exit {proc.returncode}): {' '.join(command)}")
    result = json.loads(part.read_text())
    result["outputs"] = [torch.load(f"{part}.rank{r}.pt") for r in range(len(result["ranks"]))]
    result["launch_seconds"] = time.perf_counter() - t0
    r0 = result["ranks"][0]
    print(
        f"[bench_mi] L={length:<5} {case:<24} estimator {' / '.join('%.3f' % r['estimator']['seconds'] for r in result['ranks'])} s, "
        f"forward {' / '.join('%.3f' % r['forward']['seconds'] for r in result['ranks'])} s, "
        f"peak {' / '.join('%.0f' % (r['peak_mb'] or 0) for r in result['ranks'])} MB, head {r0['lm_head_class']} "
        f"(launch {result['launch_seconds']:.1f} s)",
        file=sys.stderr,
        flush=True,
    )
    return result


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _per_rank(values: list[float | None], spec: str) -> str:
    return " / ".join(fmt(v, spec) for v in values)


def _tp_rows(args: argparse.Namespace, length: int, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per case: per-rank times, memory, collective bytes, the logit-gather reference, diffs."""
    ref = results["tp1"]
    ref_h, ref_lp = ref["outputs"][0]["h"], ref["outputs"][0]["log_probs"]
    ref_seconds = ref["ranks"][0]["estimator"]["seconds"]
    vocab = MODEL_CONFIG["vocab_size"]
    rows = []
    for case, res in results.items():
        ranks = res["ranks"]
        tp = ranks[0]["world"]
        est = [r["estimator"] for r in ranks]
        cats = [e["collectives"]["by_category"] for e in est]

        def total(category: str, key: str, cats=cats) -> list[float]:
            return [c.get(category, {}).get(key, 0) for c in cats]

        def gathered(collectives: dict) -> int:
            """DeepSpeed's all-gathers (ZeRO-3 parameters, AutoTP's logit gather), payload bytes."""
            return sum(b for cat, rec in collectives["by_category"].items() if cat != "estimator"
                       for op, b in rec.get("op_bytes", {}).items() if op.startswith("all_gather"))

        head_rows = est[0]["collectives"]["lm_head_rows"]
        gather_formula = head_rows * vocab * 4 * (tp - 1) / tp
        # The cases are compared with each other: any case that shared the CPUs is flagged.
        others = max(max(e["others_cpu"] + r["forward"]["others_cpu"]) for e, r in zip(est, ranks))
        note = f"noisy: other processes used {others:.0%} of the CPUs" if others >= 0.1 else ""
        if not all(e["collectives_same_every_call"] for e in est):
            note = "; ".join(x for x in (note, "collective counts differ between calls") if x)
        rows.append(dict(
            length=length,
            case=case.replace("tpN", f"tp{tp}"),
            tp=tp,
            threads_per_rank=ranks[0]["threads"],
            lm_head=ranks[0]["lm_head_class"],
            shm_vector_kernel_level=ranks[0].get("shm_vector_kernel_level"),
            vocab_parallel=ranks[0]["layout"]["vocab_parallel"],
            head_mode=ranks[0]["layout"]["head"],
            logits_width=ranks[0]["logits_width"],
            estimator_seconds=[e["seconds"] for e in est],
            x_tp1=max(e["seconds"] for e in est) / ref_seconds,
            forward_seconds=[r["forward"]["seconds"] for r in ranks],
            peak_mb=[r["peak_mb"] for r in ranks],
            rss_before_mb=[r["rss_before_mb"] for r in ranks],
            memory_method=ranks[0]["memory_method"],
            lm_head_rows=head_rows,
            estimator_calls=total("estimator", "calls"),
            estimator_payload_bytes=total("estimator", "payload_bytes"),
            estimator_wire_bytes=total("estimator", "wire_bytes"),
            lm_head_payload_bytes=total("lm_head", "payload_bytes"),
            lm_head_wire_bytes=total("lm_head", "wire_bytes"),
            body_calls=total("body", "calls"),
            body_wire_bytes=total("body", "wire_bytes"),
            other_wire_bytes=total("other", "wire_bytes"),
            logit_gather_formula_bytes=gather_formula,
            forward_collectives=[r["forward"]["collectives"] for r in ranks],
            zero_stage=3 if case.startswith("zero3") else 0,
            estimator_all_gather_bytes=[gathered(e["collectives"]) for e in est],
            forward_all_gather_bytes=[gathered(r["forward"]["collectives"]) for r in ranks],
            max_diff_h=max(_max_diff(o["h"], ref_h) for o in res["outputs"]),
            max_diff_log_probs=max(_max_diff(o["log_probs"], ref_lp) for o in res["outputs"]),
            others_cpu=others,
            note=note,
            ranks=ranks,
        ))
    return rows


def _bytes(x: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


def _ratio(x: float, reference: float) -> str:
    if reference <= 0:
        return "-"
    return f"{x / reference:.3f}" if x >= 0.01 * reference else f"1/{reference / max(x, 1e-9):.0f}"


def tp_tables(rows: list[dict[str, Any]]) -> str:
    time_lines = [
        "| L | case | ranks x threads | LM head | estimator s (per rank) | x TP1 | forward s (per rank) | "
        "peak MB (per rank) | max diff h / log-probs vs TP1 | note |",
        "|---:|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    byte_lines = [
        "| L | case | LM-head rows | estimator's own collectives (calls, bytes/rank) | LM-head logit gather "
        "(measured, bytes/rank) | gathering the logits (formula, bytes/rank) | (estimator + LM-head gather) / formula | "
        "AutoTP body all-reduces (calls, bytes/rank) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    zero_lines = [
        "| L | case | ranks | estimator s (per rank) | forward s (per rank) | peak MB (per rank) | "
        "parameters all-gathered per estimator call (bytes/rank) | per plain forward | ratio |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["zero_stage"] == 3:
            est_b, fwd_b = r["estimator_all_gather_bytes"][0], r["forward_all_gather_bytes"][0]
            zero_lines.append(
                f"| {r['length']} | {r['case']} | {r['tp']} | {_per_rank(r['estimator_seconds'], '.3f')} | "
                f"{_per_rank(r['forward_seconds'], '.3f')} | {_per_rank(r['peak_mb'], '.0f')} | {_bytes(est_b)} | "
                f"{_bytes(fwd_b)} | {est_b / fwd_b if fwd_b else float('nan'):.2f} |"
            )
            continue
        head = {"sliced": "sliced by the estimator (no logit gather)", "vocab_parallel": "vocab-parallel (DeepSpeed)",
                "model": "full"}[r["head_mode"]]
        time_lines.append(
            f"| {r['length']} | {r['case']} | {r['tp']} x {r['threads_per_rank']} | {head} | "
            f"{_per_rank(r['estimator_seconds'], '.3f')} | {r['x_tp1']:.2f} | {_per_rank(r['forward_seconds'], '.3f')} | "
            f"{_per_rank(r['peak_mb'], '.0f')} | {r['max_diff_h']:.1e} / {r['max_diff_log_probs']:.1e} | {r['note']} |"
        )
        if r["tp"] > 1:
            byte_lines.append(
                f"| {r['length']} | {r['case']} | {r['lm_head_rows']} | "
                f"{r['estimator_calls'][0]}, {_bytes(r['estimator_wire_bytes'][0])} | "
                f"{_bytes(r['lm_head_wire_bytes'][0]) if r['lm_head_wire_bytes'][0] else '-'} | "
                f"{_bytes(r['logit_gather_formula_bytes'])} | "
                f"{_ratio(r['estimator_wire_bytes'][0] + r['lm_head_wire_bytes'][0], r['logit_gather_formula_bytes'])} | "
                f"{r['body_calls'][0]}, {_bytes(r['body_wire_bytes'][0])} |"
            )
    return "\n".join(time_lines) + "\n\n" + "\n".join(byte_lines) + "\n\n" + "\n".join(zero_lines)


def tp_main(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    meta = dict(
        torch=torch.__version__,
        transformers=transformers.__version__,
        deepspeed=_deepspeed_version(),
        python=platform.python_version(),
        cpu=cpu_model(),
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        load_average_before=os.getloadavg(),
        model_config=dict(MODEL_CONFIG, attn_implementation="sdpa", dtype="float32", weights="random"),
        row_response_fractions=ROW_RESPONSE_FRACTIONS,
        row_prompt_lengths=prompt_lengths(args.batch, args.prompt_len),
        backend="gloo (DS_ACCELERATOR=cpu); DeepSpeed's AutoTP all-reduces may use its shared-memory kernel",
        byte_formulas=dict(
            payload="bytes of the tensor reduced, or of the gathered output",
            wire_per_rank="ring: all-reduce 2 (p-1)/p * payload, all-gather (p-1)/p * payload",
            logit_gather="LM-head rows of the call x vocab x 4 bytes (fp32) x (tp-1)/tp per rank",
        ),
    )
    print(f"[bench_mi] --tp {args.tp}: torch {meta['torch']}, deepspeed {meta['deepspeed']}, {meta['cpu']}; "
          f"lengths {args.lengths}", file=sys.stderr, flush=True)
    rows: list[dict[str, Any]] = []

    def save() -> None:
        payload = dict(meta=meta, args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                       results=rows, wall_seconds=time.perf_counter() - start)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="bench_mi_tp_") as tmp:
        for length in args.lengths:
            results = {}
            for case in _tp_cases():
                results[case] = _launch_case(args, case, length, Path(tmp) / f"{case}_{length}.json")
            rows.extend(_tp_rows(args, length, results))
            save()
    meta["load_average_after"] = os.getloadavg()
    save()

    print(f"## bench_mi --tp {args.tp}: B={args.batch}, prompt ~{args.prompt_len}, P={args.postfix_len}, "
          f"response rows {', '.join(str(f) for f in ROW_RESPONSE_FRACTIONS[: args.batch])} x L, "
          f"answer_entropy(..., return_log_probs=True)\n")
    print(f"torch {meta['torch']}, deepspeed {meta['deepspeed']}, transformers {meta['transformers']}, {meta['cpu']}, "
          f"{meta['cpu_count']} CPUs\n")
    print(tp_tables(rows))
    print(
        "\nBytes per rank and per warm estimator call, as a ring moves them (kB/MB = 1e3/1e6 B): all-reduce "
        "2 (p-1)/p x payload, all-gather (p-1)/p x payload. Formula: LM-head rows of the same call x vocab x "
        "4 B (fp32) x (tp-1)/tp. The estimator's own collectives: the batch fingerprint (all-gather) and, "
        "with a vocab-parallel head, the max / sum-exp reductions of log-probs and entropies. peak MB: "
        "resident-memory peak of the rank's first estimator call above its resident memory before it. "
        "x TP1: slowest rank against tp1."
    )
    print(f"\nwall time {time.perf_counter() - start:.1f} s; JSON: {args.out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS} only (the README's first command)")
    add("--lengths", type=str, default=None, help=f"comma-separated response lengths L (default {FULL_LENGTHS})")
    add("--batch", type=int, default=4)
    add("--prompt-len", type=int, default=64)
    add("--postfix-len", type=int, default=4, help="P, postfix tokens per probe")
    add("--stride", type=int, default=4, help="probe_stride of the strided chunked run")
    add("--naive-max-seconds", type=float, default=None,
        help="run naive only where its estimate is below this (default 60, 30 with --quick)")
    add("--chunk-tokens", type=int, default=None, help="chunk_tokens of the chunked runs (default: automatic)")
    add("--repeats", type=int, default=None, help="timed calls per measurement (default: 3 if a call < 2 s, else 1)")
    add("--warmup-below", type=float, default=5.0, help="discard the cold call as warm-up if it took < this (s)")
    add("--wait-idle", type=float, default=0.0,
        help="before each measurement wait up to this many s for other processes to leave the CPUs idle")
    add("--threads", type=int, default=None,
        help="torch.set_num_threads in the measuring processes (default: left at torch's default)")
    add("--seed", type=int, default=0)
    add("--out", type=Path, default=None, help="JSON output (default bench_mi.json, bench_mi_tp.json with --tp)")
    add("--tp", type=int, default=1,
        help="N >= 2: the tensor-parallel benchmark (AutoTP N ranks under torchrun against one process), "
        f"lengths {TP_DEFAULT_LENGTHS} unless --lengths; --threads is then per rank (default 1)")
    add("--tp-timeout", type=float, default=900.0, help="--tp: seconds allowed to each launch")
    add("--tp-worker", action="store_true", help=argparse.SUPPRESS)
    add("--tp-case", choices=TP_CASES, default=None, help=argparse.SUPPRESS)
    add("--tp-part", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path("bench_mi_tp.json" if args.tp > 1 else "bench_mi.json")
    if args.lengths:
        args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    elif args.tp > 1:
        args.lengths = list(TP_DEFAULT_LENGTHS)
    else:
        args.lengths = list(QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    if args.tp < 1 or (args.tp_worker and (args.tp_case is None or args.tp_part is None)):
        parser.error("--tp must be >= 1; --tp-worker needs --tp-case and --tp-part")
    if args.naive_max_seconds is None:
        args.naive_max_seconds = 30.0 if args.quick else 60.0
    positive = [*args.lengths, args.batch, args.prompt_len, args.postfix_len, args.stride, args.threads or 1]
    if min(positive) < 1:
        parser.error("lengths, --batch, --prompt-len, --postfix-len, --stride and --threads must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.tp_worker:
        tp_worker(args)
        return
    if args.tp > 1:
        tp_main(args)
        return
    start = time.perf_counter()
    load_before = os.getloadavg()

    ctx = multiprocessing.get_context("forkserver")
    # The server imports everything once (the script as well: it is __main__), so a child only forks.
    ctx.set_forkserver_preload(["__main__", "torch", "transformers", "transformers.models.qwen2.modeling_qwen2"])

    meta = dict(
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        threads=args.threads or torch.get_num_threads(),
        threads_set_by_option=args.threads is not None,
        cpu=cpu_model(),
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        processor=platform.processor(),
        load_average_before=load_before,
        model_config=dict(MODEL_CONFIG, attn_implementation="sdpa", dtype="float32", weights="random"),
        row_response_fractions=ROW_RESPONSE_FRACTIONS,
        row_prompt_lengths=prompt_lengths(args.batch, args.prompt_len),
    )
    print(
        f"[bench_mi] torch {meta['torch']}, transformers {meta['transformers']}, {meta['threads']} threads, "
        f"{meta['cpu']}; lengths {args.lengths}",
        file=sys.stderr,
        flush=True,
    )

    rows: list[Row] = []

    def save(targets: list[dict[str, str]] | None = None) -> None:
        payload = dict(
            meta=meta,
            args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            results=[asdict(r) for r in rows],
            targets=targets,
            wall_seconds=time.perf_counter() - start,
        )
        args.out.write_text(json.dumps(payload, indent=2) + "\n")

    # max_tasks_per_child=1: every measurement gets a fresh process (honest peak memory).
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1) as pool:

        def run(job: Job) -> Measurement:
            if args.wait_idle > 0:
                wait_for_idle(args.wait_idle)
            return pool.submit(measure, job).result()

        for length in args.lengths:
            rows.extend(bench_length(run, args, length))
            save()

    targets = check_targets(rows, args.postfix_len)
    meta["load_average_after"] = os.getloadavg()
    save(targets)

    print(f"## bench_mi: B={args.batch}, prompt ~{args.prompt_len}, P={args.postfix_len}, response rows "
          f"{', '.join(str(f) for f in ROW_RESPONSE_FRACTIONS[: args.batch])} x L\n")
    print(f"torch {meta['torch']}, transformers {meta['transformers']}, {meta['threads']} threads, {meta['cpu']}\n")
    print(markdown_table(rows))
    print()
    for t in targets:
        print(f"- {t['status']}: {t['target']}: {t['detail']}")
    print(f"\nwall time {time.perf_counter() - start:.1f} s; JSON: {args.out}")


if __name__ == "__main__":
    main()
