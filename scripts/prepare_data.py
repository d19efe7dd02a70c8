#!/usr/bin/env python
r"""Build the prompt JSONL that OpenRLHF (and the local backend) read, from GSM8K, MATH-500 or DAPO-Math-17k.

    python scripts/prepare_data.py gsm8k --input ../shared/data/gsm8k/train.jsonl --split train \
        --out data/gsm8k_train.jsonl
    python scripts/prepare_data.py math500 --split test --chat-template --out data/math500_chat.jsonl  # hub

Splits, as the paper uses them:
    gsm8k    train (7,473 problems) to train, test (1,319) to evaluate
    math500  test only (500 problems): an evaluation set (HuggingFaceH4/MATH-500)
    dapo     train only (~17k unique problems; the hub copy repeats each ~100 times, duplicates are
             dropped unless --keep-duplicates): a training set, evaluated on math500

Source (--input): a local .jsonl / .json / .parquet file in the dataset's own layout, or a hub dataset
name loaded with `datasets.load_dataset` when a hub is reachable (default: the dataset's hub name).
    gsm8k    {"question", "answer": "... #### 18"}   label: the number after the last "####", "1,080" -> "1080"
    math500  {"problem", "answer"}                    label: answer
    dapo     {"prompt": [{"role": "user", "content"}] or str, "reward_model": {"ground_truth"}}
             question: the user message without DAPO's own "Answer: $Answer" instructions, which
             contradict the R1 <answer> format; label: reward_model.ground_truth

Output, one JSON object per line:
    {"prompt": ..., "question": <problem text>, "answer": <gold label>, "datasource": <dataset>}
"prompt" is the R1 system prompt plus the question: by default one string built by
`iapo_openrlhf.data.r1_prompt` (ends with "Assistant: <think>", for models without a chat template);
with --chat-template a [system, user] message list for the model's own template; with --style paper
the IAPO authors' prompt as chat messages: their R1-style system prompt plus the dataset's task
instruction ("The answer must be a single integer." for gsm8k and dapo), a one-shot exchange
("What is 2+2?"), then the question (`iapo_openrlhf.data.paper_messages`; configs/paper/ read it
with data.system_prompt: paper). Use with OpenRLHF:
    --data.prompt_dataset OUT --data.input_key prompt --data.label_key answer [--data.apply_chat_template]
(with --chat-template the last flag is required; without it, it must be left out). The local backend
reads the same file with its default keys (data.input_key question, data.label_key answer).

Held-out splits (--holdout SIZE:FILE, repeatable): SIZE rows (an integer, or a fraction such as 0.2
of the usable rows) go to FILE instead of --out. The usable rows are shuffled with Python's
random.Random(--holdout-seed, default 42) and each holdout takes the last SIZE rows of that order
that are left, in the order given; every file keeps the input's row order. So the authors' 80/20
split (the last 20 % of the shuffled rows held out) is `--holdout 0.2:test.jsonl`, and a validation
split carved from the training rows for checkpoint selection (README, "Reproducing the paper") is a
second holdout: `--holdout 0.2:test.jsonl --holdout 50:val.jsonl --out train.jsonl`.
--limit N uses the first N usable rows (the authors train on the first 7,000 DAPO-Math-17k rows).

Errors (missing file, unknown dataset, split the dataset lacks, a row without a required field, a
bad holdout) are one line on stderr and exit status 2. Rows with an empty question or label, or a GSM8K answer without
"####", or a repeated question are skipped and counted in the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from iapo_openrlhf.data import paper_messages, r1_prompt
from iapo_openrlhf.rewards import R1_SYSTEM_PROMPT

INPUT_KEY, QUESTION_KEY, LABEL_KEY, SOURCE_KEY = "prompt", "question", "answer", "datasource"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")

_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DAPO_PREFIX = re.compile(r"\A\s*Solve the following math problem step by step\..*?\n\s*\n", re.DOTALL)
_DAPO_SUFFIX = re.compile(r"\n\s*\n\s*Remember to put your answer on its own line after \"Answer:\"\.?\s*\Z")


class DataError(Exception):
    """A problem with the input or the arguments: printed as one line, exit status 2."""


class Skip(Exception):
    """A row that is well formed but unusable; the message is the reason counted in the summary."""


def _field(row: dict, path: str, where: str):
    """row["a"]["b"] for path "a.b"; a missing key is a DataError naming the row and field."""
    value = row
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise DataError(f"{where}: missing field '{path}'")
        value = value[key]
    return value


def _text(value, what: str) -> str:
    text = "" if value is None else str(value).strip()
    if not text:
        raise Skip(f"empty {what}")
    return text


def gsm8k_row(row: dict, where: str) -> tuple[str, str]:
    question, solution = _field(row, "question", where), _field(row, "answer", where)
    solution = _text(solution, "answer")
    if "####" not in solution:
        raise Skip("answer without '####'")
    label = _text(solution.rsplit("####", 1)[1], "answer after '####'")
    if _THOUSANDS.fullmatch(label):
        label = label.replace(",", "")
    return _text(question, "question"), label


def math500_row(row: dict, where: str) -> tuple[str, str]:
    return _text(_field(row, "problem", where), "problem"), _text(_field(row, "answer", where), "answer")


def dapo_row(row: dict, where: str) -> tuple[str, str]:
    prompt = _field(row, "prompt", where)
    label = _field(row, "reward_model.ground_truth", where)
    if isinstance(prompt, list):  # chat messages: the (last) user turn holds the problem
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1] if users else None
    question = _DAPO_SUFFIX.sub("", _DAPO_PREFIX.sub("", _text(prompt, "user message in prompt")))
    return _text(question, "question"), _text(label, "reward_model.ground_truth")


@dataclass(frozen=True)
class Spec:
    convert: Callable[[dict, str], tuple[str, str]]
    splits: tuple[str, ...]
    hub: str
    hub_config: str | None
    role: str  # shown when a split is refused


DATASETS = {
    "gsm8k": Spec(gsm8k_row, ("train", "test"), "openai/gsm8k", "main", "train/test"),
    "math500": Spec(math500_row, ("test",), "HuggingFaceH4/MATH-500", None, "an evaluation set"),
    "dapo": Spec(dapo_row, ("train",), "BytedTsinghua-SIA/DAPO-Math-17k", None, "a training set"),
}


# ── reading ──


def _is_file_like(source: str) -> bool:
    return (source.lower().endswith(FILE_SUFFIXES) or source.startswith(("/", "./", "../", "~"))
            or os.path.exists(source))


def _jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{where}: not valid JSON, expected one object per line") from None
            yield where, row


def _json(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8") as f:
        head = f.read(1024).lstrip()
    if not head.startswith("["):  # JSON lines under a .json name
        yield from _jsonl(path)
        return
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    for i, row in enumerate(rows, 1):
        yield f"{path} row {i}", row


def _parquet(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    i = 0
    for batch in batches:
        for row in batch.to_pylist():
            i += 1
            yield f"{path} row {i}", row


def _hub(name: str, config: str | None, split: str) -> Iterator[tuple[str, dict]]:
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(
            f"loading '{name}' from the hub needs the datasets package; or pass a local file with --input"
        ) from None
    try:
        data = load_dataset(name, config, split=split) if config else load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, missing split: all one message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"could not load hub dataset '{name}' split '{split}' ({first}); pass a local file with --input"
        ) from None
    for i, row in enumerate(data, 1):
        yield f"{name}[{split}] row {i}", row


def read_rows(source: str, spec: Spec, split: str) -> Iterator[tuple[str, dict]]:
    """(location, row) pairs from a local file or, for a name that is not a path, the hub."""
    if not _is_file_like(source):
        config = spec.hub_config if source == spec.hub else None
        yield from _hub(source, config, split)
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"input file not found: {path}")
    if not path.is_file():
        raise DataError(f"{path}: not a file, expected a {'/'.join(FILE_SUFFIXES)} file")
    readers = {".jsonl": _jsonl, ".json": _json, ".parquet": _parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}', expected {', '.join(FILE_SUFFIXES)}")
    for where, row in reader(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


# ── writing ──


def make_prompt(question: str, chat: bool, style: str = "r1", dataset: str = "gsm8k"):
    if style == "paper":
        return paper_messages(question, dataset)
    if chat:
        return [{"role": "system", "content": R1_SYSTEM_PROMPT}, {"role": "user", "content": question}]
    return r1_prompt(question, R1_SYSTEM_PROMPT)


def parse_holdout(text: str) -> tuple[float, Path]:
    """'500:val.jsonl' -> (500, Path), '0.2:test.jsonl' -> (0.2, Path)."""
    size, sep, path = text.partition(":")
    try:
        value = float(size) if "." in size else int(size)
    except ValueError:
        value = None
    if not sep or not path or value is None or value <= 0 or (isinstance(value, float) and value >= 1):
        raise DataError(f"--holdout {text}: expected SIZE:FILE with SIZE a row count (500) or a fraction in (0, 1) "
                        "(0.2), e.g. --holdout 0.2:data/test.jsonl")
    return value, Path(path)


def _holdout_sizes(holdouts: list[tuple[float, Path]], n: int) -> list[int]:
    sizes = []
    for value, path in holdouts:
        sizes.append(value if isinstance(value, int) else n - int(n * (1 - value)))  # int(0.8 * n) rows stay
    if sum(sizes) >= n:
        raise DataError(f"--holdout: {sum(sizes)} held-out rows of {n} usable ones leave none for --out, "
                        "expected smaller holdouts")
    return sizes


def _write(path: Path, records: list[dict]) -> None:
    """Atomically: no partial file on error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def prepare(dataset: str, source: str, split: str, out: Path, *, chat: bool, limit: int | None,
            keep_duplicates: bool, style: str = "r1", holdouts: list[tuple[float, Path]] | None = None,
            holdout_seed: int = 42) -> tuple[int, Counter, list[int]]:
    """Write the prompt file (and the holdouts); return (rows in --out, skip reasons, holdout sizes)."""
    spec = DATASETS[dataset]
    skipped: Counter = Counter()
    seen: set[str] = set()
    records: list[dict] = []
    holdouts = holdouts or []
    paths = [out.resolve(), *(p.resolve() for _, p in holdouts)]
    if len(set(paths)) != len(paths):
        raise DataError("--holdout: every holdout FILE must differ from --out and from the other holdouts")
    for where, row in read_rows(source, spec, split):
        try:
            question, label = spec.convert(row, where)
            key = " ".join(question.split())
            if not keep_duplicates and key in seen:
                raise Skip("duplicate question")
        except Skip as reason:
            skipped[str(reason)] += 1
            continue
        seen.add(key)
        records.append({INPUT_KEY: make_prompt(question, chat, style, dataset), QUESTION_KEY: question,
                        LABEL_KEY: label, SOURCE_KEY: dataset})
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError(f"{source}: no usable rows ({_reasons(skipped) or 'the input is empty'})")
    sizes = _holdout_sizes(holdouts, len(records))
    order = list(range(len(records)))
    random.Random(holdout_seed).shuffle(order)
    held: list[list[int]] = []
    end = len(order)
    for size in sizes:
        held.append(sorted(order[end - size : end]))
        end -= size
    kept = sorted(order[:end])
    _write(out, [records[i] for i in kept])
    for (_, path), rows in zip(holdouts, held):
        _write(path, [records[i] for i in rows])
    return len(kept), skipped, sizes


