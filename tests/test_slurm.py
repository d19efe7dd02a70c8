"""iapo-slurm: the rendered sbatch script (always), shellcheck on it (when installed), and real
jobs on a one-node SLURM cluster started on this machine (when slurm-wlm and munge are installed:
.ci/run installs them with apt-get). The multi-node cluster is in test_slurm_multinode.py, prefetch
and the submit-time model check in test_prefetch.py.

The cluster is private to this module (tests/slurm_cluster.py): its own munged (own key and
socket), slurmctld and slurmd on free ports, state under a temporary directory, no cgroups, no
accounting. Four jobs run at
once (the node advertises 4 CPUs, each job takes 1): one that trains to completion, one whose
training fails inside the job, one that receives SIGTERM mid-training and must requeue itself and
resume, and one whose Ray head cannot come up in time.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from hub_server import STUB_MODEL, cache_model
from iapo_openrlhf import slurm as iapo_slurm
from slurm_cluster import Cluster, Node, kill_processes_mentioning
from slurm_cluster import slurm_cluster as slurm_cluster_on

ROOT = Path(__file__).resolve().parent.parent
SHELLCHECK = shutil.which("shellcheck")


def tiny_config(path: Path, out: Path, **train) -> Path:
    """configs/local_tiny.yaml cut down to a run of a few seconds of compute."""
    cfg = yaml.safe_load((ROOT / "configs" / "local_tiny.yaml").read_text())
    cfg["model"]["warmstart_steps"] = 20
    cfg["train"].update({"steps": 2, **train})
    cfg["eval"] = {"every": 0, "k": [1]}
    cfg["data"]["num_test"] = 2
    cfg["rollout"].update(prompts_per_step=2, n_samples_per_prompt=2, max_new_tokens=24)
    cfg["output"] = {"dir": str(out), "save_every": 1}
    path.write_text(yaml.safe_dump(cfg))
    return path


def sbatch_lines(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


def render(capsys, *args: str) -> str:
    assert iapo_slurm.main(["submit", "--dry-run", *args]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def job_env(script: str) -> dict[str, str]:
    """The rendered JOB_ENV=(...) array as a dict (values are shell-quoted)."""
    import shlex

    line = next(line for line in script.splitlines() if line.startswith("JOB_ENV=("))
    return dict(item.split("=", 1) for item in shlex.split(line[len("JOB_ENV=("):-1]))


@pytest.fixture(scope="module")
def qwen_cache(tmp_path_factory):
    """An HF cache holding (stub files of) the shipped 7B configs' model, as `iapo-slurm prefetch` leaves it."""
    from iapo_openrlhf.tasks.synthetic import build_tokenizer

    cache = tmp_path_factory.mktemp("hf-cache")
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer().save_pretrained(tokenizer_dir)  # a real tokenizer: iapo-train-ray --dry-run checks the postfix
    files = {p.name: p.read_bytes() for p in tokenizer_dir.iterdir()}
    cache_model(cache, "Qwen/Qwen2.5-7B-Instruct", {**STUB_MODEL, **files})
    return cache


# -- rendering ----------------------------------------------------------------------------------

def test_dry_run_local_backend(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path / "tiny.yaml", tmp_path / "out")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the default --cache-dir
    script = render(capsys, "--config", str(config), "--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", "2",
                    "--partition", "debug", "--account", "acct1", "--time", "0:30:00", "--backend", "local",
                    "--set", "train.steps=3", "--sbatch=--qos=high")
    logs = tmp_path / "out" / "slurm-logs"
    assert sbatch_lines(script) == [
        "--job-name=iapo-tiny", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--time=0:30:00",
        "--partition=debug", "--account=acct1", "--requeue", "--signal=B:TERM@120", "--open-mode=append",
        f"--chdir={tmp_path}", f"--output={logs}/%x-%j.log", f"--error={logs}/%x-%j.log", "--qos=high",
    ]
    assert script.startswith("#!/bin/bash\n")
    assert "@@{" not in script
    assert "set -euo pipefail" in script
    assert f"TRAIN_CMD=({iapo_slurm._scripts_dir()}/iapo-train --config {config} --set train.steps=3 --quiet)" in script
    for piece in ('"$SCRIPTS_DIR/ray" start --head --block', "-m iapo_openrlhf.slurm wait-ray",
                  'scontrol requeue "$job"', "trap on_term TERM", "trap cleanup EXIT", "RAY_STOP_ALL=0",
                  'scontrol show hostnames "$SLURM_JOB_NODELIST"'):
        assert piece in script
    assert not logs.exists()  # a dry run writes nothing
    # the job's environment: the HF cache, offline (the local backend reads no hub either way)
    assert job_env(script) == {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
                               "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"), "HF_HUB_OFFLINE": "1",
                               "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    assert "IFNAME=''" in script and "RUN_LABEL=training" in script


