"""configs/paper/: the authors' settings for every model x dataset, parsed for both backends and every
method (the 7B ones through OpenRLHF's real parser); the new config keys and their errors; a paper
config driving the local backend end to end on the authors' prompt (tiny model, GSM8K rows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iapo_openrlhf.config import METHODS, ConfigError, group_size, load_config
from iapo_openrlhf.data import PAPER_SYSTEM_PROMPT, load_jsonl, render_chat
from iapo_openrlhf.openrlhf.config_args import openrlhf_args
from test_prepare_data import load_script

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper"
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
CONFIGS = sorted(p.name for p in PAPER.glob("*.yaml"))
# the authors' best (surprise, confidence) weights per model x dataset (issue 16)
WEIGHTS = {
    ("0.5b", "gsm8k"): (1, 1), ("1.5b", "gsm8k"): (1, 1), ("7b", "gsm8k"): (1, 1e-6),
    ("0.5b", "math500"): (1, 1e-6), ("1.5b", "math500"): (1e-6, 1e-6), ("7b", "math500"): (1e-6, 1e-6),
    ("0.5b", "dapo17k"): (1e-6, 1e-2), ("1.5b", "dapo17k"): (1e-2, 1e-4), ("7b", "dapo17k"): (1e-6, 1e-6),
}


def _option(argv: list[str], name: str, n: int = 1):
    i = argv.index(name)
    return argv[i + 1] if n == 1 else argv[i + 1 : i + 1 + n]


def test_one_config_per_model_and_dataset():
    assert CONFIGS == sorted(f"qwen2.5-{m}_{d}.yaml" for m, d in WEIGHTS)


@pytest.mark.parametrize("name", CONFIGS)
def test_authors_settings_for_every_method(name):
    size, dataset = name[len("qwen2.5-"):-len(".yaml")].split("_")
    for method in METHODS:
        cfg = load_config(str(PAPER / name), [f"method={method}"], local_files=False)
        t, r = cfg.train, cfg.rollout
        assert (t.lr, t.adam_betas, t.kl_coef, t.ppo_epochs, t.lr_scheduler, t.lr_warmup_ratio) == (
            1e-6, [0.9, 0.99], 0.001, 1, "linear", 0.0)
        assert (r.n_samples_per_prompt, r.temperature, r.max_new_tokens) == (8, 1.0, 2048)
        assert r.prompts_per_step == (16 if size == "7b" else 12)
        assert t.epochs == (152 if dataset == "math500" else 2) and t.steps % t.epochs == 0
        assert cfg.cluster.max_prompt_tokens == 512 and cfg.reward.scheme == "paper" and cfg.reward.format == "authors"
        assert cfg.data.system_prompt == "paper" and cfg.data.val_path and cfg.data.val_path != cfg.data.test_path
        i = cfg.iapo
        assert (i.alpha, i.beta) == pytest.approx(WEIGHTS[(size, dataset)])
        assert (i.shaping_norm, i.exploration, i.predict_mode, i.mi_smoothing) == ("authors", "entropy", "postfix",
                                                                                    "official")
        # the authors' per-method loss: clip-high 0.28 and token mean for IAPO and DAPO only
        clip_high = 0.28 if method in ("iapo", "dapo", "ib", "significance") else 0.2
        assert (t.clip_eps_low, t.clip_eps_high) == (0.2, clip_high)
        assert t.loss_agg == ("seq_mean" if method in ("gfpo", "sgrpo") else "token_mean")
        assert group_size(cfg) == (6 if method == "gfpo" else 8)
        if cfg.cluster.nodes * cfg.cluster.gpus_per_node:
            dp = cfg.cluster.nodes * cfg.cluster.gpus_per_node // cfg.cluster.tensor_parallel_size
            samples = r.prompts_per_step * group_size(cfg)
            assert samples % (t.micro_batch_size * dp) == 0, (method, samples)  # DeepSpeed's accumulation
        argv = openrlhf_args(cfg, "reward.py")
        assert _option(argv, "--actor.adam.betas", 2) == ["0.9", "0.99"]
        assert _option(argv, "--actor.lr_scheduler") == "linear" and _option(argv, "--actor.lr_warmup_ratio") == "0.0"
        assert _option(argv, "--train.num_episodes") == str(t.epochs)
        assert int(_option(argv, "--data.max_samples")) == t.steps // t.epochs * r.prompts_per_step
        assert "--data.apply_chat_template" in argv and _option(argv, "--data.input_key") == "prompt"
        assert _option(argv, "--eval.dataset") == cfg.data.val_path  # in-training evaluations never read test
        assert "--algo.dynamic_filtering_enable" not in argv and "--reward.overlong_buffer_len" not in argv
    assert (PAPER / name).read_text().count("theirs") >= 10  # the differences are said in the file


@pytest.mark.parametrize("name", [n for n in CONFIGS if n.startswith("qwen2.5-7b")])
def test_7b_configs_pass_openrlhfs_parser_for_every_method(name, monkeypatch):
    from iapo_openrlhf.openrlhf import launch

    monkeypatch.delenv(launch.SCHEME_ENV, raising=False)
    monkeypatch.delenv(launch.FORMAT_ENV, raising=False)
    for method in METHODS:
        argv = ["--config", str(PAPER / name), "--set", f"method={method}", "--dry-run"]
        args = launch.parse_args(launch.expand_config(argv))
        assert args.actor.adam.betas == [0.9, 0.99] and args.actor.lr_scheduler == "linear"
        assert args.rollout.batch_size == 16 and args.rollout.n_samples_per_prompt == 8
        assert args.data.max_len == 512 + 2048 and args.train.num_episodes in (2, 152)
        assert args.algo.kl.use_loss and args.algo.kl.estimator == "k3" and args.algo.kl.init_coef == 0.001
        assert args.iapo.method == method and args.iapo.shaping_norm == "authors"
        assert args.ds.tensor_parallel_size == 2 and args.actor.num_nodes == 2
    import os

    assert os.environ[launch.FORMAT_ENV] == "authors" and os.environ[launch.SCHEME_ENV] == "paper"


# -- the new keys: errors are one line, with the fix ---------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (["train.epochs=0"], "train.epochs: got 0, expected an integer >= 1"),
    (["train.epochs=2", "train.steps=5"], "train.steps: got 5 with train.epochs 2, expected a multiple"),
    (["train.adam_betas=[0.9]"], "train.adam_betas: got [0.9], expected two numbers in [0, 1)"),
    (["train.adam_betas=0.9,1.5"], "train.adam_betas: got [0.9, 1.5]"),
    (["train.adam_betas=a,b"], "train.adam_betas: got 'a,b', expected comma-separated floats"),
    (["train.lr_scheduler=cosine"], "train.lr_scheduler: got 'cosine', expected one of"),
    (["train.lr_warmup_ratio=1.5"], "train.lr_warmup_ratio: got 1.5, expected a number in [0, 1)"),
    (["reward.format=strict"], "reward.format: got 'strict', expected one of ['r1', 'authors']"),
    (["data.system_prompt=paper"], "data.system_prompt: paper is a prompt file's chat messages, expected data.task=jsonl"),
    (["data.task=jsonl", "data.train_path=t.jsonl", "data.test_path=x.jsonl", "data.val_path=./x.jsonl"],
     "data.val_path: ./x.jsonl is the test split; checkpoints are selected on a validation split"),
    (["per_method.grpo.train.lr=1"], "--set per_method.grpo.train.lr=1: per_method is set in the file only"),
])
def test_new_config_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(str(ROOT / "configs" / "local_tiny.yaml"), overrides, local_files=False)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("per_method,message", [
    ("per_method: [1]", "per_method: got [1], expected a mapping of method -> settings"),
    ("per_method: {ppo: {train: {lr: 1}}}", "per_method.ppo: unknown method"),
    ("per_method: {grpo: {method: dapo}}", "per_method.grpo: expected a mapping of sections"),
    ("per_method: {grpo: {train: {lrr: 1}}}\nmethod: grpo", "train.lrr: unknown key"),
])
def test_per_method_errors(tmp_path, per_method, message):
    path = tmp_path / "c.yaml"
    path.write_text((ROOT / "configs" / "local_tiny.yaml").read_text() + per_method + "\n")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(str(path), local_files=False)


def test_per_method_applies_to_its_method_only_and_set_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text((ROOT / "configs" / "local_tiny.yaml").read_text()
                    + "per_method:\n  grpo: {train: {clip_eps_high: 0.3}}\n  gfpo: {gfpo: {keep: 6}}\n")
    assert load_config(str(path), local_files=False).train.clip_eps_high == 0.2  # method iapo
    assert load_config(str(path), ["method=grpo"], local_files=False).train.clip_eps_high == 0.3
    assert load_config(str(path), ["method=grpo", "train.clip_eps_high=0.25"], local_files=False).train.clip_eps_high == 0.25
    assert load_config(str(path), ["method=gfpo"], local_files=False).gfpo.keep == 6  # no "gfpo.* with iapo" error


# -- the local backend on a paper config ----------------------------------------------------------------

@pytest.mark.skipif(not GSM8K.exists(), reason="../shared/data/gsm8k not beside the checkout")
def test_paper_config_drives_the_local_backend(tmp_path, capsys):
    """configs/paper/qwen2.5-0.5b_gsm8k.yaml with a tiny model on 40 GSM8K rows prepared as the README
    says: the authors' chat prompt, their format check, two epochs, their optimizer and schedule."""
    from iapo_openrlhf.cli.train import main as train_main

    rows = GSM8K / "train.jsonl"
    small = tmp_path / "train40.jsonl"
    small.write_text("".join(rows.read_text().splitlines(keepends=True)[:40]))
    prepare = load_script()  # scripts/prepare_data.py
    data = tmp_path / "data"
    assert prepare.main(["gsm8k", "--input", str(small), "--split", "train", "--style", "paper",
                         "--holdout", f"8:{data / 'val.jsonl'}", "--out", str(data / "train.jsonl")]) == 0
    assert prepare.main(["gsm8k", "--input", str(small), "--split", "test", "--style", "paper",
                         "--limit", "4", "--out", str(data / "test.jsonl")]) == 0
    capsys.readouterr()
    first = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    assert first["prompt"][0]["content"] == PAPER_SYSTEM_PROMPT + "\nThe answer must be a single integer."
    assert [m["role"] for m in first["prompt"]] == ["system", "user", "assistant", "user"]
    out = tmp_path / "run"
    sets = [f"data.train_path={data / 'train.jsonl'}", f"data.val_path={data / 'val.jsonl'}",
            f"data.test_path={data / 'test.jsonl'}", "model.path=null", "model.dtype=float32",
            "train.steps=2", "rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=2",
            "rollout.max_new_tokens=24", "train.micro_batch_size=4", "eval.every=0", "eval.k=[1]",
            "data.num_test=2", f"output.dir={out}", "output.save_every=0", "device=cpu"]
    argv = ["--config", str(PAPER / "qwen2.5-0.5b_gsm8k.yaml"), "--quiet"]
    for item in sets:
        argv += ["--set", item]
    assert train_main(argv) == 0, capsys.readouterr().err
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [s for s in steps if "eval" not in s]
    assert [s["step"] for s in train] == [1, 2]
    assert train[0]["lr"] == pytest.approx(1e-6) and train[1]["lr"] == pytest.approx(0.5e-6)  # linear decay to 0
    # a random tiny model never formats: -1 (wrong) - 0.5 (the authors' format check)
    assert all(s["reward"] == -1.5 and s["format_ok"] == 0.0 for s in train)
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["adam_betas"] == [0.9, 0.99] and saved["reward"]["format"] == "authors"
    # the prompts the model saw: the tiny tokenizer's ChatML, the assistant turn opened, no <think>
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    (example,) = render_chat(load_jsonl(str(data / "test.jsonl"), "question", "answer", None, chat=True)[:1], tokenizer)
    assert example.prompt.startswith("<|im_start|>system\nA conversation between User and Assistant.")
    assert "What is 2+2?<|im_end|>" in example.prompt and example.prompt.endswith("<|im_start|>assistant\n")


def test_chat_prompts_need_a_chat_template(tmp_path):
    from iapo_openrlhf.tasks.synthetic import build_tokenizer

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "1+1?"}], "question": "1+1?", "answer": "2"}) + "\n")
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="renders chat messages with the model's chat template, but this tokenizer has none"):
        render_chat(load_jsonl(str(path), "question", "answer", None, chat=True), tokenizer)
    path.write_text(json.dumps({"prompt": "plain text", "question": "1+1?", "answer": "2"}) + "\n")
    with pytest.raises(ConfigError, match="p.jsonl:1: data.system_prompt paper expects chat messages under 'prompt', got str"):
        load_jsonl(str(path), "question", "answer", None, chat=True)
