"""`iapo-slurm`: submit a training run as a SLURM job that brings up its own Ray cluster.

`iapo-slurm submit --config FILE --nodes N ...` renders `slurm/job.sbatch.template` (a
`string.Template` with `@@{NAME}` placeholders) into an sbatch script and submits it; `--dry-run`
prints the script instead. The job starts a Ray head on the batch host and workers on the other
nodes with `srun`, waits until Ray reports every node, CPU and GPU (`iapo-slurm wait-ray`, below),
runs `iapo-train-ray` (or `iapo-train` with `--backend local`), stops Ray and exits with the
training's exit code; on SIGTERM it requeues itself and the next run resumes from the last
checkpoint. Every problem found before submission is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import shlex
import shutil
import socket
import string
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any


PROG = "iapo-slurm"
# slurm/ sits beside the package in a checkout (pip install -e); a wheel install puts it under
# <prefix>/share/iapo-openrlhf (setup.py data_files).
TEMPLATE = next(
    (p for p in (Path(__file__).resolve().parent.parent / "slurm" / "job.sbatch.template",
                 Path(sys.prefix) / "share" / "iapo-openrlhf" / "slurm" / "job.sbatch.template") if p.is_file()),
    Path(__file__).resolve().parent.parent / "slurm" / "job.sbatch.template",
)
DEFAULT_GPUS_PER_NODE = 8
DEFAULT_RAY_TIMEOUT = 600
SIGNAL_SECONDS = 120  # SIGTERM this long before the time limit (--signal=B:TERM@120)
EXIT_JOB_FAILED = 3  # the job itself failed (Ray did not come up), see the template
TRAIN_COMMAND = {"ray": "iapo-train-ray", "local": "iapo-train"}
# [days-]hours:minutes:seconds and the other forms sbatch --time accepts.
TIME_RE = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}|UNLIMITED|INFINITE)$")
# #SBATCH values are not parsed by a shell: keep them to characters that need no quoting.
SAFE_VALUE_RE = re.compile(r"^[A-Za-z0-9_.,:/+@=-]+$")


class UsageError(Exception):
    """A problem found before anything is submitted; the message is the one line shown."""


class _Template(string.Template):
    delimiter = "@@"
    braceidpattern = r"[A-Z_]+"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2 (argparse prints the usage too)
        raise UsageError(message)


# -- the config --------------------------------------------------------------------------------

def _read_config(path: str, sets: list[str], backend: str) -> tuple[str, dict[str, Any], str]:
    """Validate the config as the training will (load_config); (output.dir, cluster section, device)."""
    import dataclasses

    from .config import ConfigError, load_config

    try:
        # The Ray backend resolves model and data paths on the cluster (or as hub names).
        cfg = load_config(path, sets, local_files=backend == "local")
    except ConfigError as e:
        raise UsageError(str(e)) from None
    return cfg.output.dir, dataclasses.asdict(cfg.cluster), cfg.device


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
    p.add_argument("--time", help="time limit, e.g. 2-00:00:00; SIGTERM arrives 120 s before it and the job requeues")
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
    p.add_argument("--ray-timeout", type=int, default=DEFAULT_RAY_TIMEOUT,
                   help=f"seconds to wait for Ray to report every node and GPU (default {DEFAULT_RAY_TIMEOUT})")
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
    output_dir, cluster, device = _read_config(str(config), args.set, args.backend)
    nodes, gpus = _defaults(args, cluster, device)
    _positive("--nodes", nodes)
    _positive("--gpus-per-node", gpus, 0)
    _positive("--cpus-per-task", args.cpus_per_task)
    _positive("--ray-timeout", args.ray_timeout)
    if args.backend == "local" and nodes != 1:
        raise UsageError(f"--nodes {nodes}: --backend local runs one process on one node, expected --nodes 1")
    if args.backend == "ray":
        if gpus < 1:
            raise UsageError("--gpus-per-node 0: --backend ray runs OpenRLHF, which needs GPUs; "
                             "use --backend local for a CPU-only job")
        for key, value in (("nodes", nodes), ("gpus_per_node", gpus)):
            if key in cluster and int(cluster[key]) != value:
                flag = "--" + key.replace("_", "-")
                raise UsageError(
                    f"{flag} {value}: the config's cluster.{key} is {cluster[key]} and sets the Ray layout; "
                    f"pass --set cluster.{key}={value} (and adjust cluster.vllm_engines) or {flag} {cluster[key]}"
                )
    if args.time is not None and not TIME_RE.match(args.time):
        raise UsageError(f"--time {args.time}: expected minutes, HH:MM:SS or D-HH:MM:SS (sbatch --time)")
    for name in ("partition", "account", "job_name"):
        value = getattr(args, name)
        if value is not None:
            _safe("--" + name.replace("_", "-"), value)
    for option in args.sbatch:
        if not option.startswith("-") or any(c.isspace() for c in option):
            raise UsageError(f"--sbatch {option!r}: expected one sbatch option like --qos=high (no spaces)")

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
        f"--signal=B:TERM@{SIGNAL_SECONDS}",
        "--open-mode=append",
        f"--chdir={workdir}",
        f"--output={log_dir}/%x-%j.log",
        f"--error={log_dir}/%x-%j.log",
    ]
    sbatch += args.sbatch

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
        "TRAIN_CMD": " ".join(shlex.quote(a) for a in train),
    }
    try:
        script = _Template(template.read_text(encoding="utf-8")).substitute(values)
    except (KeyError, ValueError) as e:
        raise UsageError(f"--template {template}: bad placeholder {e} (known: {', '.join(sorted(values))})") from None
    return script, {"job_name": job_name, "log_dir": log_dir, "config": config, "workdir": workdir}


def _check_ray_config(args: argparse.Namespace) -> None:
    """Run the training command's own dry run, so that OpenRLHF's checks fail here, not in the queue."""
    cmd = [str(_scripts_dir() / TRAIN_COMMAND["ray"]), "--config", args.config]
    for override in args.set:
        cmd += ["--set", override]
    cmd += [*args.train_args, "--dry-run"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {result.returncode}"
        raise UsageError(f"iapo-train-ray --dry-run refused the config: {reason}")


def submit(argv: list[str]) -> int:
    args = _submit_parser().parse_args(argv)
    script, facts = build(args)
    sbatch = shutil.which("sbatch")
    if sbatch is None and not args.dry_run:
        raise UsageError("sbatch not found on PATH: run on a SLURM login node (or use --dry-run to see the script)")
    if args.backend == "ray" and args.check:
        _check_ray_config(args)
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
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline().strip()
    job_id = first.split(";")[0]
    if not job_id.isdigit():
        proc.wait()
        path.unlink(missing_ok=True)
        errors = [line for line in proc.stderr.read().splitlines() if line.strip()]
        reason = errors[-1] if errors else f"exit code {proc.returncode}"
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


def wait_ray(argv: list[str]) -> int:
    args = _wait_parser().parse_args(argv)
    start = time.monotonic()
    deadline = start + args.timeout
    status = "the head is not reachable yet"
    connected = False
    last_report = start
    try:
        while True:
            for pid in args.pid:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    print(f"{PROG} wait-ray: error: a Ray step (pid {pid}) exited; Ray reports {status}",
                          file=sys.stderr, flush=True)
                    return 1
                except PermissionError:
                    pass
            if not connected and _reachable(args.address):
                import ray

                ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
                connected = True
            if connected:
                alive = [n for n in ray.nodes() if n.get("Alive")]
                cpus = sum(n["Resources"].get("CPU", 0) for n in alive)
                gpus = sum(n["Resources"].get("GPU", 0) for n in alive)
                status = _summary(len(alive), cpus, gpus, args)
                if len(alive) >= args.nodes and cpus >= args.cpus and gpus >= args.gpus:
                    print(f"Ray cluster ready after {time.monotonic() - start:.0f}s: {status}", flush=True)
                    return 0
            now = time.monotonic()
            if now >= deadline:
                print(f"{PROG} wait-ray: error: timed out after {args.timeout:g}s: Ray at {args.address} "
                      f"reports {status}", file=sys.stderr, flush=True)
                return 1
            if now - last_report >= 10:
                print(f"waiting for Ray: {status}", flush=True)
                last_report = now
            time.sleep(args.interval)
    finally:
        if connected:
            ray.shutdown()


# -- entry point -------------------------------------------------------------------------------

USAGE = f"usage: {PROG} submit --config FILE [--nodes N] [options] [-- TRAINING_ARGS]   ({PROG} submit --help)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        print(f"       {PROG} wait-ray ...   (used inside the job)")
        return 0
    commands = {"submit": submit, "wait-ray": wait_ray}
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
