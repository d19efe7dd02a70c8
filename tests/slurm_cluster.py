"""A private SLURM cluster started on this machine for the tests (tests/test_slurm*.py).

`slurm_cluster(root, nodes, ...)` starts its own munged (own key and socket), slurmctld and one
slurmd per node on free ports, state under `root`, no cgroups, no accounting, and stops them at
the end. A node either shares this machine's network (the one-node cluster of test_slurm.py), or
runs in a network namespace of its own (`netns_network`): each such node has its own interfaces
and addresses, joined to the other nodes by bridges, so that SLURM, Ray and gloo really talk
across distinct addresses; its own mount namespace (from `ip netns exec`) gets node-local
directories bind-mounted where a real node has node-local storage (Ray's temp dir).

Skips (pytest.skip, saying why) only when a tool is missing or a daemon cannot start: slurm-wlm
and munge from apt (`.ci/run` installs them), and root with iproute2 for network namespaces.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])


@dataclass
class Node:
    name: str
    addr: str  # SLURM's NodeAddr
    cpus: int
    netns: str | None = None  # run slurmd in this network namespace (None: this machine's network)
    binds: dict[str, str] = field(default_factory=dict)  # mount point -> node-local source (netns nodes)


class Cluster:
    def __init__(self, root: Path, env: dict, nodes: list[Node]):
        self.root, self.env, self.nodes = root, env, nodes
        self.node = nodes[0].name

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def last_error(*paths: Path) -> str:
    lines = []
    for path in paths:
        if path.exists():
            lines += [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"fatal|error", line, re.I)]
    return (errors or lines or ["no output"])[-1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()



def kill_processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose command line contains `text` (a job's own Ray
    temp dir), each killed: what a job left running, so that one leak does not slow the tests after."""
    left = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                left.append((int(proc.name), cmdline[:200]))
    for pid, _ in left:
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
    return left

def _which_or_skip() -> dict[str, str]:
    tools = {name: shutil.which(name, path=SEARCH_PATH)
             for name in ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "scancel", "squeue")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        pytest.skip(f"SLURM not installed here ({', '.join(missing)} not found): "
                    "apt-get install slurm-wlm munge (.ci/run does)")
    return tools


@contextlib.contextmanager
def slurm_cluster(root: Path, nodes: list[Node], ctld_addr: str = "127.0.0.1") -> Iterator[Cluster]:
    """Start munged, slurmctld (on this machine's network, at ctld_addr) and a slurmd per node;
    yield once every node is idle; cancel what is left of the jobs and stop the daemons."""
    tools = _which_or_skip()
    root.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    conf = root / "slurm.conf"
    env = dict(os.environ, SLURM_CONF=str(conf), PATH=SEARCH_PATH)
    try:
        munge = root / "munge"
        munge.mkdir(mode=0o711)
        munge.chmod(0o711)
        key = munge / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        socket_path = munge / "munge.socket"
        munged = subprocess.Popen(
            [tools["munged"], "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
             f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
             f"--seed-file={munge / 'seed'}"],
            stdout=subprocess.DEVNULL, stderr=(munge / "munged.err").open("w"),
        )
        procs.append(munged)
        for _ in range(100):
            if socket_path.exists() or munged.poll() is not None:
                break
            time.sleep(0.1)
        if not socket_path.exists():
            pytest.skip(f"slurmctld cannot start: munged failed: {last_error(munge / 'munged.err', munge / 'munged.log')}")

        for sub in ("state", "spool", "log"):
            (root / sub).mkdir()
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        memory = int(mem_kb / 1024 * 0.9 / len(nodes))
        host = socket.gethostname().split(".")[0]
        node_lines = "\n".join(f"NodeName={n.name} NodeAddr={n.addr} CPUs={n.cpus} RealMemory={memory} State=UNKNOWN"
                               for n in nodes)
        conf.write_text(f"""\
ClusterName=iapotest
SlurmctldHost={host}({ctld_addr})
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path},cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
{node_lines}
PartitionName=debug Nodes={','.join(n.name for n in nodes)} Default=YES MaxTime=INFINITE State=UP
""")
        cluster = Cluster(root, env, nodes)
        ctld_err = root / "log" / "slurmctld.err"
        ctld = subprocess.Popen([tools["slurmctld"], "-D", "-f", str(conf)], env=env,
                                stdout=subprocess.DEVNULL, stderr=ctld_err.open("w"))
        procs.append(ctld)
        for _ in range(60):
            if ctld.poll() is not None or "is UP" in cluster.run("scontrol", "ping").stdout:
                break
            time.sleep(0.5)
        if ctld.poll() is not None or "is UP" not in cluster.run("scontrol", "ping").stdout:
            pytest.skip(f"slurmctld cannot start: {last_error(ctld_err, root / 'log' / 'slurmctld.log')}")

        for node in nodes:
            cmd = [tools["slurmd"], "-D", "-f", str(conf), "-N", node.name]
            (root / "spool" / node.name).mkdir()
            if node.netns:
                # In the node's network namespace and a private mount namespace, where the node-local
                # bind mounts stay. (Not `ip netns exec`: it remounts /sys, hiding the cgroup
                # filesystems slurmd needs.)
                mounts = " && ".join(f"mount --bind {src} {dst}" for dst, src in node.binds.items()) or "true"
                cmd = ["nsenter", f"--net=/run/netns/{node.netns}", "unshare", "--mount", "--propagation", "private",
                       "sh", "-c", f'{mounts} && exec "$0" "$@"', *cmd]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                          stderr=(root / "log" / f"slurmd-{node.name}.err").open("w")))
        deadline = time.monotonic() + 60
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            out = cluster.run("sinfo", "-h", "-N", "-o", "%N %T").stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            if all(states.get(n.name) == "idle" for n in nodes) or any(p.poll() is not None for p in procs):
                break
            time.sleep(0.5)
        bad = [n.name for n in nodes if states.get(n.name) != "idle"]
        assert not bad, (f"SLURM node(s) {bad} did not become idle ({states}): "
                         + "; ".join(last_error(root / "log" / f"slurmd-{n}.err", root / "log" / f"slurmd-{n}.log")
                                     for n in bad))
        yield cluster
    finally:
        if len(procs) > 1:  # cancel what is left of our jobs before the daemons go
            ids = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env).stdout.split()
            if ids:
                subprocess.run(["scancel", *ids], env=env, capture_output=True)
                time.sleep(12)
        for proc in reversed(procs):
            stop(proc)


