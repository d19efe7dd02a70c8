"""scripts/prepare_data.py: labels, prompts, both output formats, and OpenRLHF's own reading of the file."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from iapo_openrlhf.data import load_jsonl, r1_prompt
from iapo_openrlhf.openrlhf import cpu_stubs
from iapo_openrlhf.rewards import R1_SYSTEM_PROMPT

cpu_stubs.install()

from openrlhf.datasets import PromptDataset  # noqa: E402
from openrlhf.datasets.utils import blending_datasets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prepare_data.py"
GSM8K_TEST = Path("/work/shared/data/gsm8k/test.jsonl")
if not GSM8K_TEST.exists():  # the same data, located from the repository as DESIGN section 8 puts it
    GSM8K_TEST = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
needs_gsm8k = pytest.mark.skipif(not GSM8K_TEST.exists(), reason="../shared/data/gsm8k not beside the checkout")

DAPO_INSTRUCTION = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_REMINDER = '\n\nRemember to put your answer on its own line after "Answer:".'


def load_script():
    spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


prepare_data = load_script()


def run(argv, capsys):
    code = prepare_data.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def source_rows(n: int) -> list[dict]:
    with open(GSM8K_TEST, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with Qwen-style specials and chat template, built in code (no download)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([R1_SYSTEM_PROMPT], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def openrlhf_read(path: Path, tokenizer, apply_chat_template: bool, monkeypatch, tmp_path) -> list[tuple]:
    """The file as OpenRLHF's trainer reads it: blending_datasets + PromptDataset, with the
    --data.input_key / --data.label_key / --data.apply_chat_template values the script prints."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    data_args = SimpleNamespace(input_key=prepare_data.INPUT_KEY, label_key=prepare_data.LABEL_KEY,
                                apply_chat_template=apply_chat_template)
    strategy = SimpleNamespace(args=SimpleNamespace(data=data_args, use_ms=False), is_rank_0=lambda: False,
                               print=lambda *a, **k: None)
    data = blending_datasets(str(path), None, strategy, dataset_split="train")
    dataset = PromptDataset(data, tokenizer, strategy, input_template=None)
    return [dataset[i] for i in range(len(dataset))]


def gsm8k_label(solution: str) -> str:
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


@needs_gsm8k
def test_gsm8k_plain_prompts(tmp_path, capsys, monkeypatch):
    out = tmp_path / "gsm8k_test.jsonl"
    code, stdout, _ = run(["gsm8k", "--input", GSM8K_TEST, "--split", "test", "--limit", 5, "--out", out], capsys)
    assert code == 0
    rows, sources = read(out), source_rows(5)
    assert [r["answer"] for r in rows] == [gsm8k_label(s["answer"]) for s in sources]
    assert rows[0]["answer"] == "18"
    for row, src in zip(rows, sources):
        assert row["prompt"] == r1_prompt(src["question"], R1_SYSTEM_PROMPT)
        assert row["prompt"].startswith(R1_SYSTEM_PROMPT) and src["question"].strip() in row["prompt"]
        assert row["question"] == src["question"].strip() and row["datasource"] == "gsm8k"
    assert f"wrote 5 rows to {out.resolve()}" in stdout and "skipped 0 rows" in stdout
    assert "--data.input_key prompt --data.label_key answer" in stdout and "apply_chat_template" not in stdout

    # OpenRLHF reads (prompt, label) pairs without a chat template
    read_back = openrlhf_read(out, chat_tokenizer(), False, monkeypatch, tmp_path)
    assert [(p, lab) for _, p, lab, _ in read_back] == [(r["prompt"], r["answer"]) for r in rows]
    assert {ds for ds, _, _, _ in read_back} == {"gsm8k"}
    # the local backend reads the same file with its default keys and builds the same prompts
    local = load_jsonl(str(out), "question", "answer", R1_SYSTEM_PROMPT)
    assert [(e.prompt, e.label) for e in local] == [(r["prompt"], r["answer"]) for r in rows]


