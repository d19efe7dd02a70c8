"""`iapo-eval`: P@k, L@k, R@k and inference time of a saved model on a test split."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..config import ConfigError

SYNTHETIC_TEST_SIZE = 500  # the synthetic test split, fixed so numbers are comparable across runs


def _ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",")})
    except ValueError:
        raise ConfigError(f"--k: got {text!r}, expected comma-separated integers like 1,4,8") from None
    if ks[0] < 1:
        raise ConfigError(f"--k: got {text!r}, expected positive integers")
    return ks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="iapo-eval", description="Evaluate a saved model: P@k, L@k, R@k.")
    parser.add_argument("--model", required=True, help="directory written by save_pretrained (e.g. runs/x/final)")
    parser.add_argument("--data", required=True, help="a prompt JSONL file, or 'synthetic'")
    parser.add_argument("--k", default="1,2,4,8,16,32", help="sample counts, comma separated (default 1,2,4,8,16,32)")
    parser.add_argument("--num", type=int, default=0, help="evaluate the first N problems only (default: whole split)")
    parser.add_argument("--seed", type=int, default=0, help="task seed (synthetic) and sampling seed")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input-key", default="question")
    parser.add_argument("--label-key", default="answer")
    parser.add_argument("--system-prompt", choices=["r1", "none"], default="r1")
    parser.add_argument("--reward-scheme", default="paper", choices=["paper", "correctness", "correctness_pm1"])
    parser.add_argument("--name", default=None, help="row name in the table (default: the model directory)")
    parser.add_argument("--out", default=None, help="output directory (default: <model>/eval)")
    args = parser.parse_args(argv)
    try:
        ks = _ks(args.k)
        if not os.path.isdir(args.model):
            raise ConfigError(f"--model: {args.model} is not a directory, expected a save_pretrained output")
        if args.data != "synthetic" and not os.path.isfile(args.data):
            raise ConfigError(f"--data: {args.data} does not exist, expected a JSONL file or 'synthetic'")
        if not args.temperature > 0 or args.max_new_tokens < 1 or args.num < 0:
            raise ConfigError("--temperature must be > 0, --max-new-tokens >= 1 and --num >= 0")
        import torch
        from tqdm import tqdm
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..data import load_jsonl, synthetic_examples
        from ..eval.generation import evaluate_model
        from ..eval.metrics import write_reports
        from ..rewards import R1_SYSTEM_PROMPT

        if args.data == "synthetic":
            from ..tasks.synthetic import SyntheticTask

            examples = synthetic_examples(SyntheticTask(args.seed), "test", args.num or SYNTHETIC_TEST_SIZE)
        else:
            system = R1_SYSTEM_PROMPT if args.system_prompt == "r1" else None
            examples = load_jsonl(args.data, args.input_key, args.label_key, system)
            examples = examples[: args.num] if args.num else examples
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model).to(device).eval()
        with tqdm(total=len(examples) * max(ks), desc="eval samples") as bar:
            result = evaluate_model(
                model, tokenizer, examples, ks=ks, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                reward_scheme=args.reward_scheme, batch_size=args.batch_size, seed=args.seed, progress=bar,
            )
    except ConfigError as e:
        print(f"iapo-eval: error: {e}", file=sys.stderr)
        return 2
    name = args.name or os.path.basename(os.path.normpath(args.model))
    out = args.out or os.path.join(args.model, "eval")
    paths = write_reports({name: result}, ks, out)
    print(paths["md"].read_text(encoding="utf-8"))
    print(f"{len(examples)} problems x {max(ks)} samples, inference {result['inference_seconds']:.1f} s")
    print("reports:", json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