# -- network namespaces -------------------------------------------------------------------------------

def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def _free_subnets(count: int) -> list[ipaddress.IPv4Network]:
    """`count` /24 networks under 10.0.0.0/8 that no interface or route here uses."""
    used = [ipaddress.ip_network(m, strict=False)
            for m in re.findall(r"\b(\d+\.\d+\.\d+\.\d+/\d+)", _ip("-4", "addr").stdout + _ip("-4", "route").stdout)]
    for _ in range(200):
        second = secrets.randbelow(150) + 100
        nets = [ipaddress.ip_network(f"10.{second}.{i + 1}.0/24") for i in range(count)]
        if not any(n.overlaps(u) for n in nets for u in used if u.prefixlen > 0):
            return nets
    raise RuntimeError("no free 10.x.y.0/24 networks")


@dataclass
class Network:
    namespaces: list[str]  # one per node
    subnets: list[ipaddress.IPv4Network]  # one per interface
    interfaces: list[str]  # the interface names inside every namespace, one per subnet
    host_addr: str  # this machine's address on the first subnet (where slurmctld listens)

    def addr(self, node: int, net: int) -> str:
        return str(self.subnets[net].network_address + 11 + node)


@contextlib.contextmanager
def netns_network(n_nodes: int, interfaces: tuple[str, ...] = ("mgmt0", "fast0")) -> Iterator[Network]:
    """n_nodes network namespaces, each with one interface per name in `interfaces`; interface i of
    every namespace is on bridge i (subnet i, node k at .11+k); this machine has .1 on subnet 0 only."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    if shutil.which("ip", path=SEARCH_PATH) is None:
        pytest.skip("iproute2 not installed (apt-get install iproute2)")
    if shutil.which("nsenter", path=SEARCH_PATH) is None or shutil.which("unshare", path=SEARCH_PATH) is None:
        pytest.skip("nsenter/unshare not installed (util-linux)")
    tag = "iapo" + secrets.token_hex(2)
    subnets = _free_subnets(len(interfaces))
    namespaces = [f"{tag}n{k}" for k in range(n_nodes)]
    bridges = [f"{tag}b{i}" for i in range(len(interfaces))]
    made_ns: list[str] = []
    made_br: list[str] = []

    def must(*args: str) -> None:
        result = _ip(*args)
        if result.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")

    try:
        probe = _ip("netns", "add", namespaces[0])
        if probe.returncode != 0:
            pytest.skip(f"cannot create a network namespace here: {probe.stderr.strip()}")
        made_ns.append(namespaces[0])
        for ns in namespaces[1:]:
            must("netns", "add", ns)
            made_ns.append(ns)
        for i, (bridge, subnet) in enumerate(zip(bridges, subnets)):
            must("link", "add", bridge, "type", "bridge")
            made_br.append(bridge)
            must("link", "set", bridge, "up")
            if i == 0:
                must("addr", "add", f"{subnet.network_address + 1}/24", "dev", bridge)
        network = Network(namespaces, subnets, list(interfaces), str(subnets[0].network_address + 1))
        for k, ns in enumerate(namespaces):
            must("-n", ns, "link", "set", "lo", "up")
            for i, name in enumerate(interfaces):
                outside = f"{tag}v{k}{i}"
                must("link", "add", outside, "type", "veth", "peer", "name", name, "netns", ns)
                must("link", "set", outside, "master", bridges[i], "up")
                must("-n", ns, "addr", "add", f"{network.addr(k, i)}/24", "dev", name)
                must("-n", ns, "link", "set", name, "up")
        yield network
    finally:
        for ns in made_ns:  # removes the veth pairs with them
            _ip("netns", "del", ns)
        for bridge in made_br:
            _ip("link", "del", bridge)
