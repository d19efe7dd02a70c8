"""Offline compute nodes: `iapo-slurm prefetch` and the submit-time check that the model is there.

There is no network here: prefetch runs against a local stand-in for the Hugging Face Hub
(tests/hub_server.py, an HTTP server speaking the part of the Hub API that huggingface_hub's
snapshot_download and datasets' load_dataset use), with HF_ENDPOINT pointing at it. Nothing is
stubbed inside iapo-openrlhf or the libraries: the real huggingface_hub and datasets download
into the cache, and the models and datasets are then loaded back with the hub offline
(HF_HUB_OFFLINE=1, the endpoint pointing at a closed port), as the job will.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from hub_server import STUB_MODEL, HubServer, cache_model
from iapo_openrlhf import hub
from iapo_openrlhf import slurm as iapo_slurm
from iapo_openrlhf.config import load_config

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-org/tiny-qwen"
DATASET = "tiny-org/prompts"


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory):
    """A "hub" with a tiny Qwen2 (config, safetensors weights, tokenizer) and a prompt dataset."""
    from transformers import AutoModelForCausalLM

    from iapo_openrlhf.tasks.synthetic import build_tokenizer
    from iapo_openrlhf.tasks.warmstart import tiny_qwen2_config

    root = tmp_path_factory.mktemp("hub")
    tokenizer = build_tokenizer()
    model_dir = root / "models" / MODEL
    AutoModelForCausalLM.from_config(tiny_qwen2_config(tokenizer, num_layers=1)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "README.md").write_text("not fetched: only what from_pretrained reads is\n")
    data = root / "datasets" / DATASET / "data"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(5)))
    return root


@pytest.fixture(scope="module")
def local_hub(hub_root):
    with HubServer(hub_root) as server:
        yield server


def ray_config(tmp_path: Path, model: str, **data) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "qwen2.5-0.5b_gsm8k.yaml").read_text())
    cfg["model"]["path"] = model
    cfg["data"].update(data)
    cfg["output"]["dir"] = str(tmp_path / "out")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def iapo_slurm_cli(*args: str, env: dict | None = None, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "iapo_openrlhf.slurm", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})})


def submit_dry_run(capsys, *args: str) -> tuple[int, str, str]:
    code = iapo_slurm.main(["submit", "--dry-run", "--no-check", *args])
    out, err = capsys.readouterr()
    return code, out, err


# -- prefetch through a local hub, then submit ----------------------------------------------------

def test_prefetch_then_submit_then_offline_load(local_hub, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.jsonl").write_text('{"prompt": "q", "answer": "1"}\n')
    config = ray_config(tmp_path, MODEL, train_path="data/train.jsonl", test_path="data/test.jsonl")
    cache = tmp_path / "cache"
    online = {"HF_ENDPOINT": local_hub.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp_path / "elsewhere")}
    # the prompt dataset from the hub, given the way OpenRLHF options are (after --)
    result = iapo_slurm_cli("prefetch", "--config", str(config), "--cache-dir", str(cache),
                            "--", "--data.prompt_dataset", DATASET, env=online, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"model {MODEL} (model.path): ok, loads offline (qwen2, tokenizer of " in out
    assert f"dataset {DATASET} (--data.prompt_dataset): ok, loads offline (train: 5 rows)" in out
    assert "dataset data/test.jsonl (data.test_path): local file, nothing to fetch" in out
    snapshot = hub.snapshot_dir(MODEL, cache / "hub")
    assert snapshot is not None and hub.missing_model_files(snapshot) == []
    assert not (snapshot / "README.md").exists()  # only what the training reads
    assert (cache / "datasets" / "tiny-org___prompts").is_dir()
    assert not (tmp_path / "elsewhere").exists()  # --cache-dir, not the caller's HF_HOME
    fetched = {path for method, path in local_hub.requests if method == "GET"}
    assert f"/api/models/{MODEL}/revision/main" in fetched and any(p.startswith(f"/api/datasets/{DATASET}") for p in fetched)
    assert any(p.startswith(f"/{MODEL}/resolve/") and p.endswith("model.safetensors") for p in fetched)

    # what the job does: load everything with the hub offline and no reachable endpoint
    job_env = {**hub.job_env(cache), "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    check = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import datasets
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({MODEL!r})
        tokenizer = AutoTokenizer.from_pretrained({MODEL!r})
        rows = datasets.load_dataset({DATASET!r})["train"]
        print("LOADED", type(model).__name__, len(tokenizer), len(rows))
        """)], capture_output=True, text=True, env={**os.environ, **job_env})
    assert "LOADED Qwen2ForCausalLM" in check.stdout and check.stdout.strip().endswith(" 5"), check.stderr[-2000:]

    # submit: the model and the dataset are in the cache, the job runs offline on it; no hub request
    requests = len(local_hub.requests)
    code, script, err = submit_dry_run(capsys, "--config", str(config), "--cache-dir", str(cache),
                                       "--", "--data.prompt_dataset", DATASET)
    assert code == 0, err
    job_line = next(line for line in script.splitlines() if line.startswith("JOB_ENV=("))
    assert f"HF_HOME={cache}" in job_line and "HF_HUB_OFFLINE=1" in job_line and "HF_DATASETS_OFFLINE=1" in job_line
    assert len(local_hub.requests) == requests

    # the same submit with an empty cache: one line, exit 2, saying what to run
    code, out, err = submit_dry_run(capsys, "--config", str(config), "--cache-dir", str(tmp_path / "empty"),
                                    "--", "--data.prompt_dataset", DATASET)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"iapo-slurm: error: model.path {MODEL}: no such directory here, and not in the cache ")
    assert (f"run `iapo-slurm prefetch --config {config} --cache-dir {tmp_path / 'empty'} -- --data.prompt_dataset "
            f"{DATASET}` on this node first") in err
    # the model cached but not the hub dataset
    cache_model(tmp_path / "only-model", MODEL)
    code, _, err = submit_dry_run(capsys, "--config", str(config), "--cache-dir", str(tmp_path / "only-model"),
                                  "--", "--data.prompt_dataset", DATASET)
    assert code == 2 and err.startswith(f"iapo-slurm: error: --data.prompt_dataset {DATASET}: hub dataset not in the cache")