def test_signal_seconds_sets_how_long_before_the_time_limit_sigterm_comes(tmp_path, capsys, monkeypatch):
    """The training finishes its step and saves on that SIGTERM: a long step needs a longer lead."""
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path / "tiny.yaml", tmp_path / "out")
    script = render(capsys, "--config", str(config), "--backend", "local", "--time", "4:00:00", "--signal-seconds", "900")
    lines = sbatch_lines(script)
    assert "--signal=B:TERM@900" in lines and "--requeue" in lines and "--time=4:00:00" in lines
    assert "trap on_term TERM" in script and 'kill -TERM "$child_pid"' in script  # forwarded to the training


def test_dry_run_ray_backend_7b(capsys, monkeypatch, qwen_cache):
    monkeypatch.chdir(ROOT)
    script = render(capsys, "--config", "configs/qwen2.5-7b_gsm8k.yaml", "--partition", "gpu", "--time", "2-00:00:00",
                    "--no-check", "--cache-dir", str(qwen_cache), "--", "--ds.packing_samples")
    lines = sbatch_lines(script)
    # nodes and GPUs come from the config's cluster section; GPU jobs take whole nodes
    for line in ("--nodes=2", "--gpus-per-node=8", "--exclusive", "--mem=0", "--partition=gpu", "--time=2-00:00:00",
                 "--requeue", "--signal=B:TERM@120"):
        assert line in lines
    assert not any(line.startswith("--account") for line in lines)
    assert "iapo-train-ray --config " + str(ROOT / "configs/qwen2.5-7b_gsm8k.yaml") + " --ds.packing_samples)" in script
    assert "RAY_STOP_ALL=1" in script and "BACKEND=ray" in script and "GPUS_PER_NODE=8" in script
    env = job_env(script)
    assert env["HF_HOME"] == str(qwen_cache) and env["HF_HUB_CACHE"] == str(qwen_cache / "hub")
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"
    assert "NCCL_SOCKET_IFNAME" not in env  # NCCL chooses its interface unless --ifname / --env say
    # every node starts Ray on an explicit address
    assert '--node-ip-address="$head_ip"' in script
    assert '-m iapo_openrlhf.slurm node-ip "${node_ip_args[@]}" --towards "$head_ip"' in script


def test_dry_run_network_options(capsys, monkeypatch, qwen_cache):
    """--ifname sets Ray's interface and NCCL/Gloo's; --env reaches the job (and wins); --online drops offline mode."""
    monkeypatch.chdir(ROOT)
    here = socket.if_nameindex()[0][1]  # an interface that exists here: no warning
    script = render(capsys, "--config", "configs/qwen2.5-7b_gsm8k.yaml", "--no-check", "--cache-dir", str(qwen_cache),
                    "--ifname", here, "--env", "NCCL_IB_HCA=mlx5_0,mlx5_1", "--env", "GLOO_SOCKET_IFNAME=eth9",
                    "--env", "NCCL_DEBUG=INFO with spaces")
    env = job_env(script)
    assert f"IFNAME={here}" in script
    assert env["NCCL_SOCKET_IFNAME"] == here and env["GLOO_SOCKET_IFNAME"] == "eth9"
    assert env["NCCL_IB_HCA"] == "mlx5_0,mlx5_1" and env["NCCL_DEBUG"] == "INFO with spaces"
    assert "'NCCL_DEBUG=INFO with spaces'" in script  # quoted for the shell
    online = render(capsys, "--config", "configs/qwen2.5-7b_gsm8k.yaml", "--no-check", "--online",
                    "--cache-dir", str(qwen_cache / "empty"))
    assert "HF_HUB_OFFLINE" not in job_env(online) and job_env(online)["HF_HOME"] == str(qwen_cache / "empty")


def test_ifname_missing_here_is_a_warning(capsys, monkeypatch, qwen_cache):
    """The login node may lack the compute nodes' interface: warn, render; the job checks each node."""
    monkeypatch.chdir(ROOT)
    code = iapo_slurm.main(["submit", "--dry-run", "--config", "configs/qwen2.5-7b_gsm8k.yaml", "--no-check",
                            "--cache-dir", str(qwen_cache), "--ifname", "ibx9"])
    out, err = capsys.readouterr()
    assert code == 0 and "IFNAME=ibx9" in out
    assert err.startswith("iapo-slurm: warning: --ifname ibx9: no such interface on this node") and err.count("\n") == 1


def test_dry_run_preflight(capsys, monkeypatch, qwen_cache, tmp_path):
    """--preflight runs the probe instead of the training, may run without GPUs and on another layout."""
    monkeypatch.chdir(ROOT)
    script = render(capsys, "--config", "configs/qwen2.5-7b_gsm8k.yaml", "--no-check", "--cache-dir", str(qwen_cache),
                    "--preflight", "--nodes", "3", "--gpus-per-node", "0", "--ifname", "lo", "--log-dir", str(tmp_path))
    assert "--nodes=3" in sbatch_lines(script) and not any("gpus" in line for line in sbatch_lines(script))
    assert (f"TRAIN_CMD=({sys.executable} -m iapo_openrlhf.slurm probe --nodes 3 --report-dir {tmp_path} "
            "--ifname lo --model Qwen/Qwen2.5-7B-Instruct)") in script
    assert "RUN_LABEL=preflight" in script