@needs_gsm8k
def test_gsm8k_chat_messages(tmp_path, capsys, monkeypatch):
    out = tmp_path / "chat.jsonl"
    code, stdout, _ = run(["gsm8k", "--input", GSM8K_TEST, "--split", "test", "--limit", 3, "--chat-template",
                           "--out", out], capsys)
    assert code == 0 and "--data.apply_chat_template" in stdout
    rows, sources = read(out), source_rows(3)
    for row, src in zip(rows, sources):
        assert row["prompt"] == [
            {"role": "system", "content": R1_SYSTEM_PROMPT},
            {"role": "user", "content": src["question"].strip()},
        ]
        assert row["answer"] == gsm8k_label(src["answer"])

    tokenizer = chat_tokenizer()
    read_back = openrlhf_read(out, tokenizer, True, monkeypatch, tmp_path)
    template = tokenizer.apply_chat_template
    expected = [(template(r["prompt"], tokenize=False, add_generation_prompt=True), r["answer"]) for r in rows]
    assert [(p, lab) for _, p, lab, _ in read_back] == expected
    first = read_back[0][1]
    assert first.startswith(f"<|im_start|>system\n{R1_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nJanet")
    assert first.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_gsm8k_label_details_and_skips(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"question": "Big?", "answer": "work\n#### 1,080"},
        {"question": "Neg?", "answer": "a #### b\n#### -5"},  # the last "####" counts
        {"question": "No marker?", "answer": "just 5"},
        {"question": "  ", "answer": "#### 3"},
        {"question": "Big?", "answer": "#### 1080"},  # duplicate question
    ])
    out = tmp_path / "out.jsonl"
    code, stdout, _ = run(["gsm8k", "--input", src, "--out", out], capsys)
    assert code == 0
    assert [(r["question"], r["answer"]) for r in read(out)] == [("Big?", "1080"), ("Neg?", "-5")]
    assert "wrote 2 rows" in stdout
    assert "skipped 3 rows:" in stdout
    for reason in ("1 answer without '####'", "1 empty question", "1 duplicate question"):
        assert reason in stdout
    code, _, _ = run(["gsm8k", "--input", src, "--out", out, "--keep-duplicates"], capsys)
    assert code == 0 and len(read(out)) == 3


def test_math500(tmp_path, capsys):
    src = write_jsonl(tmp_path / "test.jsonl", [
        {"problem": "Compute $\\frac{1}{2}+\\frac{1}{4}$.", "solution": "... $\\boxed{\\frac{3}{4}}$",
         "answer": "\\frac{3}{4}", "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"},
        {"problem": "Convert $(0,3)$ to polar.", "solution": "...", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)"},
    ])
    out = tmp_path / "m.jsonl"
    code, stdout, _ = run(["math500", "--input", src, "--out", out], capsys)  # split defaults to test
    assert code == 0 and "math500 test" in stdout and "--eval.dataset" in stdout
    rows = read(out)
    assert [r["answer"] for r in rows] == ["\\frac{3}{4}", "\\left( 3, \\frac{\\pi}{2} \\right)"]
    assert rows[0]["prompt"] == r1_prompt("Compute $\\frac{1}{2}+\\frac{1}{4}$.", R1_SYSTEM_PROMPT)
    assert {r["datasource"] for r in rows} == {"math500"}


def dapo_row(problem: str, answer: str, index: int) -> dict:
    """The hub layout of BytedTsinghua-SIA/DAPO-Math-17k."""
    return {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": DAPO_INSTRUCTION + problem + DAPO_REMINDER}],
        "ability": "MATH",
        "reward_model": {"style": "rule-lang", "ground_truth": answer},
        "extra_info": {"index": f"id-{index}"},
    }


