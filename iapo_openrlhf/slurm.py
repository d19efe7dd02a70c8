"""`iapo-slurm`: submit a training run as a SLURM job that brings up its own Ray cluster.

`iapo-slurm submit --config FILE --nodes N ...` renders `slurm/job.sbatch.template` (a
`string.Template` with `@@{NAME}` placeholders) into an sbatch script and submits it; `--dry-run`
prints the script instead. The job starts a Ray head on the batch host and workers on the other
nodes with `srun`, waits until Ray reports every node, CPU and GPU (`iapo-slurm wait-ray`, below),
runs `iapo-train-ray` (or `iapo-train` with `--backend local`), stops Ray and exits with the
training's exit code; on SIGTERM it requeues itself and the next run resumes from the last
checkpoint. Every problem found before submission is one line on stderr and exit code 2.

Networking: every node starts Ray on an address chosen explicitly (`iapo-slurm node-ip`, below):
the address of `--ifname` on that node, else the source address of the node's route towards the
head (the head's: towards the first worker's SLURM NodeAddr). `--env KEY=VALUE` (and `--ifname`,
for NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME) reaches every process: the job exports it before
the Ray steps start, so the raylets, every Ray actor they fork and the training driver see it.

Offline compute nodes: `iapo-slurm prefetch` downloads the run's models and hub datasets into a
cache on the login node (iapo_openrlhf/hub.py); `submit` checks they are there and runs the job
with HF_HOME on that cache and the hub offline. `submit --preflight` runs `iapo-slurm probe`
instead of the training: one Ray actor per node reports its address, environment and model
cache, and a gloo all-reduce crosses the nodes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import string
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any

from . import hub


PROG = "iapo-slurm"
# slurm/ sits beside the package in a checkout (pip install -e); a wheel install puts it under
# <prefix>/share/iapo-openrlhf (setup.py data_files).
def _template(name: str) -> Path:
    return next((p for p in (Path(__file__).resolve().parent.parent / "slurm" / name,
                             Path(sys.prefix) / "share" / "iapo-openrlhf" / "slurm" / name) if p.is_file()),
                Path(__file__).resolve().parent.parent / "slurm" / name)


TEMPLATE = _template("job.sbatch.template")
STEP_TEMPLATE = _template("step.sbatch.template")  # a study's evaluation and table jobs
DEFAULT_GPUS_PER_NODE = 8
DEFAULT_RAY_TIMEOUT = 600
# SIGTERM this long before the time limit (--signal=B:TERM@120): the training then finishes its
# step and saves a checkpoint (preemption.py); --signal-seconds gives a long step more time.
SIGNAL_SECONDS = 120
EXIT_JOB_FAILED = 3  # the job itself failed (Ray did not come up), see the template
TRAIN_COMMAND = {"ray": "iapo-train-ray", "local": "iapo-train"}
STUDY_JOB_MARK = "# ==== iapo-slurm study: job"  # --dry-run: the line before each script
# [days-]hours:minutes:seconds and the other forms sbatch --time accepts.
TIME_RE = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}|UNLIMITED|INFINITE)$")
# #SBATCH values are not parsed by a shell: keep them to characters that need no quoting.
SAFE_VALUE_RE = re.compile(r"^[A-Za-z0-9_.,:/+@=-]+$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")  # Linux interface names (IFNAMSIZ 16 with the NUL)
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Set from --ifname unless --env names them: the interface of NCCL's and Gloo's sockets.
IFNAME_ENV = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")
# Set by the job itself: --env may not override them.
RESERVED_ENV = ("PATH", "RAY_ADDRESS", "IAPO_JOB_ENV")


def _quote(arg: str) -> str:
    """shlex.quote, and quotes around a comma too (shellcheck reads a bare comma in an array as a typo)."""
    quoted = shlex.quote(arg)
    return f"'{arg}'" if quoted == arg and "," in arg else quoted


class UsageError(Exception):
    """A problem found before anything is submitted; the message is the one line shown."""


class _Template(string.Template):
    delimiter = "@@"
    braceidpattern = r"[A-Z_]+"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2 (argparse prints the usage too)
        raise UsageError(message)


# -- the config --------------------------------------------------------------------------------

def _read_config(path: str, sets: list[str], backend: str) -> tuple[str, dict[str, Any], str, Any]:
    """Validate the config as the training will (load_config); (output.dir, cluster section, device, config)."""
    import dataclasses

    from .config import ConfigError, load_config

    try:
        # The Ray backend resolves model and data paths on the cluster (or as hub names).
        cfg = load_config(path, sets, local_files=backend == "local")
    except ConfigError as e:
        raise UsageError(str(e)) from None
    return cfg.output.dir, dataclasses.asdict(cfg.cluster), cfg.device, cfg


def _defaults(args: argparse.Namespace, cluster: dict[str, Any], device: str) -> tuple[int, int]:
    """(nodes, gpus per node): the flags, else the config's cluster section (ray) or one node (local)."""
    if args.backend == "ray":
        nodes = args.nodes if args.nodes is not None else int(cluster.get("nodes", 1))
        gpus = args.gpus_per_node if args.gpus_per_node is not None \
            else int(cluster.get("gpus_per_node", DEFAULT_GPUS_PER_NODE))
    else:  # one process: one node, one GPU (none for device: cpu)
        nodes = args.nodes if args.nodes is not None else 1
        gpus = args.gpus_per_node if args.gpus_per_node is not None else int(device != "cpu")
    return nodes, gpus


# -- submit ------------------------------------------------------------------------------------