def _openrlhf_or_skip():
    try:
        import openrlhf  # noqa: F401
    except ImportError as e:
        pytest.skip(f"OpenRLHF not installed ({e}): the ray backend's check runs iapo-train-ray --dry-run")


def test_ray_backend_checks_the_config_with_iapo_train_ray(capsys, monkeypatch, qwen_cache):
    """Before submitting, iapo-train-ray --dry-run sees the config and the extra options."""
    _openrlhf_or_skip()
    monkeypatch.chdir(ROOT)
    script = render(capsys, "--config", "configs/qwen2.5-7b_gsm8k.yaml", "--cache-dir", str(qwen_cache))
    assert "--nodes=2" in sbatch_lines(script)
    code = iapo_slurm.main(["submit", "--config", "configs/qwen2.5-7b_gsm8k.yaml", "--dry-run",
                            "--cache-dir", str(qwen_cache), "--", "--rollout.n_samples_per_prompt", "1"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("iapo-slurm: error: iapo-train-ray --dry-run refused the config: ") and err.count("\n") == 1
    assert "n_samples_per_prompt" in err


@pytest.mark.parametrize("variant", ["local", "local-no-ray", "ray", "ray-network", "preflight-online"])
def test_rendered_script_passes_shellcheck(variant, tmp_path, capsys, monkeypatch, qwen_cache):
    if SHELLCHECK is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck; .ci/run does)")
    monkeypatch.chdir(ROOT)
    ray = ["--config", "configs/qwen2.5-7b_gsm8k.yaml", "--no-check", "--cache-dir", str(qwen_cache)]
    if variant.startswith("local"):
        args = ["--config", str(tiny_config(tmp_path / "tiny.yaml", tmp_path / "out")), "--backend", "local",
                "--gpus-per-node", "0", "--time", "10", *(["--no-ray"] if variant == "local-no-ray" else [])]
    elif variant == "ray":
        args = [*ray, "--account", "a", "--partition", "p"]
    elif variant == "ray-network":
        args = [*ray, "--ifname", "lo", "--env", "NCCL_IB_HCA=mlx5_0", "--env", "X=a b'c\"d$e"]
    else:
        args = [*ray, "--preflight", "--online", "--gpus-per-node", "0", "--nodes", "2"]
    path = tmp_path / "job.sbatch"
    path.write_text(render(capsys, *args))
    result = subprocess.run([SHELLCHECK, "--shell=bash", "--severity=style", str(path)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


ERRORS = [
    (["--config", "nope.yaml", "--backend", "local"], "--config nope.yaml: no such file"),
    (["--config", "TINY", "--backend", "local", "--nodes", "0"], "--nodes: got 0, expected an integer >= 1"),
    (["--config", "TINY", "--backend", "local", "--nodes", "2"], "--backend local runs one process on one node"),
    (["--config", "TINY", "--backend", "local", "--gpus-per-node", "-1"], "--gpus-per-node: got -1"),
    (["--config", "TINY", "--backend", "local", "--time", "tomorrow"], "--time tomorrow: expected minutes"),
    (["--config", "TINY", "--backend", "local", "--partition", "a b"], "--partition: got 'a b'"),
    (["--config", "TINY", "--backend", "local", "--set", "iapo.alpha=-1"], "iapo.alpha: got -1.0"),
    (["--config", "TINY", "--backend", "local", "--bogus"], "unrecognized arguments: --bogus"),
    (["--config", "TINY", "--gpus-per-node", "0", "--no-check"], "--backend ray runs OpenRLHF, which needs GPUs"),
    (["--config", "configs/qwen2.5-7b_gsm8k.yaml", "--nodes", "1", "--no-check"],
     "--nodes 1: the config's cluster.nodes is 2"),
    (["--nodes", "1"], "the following arguments are required: --config"),
    (["--config", "TINY", "--backend", "local", "--env", "NCCL_DEBUG"], "--env NCCL_DEBUG: expected KEY=VALUE"),
    (["--config", "TINY", "--backend", "local", "--env", "1X=2"], "--env 1X=2: expected KEY=VALUE"),
    (["--config", "TINY", "--backend", "local", "--env", "RAY_ADDRESS=x:1"], "--env RAY_ADDRESS: set by the job"),
    (["--config", "TINY", "--backend", "local", "--env", "SLURM_NNODES=3"], "--env SLURM_NNODES: set by the job"),
    (["--config", "TINY", "--backend", "local", "--ifname", "a b"], "--ifname a b: expected a network interface"),
    (["--config", "TINY", "--backend", "local", "--ifname", "much-too-long-name0"],
     "--ifname much-too-long-name0: expected"),
    (["--config", "TINY", "--backend", "local", "--preflight"], "--preflight checks the Ray cluster"),
    (["--config", "TINY", "--gpus-per-node", "1", "--no-ray", "--no-check"], "--no-ray: --backend ray runs on the job's Ray"),
    (["--config", "TINY", "--backend", "local", "--signal-seconds", "0"], "--signal-seconds 0: expected 1 to 65535"),
]


@pytest.mark.parametrize("args,message", ERRORS, ids=[m.split(":")[0][:30] for _, m in ERRORS])
def test_errors_are_one_line_and_exit_2(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    tiny = str(tiny_config(tmp_path / "tiny.yaml", tmp_path / "out"))
    code = iapo_slurm.main(["submit", *[tiny if a == "TINY" else a for a in args], "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("iapo-slurm: error: ") and err.count("\n") == 1, err
    assert message in err


def test_sbatch_missing_is_an_error_without_dry_run(tmp_path, monkeypatch):
    """Through the real entry point: exit code 2, one line, nothing written."""
    config = tiny_config(tmp_path / "tiny.yaml", tmp_path / "out")
    env = dict(os.environ, PATH=str(tmp_path / "empty"))
    result = subprocess.run([sys.executable, "-m", "iapo_openrlhf.slurm", "submit", "--config", str(config),
                             "--backend", "local"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "iapo-slurm: error: sbatch not found on PATH: run on a SLURM login node " \
                            "(or use --dry-run to see the script)\n"
    assert not (tmp_path / "out").exists()


def test_node_ip_exec_appends_the_address_and_free_ports():
    """What each Ray worker runs: the address, and a port free on it for each --free-port option
    (Ray's fixed default for the dashboard agent may belong to another job on the node)."""
    out = subprocess.run(
        [sys.executable, "-m", "iapo_openrlhf.slurm", "node-ip", "--ifname", "lo",
         "--free-port=--dashboard-agent-listen-port", "--exec", "echo", "ray", "start"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.splitlines()
    assert out[0].startswith("iapo-slurm node-ip: node ") and "Ray address 127.0.0.1" in out[0], out
    match = re.fullmatch(r"ray start --node-ip-address=127\.0\.0\.1 --dashboard-agent-listen-port=(\d+)", out[1])
    assert match and 1024 <= int(match[1]) < 65536, out
    with socket.socket() as s:  # free when chosen: it binds
        s.bind(("127.0.0.1", int(match[1])))


# -- study: rendering and errors ------------------------------------------------------------------

def study_jobs(out: str) -> list[tuple[str, str, str]]:
    """A study's --dry-run output as [(label, sbatch command line, script)]."""
    jobs = []
    for chunk in out.split(iapo_slurm.STUDY_JOB_MARK)[1:]:
        head, command, script = chunk.split("\n", 2)
        jobs.append((head.split(": ", 1)[1].rstrip(" ="), command, script))
    return jobs


def test_study_dry_run_7b_every_script_passes_shellcheck(tmp_path, capsys, monkeypatch, qwen_cache):
    """The paper's 7B GSM8K study: 6 methods x 3 seeds, an evaluation per run after its training
    succeeded, one table job after everything ended; every script passes shellcheck; nothing written."""
    monkeypatch.chdir(ROOT)
    out_dir = tmp_path / "study"
    code = iapo_slurm.main(["study", "--config", "configs/paper/qwen2.5-7b_gsm8k.yaml", "--methods",
                            "grpo,dapo,gfpo,gtpo,sgrpo,iapo", "--seeds", "3", "--dry-run", "--no-check",
                            "--cache-dir", str(qwen_cache), "--partition", "gpu", "--time", "2-00:00:00",
                            "--eval-time", "12:00:00", "--out", str(out_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("# iapo-slurm study: 18 runs (grpo, dapo, gfpo, gtpo, sgrpo, iapo x seeds 42, 43, 44)")
    assert "37 jobs, nothing submitted (--dry-run)" in out.splitlines()[0]
    assert out.splitlines()[1].startswith("# estimated GPU-hours (an estimate from the settings")
    assert out.splitlines()[1].endswith("18 run(s): ~1674")  # README's table
    jobs = study_jobs(out)
    assert len(jobs) == 37 and not out_dir.exists()
    runs = [f"{m}-seed{s}" for m in ("grpo", "dapo", "gfpo", "gtpo", "sgrpo", "iapo") for s in (42, 43, 44)]
    for i, run in enumerate(runs):
        (train_label, train_cmd, train), (eval_label, eval_cmd, evaluation) = jobs[2 * i], jobs[2 * i + 1]
        method, seed = run.split("-seed")
        assert train_label == f"training {method} seed {seed}" and train_cmd == f"# sbatch --parsable <train-{run}.sbatch>"
        lines = sbatch_lines(train)
        assert f"--job-name=iapo-qwen2.5-7b_gsm8k-{run}" in lines and "--nodes=2" in lines
        assert "--gpus-per-node=8" in lines and "--requeue" in lines and "--time=2-00:00:00" in lines
        run_dir = out_dir / "runs" / run
        assert (f"--set method={method} --set seed={seed} --set output.dir={run_dir}") in train
        assert eval_cmd == (f"# sbatch --parsable --dependency=afterok:<job id of train-{run}> "
                            f"--kill-on-invalid-dep=yes <eval-{run}.sbatch>")
        lines = sbatch_lines(evaluation)
        assert f"--job-name=iapo-qwen2.5-7b_gsm8k-eval-{run}" in lines and "--gpus-per-node=1" in lines
        assert "--time=12:00:00" in lines and "--partition=gpu" in lines and "--requeue" not in lines
        assert f"iapo-eval --run {run_dir} --config {ROOT / 'configs/paper/qwen2.5-7b_gsm8k.yaml'}" in evaluation
        assert f"--name {run} --out {run_dir / 'eval'})" in evaluation
        assert "HF_HUB_OFFLINE=1" in evaluation
    label, command, table = jobs[-1]
    assert label.startswith("the table of every run")
    assert command == ("# sbatch --parsable --dependency=afterany:"
                       + ":".join(f"<job id of {kind}-{run}>" for run in runs for kind in ("train", "eval"))
                       + " <table.sbatch>")
    assert f"-m iapo_openrlhf.eval.collect --study {out_dir} --k '16,32')" in table
    if SHELLCHECK is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck; .ci/run does)")
    for i, (_, _, script) in enumerate(jobs):
        path = tmp_path / f"job{i}.sbatch"
        path.write_text(script)
    result = subprocess.run([SHELLCHECK, "--shell=bash", "--severity=style",
                             *(str(tmp_path / f"job{i}.sbatch") for i in range(len(jobs)))],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_study_estimate_is_the_readmes_table():
    """README's GPU-hour table is estimate_gpu_hours over the 18 runs of each configs/paper/ cell."""
    from iapo_openrlhf.config import load_config
    from iapo_openrlhf.study import PAPER_METHODS, estimate_gpu_hours

    readme = (ROOT / "README.md").read_text()
    names = {"GSM8K": "gsm8k", "MATH-500": "math500", "DAPO-Math-17k": "dapo17k"}
    rows = re.findall(r"^\| (0\.5B|1\.5B|7B) \| (GSM8K|MATH-500|DAPO-Math-17k) \| .* \| ~([\d,]+) \|$", readme, re.M)
    assert len(rows) == 9
    for size, dataset, cell in rows:
        config = ROOT / "configs" / "paper" / f"qwen2.5-{size.lower()}_{names[dataset]}.yaml"
        total = sum(3 * estimate_gpu_hours(load_config(str(config), [f"method={m}"], local_files=False))["total"]
                    for m in PAPER_METHODS)
        assert abs(total - int(cell.replace(",", ""))) <= 0.01 * total, (size, dataset, total, cell)


STUDY_ERRORS = [
    (["--config", "nope.yaml"], "--config nope.yaml: no such file"),
    (["--config", "TINY", "--methods", "grpo,ppo"], "--methods grpo,ppo: unknown ppo, expected names from"),
    (["--config", "TINY", "--methods", ","], "--methods ,: empty"),
    (["--config", "TINY", "--methods", "iapo,iapo"], "a method twice"),
    (["--config", "TINY", "--seeds", "0"], "--seeds: got 0, expected an integer >= 1"),
    (["--config", "TINY", "--set", "seed=3"], "--set seed=3: set for each run by the study"),
    (["--config", "TINY", "--k", "a"], "--k a: expected positive integers"),
    (["--config", "TINY", "--eval-arg=--limit"], "--eval-arg --limit: iapo-eval refuses it"),
    (["--config", "TINY", "--eval-arg=--out=x"], "--eval-arg --out=x: set by the study for each run"),
    (["--config", "TINY", "--eval-arg=--samples=8"], "--k 16,32: iapo-eval evaluates k = 1,2,4,8 with these"),
    (["--config", "TINY", "--eval-time", "soon"], "--eval-time soon: expected minutes"),
    (["--config", "TINY", "--preflight"], "--preflight: a study runs training jobs"),
    (["--methods", "iapo"], "the following arguments are required: --config"),
]


@pytest.mark.parametrize("args,message", STUDY_ERRORS, ids=[m.split(":")[0][:30] for _, m in STUDY_ERRORS])
def test_study_errors_are_one_line_and_exit_2(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    tiny = str(tiny_config(tmp_path / "tiny.yaml", tmp_path / "out"))
    code = iapo_slurm.main(["study", *[tiny if a == "TINY" else a for a in args], "--backend", "local",
                            "--gpus-per-node", "0", "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("iapo-slurm: error: ") and err.count("\n") == 1, err
    assert message in err


def test_study_without_sbatch_is_an_error_and_writes_nothing(tmp_path):
    config = tiny_config(tmp_path / "tiny.yaml", tmp_path / "out")
    env = dict(os.environ, PATH=str(tmp_path / "empty"))
    result = subprocess.run([sys.executable, "-m", "iapo_openrlhf.slurm", "study", "--config", str(config),
                             "--backend", "local", "--gpus-per-node", "0"], capture_output=True, text=True, env=env,
                            cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "iapo-slurm: error: sbatch not found on PATH: run on a SLURM login node " \
                            "(or use --dry-run to see the scripts)\n"
    assert not (tmp_path / "out").exists()


def test_wait_ray_times_out_with_a_message(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = iapo_slurm.main(["wait-ray", "--address", f"127.0.0.1:{port}", "--nodes", "2", "--gpus", "16",
                            "--timeout", "1", "--interval", "0.2"])
    assert code == 1
    assert f"error: timed out after 1s: Ray at 127.0.0.1:{port} reports the head is not reachable yet" \
        in capsys.readouterr().err
    dead = subprocess.Popen(["true"])
    dead.wait()
    code = iapo_slurm.main(["wait-ray", "--address", f"127.0.0.1:{port}", "--nodes", "1", "--pid", str(dead.pid)])
    assert code == 1 and f"a Ray step (pid {dead.pid}) exited" in capsys.readouterr().err


# -- a real SLURM cluster on this machine -------------------------------------------------------

@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    node = socket.gethostname().split(".")[0]
    with slurm_cluster_on(tmp_path_factory.mktemp("slurm"), [Node(node, "127.0.0.1", cpus=4)]) as cluster:
        yield cluster


def _submit(cluster: Cluster, config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "iapo_openrlhf.slurm", "submit", "--config", str(config), "--nodes", "1",
         "--gpus-per-node", "0", "--cpus-per-task", "1", "--backend", "local", "--wait", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env, cwd=config.parent,
    )


class Job:
    def __init__(self, proc: subprocess.Popen, out: Path):
        self.proc, self.out = proc, out
        first = proc.stdout.readline()
        match = re.search(r"submitted job (\d+); log: (\S+)", first)
        assert match, first + proc.stderr.read()
        self.id, self.log_path = match.group(1), Path(match.group(2))
        self.stdout = self.stderr = ""
        self.code: int | None = None

    def finish(self, timeout: float) -> "Job":
        if self.code is None:
            rest, self.stderr = self.proc.communicate(timeout=timeout)
            self.stdout += rest
            self.code = self.proc.returncode
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else "(no log)"


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory):
    """Submit the four jobs at once; SIGTERM the 'preempt' one after its first checkpoint."""
    base = tmp_path_factory.mktemp("jobs")
    # Ray's temp dirs: short (Ray's socket paths), and unique, so that leftovers can be found.
    ray_root = Path(f"/tmp/iapo-test-{secrets.token_hex(3)}")
    ray_root.mkdir()
    slurm_cluster.env["IAPO_RAY_TMPDIR"] = str(ray_root)
    (base / "not_a_model").mkdir()
    configs = {
        "ok": tiny_config(base / "ok.yaml", base / "ok"),
        "fail": tiny_config(base / "fail.yaml", base / "fail"),
        "preempt": tiny_config(base / "preempt.yaml", base / "preempt", steps=5),
        "noray": tiny_config(base / "noray.yaml", base / "noray"),
    }
    # Four Ray heads start at once on a 2-core machine: without their dashboards (about half of a
    # head's start-up CPU), or on a loaded machine Ray's client server gives up waiting for its
    # raylet (a fixed 30 s in Ray 2.55) and takes the head down.
    light = "--ray-head-arg=--include-dashboard=false"
    extra = {
        "ok": ["--ray-timeout", "240", light],
        # config validation passes (the directory exists); loading it fails inside the job
        "fail": ["--ray-timeout", "240", "--set", f"model.path={base / 'not_a_model'}", light],
        "preempt": ["--ray-timeout", "240", light],
        "noray": ["--ray-timeout", "1", light],
    }
    started = time.monotonic()
    submitted = {name: Job(_submit(slurm_cluster, configs[name], *extra[name]), base / name) for name in configs}
    preempt = submitted["preempt"]
    checkpoint = preempt.out / "checkpoints" / "step_1" / "trainer_state.pt"
    signalled = {}

    def send_term():
        deadline = time.monotonic() + 280
        while time.monotonic() < deadline and preempt.proc.poll() is None:
            if checkpoint.exists():
                steps = [json.loads(line)["step"] for line in (preempt.out / "metrics.jsonl").read_text().splitlines()]
                signalled["last_step"] = max(steps)
                signalled["scancel"] = slurm_cluster.run("scancel", "--signal=TERM", "--batch", preempt.id)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=send_term, daemon=True)
    thread.start()
    for job in submitted.values():
        job.finish(timeout=max(1, 330 - (time.monotonic() - started)))
    thread.join(5)
    yield {"jobs": submitted, "signalled": signalled, "ray_root": ray_root,
           "seconds": time.monotonic() - started}
    shutil.rmtree(ray_root, ignore_errors=True)


def _train_steps(out: Path) -> list[int]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "eval" not in r]


def _describe(job: Job) -> str:
    return f"exit {job.code}\n--- stdout\n{job.stdout}\n--- stderr\n{job.stderr}\n--- log\n{job.log}"


def test_job_starts_ray_trains_and_returns_0(jobs):
    job = jobs["jobs"]["ok"]
    assert job.code == 0, _describe(job)
    log = job.log
    for line in ("phase 1/4: starting the Ray head", "Ray head started at ",
                 "phase 2/4: waiting for Ray to report 1 node(s), 1 CPUs, 0 GPUs",
                 "Ray cluster ready after", "1/1 node(s), 1/1 CPUs, 0/0 GPUs",
                 "phase 3/4: training: ", "training finished (exit code 0)", "phase 4/4: stopping Ray", "exit code 0"):
        assert line in log, line + "\n" + _describe(job)
    assert "--resume" not in log and "SIGTERM" not in log
    assert re.search(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] iapo-slurm job \d+: ", log, re.M)
    ray_logs = list(job.log_path.parent.glob(f"iapo-ok-{job.id}-ray-*.log"))
    assert ray_logs and "Ray runtime started" in ray_logs[0].read_text(errors="replace")
    assert f"job {job.id} finished with exit code 0" in job.stdout
    assert _train_steps(job.out) == [1, 2]
    assert (job.out / "checkpoints" / "step_2" / "trainer_state.pt").exists()
    assert (job.out / "final" / "config.json").exists()


def test_job_whose_training_fails_returns_nonzero(jobs):
    job = jobs["jobs"]["fail"]
    assert job.code not in (0, None), _describe(job)
    assert "Ray cluster ready after" in job.log
    assert f"training exited with code {job.code}" in job.log and f"exit code {job.code}" in job.log
    assert "requeue" not in job.log and not (job.out / "final").exists()
    assert f"job {job.id} finished with exit code {job.code}" in job.stdout


def test_sigterm_requeues_the_job_and_it_resumes(jobs):
    job, signalled = jobs["jobs"]["preempt"], jobs["signalled"]
    assert signalled.get("scancel") is not None and signalled["scancel"].returncode == 0, signalled
    assert job.code == 0, _describe(job)
    log = job.log
    for line in ("SIGTERM received", "iapo-train: SIGTERM: saved the checkpoint of step ", "training exited with code 143",
                 "requeued (this was run 0)", "run 1 of job",
                 "a checkpoint exists under", "resuming from it", "training finished (exit code 0)"):
        assert line in log, line + "\n" + _describe(job)
    assert log.index("SIGTERM received") < log.index("phase 4/4") < log.index("requeued") < log.index("run 1 of job")
    assert _train_steps(job.out) == list(range(1, 6))  # steps redone after the checkpoint are not doubled
    assert (job.out / "final" / "config.json").exists()


def test_job_fails_when_ray_does_not_come_up(jobs):
    job = jobs["jobs"]["noray"]
    assert job.code == iapo_slurm.EXIT_JOB_FAILED, _describe(job)
    assert "FAILED: the Ray head did not start within 1s" in job.log
    assert "phase 3/4" not in job.log and not (job.out / "metrics.jsonl").exists()


def test_no_ray_process_outlives_its_job(jobs):
    left = kill_processes_mentioning(str(jobs["ray_root"]))
    assert not left, left


# -- a real study on the one-node cluster ------------------------------------------------------------

STUDY_EVAL = ["--k", "1,2", "--eval-arg=--samples=2", "--eval-arg=--k=1,2", "--eval-arg=--seeds=42",
              "--eval-arg=--limit=4", "--eval-arg=--max-new-tokens=24", "--eval-arg=--backend=hf"]


def _study(cluster: Cluster, config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "iapo_openrlhf.slurm", "study", "--config", str(config), "--gpus-per-node", "0",
         "--cpus-per-task", "1", "--backend", "local", "--no-ray", *STUDY_EVAL, "--wait", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env, cwd=config.parent,
    )


@pytest.fixture(scope="module")
def studies(slurm_cluster, tmp_path_factory):
    """Two studies at once: 2 methods x 2 seeds of the tiny config, and one run whose training job is
    cancelled as soon as the study is submitted (a failed training, as far as SLURM's dependencies
    go: its evaluation never runs, the table job runs all the same and lists the run as failed)."""
    base = tmp_path_factory.mktemp("studies")
    ray_root = Path(f"/tmp/iapo-test-{secrets.token_hex(3)}")
    ray_root.mkdir()
    slurm_cluster.env["IAPO_RAY_TMPDIR"] = str(ray_root)
    started = time.monotonic()
    failed = _study(slurm_cluster, tiny_config(base / "failed.yaml", base / "failed"), "--methods", "gtpo",
                    "--seeds", "1")
    ok = _study(slurm_cluster, tiny_config(base / "ok.yaml", base / "ok"), "--methods", "grpo,iapo", "--seeds", "2")
    ids, lines = {}, []
    for line in failed.stdout:  # the table job is submitted last: then every job is in the queue
        lines.append(line)
        match = re.search(r"submitted job (\d+): (training|evaluation|the table)", line)
        if match:
            ids[match.group(2)] = match.group(1)
        if "runs submitted" in line:
            break
    assert len(ids) == 3, "".join(lines) + failed.stderr.read()
    cancel = slurm_cluster.run("scancel", ids["training"])
    results = {}
    for name, proc in (("failed", failed), ("ok", ok)):
        try:
            out, err = proc.communicate(timeout=max(1, 420 - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if name == "failed":  # while SLURM still remembers the jobs (MinJobAge)
            out = "".join(lines) + out
            evaluation = slurm_cluster.run("scontrol", "show", "job", ids["evaluation"]).stdout
        results[name] = (proc.returncode, out, err, base / name)
    yield {"results": results, "cancel": cancel, "evaluation": evaluation, "seconds": time.monotonic() - started,
           "left": kill_processes_mentioning(str(ray_root))}
    shutil.rmtree(ray_root, ignore_errors=True)


def _study_describe(result) -> str:
    code, out, err, study = result
    logs = "".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}\n" for p in sorted((study / "logs").glob("*.log")))
    return f"exit {code}\n--- stdout\n{out}\n--- stderr\n{err}\n{logs}"


def test_study_trains_evaluates_and_collects_every_run(studies):
    result = studies["results"]["ok"]
    code, out, _, study = result
    assert code == 0, _study_describe(result)
    assert out.count("submitted job") == 9 and "study of 4 runs submitted (9 jobs)" in out, out
    manifest = json.loads((study / "study.json").read_text())
    assert [r["name"] for r in manifest["runs"]] == ["grpo-seed0", "grpo-seed1", "iapo-seed0", "iapo-seed1"]
    for run in manifest["runs"]:
        run_dir = Path(run["dir"])
        assert run_dir == study / "runs" / run["name"]
        assert json.loads((run_dir / "config.json").read_text())["seed"] == run["seed"]
        assert (run_dir / "final" / "config.json").exists() and (run_dir / "eval" / "metrics.json").exists()
        assert "training finished (exit code 0)" in Path(run["train_log"]).read_text()
        assert f"evaluation of {run['name']} exited with code 0" in Path(run["eval_log"]).read_text()
    table = json.loads((study / "table" / "metrics.json").read_text())
    assert table["ks"] == [1, 2] and list(table["methods"]) == ["IAPO", "GRPO"]  # the paper's row order
    assert [r["status"] for r in table["runs"]] == ["ok"] * 4
    assert [r["checkpoint"] for r in table["runs"]] == ["final"] * 4  # no validation split: the final model
    for row in table["methods"].values():
        assert (row["runs"], row["runs_ok"], row["failed"]) == (2, 2, [])
        for key in ("P@1", "P@2", "L@1", "L@2", "R@1", "R@2"):
            assert key in row and f"{key} std" in row
    md = (study / "table" / "metrics.md").read_text()
    assert md.startswith("| Method | P@1 | P@2 | L@1 | L@2 | R@1 | R@2 | runs |") and md.count("| 2 of 2 |") == 2
    assert len((study / "table" / "runs.csv").read_text().splitlines()) == 5
    assert (study / "table" / "metrics.csv").exists() and (study / "table" / "accuracy_vs_length.png").exists()
    assert f"table job {manifest['table_job']} finished with exit code 0" in out
    assert not studies["left"], studies["left"]  # no Ray process outlives its job


def test_study_lists_a_failed_run_and_its_evaluation_never_runs(studies):
    result = studies["results"]["failed"]
    code, out, _, study = result
    assert studies["cancel"].returncode == 0, studies["cancel"].stderr
    assert code == 0, _study_describe(result)
    (run,) = json.loads((study / "study.json").read_text())["runs"]
    # afterok on a training that did not succeed: SLURM cancels the evaluation (--kill-on-invalid-dep)
    assert "JobState=CANCELLED" in studies["evaluation"] and "DependencyNeverSatisfied" in studies["evaluation"], \
        studies["evaluation"]
    assert not Path(run["eval_log"]).exists()
    table = json.loads((study / "table" / "metrics.json").read_text())
    (outcome,) = table["runs"]
    assert outcome["status"] == "failed" and outcome["reason"].startswith("training failed: no model in ")
    assert table["methods"]["GTPO"]["runs_ok"] == 0 and table["methods"]["GTPO"]["failed"][0]["seed"] == 0
    md = (study / "table" / "metrics.md").read_text()
    assert "| GTPO | failed |" in md and "| gtpo-seed0 | gtpo | 0 | failed: training failed" in md