def test_prefetch_of_a_model_the_hub_does_not_have_fails_in_one_line(local_hub, tmp_path):
    config = ray_config(tmp_path, "tiny-org/no-such-model", train_path="data/train.jsonl", test_path=None)
    result = iapo_slurm_cli("prefetch", "--config", str(config), "--cache-dir", str(tmp_path / "cache"),
                            env={"HF_ENDPOINT": local_hub.url}, cwd=tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("iapo-slurm")]
    assert errors == [f"iapo-slurm prefetch: error: download failed: model tiny-org/no-such-model (model.path): "
                      f"RepositoryNotFoundError: {errors[0].split('RepositoryNotFoundError: ', 1)[-1]}"], result.stderr
    assert hub.snapshot_dir("tiny-org/no-such-model", tmp_path / "cache" / "hub") is None


def test_prefetch_with_nothing_to_fetch(tmp_path, capsys):
    """A local model directory and local data files: nothing goes to the hub."""
    model = tmp_path / "model"
    model.mkdir()
    for name, data in STUB_MODEL.items():
        (model / name).write_bytes(data)
    config = ray_config(tmp_path, str(model), train_path=str(tmp_path / "train.jsonl"), test_path=None)
    code = iapo_slurm.main(["prefetch", "--config", str(config), "--cache-dir", str(tmp_path / "cache"),
                            "--", f"--eval.dataset={tmp_path / 'missing.jsonl'}"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"model {model} (model.path): local directory, nothing to fetch" in out
    assert f"(warning: {tmp_path / 'train.jsonl'} does not exist here)" in out
    assert f"dataset {tmp_path / 'missing.jsonl'} (--eval.dataset): local file" in out


# -- the submit-time check: local directory / cache, present / absent / incomplete ------------------

def test_submit_accepts_a_complete_local_model_directory_without_any_cache(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for name, data in STUB_MODEL.items():
        (model / name).write_bytes(data)
    config = ray_config(tmp_path, str(model))
    code, script, err = submit_dry_run(capsys, "--config", str(config), "--cache-dir", str(tmp_path / "no-cache"))
    assert code == 0, err
    assert "HF_HUB_OFFLINE=1" in script


@pytest.mark.parametrize("case", ["absent-dir", "incomplete-dir", "incomplete-cache", "sharded-cache", "online"])
def test_submit_check_of_the_model(case, tmp_path, capsys):
    cache = tmp_path / "cache"
    model = str(tmp_path / "model")
    if case == "incomplete-dir":
        Path(model).mkdir()
        (Path(model) / "config.json").write_text("{}")  # no weights, no tokenizer
    elif case == "incomplete-cache":
        model = "org/model"
        cache_model(cache, model, {"config.json": b"{}", "tokenizer.json": b"{}"})  # weights missing
    elif case == "sharded-cache":
        model = "org/model"
        index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        cache_model(cache, model, {"config.json": b"{}", "tokenizer.json": b"{}",
                                   "model.safetensors.index.json": json.dumps(index).encode(),
                                   "model-00001-of-00002.safetensors": b"x"})  # a shard missing
    elif case == "online":
        model = "org/not-cached"
    config = ray_config(tmp_path, model)
    extra = ["--online"] if case == "online" else []
    code, out, err = submit_dry_run(capsys, "--config", str(config), "--cache-dir", str(cache), *extra)
    if case == "online":  # compute nodes reach the hub: no check, no offline mode
        assert code == 0 and "HF_HUB_OFFLINE" not in out
        return
    assert code == 2 and out == "" and err.count("\n") == 1, err
    expected = {
        "absent-dir": f"model.path {model}: no such directory here, and not a hub name like Qwen/Qwen2.5-7B-Instruct",
        "incomplete-dir": f"model.path {model}: incomplete in the directory (missing model.safetensors or "
                          "pytorch_model.bin, a tokenizer (tokenizer.json, tokenizer_config.json, tokenizer.model, "
                          "vocab.json)): expected a saved HF model",
        "incomplete-cache": f"model.path org/model: incomplete in the cache {cache} (missing model.safetensors or "
                            "pytorch_model.bin): run `iapo-slurm prefetch",
        "sharded-cache": f"model.path org/model: incomplete in the cache {cache} "
                         "(missing model-00002-of-00002.safetensors): run `iapo-slurm prefetch",
    }[case]
    assert err.startswith("iapo-slurm: error: " + expected), err


def test_submit_checks_every_model_the_options_name(tmp_path, capsys):
    """A reward model named after -- is checked like the actor."""
    cache = tmp_path / "cache"
    cache_model(cache, "org/actor")
    config = ray_config(tmp_path, "org/actor")
    code, _, err = submit_dry_run(capsys, "--config", str(config), "--cache-dir", str(cache),
                                  "--", "--reward.model_name_or_path", "org/rm")
    assert code == 2 and err.startswith("iapo-slurm: error: --reward.model_name_or_path org/rm: no such directory")
    cache_model(cache, "org/rm")
    code, _, err = submit_dry_run(capsys, "--config", str(config), "--cache-dir", str(cache),
                                  "--", "--reward.model_name_or_path", "org/rm")
    assert code == 0, err


def test_needs_follows_openrlhf_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "saved").mkdir()
    config = ray_config(tmp_path, "Qwen/Qwen2.5-7B-Instruct", train_path="data/train.jsonl", test_path="org/eval@sub")
    cfg = load_config(str(config), ["cluster.extra_args=--reward.model_name_or_path org/rm1,org/rm2"], local_files=False)
    items = hub.needs(cfg, ["--data.prompt_dataset", "org/a, saved ,x.parquet", "--actor.model_name_or_path=org/b"])
    assert [(n.kind, n.name, n.source, n.local, n.data_dir) for n in items] == [
        ("model", "org/b", "--actor.model_name_or_path", False, None),
        ("model", "org/rm1", "--reward.model_name_or_path", False, None),
        ("model", "org/rm2", "--reward.model_name_or_path", False, None),
        ("dataset", "org/a", "--data.prompt_dataset", False, None),
        ("dataset", "saved", "--data.prompt_dataset", True, None),
        ("dataset", "x.parquet", "--data.prompt_dataset", True, None),
        ("dataset", "org/eval", "data.test_path", False, "sub"),
    ]
    with pytest.raises(hub.NeedError, match=r"^--data.prompt_dataset /nope/dir: no such file or directory here"):
        hub.needs(cfg, ["--data.prompt_dataset", "/nope/dir"])


def test_prefetch_errors_are_one_line(tmp_path, capsys):
    config = ray_config(tmp_path, "/no/such/model")
    for args, message in [
        (["--config", str(tmp_path / "nope.yaml")], "--config"),
        (["--config", str(config)], "model.path /no/such/model: no such directory here, and not a hub name"),
        (["--config", str(config), "--set", "method=nope"], "method: got 'nope'"),
    ]:
        code = iapo_slurm.main(["prefetch", *args])
        out, err = capsys.readouterr()
        assert code == 2 and err.count("\n") == 1 and err.startswith("iapo-slurm: error: ") and message in err, err