def _submit_parser() -> _Parser:
    p = _Parser(prog=f"{PROG} submit", description="Render the sbatch script for a training run and submit it.")
    p.add_argument("--config", required=True, help="the YAML config (same file as iapo-train / iapo-train-ray)")
    p.add_argument("--nodes", type=int, help="nodes to allocate (default: cluster.nodes of the config; "
                   "--backend local: 1)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--time", help="time limit, e.g. 2-00:00:00; SIGTERM arrives --signal-seconds before it, the "
                   "training finishes its step, saves and exits 143, and the job requeues")
    p.add_argument("--signal-seconds", type=int, default=SIGNAL_SECONDS, metavar="N",
                   help=f"send SIGTERM N seconds before the time limit (--signal=B:TERM@N; default {SIGNAL_SECONDS}): "
                   "enough for a step, a checkpoint save and Ray's shutdown")
    p.add_argument("--gpus-per-node", type=int,
                   help=f"GPUs per node (default: cluster.gpus_per_node of the config, else {DEFAULT_GPUS_PER_NODE}; "
                   "--backend local: 1, or 0 with device: cpu; 0 for a CPU-only job)")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per node (one task per node); default: the node's "
                   "CPUs for an exclusive job, else the cluster's default")
    p.add_argument("--backend", choices=("ray", "local"), default="ray",
                   help="ray: iapo-train-ray (OpenRLHF, GPUs); local: iapo-train (one process, one node)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, passed on to the training (repeatable)")
    p.add_argument("--job-name", help="SLURM job name (default: iapo-<config name>)")
    p.add_argument("--log-dir", help="where the job writes its logs (default: <output.dir>/slurm-logs)")
    p.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=None,
                   help="whole nodes, all their memory, and ray stop on every node at the end "
                   "(default: on for --backend ray)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="an extra #SBATCH option, e.g. --sbatch=--qos=high (repeatable)")
    p.add_argument("--ray", action=argparse.BooleanOptionalAction, default=True,
                   help="start a Ray cluster in the job (default); --no-ray with --backend local skips it: "
                   "the local backend is one process and does not use Ray (saves its start and stop)")
    p.add_argument("--ray-timeout", type=int, default=DEFAULT_RAY_TIMEOUT,
                   help=f"seconds to wait for Ray to report every node and GPU (default {DEFAULT_RAY_TIMEOUT})")
    p.add_argument("--ray-arg", action="append", default=[], metavar="OPTION",
                   help="an extra option for `ray start` on every node, e.g. --ray-arg=--object-store-memory=2000000000 "
                   "(repeatable)")
    p.add_argument("--ray-head-arg", action="append", default=[], metavar="OPTION",
                   help="an extra option for the head's `ray start` only, e.g. --ray-head-arg=--dashboard-host=0.0.0.0 "
                   "or --ray-head-arg=--include-dashboard=false (repeatable)")
    p.add_argument("--ifname", metavar="INTERFACE",
                   help="network interface whose IPv4 address each node's Ray uses (e.g. ib0); also sets "
                   "NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME unless --env does (default: the interface "
                   "each node reaches the head through; NCCL/Gloo choose their own)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for every process of the job (Ray head and workers, hence "
                   "every Ray actor, and the training driver), e.g. --env NCCL_IB_HCA=mlx5_0 (repeatable)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="Hugging Face cache (HF_HOME) on a filesystem the compute nodes mount, filled by "
                   "`iapo-slurm prefetch` (default: $HF_HOME, else ~/.cache/huggingface)")
    p.add_argument("--online", action="store_true",
                   help="compute nodes can reach the hub: no HF_HUB_OFFLINE and no check that the model is cached "
                   "(default: the job runs offline, and submit refuses a model that is not a local directory "
                   "or in --cache-dir)")
    p.add_argument("--preflight", action="store_true",
                   help="instead of training, check the cluster: Ray on every node, each node's address, the job's "
                   "environment and model cache on every node, a gloo all-reduce across the nodes (exit 0 when "
                   "all hold); --gpus-per-node 0 is then allowed")
    p.add_argument("--template", default=str(TEMPLATE), help="the sbatch template (default: slurm/job.sbatch.template)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="ray backend: run iapo-train-ray --dry-run on the config before submitting (default on)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job (sbatch --wait) and exit with its exit code")
    p.add_argument("train_args", nargs="*", metavar="-- TRAINING_ARGS",
                   help="after --: extra options for the training command (e.g. OpenRLHF options)")
    return p


def _positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{name}: got {value}, expected an integer >= {minimum}")


def _safe(name: str, value: str) -> str:
    if not SAFE_VALUE_RE.match(value):
        raise UsageError(f"{name}: got {value!r}, expected letters, digits and _.,:/+@=- only (no spaces)")
    return value


def _scripts_dir() -> Path:
    """Where this environment's console scripts (ray, iapo-train, ...) are."""
    return Path(sysconfig.get_path("scripts"))


def build(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Check everything that can be checked here; return (script text, facts for the caller)."""
    config = Path(args.config)
    if not config.is_file():
        raise UsageError(f"--config {args.config}: no such file, expected a YAML config (see configs/)")
    output_dir, cluster, device, cfg = _read_config(str(config), args.set, args.backend)
    nodes, gpus = _defaults(args, cluster, device)
    _positive("--nodes", nodes)
    _positive("--gpus-per-node", gpus, 0)
    _positive("--cpus-per-task", args.cpus_per_task)
    _positive("--ray-timeout", args.ray_timeout)
    if args.backend == "local" and nodes != 1:
        raise UsageError(f"--nodes {nodes}: --backend local runs one process on one node, expected --nodes 1")
    if not args.ray and args.backend != "local":
        raise UsageError(f"--no-ray: --backend {args.backend} runs on the job's Ray cluster, expected --backend local")
    if args.preflight and args.backend != "ray":
        raise UsageError("--preflight checks the Ray cluster of --backend ray jobs, expected --backend ray")
    if args.backend == "ray" and not args.preflight:  # a preflight may run on another layout, or without GPUs
        if gpus < 1:
            raise UsageError("--gpus-per-node 0: --backend ray runs OpenRLHF, which needs GPUs; "
                             "use --backend local for a CPU-only job (or --preflight to check the cluster)")
        for key, value in (("nodes", nodes), ("gpus_per_node", gpus)):
            if key in cluster and int(cluster[key]) != value:
                flag = "--" + key.replace("_", "-")
                raise UsageError(
                    f"{flag} {value}: the config's cluster.{key} is {cluster[key]} and sets the Ray layout; "
                    f"pass --set cluster.{key}={value} (and adjust cluster.vllm_engines) or {flag} {cluster[key]}"
                )
    if not 1 <= args.signal_seconds <= 65535:  # sbatch's limit for --signal's offset
        raise UsageError(f"--signal-seconds {args.signal_seconds}: expected 1 to 65535 (sbatch --signal's range)")
    if args.time is not None and not TIME_RE.match(args.time):
        raise UsageError(f"--time {args.time}: expected minutes, HH:MM:SS or D-HH:MM:SS (sbatch --time)")
    for name in ("partition", "account", "job_name"):
        value = getattr(args, name)
        if value is not None:
            _safe("--" + name.replace("_", "-"), value)
    for option in args.sbatch:
        if not option.startswith("-") or any(c.isspace() for c in option):
            raise UsageError(f"--sbatch {option!r}: expected one sbatch option like --qos=high (no spaces)")
    for flag, options in (("--ray-arg", args.ray_arg), ("--ray-head-arg", args.ray_head_arg)):
        for option in options:
            if not option.startswith("--"):
                raise UsageError(f"{flag} {option!r}: expected one `ray start` option like --object-store-memory=N")
    cache_dir = Path(args.cache_dir).expanduser().resolve() if args.cache_dir else hub.default_cache_dir().resolve()
    job_env = _job_env(args, cache_dir)

    template = Path(args.template)
    if not template.is_file():
        raise UsageError(f"--template {args.template}: no such file (the default lives in the source checkout: "
                         "install with pip install -e .)")
    scripts = _scripts_dir()
    needed = ["ray", TRAIN_COMMAND[args.backend]]
    missing = [name for name in needed if not (scripts / name).exists()]
    if missing:
        hint = "pip install 'ray[default]>=2.55,<3'" if "ray" in missing else "pip install -e ."
        raise UsageError(f"{', '.join(missing)} not found in {scripts} (the job runs this environment): {hint}")

    workdir = Path.cwd().resolve()
    out = Path(output_dir)
    out = out if out.is_absolute() else workdir / out
    log_dir = Path(args.log_dir).resolve() if args.log_dir else out / "slurm-logs"
    _safe("--log-dir", str(log_dir))
    _safe("the working directory", str(workdir))
    job_name = args.job_name or _safe("--job-name", "iapo-" + re.sub(r"[^A-Za-z0-9_.-]", "-", config.stem))
    exclusive = args.backend == "ray" if args.exclusive is None else args.exclusive

    sbatch = [
        f"--job-name={job_name}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
    ]
    if gpus > 0:
        sbatch.append(f"--gpus-per-node={gpus}")
    if args.cpus_per_task is not None:
        sbatch.append(f"--cpus-per-task={args.cpus_per_task}")
    if exclusive:
        sbatch += ["--exclusive", "--mem=0"]
    if args.time is not None:
        sbatch.append(f"--time={args.time}")
    if args.partition is not None:
        sbatch.append(f"--partition={args.partition}")
    if args.account is not None:
        sbatch.append(f"--account={args.account}")
    sbatch += [
        "--requeue",
        f"--signal=B:TERM@{args.signal_seconds}",
        "--open-mode=append",
        f"--chdir={workdir}",
        f"--output={log_dir}/%x-%j.log",
        f"--error={log_dir}/%x-%j.log",
    ]
    sbatch += args.sbatch

    # What the run reads from the hub (ray backend; the local backend reads local files only): with
    # offline compute nodes each model must be a local directory or in the cache now.
    items: list[hub.Need] = []
    if args.backend == "ray":
        try:
            items = hub.needs(cfg, args.train_args)
            if not args.online:
                same = ["--config", args.config, *(a for s in args.set for a in ("--set", s))]
                same += ["--cache-dir", str(cache_dir)] if args.cache_dir else []
                same += ["--", *args.train_args] if args.train_args else []
                fix = (f"run `{PROG} prefetch {shlex.join(same)}` on this node first "
                       "(or pass --online where compute nodes reach the hub)")
                hub.check_available(items, cache_dir, fix)
        except hub.NeedError as e:
            raise UsageError(str(e)) from None

    if args.preflight:
        train = [sys.executable, "-m", "iapo_openrlhf.slurm", "probe", "--nodes", str(nodes),
                 "--report-dir", str(log_dir)]
        if args.ifname:
            train += ["--ifname", args.ifname]
        if args.online:
            train.append("--online")
        for need in items:
            if need.kind == "model":
                train += ["--model", need.name]
    else:
        train = [str(scripts / TRAIN_COMMAND[args.backend]), "--config", str(config.resolve())]
        for override in args.set:
            train += ["--set", override]
        if args.backend == "local":
            train.append("--quiet")  # progress bars do not belong in a log file; metrics.jsonl has every step
        train += args.train_args

    values = {
        "SBATCH_LINES": "\n".join(f"#SBATCH {line}" for line in sbatch),
        "SCRIPTS_DIR": shlex.quote(str(scripts)),
        "PYTHON": shlex.quote(sys.executable),
        "WORKDIR": shlex.quote(str(workdir)),
        "BACKEND": args.backend,
        "NODES": str(nodes),
        "GPUS_PER_NODE": str(gpus),
        "OUTPUT_DIR": shlex.quote(str(out)),
        "LOG_DIR": shlex.quote(str(log_dir)),
        "RAY_TIMEOUT": str(args.ray_timeout),
        "RAY_STOP_ALL": "1" if exclusive else "0",
        "START_RAY": "1" if args.ray else "0",
        "TRAIN_CMD": " ".join(_quote(a) for a in train),
        "RUN_LABEL": "preflight" if args.preflight else "training",
        "IFNAME": shlex.quote(args.ifname or ""),
        "JOB_ENV": " ".join(shlex.quote(f"{key}={value}") for key, value in job_env.items()),
        "RAY_ARGS": " ".join(shlex.quote(a) for a in args.ray_arg),
        "RAY_HEAD_ARGS": " ".join(shlex.quote(a) for a in args.ray_head_arg),
    }
    try:
        script = _Template(template.read_text(encoding="utf-8")).substitute(values)
    except (KeyError, ValueError) as e:
        raise UsageError(f"--template {template}: bad placeholder {e} (known: {', '.join(sorted(values))})") from None
    return script, {"job_name": job_name, "log_dir": log_dir, "config": config, "workdir": workdir,
                    "job_env": job_env, "cfg": cfg}


def _job_env(args: argparse.Namespace, cache_dir: Path) -> dict[str, str]:
    """The variables the job exports to every process: the hub cache (offline unless --online),
    NCCL/Gloo interfaces from --ifname, then --env (which wins)."""
    env = hub.job_env(cache_dir, offline=not args.online)
    user: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not ENV_NAME_RE.match(key):
            raise UsageError(f"--env {item}: expected KEY=VALUE with KEY letters, digits and _ (e.g. NCCL_IB_HCA=mlx5_0)")
        if key in RESERVED_ENV or key.startswith("SLURM_"):
            raise UsageError(f"--env {key}: set by the job itself, expected another variable")
        user[key] = value
    if args.ifname is not None:
        if not IFNAME_RE.match(args.ifname):
            raise UsageError(f"--ifname {args.ifname}: expected a network interface name like ib0 or eth0 "
                             "(at most 15 letters, digits and _.:@-)")
        here = [name for _, name in socket.if_nameindex()]
        if args.ifname not in here:
            print(f"{PROG}: warning: --ifname {args.ifname}: no such interface on this node (it has {', '.join(here)}); "
                  "each compute node looks it up when the job starts, and the job fails (exit 3) on a node "
                  "without it", file=sys.stderr)
        for key in IFNAME_ENV:
            env[key] = args.ifname
    env.update(user)
    return env


def _check_ray_config(args: argparse.Namespace, env: dict[str, str]) -> None:
    """Run the training command's own dry run, so that OpenRLHF's checks fail here, not in the queue.
    It runs with the job's environment: offline, the tokenizer comes from the cache (postfix check)."""
    cmd = [str(_scripts_dir() / TRAIN_COMMAND["ray"]), "--config", args.config]
    for override in args.set:
        cmd += ["--set", override]
    cmd += [*args.train_args, "--dry-run"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {result.returncode}"
        raise UsageError(f"iapo-train-ray --dry-run refused the config: {reason}")


def _sbatch(cmd: list[str]) -> tuple[subprocess.Popen, str | None, str]:
    """Start `sbatch --parsable ...`; (process, job id, "") once it printed the id (with --wait it
    runs on until the job ends), or (ended process, None, sbatch's last error line)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = proc.stdout.readline().strip().split(";")[0]
    if job_id.isdigit():
        return proc, job_id, ""
    proc.wait()
    errors = [line for line in proc.stderr.read().splitlines() if line.strip()]
    return proc, None, errors[-1] if errors else f"exit code {proc.returncode}"


def _which_sbatch(dry_run: bool, what: str) -> str | None:
    """sbatch's path; a missing sbatch is an error unless nothing is to be submitted."""
    sbatch = shutil.which("sbatch")
    if sbatch is None and not dry_run:
        raise UsageError(f"sbatch not found on PATH: run on a SLURM login node (or use --dry-run to see {what})")
    return sbatch


def submit(argv: list[str]) -> int:
    args = _submit_parser().parse_args(argv)
    script, facts = build(args)
    sbatch = _which_sbatch(args.dry_run, "the script")
    if args.backend == "ray" and args.check:
        _check_ray_config(args, facts["job_env"])
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    log_dir: Path = facts["log_dir"]
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--log-dir {log_dir}: cannot create it ({e.strerror})") from None
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = log_dir / f"{facts['job_name']}-submitted-{stamp}-{os.getpid()}.sbatch"
    path.write_text(script, encoding="utf-8")
    cmd = [sbatch, "--parsable", *(["--wait"] if args.wait else []), str(path)]
    proc, job_id, reason = _sbatch(cmd)
    if job_id is None:
        path.unlink(missing_ok=True)
        raise UsageError(f"sbatch refused the job: {reason}")
    script_path = path.with_name(f"{facts['job_name']}-{job_id}.sbatch")
    path.replace(script_path)
    log = log_dir / f"{facts['job_name']}-{job_id}.log"
    print(f"{PROG}: submitted job {job_id}; log: {log} (script: {script_path})", flush=True)
    if not args.wait:
        proc.wait()
        return 0
    code = proc.wait()
    for line in proc.stderr.read().splitlines():
        if line.strip():
            print(line, file=sys.stderr)
    print(f"{PROG}: job {job_id} finished with exit code {code}; log: {log}", flush=True)
    return code


# -- study (on the login node) ----------------------------------------------------------------------

def _study_parser() -> _Parser:
    """submit's options (they shape every training job) plus the study's own."""
    p = _submit_parser()
    p.prog = f"{PROG} study"
    p.description = ("Submit a whole study: one training job per method x seed (as `submit` would), an evaluation "
                     "job per run once its training succeeded (sbatch --dependency=afterok; iapo-eval --run: the "
                     "checkpoint chosen on the validation split, then the test protocol), and a final job that "
                     "collects every run into the paper's table (mean +- std over seeds; a failed run is listed as "
                     "failed). The study's layout: iapo_openrlhf/study.py; README 'Reproducing the paper'.")
    from .study import PAPER_METHODS

    p.add_argument("--methods", default=",".join(PAPER_METHODS),
                   help=f"methods, comma separated (default: the paper's table, {','.join(PAPER_METHODS)})")
    p.add_argument("--seeds", type=int, default=3,
                   help="training seeds per method: the config's seed, +1, +2, ... (default 3)")
    p.add_argument("--out", metavar="DIR", help="the study directory (default: the config's output.dir)")
    p.add_argument("--k", default="16,32", help="the table's k values (default 16,32, the paper's)")
    p.add_argument("--eval-arg", action="append", default=[], metavar="OPTION",
                   help="an option for every run's iapo-eval, e.g. --eval-arg=--timing=batched (repeatable)")
    p.add_argument("--eval-gpus", type=int, help="GPUs of each evaluation job (default 1; --backend local: the "
                   "training's --gpus-per-node)")
    p.add_argument("--eval-cpus", type=int, help="CPUs of each evaluation job (default: the cluster's)")
    p.add_argument("--eval-time", help="time limit of each evaluation job (default: the partition's)")
    p.add_argument("--collect-time", default="0:30:00", help="time limit of the table job (default 0:30:00)")
    study_help = {"wait": "wait for the table job (sbatch --wait), i.e. the whole study, and exit with its exit code",
                  "dry_run": "print every job's script and sbatch line, submit nothing",
                  "template": "the training jobs' sbatch template (default: slurm/job.sbatch.template)"}
    for action in p._actions:  # submit's options, as they read for a study
        action.help = study_help.get(action.dest, action.help)
    return p


def _check_eval_args(options: list[str], ks: list[int]) -> None:
    """iapo-eval options the study passes on: parsed here, so that a bad one fails before submission."""
    from .cli import eval as eval_cli

    owned = ("--model", "--run", "--config", "--set", "--name", "--out", "--data", "--val")
    for option in options:
        if not option.startswith("-"):
            raise UsageError(f"--eval-arg {option!r}: expected one iapo-eval option like --eval-arg=--timing=batched")
        if option.split("=", 1)[0] in owned:
            raise UsageError(f"--eval-arg {option}: set by the study for each run (the run, its config and "
                             "overrides, the data files of the config), expected another iapo-eval option")
    parser = eval_cli.build_parser()
    parser.exit_on_error = False
    try:
        parsed = parser.parse_args(["--model", ".", "--data", "synthetic", *options])
    except (argparse.ArgumentError, SystemExit) as e:
        raise UsageError(f"--eval-arg {' '.join(options)}: iapo-eval refuses it ({e})") from None
    try:
        evaluated = eval_cli.protocol_ks(parsed)
    except Exception as e:  # ConfigError: one line already
        raise UsageError(f"--eval-arg: {e}") from None
    missing = sorted(set(ks) - set(evaluated))
    if missing:
        raise UsageError(f"--k {','.join(map(str, ks))}: iapo-eval evaluates k = {','.join(map(str, evaluated))} with "
                         f"these --eval-arg options, expected the table's k among them (or --k {max(evaluated)})")


def _step_script(template: Path, *, sbatch: list[str], scripts: Path, workdir: Path, command: list[str], label: str,
                 job_env: dict[str, str]) -> str:
    values = {
        "SBATCH_LINES": "\n".join(f"#SBATCH {line}" for line in sbatch),
        "SCRIPTS_DIR": shlex.quote(str(scripts)),
        "WORKDIR": shlex.quote(str(workdir)),
        "STEP_CMD": " ".join(_quote(a) for a in command),
        "RUN_LABEL": shlex.quote(label),
        "JOB_ENV": " ".join(shlex.quote(f"{key}={value}") for key, value in job_env.items()),
    }
    try:
        return _Template(template.read_text(encoding="utf-8")).substitute(values)
    except (KeyError, ValueError) as e:
        raise UsageError(f"{template}: bad placeholder {e} (known: {', '.join(sorted(values))})") from None


def build_study(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Every job of the study, checked: [{"name", "kind", "script", "depends": [names], "run"}], manifest."""
    import copy

    from .config import METHODS
    from .study import format_estimate, plan

    if args.preflight:
        raise UsageError("--preflight: a study runs training jobs; check the cluster with `iapo-slurm submit "
                         "--preflight` first")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise UsageError(f"--methods {args.methods}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}, "
                         f"expected names from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise UsageError(f"--methods {args.methods}: a method twice, expected each once")
    _positive("--seeds", args.seeds)
    _positive("--eval-cpus", args.eval_cpus)
    _positive("--eval-gpus", args.eval_gpus, 0)
    for override in args.set:
        key = override.split("=", 1)[0].strip()
        if key in ("method", "seed", "output.dir"):
            raise UsageError(f"--set {override}: set for each run by the study (--methods, --seeds, --out), expected "
                             "another key")
    for flag, value in (("--eval-time", args.eval_time), ("--collect-time", args.collect_time)):
        if value is not None and not TIME_RE.match(value):
            raise UsageError(f"{flag} {value}: expected minutes, HH:MM:SS or D-HH:MM:SS (sbatch --time)")
    try:
        ks = sorted({int(k) for k in args.k.split(",")})
        if min(ks) < 1:
            raise ValueError
    except ValueError:
        raise UsageError(f"--k {args.k}: expected positive integers, comma separated, like 16,32") from None
    _check_eval_args(args.eval_arg, ks)
    config = Path(args.config)
    if not config.is_file():
        raise UsageError(f"--config {args.config}: no such file, expected a YAML config (see configs/paper/)")
    output_dir, cluster, device, cfg = _read_config(str(config), args.set, args.backend)
    workdir = Path.cwd().resolve()
    study_dir = Path(args.out) if args.out else Path(output_dir)
    study_dir = (study_dir if study_dir.is_absolute() else workdir / study_dir).resolve()
    _safe("--out", str(study_dir))
    log_dir = Path(args.log_dir).resolve() if args.log_dir else study_dir / "logs"
    prefix = args.job_name or "iapo-" + re.sub(r"[^A-Za-z0-9_.-]", "-", config.stem)
    _safe("--job-name", prefix)
    seeds = [cfg.seed + i for i in range(args.seeds)]
    runs = plan(study_dir, methods, seeds)
    scripts = _scripts_dir()
    if not (scripts / "iapo-eval").exists():
        raise UsageError(f"iapo-eval not found in {scripts} (the jobs run this environment): pip install -e .")
    jobs: list[dict] = []
    manifest: dict = {"config": str(config.resolve()), "sets": list(args.set), "backend": args.backend,
                      "methods": methods, "seeds": seeds, "ks": ks, "study_dir": str(study_dir), "runs": []}
    checked: set[str] = set()
    run_configs = []  # each run's resolved config (method and seed set): the estimate sums them
    for run in runs:
        run_sets = [*args.set, f"method={run.method}", f"seed={run.seed}", f"output.dir={run.dir}"]
        run_args = copy.copy(args)
        run_args.set, run_args.job_name, run_args.log_dir = run_sets, f"{prefix}-{run.name}", str(log_dir)
        run_args.wait = False
        script, facts = build(run_args)
        if args.backend == "ray" and args.check and run.method not in checked:  # OpenRLHF's checks, once a method
            _check_ray_config(run_args, facts["job_env"])
            checked.add(run.method)
        job_env = facts["job_env"]
        run_configs.append(facts["cfg"])
        eval_gpus = args.eval_gpus if args.eval_gpus is not None else (
            1 if args.backend == "ray" else _defaults(args, cluster, device)[1])
        sbatch = [f"--job-name={prefix}-eval-{run.name}", "--nodes=1", "--ntasks-per-node=1"]
        sbatch += [f"--gpus-per-node={eval_gpus}"] if eval_gpus else []
        sbatch += [f"--cpus-per-task={args.eval_cpus}"] if args.eval_cpus else []
        sbatch += [f"--time={args.eval_time}"] if args.eval_time else []
        sbatch += [f"--partition={args.partition}"] if args.partition else []
        sbatch += [f"--account={args.account}"] if args.account else []
        sbatch += [f"--signal=B:TERM@{SIGNAL_SECONDS}", "--open-mode=append", f"--chdir={workdir}",
                   f"--output={log_dir}/%x-%j.log", f"--error={log_dir}/%x-%j.log", *args.sbatch]
        command = [str(scripts / "iapo-eval"), "--run", str(run.dir), "--config", str(config.resolve())]
        for override in run_sets:
            command += ["--set", override]
        command += ["--name", run.name, "--out", str(run.dir / "eval"), *args.eval_arg]
        eval_script = _step_script(STEP_TEMPLATE, sbatch=sbatch, scripts=scripts, workdir=workdir, command=command,
                                   label=f"evaluation of {run.name}", job_env=job_env)
        jobs.append({"name": f"train-{run.name}", "kind": "training", "script": script, "depends": [], "run": run.name,
                     "label": f"training {run.method} seed {run.seed}"})
        jobs.append({"name": f"eval-{run.name}", "kind": "evaluation", "script": eval_script,
                     "depends": [f"train-{run.name}"], "run": run.name,
                     "label": f"evaluation of {run.method} seed {run.seed} (after its training succeeded)"})
        manifest["runs"].append({"name": run.name, "method": run.method, "seed": run.seed, "dir": str(run.dir),
                                 "train_log": f"{log_dir}/{prefix}-{run.name}-<job>.log",
                                 "eval_log": f"{log_dir}/{prefix}-eval-{run.name}-<job>.log"})
    sbatch = [f"--job-name={prefix}-table", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1",
              f"--time={args.collect_time}"]
    sbatch += [f"--partition={args.partition}"] if args.partition else []
    sbatch += [f"--account={args.account}"] if args.account else []
    sbatch += ["--open-mode=append", f"--chdir={workdir}", f"--output={log_dir}/%x-%j.log",
               f"--error={log_dir}/%x-%j.log", *args.sbatch]
    command = [sys.executable, "-m", "iapo_openrlhf.eval.collect", "--study", str(study_dir),
               "--k", ",".join(map(str, ks))]
    table = _step_script(STEP_TEMPLATE, sbatch=sbatch, scripts=scripts, workdir=workdir, command=command,
                         label="table of the study", job_env=job_env)
    jobs.append({"name": "table", "kind": "table", "script": table, "depends": [j["name"] for j in jobs], "run": None,
                 "label": "the table of every run (after all of them ended, whatever their outcome)"})
    manifest["estimate"] = format_estimate(run_configs)
    manifest["log_dir"] = str(log_dir)
    manifest["prefix"] = prefix
    return jobs, manifest


def _dependency(job: dict, ids: dict[str, str]) -> list[str]:
    """sbatch options: an evaluation waits for its training to succeed (and is dropped when it fails);
    the table waits for every job to end, whatever the outcome."""
    if not job["depends"]:
        return []
    if job["kind"] == "evaluation":
        return [f"--dependency=afterok:{':'.join(ids[d] for d in job['depends'])}", "--kill-on-invalid-dep=yes"]
    return [f"--dependency=afterany:{':'.join(ids[d] for d in job['depends'])}"]


def study(argv: list[str]) -> int:
    args = _study_parser().parse_args(argv)
    jobs, manifest = build_study(args)
    sbatch = _which_sbatch(args.dry_run, "the scripts")
    if args.dry_run:
        print(f"# iapo-slurm study: {len(manifest['runs'])} runs ({', '.join(manifest['methods'])} x seeds "
              f"{', '.join(map(str, manifest['seeds']))}) of {manifest['config']} in {manifest['study_dir']}: "
              f"{len(jobs)} jobs, nothing submitted (--dry-run)")
        print(f"# {manifest['estimate']}")
        symbolic = {j["name"]: f"<job id of {j['name']}>" for j in jobs}
        for i, job in enumerate(jobs, 1):
            print(f"{STUDY_JOB_MARK} {i} of {len(jobs)}: {job['label']} ====")
            print("# sbatch --parsable " + " ".join([*_dependency(job, symbolic), f"<{job['name']}.sbatch>"]))
            sys.stdout.write(job["script"])
        return 0
    study_dir = Path(manifest["study_dir"])
    script_dir = study_dir / "scripts"
    try:
        for d in (script_dir, Path(manifest["log_dir"])):
            d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {study_dir}: cannot create its directories ({e.strerror})") from None
    from .study import STUDY_FILE, TABLE_DIR

    ids: dict[str, str] = {}
    runs = {r["name"]: r for r in manifest["runs"]}

    def save_manifest() -> None:
        (study_dir / STUDY_FILE).write_text(json.dumps(manifest, indent=1) + "\n")

    save_manifest()
    collect_proc = None
    for job in jobs:
        path = script_dir / f"{job['name']}.sbatch"
        path.write_text(job["script"], encoding="utf-8")
        wait = args.wait and job["kind"] == "table"
        cmd = [sbatch, "--parsable", *(["--wait"] if wait else []), *_dependency(job, ids), str(path)]
        proc, job_id, reason = _sbatch(cmd)
        if job_id is None:
            cancelled = ""
            if ids and shutil.which("scancel"):
                subprocess.run(["scancel", *ids.values()], capture_output=True)
                cancelled = f"; cancelled the {len(ids)} job(s) already submitted"
            raise UsageError(f"sbatch refused the {job['label']}: {reason}{cancelled}")
        ids[job["name"]] = job_id
        if job["run"]:
            key = "train_job" if job["kind"] == "training" else "eval_job"
            runs[job["run"]][key] = job_id
            prefix = manifest["prefix"] + ("-" if job["kind"] == "training" else "-eval-")
            runs[job["run"]][key.replace("job", "log")] = str(Path(manifest["log_dir"]) / f"{prefix}{job['run']}-{job_id}.log")
        else:
            manifest["table_job"] = job_id
        save_manifest()
        print(f"{PROG}: submitted job {job_id}: {job['label']}", flush=True)
        if wait:
            collect_proc = proc
        else:
            proc.wait()
    table = study_dir / TABLE_DIR
    print(f"{PROG}: study of {len(runs)} runs submitted ({len(ids)} jobs); manifest {study_dir / STUDY_FILE}; the table "
          f"will be in {table} (metrics.md)", flush=True)
    if collect_proc is None:
        return 0
    code = collect_proc.wait()
    for line in collect_proc.stderr.read().splitlines():
        if line.strip():
            print(line, file=sys.stderr)
    print(f"{PROG}: table job {manifest['table_job']} finished with exit code {code}; table: {table / 'metrics.md'}",
          flush=True)
    return code


# -- wait-ray (runs inside the job) -------------------------------------------------------------

def _wait_parser() -> _Parser:
    p = _Parser(prog=f"{PROG} wait-ray",
                description="Inside the job: wait until the Ray cluster reports the expected nodes, CPUs and GPUs.")
    p.add_argument("--address", required=True, help="the Ray head's GCS address, host:port")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--cpus", type=float, default=0)
    p.add_argument("--gpus", type=float, default=0)
    p.add_argument("--timeout", type=float, default=DEFAULT_RAY_TIMEOUT)
    p.add_argument("--pid", type=int, action="append", default=[],
                   help="a process (the srun of a Ray step) whose exit means the cluster will not come up")
    p.add_argument("--interval", type=float, default=1.0)
    return p


def _summary(nodes: int, cpus: float, gpus: float, want: argparse.Namespace) -> str:
    return f"{nodes}/{want.nodes} node(s), {cpus:g}/{want.cpus:g} CPUs, {gpus:g}/{want.gpus:g} GPUs"


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


class _RayPoller(threading.Thread):
    """Connects to Ray and reads the alive nodes every `interval` s, in a thread of its own: a Ray
    call can block for minutes when the head dies under it (ray.init retries the GCS), and the
    caller must still notice a Ray step's exit or its deadline."""

    def __init__(self, address: str, interval: float):
        super().__init__(daemon=True)
        self.address, self.interval = address, interval
        self.nodes: list[dict] | None = None
        self.error: str | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        import ray

        try:
            ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
            try:
                while not self.halt.is_set():
                    self.nodes = [n for n in ray.nodes() if n.get("Alive")]
                    self.halt.wait(self.interval)
            finally:
                ray.shutdown()
        except Exception as e:  # noqa: BLE001 - reported by the caller in one line
            self.error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def wait_ray(argv: list[str]) -> int:
    args = _wait_parser().parse_args(argv)
    start = time.monotonic()
    deadline = start + args.timeout
    status = "the head is not reachable yet"
    poller: _RayPoller | None = None
    last_report = start
    code = 1
    try:
        while True:
            for pid in args.pid:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    print(f"{PROG} wait-ray: error: a Ray step (pid {pid}) exited; Ray reports {status}",
                          file=sys.stderr, flush=True)
                    return code
                except PermissionError:
                    pass
            if poller is None and _reachable(args.address):
                poller = _RayPoller(args.address, args.interval)
                poller.start()
                status = "the head is reachable, connecting"
            if poller is not None and poller.error:
                print(f"{PROG} wait-ray: error: Ray at {args.address}: {poller.error}", file=sys.stderr, flush=True)
                return code
            alive = poller.nodes if poller is not None else None
            if alive is not None:
                cpus = sum(n["Resources"].get("CPU", 0) for n in alive)
                gpus = sum(n["Resources"].get("GPU", 0) for n in alive)
                status = _summary(len(alive), cpus, gpus, args)
                if len(alive) >= args.nodes and cpus >= args.cpus and gpus >= args.gpus:
                    addresses = ", ".join(sorted(str(n.get("NodeManagerAddress")) for n in alive))
                    print(f"Ray cluster ready after {time.monotonic() - start:.0f}s: {status}; node addresses "
                          f"{addresses}", flush=True)
                    code = 0
                    return code
            now = time.monotonic()
            if now >= deadline:
                print(f"{PROG} wait-ray: error: timed out after {args.timeout:g}s: Ray at {args.address} "
                      f"reports {status}", file=sys.stderr, flush=True)
                return code
            if now - last_report >= 10:
                print(f"waiting for Ray: {status}", flush=True)
                last_report = now
            time.sleep(args.interval)
    finally:
        if poller is not None:
            poller.halt.set()
            poller.join(10)
            if poller.is_alive():  # stuck in a Ray call on a dead head: do not wait for it
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)


# -- prefetch (on the login node) ------------------------------------------------------------------

def _prefetch_parser() -> _Parser:
    p = _Parser(prog=f"{PROG} prefetch",
                description="Download the models and hub datasets a run reads into the cache its job will read "
                            "offline (run it on the login node; the cache must be on a filesystem the compute "
                            "nodes mount).")
    p.add_argument("--config", required=True, help="the YAML config (the same file as for submit)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, as for submit (repeatable)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="the cache (HF_HOME) to fill (default: $HF_HOME, else ~/.cache/huggingface); pass the "
                        "same to submit")
    p.add_argument("train_args", nargs="*", metavar="-- TRAINING_ARGS",
                   help="after --: the training options given to submit (e.g. --reward.model_name_or_path ...)")
    return p


def prefetch(argv: list[str]) -> int:
    args = _prefetch_parser().parse_args(argv)
    if not Path(args.config).is_file():
        raise UsageError(f"--config {args.config}: no such file, expected a YAML config (see configs/)")
    *_, cfg = _read_config(args.config, args.set, "ray")
    cache_dir = Path(args.cache_dir).expanduser().resolve() if args.cache_dir else hub.default_cache_dir().resolve()
    try:
        items = hub.needs(cfg, args.train_args)
    except hub.NeedError as e:
        raise UsageError(str(e)) from None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--cache-dir {cache_dir}: cannot create it ({e.strerror})") from None
    if not os.access(cache_dir, os.W_OK):
        raise UsageError(f"--cache-dir {cache_dir}: not writable")
    print(f"{PROG} prefetch: {len(items)} item(s) for {args.config} into {cache_dir}", flush=True)
    try:
        hub.prefetch(items, cache_dir)
    except hub.NeedError as e:
        print(f"{PROG} prefetch: error: {e}", file=sys.stderr)
        return 1
    same = ["--config", args.config, *(a for s in args.set for a in ("--set", s))]
    same += ["--cache-dir", str(cache_dir)] if args.cache_dir else []
    print(f"{PROG} prefetch: done; the job reads them offline from {cache_dir}: "
          f"{PROG} submit {shlex.join(same)} ...", flush=True)
    return 0


# -- node-ip (runs inside the job, on every node) ---------------------------------------------------

SIOCGIFADDR = 0x8915
DEFAULT_ROUTE_PROBE = "8.8.8.8"  # as Ray does: only the route to it is looked up, nothing is sent


def interface_addresses() -> dict[str, str | None]:
    """This node's interfaces and their (primary) IPv4 address, None for an interface without one."""
    import fcntl
    import struct

    result: dict[str, str | None] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                result[name] = socket.inet_ntoa(packed[20:24])
            except OSError:
                result[name] = None
    return result


def source_address(destination: str) -> str:
    """The address this node sends from to reach `destination` (the kernel's route; nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((destination, 9))
        return s.getsockname()[0]


def _resolve(host: str, what: str) -> str:
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
    except (OSError, IndexError):
        raise UsageError(f"{what} {host}: cannot resolve it to an IPv4 address") from None


def _node_addr(node: str) -> str:
    """SLURM's NodeAddr of `node` (what slurmctld and srun reach it at), as an IPv4 address."""
    result = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True)
    match = re.search(r"\bNodeAddr=(\S+)", result.stdout)
    if result.returncode != 0 or not match:
        reason = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        raise UsageError(f"--towards-node {node}: scontrol show node did not give its NodeAddr ({reason})")
    return _resolve(match.group(1), f"NodeAddr of {node}:")


def _node_ip_parser() -> _Parser:
    p = _Parser(prog=f"{PROG} node-ip",
                description="Inside the job: the address this node's Ray uses, printed as 'ADDRESS INTERFACE', "
                            "or with --exec appended to a command as --node-ip-address=ADDRESS.")
    p.add_argument("--ifname", help="the address of this interface (an error on a node without it)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--towards", metavar="HOST", help="else the source address of the route to HOST")
    where.add_argument("--towards-node", metavar="NODE", help="else the route to this SLURM node's NodeAddr")
    p.add_argument("--free-port", metavar="OPTION", action="append", default=[],
                   help="with --exec: also append OPTION=PORT, a port free on ADDRESS now (repeatable); for "
                        "Ray options whose default is a fixed port that another job on the node may hold")
    p.add_argument("--exec", dest="command", nargs=argparse.REMAINDER,
                   help="exec this command with --node-ip-address=ADDRESS appended (the rest of the line)")
    return p


def choose_node_ip(ifname: str | None, towards: str | None) -> tuple[str, str | None]:
    """(address, interface): the IPv4 address of `ifname`, else of the interface routing to `towards`."""
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    addresses = interface_addresses()
    if ifname:
        if ifname not in addresses:
            raise UsageError(f"--ifname {ifname}: no such interface on node {node} (it has {', '.join(addresses)})")
        if addresses[ifname] is None:
            raise UsageError(f"--ifname {ifname}: no IPv4 address on node {node}")
        return addresses[ifname], ifname
    if towards is None:
        raise UsageError("expected --ifname, --towards HOST or --towards-node NODE")
    try:
        ip = source_address(towards)
    except OSError as e:
        raise UsageError(f"node {node} has no route to {towards} ({e.strerror}): pass --ifname") from None
    if ipaddress.ip_address(ip).is_loopback:
        # `towards` is this node (a one-node job whose NodeAddr is loopback): Ray would replace a
        # loopback address by the one with the default route; say so by choosing that one here.
        try:
            ip = source_address(DEFAULT_ROUTE_PROBE)
        except OSError:
            pass
    return ip, next((name for name, addr in addresses.items() if addr == ip), None)


def node_ip(argv: list[str]) -> int:
    args = _node_ip_parser().parse_args(argv)
    towards = args.towards
    if args.towards_node and not args.ifname:
        towards = _node_addr(args.towards_node)
    elif towards is not None:
        towards = _resolve(towards, "--towards")
    ip, interface = choose_node_ip(args.ifname, towards)
    if not args.command:
        print(ip, interface or "-", flush=True)
        return 0
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    how = f"interface {args.ifname}" if args.ifname else f"interface {interface or '?'}, the route to {towards}"
    print(f"{PROG} node-ip: node {node}: Ray address {ip} ({how})", flush=True)
    command = [*args.command, f"--node-ip-address={ip}", *(f"{option}={_free_port_on(ip)}" for option in args.free_port)]
    # vLLM's processes find their node's address in VLLM_HOST_IP, else by a route to 8.8.8.8
    # (another interface, or none on nodes without a default route): the Ray address, per node.
    env = {**os.environ, "VLLM_HOST_IP": os.environ.get("VLLM_HOST_IP") or ip}
    try:
        os.execvpe(command[0], command, env)
    except OSError as e:
        raise UsageError(f"--exec {command[0]}: {e.strerror}") from None
    return 1  # not reached


# -- probe (the preflight job's phase 3) --------------------------------------------------------------

def _probe_parser() -> _Parser:
    p = _Parser(prog=f"{PROG} probe",
                description="Inside a preflight job (RAY_ADDRESS set): one Ray actor per node reports its address, "
                            "the job's environment and model cache; then a gloo all-reduce across the nodes.")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--ifname", help="the interface every node's Ray address must be on")
    p.add_argument("--model", action="append", default=[], help="a model each node must find (directory or hub name)")
    p.add_argument("--online", action="store_true", help="a model missing from the cache is not an error")
    p.add_argument("--report-dir", help="write <job name>-<job id>-preflight.json here")
    p.add_argument("--timeout", type=float, default=180, help="seconds for each round of the probe")
    return p


def _probe_node(names: list[str], models: list[str]) -> dict[str, Any]:
    """On one node (inside a Ray actor): what the training's actors there would see."""
    import ray

    ip = ray.util.get_node_ip_address()
    addresses = interface_addresses()
    hub_cache = Path(os.environ.get("HF_HUB_CACHE") or hub.default_cache_dir() / "hub")
    found = {}
    for name in models:
        local = os.path.isdir(name)
        directory = Path(name) if local else hub.snapshot_dir(name, hub_cache)
        if directory is None:
            found[name] = f"not in the cache {hub_cache}"
        else:
            missing = hub.missing_model_files(directory)
            found[name] = f"missing {', '.join(missing)} in {directory}" if missing else "ok"
    return {
        "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
        "ip": ip,
        "interface": next((n for n, a in addresses.items() if a == ip), None),
        "env": {name: os.environ.get(name) for name in names},
        "vllm_host_ip": os.environ.get("VLLM_HOST_IP"),
        "models": found,
        "pid": os.getpid(),
    }


def _gloo_allreduce(master: str, port: int, rank: int, world: int, interface: str | None) -> dict[str, Any]:
    """One rank of a gloo all-reduce; GLOO_SOCKET_IFNAME as the job set it, else the Ray interface."""
    import datetime

    import torch
    import torch.distributed as dist

    given = os.environ.get("GLOO_SOCKET_IFNAME")
    if not given and interface:
        os.environ["GLOO_SOCKET_IFNAME"] = interface  # this actor process only
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        value = torch.tensor([float(rank + 1)])
        dist.all_reduce(value)
    finally:
        dist.destroy_process_group()
    return {"rank": rank, "sum": value.item(), "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
            "from_job": bool(given)}


def _free_port_on(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def probe(argv: list[str]) -> int:
    args = _probe_parser().parse_args(argv)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    names = os.environ.get("IAPO_JOB_ENV", "").split()
    expected = {name: os.environ.get(name) for name in names}  # this process is the job's driver
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), logging_level="ERROR", log_to_driver=False)
    problems: list[str] = []
    report: dict[str, Any] = {"driver_env": expected, "nodes": [], "gloo": None, "problems": problems}
    unset = [name for name, value in expected.items() if value is None]
    if unset:
        problems.append(f"the driver lacks the job's {', '.join(unset)}")
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if len(alive) != args.nodes:
            problems.append(f"Ray reports {len(alive)} node(s), expected {args.nodes}")

        @ray.remote(num_cpus=0)
        class Probe:  # the functions come from the installed package on each node (not from __main__)
            def facts(self, names, models):
                from iapo_openrlhf.slurm import _probe_node

                return _probe_node(names, models)

            def free_port(self, ip):
                from iapo_openrlhf.slurm import _free_port_on

                return _free_port_on(ip)

            def allreduce(self, master, port, rank, world, interface):
                from iapo_openrlhf.slurm import _gloo_allreduce

                return _gloo_allreduce(master, port, rank, world, interface)

        actors = [Probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
                  for n in alive]
        facts = ray.get([a.facts.remote(names, args.model) for a in actors], timeout=args.timeout)
        report["nodes"] = facts
        for f in facts:
            checks = []
            wrong = {k: v for k, v in f["env"].items() if v != expected[k]}
            checks.append("environment: " + ("; ".join(f"{k}={v!r}, the job set {expected[k]!r}" for k, v in wrong.items())
                                             if wrong else f"all {len(names)} job variables as set"))
            if args.ifname and f["interface"] != args.ifname:
                problems.append(f"node {f['node']}: Ray address {f['ip']} is on {f['interface']}, expected {args.ifname}")
            if f["vllm_host_ip"] != f["ip"]:
                problems.append(f"node {f['node']}: VLLM_HOST_IP is {f['vllm_host_ip']}, expected the Ray address {f['ip']}")
            for model, state in f["models"].items():
                checks.append(f"model {model}: {state}")
                if state != "ok" and not (args.online and state.startswith("not in the cache")):
                    problems.append(f"node {f['node']}: model {model}: {state}")
            if wrong:
                problems.append(f"node {f['node']}: environment differs: {', '.join(sorted(wrong))}")
            print(f"probe: node {f['node']}: Ray address {f['ip']} (interface {f['interface']}); " + "; ".join(checks),
                  flush=True)
        ips = [f["ip"] for f in facts]
        if len(set(ips)) != len(ips):
            problems.append(f"nodes share a Ray address: {ips}")
        if facts:
            port = ray.get(actors[0].free_port.remote(facts[0]["ip"]), timeout=args.timeout)
            world = len(actors)
            results = ray.get([a.allreduce.remote(facts[0]["ip"], port, rank, world, f["interface"])
                               for rank, (a, f) in enumerate(zip(actors, facts))], timeout=args.timeout)
            want = world * (world + 1) / 2
            report["gloo"] = results
            sums = {r["sum"] for r in results}
            ifnames = sorted({str(r["gloo_ifname"]) for r in results})
            source = "GLOO_SOCKET_IFNAME from the job" if all(r["from_job"] for r in results) else "the Ray interface"
            line = (f"probe: gloo all-reduce across {world} node(s) via {facts[0]['ip']}:{port} over {', '.join(ifnames)} "
                    f"({source}): sum {', '.join(f'{v:g}' for v in sorted(sums))}, expected {want:g}")
            print(line, flush=True)
            if sums != {want}:
                problems.append(line)
    except Exception as e:  # noqa: BLE001 - a failed probe is a finding, reported in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        problems.append(f"{type(e).__name__}: {first}")
    finally:
        ray.shutdown()
    if args.report_dir:
        name = f"{os.environ.get('SLURM_JOB_NAME', 'iapo')}-{os.environ.get('SLURM_JOB_ID', 'nojob')}-preflight.json"
        try:
            Path(args.report_dir, name).write_text(json.dumps(report, indent=1, default=str))
        except OSError as e:
            problems.append(f"cannot write the report in {args.report_dir} ({e.strerror})")
    for problem in problems:
        print(f"{PROG} probe: error: {problem}", file=sys.stderr, flush=True)
    print(f"probe: {'FAILED' if problems else 'passed'}: {len(report['nodes'])} node(s)", flush=True)
    return 1 if problems else 0


# -- entry point -------------------------------------------------------------------------------

USAGE = f"usage: {PROG} submit --config FILE [--nodes N] [options] [-- TRAINING_ARGS]   ({PROG} submit --help)"
STUDY_USAGE = (f"       {PROG} study --config FILE --methods grpo,dapo,gfpo,gtpo,sgrpo,iapo --seeds 3 [options]   "
               f"({PROG} study --help)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        print(STUDY_USAGE)
        print(f"       {PROG} prefetch --config FILE [--cache-dir DIR] [-- TRAINING_ARGS]   ({PROG} prefetch --help)")
        print(f"       {PROG} wait-ray | node-ip | probe ...   (used inside the job)")
        return 0
    commands = {"submit": submit, "study": study, "prefetch": prefetch, "wait-ray": wait_ray, "node-ip": node_ip,
                "probe": probe}
    try:
        if not argv:
            raise UsageError(f"expected a command: {PROG} submit --config FILE ... ({PROG} submit --help)")
        command, rest = argv[0], argv[1:]
        if command not in commands:
            raise UsageError(f"unknown command {command!r}, expected one of {sorted(commands)}")
        return commands[command](rest)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
