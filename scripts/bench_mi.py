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
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

from iapo_openrlhf.core.mi import answer_entropy

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
    add("--out", type=Path, default=Path("bench_mi.json"))
    args = parser.parse_args(argv)
    if args.lengths:
        args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    else:
        args.lengths = list(QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    if args.naive_max_seconds is None:
        args.naive_max_seconds = 30.0 if args.quick else 60.0
    positive = [*args.lengths, args.batch, args.prompt_len, args.postfix_len, args.stride, args.threads or 1]
    if min(positive) < 1:
        parser.error("lengths, --batch, --prompt-len, --postfix-len, --stride and --threads must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
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