def test_dapo_parquet_strips_its_instructions_and_dedups(tmp_path, capsys, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    problems = [("Find $x$ if $2x=10$.", "5"), ("How many primes are below 10?", "4")]
    rows = [dapo_row(p, a, i) for i, (p, a) in enumerate(problems * 3)]  # each problem three times
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dapo-math-17k.parquet")
    out = tmp_path / "dapo.jsonl"
    argv = ["dapo", "--input", tmp_path / "dapo-math-17k.parquet", "--chat-template", "--out", out]
    code, stdout, _ = run(argv, capsys)
    assert code == 0 and "dapo train" in stdout and "4 duplicate question" in stdout
    got = read(out)
    assert [(r["question"], r["answer"]) for r in got] == problems
    assert got[0]["prompt"] == [{"role": "system", "content": R1_SYSTEM_PROMPT},
                                {"role": "user", "content": problems[0][0]}]
    # the processed copies keep the prompt as a plain string; --limit counts rows written
    processed = [{"prompt": p, "reward_model": {"ground_truth": a}} for p, a in problems]
    src = write_jsonl(tmp_path / "processed.jsonl", processed)
    code, _, _ = run(["dapo", "--input", src, "--limit", 1, "--out", out], capsys)
    assert code == 0 and [(r["question"], r["answer"]) for r in read(out)] == problems[:1]


@pytest.mark.parametrize(
    "dataset, rows, message",
    [
        ("gsm8k", [{"question": "a", "answer": "#### 1"}, {"question": "b"}], "in.jsonl:2: missing field 'answer'"),
        ("math500", [{"problem": "a"}], "in.jsonl:1: missing field 'answer'"),
        ("dapo", [{"prompt": [{"role": "user", "content": "x"}], "reward_model": {"style": "rule"}}],
         "in.jsonl:1: missing field 'reward_model.ground_truth'"),
        ("gsm8k", ["not an object"], "in.jsonl:1: expected a JSON object, got str"),
        ("gsm8k", [{"question": "a", "answer": "no marker"}], "no usable rows (1 answer without '####')"),
    ],
)
def test_bad_rows_are_one_line_errors(tmp_path, capsys, dataset, rows, message):
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    code, stdout, stderr = run([dataset, "--input", src, "--split", "train" if dataset != "math500" else "test",
                                "--out", out], capsys)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("prepare_data.py: error: ") and message in stderr
    assert not out.exists() and not (tmp_path / "out.jsonl.tmp").exists()  # no partial output


@pytest.mark.parametrize(
    "argv, message",
    [
        (["gsm9k", "--input", "x.jsonl"], "unknown dataset 'gsm9k', expected one of gsm8k, math500, dapo"),
        (["gsm8k", "--input", "/no/such/file.jsonl"], "input file not found: /no/such/file.jsonl"),
        (["math500", "--split", "train"], "math500 has no 'train' split: it is an evaluation set (use --split test)"),
        (["dapo", "--split", "test"], "dapo has no 'test' split: it is a training set (use --split train)"),
        (["gsm8k", "--split", "validation"], "gsm8k has no 'validation' split"),
        (["gsm8k", "--input", GSM8K_TEST, "--limit", "0"], "--limit: got 0, expected a positive number of rows"),
    ],
)
def test_argument_errors(tmp_path, capsys, argv, message):
    code, stdout, stderr = run(argv + ["--out", tmp_path / "o.jsonl"], capsys)
    assert code == 2 and stdout == "" and stderr.count("\n") == 1 and message in stderr


def test_invalid_json_and_file_type(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "#### 1"}\n{oops\n', encoding="utf-8")
    code, _, stderr = run(["gsm8k", "--input", bad, "--out", tmp_path / "o.jsonl"], capsys)
    assert code == 2 and f"{bad}:2: not valid JSON" in stderr
    csv = tmp_path / "data.csv"
    csv.write_text("question,answer\n", encoding="utf-8")
    code, _, stderr = run(["gsm8k", "--input", csv, "--out", tmp_path / "o.jsonl"], capsys)
    assert code == 2 and "unsupported file type '.csv'" in stderr


@needs_gsm8k
def test_command_line(tmp_path):
    """As a user runs it: exit status and a one-line error from a separate process."""
    out = tmp_path / "o.jsonl"
    ok = subprocess.run([sys.executable, str(SCRIPT), "gsm8k", "--input", str(GSM8K_TEST), "--split", "test",
                         "--limit", "2", "--out", str(out)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert len(read(out)) == 2
    bad = subprocess.run([sys.executable, str(SCRIPT), "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "prepare_data.py: error: unknown dataset 'nope', expected one of gsm8k, math500, dapo"
    ]


# ── the authors' prompt (--style paper) and held-out splits (--holdout) ──

@needs_gsm8k
def test_paper_style_is_the_authors_prompt_and_openrlhf_renders_it(tmp_path, capsys, monkeypatch):
    from iapo_openrlhf.data import PAPER_SYSTEM_PROMPT, paper_messages

    out = tmp_path / "paper.jsonl"
    code, stdout, _ = run(["gsm8k", "--input", GSM8K_TEST, "--split", "test", "--limit", 2, "--style", "paper",
                           "--out", out], capsys)
    assert code == 0 and "(the authors' chat prompt)" in stdout and "--data.apply_chat_template" in stdout
    rows, sources = read(out), source_rows(2)
    system = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it.\n"
              "    The assistant first thinks about the reasoning process in the mind and then provides the user\n"
              "    with the answer. The reasoning process and answer are enclosed within <think> and\n"
              "    <answer> tags, respectively, i.e., <think> reasoning process here </think>\n"
              "    <answer> answer here </answer>.\nThe answer must be a single integer.")
    assert rows[0]["prompt"] == [
        {"role": "system", "content": system},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant",
         "content": "<think>To calculate 2+2, we simply add the numbers together: 2 + 2 = 4.</think>\n<answer>4</answer>"},
        {"role": "user", "content": sources[0]["question"].strip()},
    ]
    assert paper_messages("q", "math500")[0]["content"] == PAPER_SYSTEM_PROMPT + "\n"  # no instruction for MATH-500
    tokenizer = chat_tokenizer()
    read_back = openrlhf_read(out, tokenizer, True, monkeypatch, tmp_path)
    assert [p for _, p, _, _ in read_back] == [tokenizer.apply_chat_template(r["prompt"], tokenize=False,
                                                                             add_generation_prompt=True) for r in rows]
    # the local backend reads the same messages and renders them with the same template
    from iapo_openrlhf.data import load_jsonl as load, render_chat

    local = render_chat(load(str(out), "question", "answer", None, chat=True), tokenizer)
    assert [e.prompt for e in local] == [p for _, p, _, _ in read_back]


def test_holdouts_are_disjoint_seeded_and_keep_the_input_order(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"question": f"Q{i}?", "answer": f"#### {i}"} for i in range(500)])
    out, test, val = tmp_path / "train.jsonl", tmp_path / "test.jsonl", tmp_path / "val.jsonl"
    argv = ["gsm8k", "--input", src, "--holdout", f"0.2:{test}", "--holdout", f"50:{val}", "--out", out]
    code, stdout, _ = run(argv, capsys)
    assert code == 0 and f"held out 100 rows to {test.resolve()} (seed 42)" in stdout
    ids = {name: [int(r["answer"]) for r in read(path)] for name, path in (("train", out), ("test", test), ("val", val))}
    assert [len(v) for v in ids.values()] == [350, 100, 50]
    assert sorted(ids["train"] + ids["test"] + ids["val"]) == list(range(500))  # disjoint, nothing lost
    assert all(v == sorted(v) for v in ids.values())
    # the authors' construction: Python's shuffle under the seed, the last 20 % held out
    import random

    order = list(range(500))
    random.Random(42).shuffle(order)
    assert ids["test"] == sorted(order[400:]) and ids["val"] == sorted(order[350:400])
    # same seed, same split; another seed, another split
    code, _, _ = run(argv, capsys)
    assert code == 0 and [int(r["answer"]) for r in read(test)] == ids["test"]
    code, _, _ = run(argv + ["--holdout-seed", "7"], capsys)
    assert code == 0 and [int(r["answer"]) for r in read(test)] != ids["test"]
    # --limit takes the first usable rows before holding out
    code, _, _ = run(["gsm8k", "--input", src, "--limit", "10", "--holdout", f"0.2:{test}", "--out", out], capsys)
    assert code == 0 and sorted(int(r["answer"]) for r in read(out) + read(test)) == list(range(10))


@pytest.mark.parametrize("holdouts, message", [
    (["0.2"], "--holdout 0.2: expected SIZE:FILE with SIZE a row count (500) or a fraction in (0, 1)"),
    (["1.5:x.jsonl"], "--holdout 1.5:x.jsonl: expected SIZE:FILE"),
    (["0:x.jsonl"], "--holdout 0:x.jsonl: expected SIZE:FILE"),
    (["abc:x.jsonl"], "--holdout abc:x.jsonl: expected SIZE:FILE"),
    (["3:a.jsonl", "2:b.jsonl"], "--holdout: 5 held-out rows of 5 usable ones leave none for --out"),
    (["1:OUT"], "--holdout: every holdout FILE must differ from --out and from the other holdouts"),
])
def test_holdout_errors(tmp_path, capsys, holdouts, message):
    src = write_jsonl(tmp_path / "in.jsonl", [{"question": f"Q{i}?", "answer": f"#### {i}"} for i in range(5)])
    out = tmp_path / "o.jsonl"
    argv = ["gsm8k", "--input", src, "--out", out]
    for h in holdouts:
        argv += ["--holdout", h.replace("OUT", str(out)).replace("a.jsonl", str(tmp_path / "a.jsonl"))]
    code, stdout, stderr = run(argv, capsys)
    assert code == 2 and stdout == "" and stderr.count("\n") == 1 and message.replace("a.jsonl", str(tmp_path / "a.jsonl")) in stderr
    assert not out.exists()