def _reasons(skipped: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare_data.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dataset", help=f"one of {', '.join(DATASETS)}")
    parser.add_argument("--input", help="local .jsonl/.json/.parquet file, or a hub dataset name "
                        "(default: the dataset's hub name)")
    parser.add_argument("--split", help="train or test (default: train for gsm8k and dapo, test for math500)")
    parser.add_argument("--out", help="output JSONL (default: DATASET_SPLIT[_chat].jsonl)")
    parser.add_argument("--limit", type=int, help="use the first N usable rows (before any --holdout)")
    parser.add_argument("--chat-template", action="store_true",
                        help="emit a [system, user] message list for --data.apply_chat_template "
                        "instead of a plain string")
    parser.add_argument("--keep-duplicates", action="store_true", help="keep repeated questions (dropped by default)")
    parser.add_argument("--style", choices=("r1", "paper"), default="r1",
                        help="r1: our R1 system prompt (default); paper: the IAPO authors' prompt as chat messages "
                        "(system prompt + task instruction, a one-shot example, the question) for configs/paper/")
    parser.add_argument("--holdout", action="append", default=[], metavar="SIZE:FILE",
                        help="hold SIZE rows (a count, or a fraction like 0.2) out of --out into FILE; repeatable, "
                        "each carved from the rows left (a test split, then a validation split)")
    parser.add_argument("--holdout-seed", type=int, default=42, help="seed of the shuffle the holdouts are drawn "
                        "from (default 42)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.dataset not in DATASETS:
            raise DataError(f"unknown dataset '{args.dataset}', expected one of {', '.join(DATASETS)}")
        spec = DATASETS[args.dataset]
        split = args.split or spec.splits[0]
        if split not in spec.splits:
            raise DataError(f"{args.dataset} has no '{split}' split: it is {spec.role} (use --split {spec.splits[0]})")
        if args.limit is not None and args.limit < 1:
            raise DataError(f"--limit: got {args.limit}, expected a positive number of rows")
        chat = args.chat_template or args.style == "paper"
        out = Path(args.out or f"{args.dataset}_{split}{'_paper' if args.style == 'paper' else '_chat' if chat else ''}.jsonl")
        holdouts = [parse_holdout(h) for h in args.holdout]
        written, skipped, sizes = prepare(args.dataset, args.input or spec.hub, split, out, chat=chat,
                                          limit=args.limit, keep_duplicates=args.keep_duplicates, style=args.style,
                                          holdouts=holdouts, holdout_seed=args.holdout_seed)
    except DataError as exc:
        print(f"prepare_data.py: error: {exc}", file=sys.stderr)
        return 2
    path = out.resolve()
    layout = "the authors' chat prompt" if args.style == "paper" else "chat messages" if chat else "plain prompts"
    print(f"{args.dataset} {split}: wrote {written} rows to {path} ({layout})")
    for (_, held_path), size in zip(holdouts, sizes):
        print(f"held out {size} rows to {held_path.resolve()} (seed {args.holdout_seed})")
    print(f"skipped {sum(skipped.values())} rows" + (f": {_reasons(skipped)}" if skipped else ""))
    chat_flag = " --data.apply_chat_template" if chat else ""
    data_flag = "--eval.dataset" if split == "test" else "--data.prompt_dataset"
    print(f"OpenRLHF: {data_flag} {path} --data.input_key {INPUT_KEY} --data.label_key {LABEL_KEY}{chat_flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
