"""iapo-slurm across nodes: a two-node SLURM cluster whose slurmd each run in a network namespace of
their own (tests/slurm_cluster.py), so that the job's Ray head and worker, and a gloo all-reduce
between them, really run between distinct addresses.

Each "node" has two interfaces, mgmt0 (10.x.1.0/24: SLURM's NodeAddr, where slurmctld reaches it)
and fast0 (10.x.2.0/24, as a second network like InfiniBand next to Ethernet), and a node-local Ray
temp dir (bind-mounted in its own mount namespace). The jobs are `iapo-slurm submit --preflight`
jobs: the real sbatch script brings up Ray on both nodes (head by srun on the batch host, worker
by srun on the other), waits for both, then `iapo-slurm probe` runs one Ray actor per node that
reports its address, the job's environment and the model cache, and a gloo all-reduce crosses
the nodes; then the job tears Ray down. Three jobs at once:

- default: no --ifname: every node's Ray address is its route towards the other (mgmt0);
- fast: --ifname fast0: Ray on the fast0 addresses, NCCL/GLOO_SOCKET_IFNAME=fast0 in every actor,
  gloo over fast0;
- lopsided: --ifname only0, an interface only the head node has: the worker cannot choose an
  address, the job fails at bring-up (exit 3) with the worker's one-line reason in its log.

What this cannot cover: GPUs, NCCL (no GPUs: gloo stands in for the collective; NCCL reads
NCCL_SOCKET_IFNAME the same way, and the test shows the variable reaches every actor), InfiniBand
(fast0 is a veth pair on a bridge), and real separate machines (the "nodes" share this machine's
filesystem, process table and CPUs, as nodes share a cluster filesystem).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hub_server import cache_model
from slurm_cluster import Node, kill_processes_mentioning, netns_network, slurm_cluster

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-org/cached-model"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("multinode")
    ray_root = Path(f"/tmp/iapo-mn-{secrets.token_hex(3)}")  # short: Ray's socket paths
    ray_root.mkdir()
    try:
        with netns_network(2, ("mgmt0", "fast0")) as net:
            # only the head node (the first: SLURM's batch host) has `only0`
            only = ipaddress.ip_network(f"{net.subnets[0].network_address + 256 * 2}/24")
            # (a veth pair inside that namespace: this kernel has no dummy interfaces)
            for args in (["link", "add", "only0", "type", "veth", "peer", "name", "only0p"],
                         ["addr", "add", f"{only.network_address + 1}/24", "dev", "only0"],
                         ["link", "set", "only0", "up"], ["link", "set", "only0p", "up"]):
                subprocess.run(["ip", "-n", net.namespaces[0], *args], check=True, capture_output=True)
            nodes = []
            for k, ns in enumerate(net.namespaces):
                local_tmp = ray_root.with_name(f"{ray_root.name}-node{k}")
                local_tmp.mkdir()
                nodes.append(Node(f"iapon{k}", net.addr(k, 0), cpus=3, netns=ns, binds={str(ray_root): str(local_tmp)}))
            with slurm_cluster(base / "slurm", nodes, ctld_addr=net.host_addr) as c:
                c.env["IAPO_RAY_TMPDIR"] = str(ray_root)
                yield {"cluster": c, "net": net, "base": base, "ray_root": ray_root}
    finally:  # (IAPO_KEEP_RAY_DIRS=1 keeps the nodes' Ray session logs, for a failure's post-mortem)
        for path in ([] if os.environ.get("IAPO_KEEP_RAY_DIRS") else ray_root.parent.glob(ray_root.name + "*")):
            shutil.rmtree(path, ignore_errors=True)


def _config(base: Path, name: str) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "qwen2.5-0.5b_gsm8k.yaml").read_text())
    cfg["model"]["path"] = MODEL
    cfg["output"]["dir"] = str(base / name)
    path = base / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def jobs(cluster):
    base, c = cluster["base"], cluster["cluster"]
    cache = base / "hf-cache"
    cache_model(cache, MODEL)  # as `iapo-slurm prefetch` leaves it (prefetch itself: test_prefetch.py)
    common = ["--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--no-exclusive", "--no-check",
              "--preflight", "--cache-dir", str(cache), "--ray-timeout", "200", "--wait",
              "--env", "IAPO_TEST_MARK=from --env",
              # three Ray heads start at once on a 2-core machine: without their dashboards (about half
              # of a head's start-up CPU), or Ray's client server gives up waiting for its raylet (30 s)
              "--ray-head-arg=--include-dashboard=false"]
    extra = {"default": [], "fast": ["--ifname", "fast0"], "lopsided": ["--ifname", "only0"]}
    started = time.monotonic()
    procs = {}
    for name, more in extra.items():
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "iapo_openrlhf.slurm", "submit", "--config", str(_config(base, name)), *common, *more],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=c.env, cwd=base)
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=max(1, 420 - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        match = re.search(r"submitted job (\d+); log: (\S+)", out)
        assert match, f"{name}: {out}{err}"
        log_path = Path(match.group(2))
        report = log_path.with_name(log_path.name.replace(".log", "-preflight.json"))
        results[name] = {
            "code": proc.returncode, "id": match.group(1), "stdout": out, "stderr": err, "log_path": log_path,
            "log": log_path.read_text(errors="replace") if log_path.exists() else "(no log)",
            "report": json.loads(report.read_text()) if report.exists() else None,
        }
    yield {"jobs": results, "seconds": time.monotonic() - started, **cluster}


def _describe(job: dict) -> str:
    ray_logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                       for p in sorted(job["log_path"].parent.glob(f"*-{job['id']}-ray-*.log")))
    return f"exit {job['code']}\n--- stdout\n{job['stdout']}\n--- stderr\n{job['stderr']}\n--- log\n{job['log']}{ray_logs}"


def _check_preflight(job: dict, net, subnet: int, interface: str) -> list[dict]:
    assert job["code"] == 0, _describe(job)
    want = [net.addr(k, subnet) for k in range(2)]
    log = job["log"]
    assert "Ray cluster ready after" in log and f"node addresses {want[0]}, {want[1]}" in log, _describe(job)
    assert f"starting the Ray head on iapon0 at {want[0]} (interface {interface};" in log, _describe(job)
    assert "phase 3/4: preflight: " in log and "preflight finished (exit code 0)" in log
    assert "probe: passed: 2 node(s)" in log
    # the worker chose its own address, on its own node (srun's %N is the hostname, which the
    # "nodes" here share: both nodes' Ray output is in one file)
    ray_logs = "".join(p.read_text(errors="replace") for p in job["log_path"].parent.glob(f"*-{job['id']}-ray-*.log"))
    assert f"iapo-slurm node-ip: node iapon1: Ray address {want[1]} (interface {interface}" in ray_logs
    nodes = sorted(job["report"]["nodes"], key=lambda n: n["node"])
    assert [(n["node"], n["ip"], n["interface"]) for n in nodes] == [
        ("iapon0", want[0], interface), ("iapon1", want[1], interface)]
    for n in nodes:  # what every Ray actor saw: the job's environment, the model in the shared cache
        assert n["vllm_host_ip"] == n["ip"]  # per node: vLLM's processes use the Ray address
        assert n["env"]["IAPO_TEST_MARK"] == "from --env"
        assert n["env"]["HF_HUB_OFFLINE"] == "1" and n["env"]["HF_HOME"].endswith("hf-cache")
        assert n["models"] == {MODEL: "ok"}
    assert job["report"]["driver_env"]["IAPO_TEST_MARK"] == "from --env"  # the driver (training's place) too
    gloo = job["report"]["gloo"]
    assert [g["sum"] for g in gloo] == [3.0, 3.0] and {g["rank"] for g in gloo} == {0, 1}
    assert job["report"]["problems"] == []
    return nodes


def test_ray_spans_two_nodes_on_the_route_to_the_head(jobs):
    """No --ifname: the head's address is its route to the worker's NodeAddr (mgmt0), the worker's its route to the head."""
    job = jobs["jobs"]["default"]
    nodes = _check_preflight(job, jobs["net"], subnet=0, interface="mgmt0")
    for n in nodes:
        assert n["env"].get("NCCL_SOCKET_IFNAME") is None and n["env"].get("GLOO_SOCKET_IFNAME") is None
    assert all(not g["from_job"] and g["gloo_ifname"] == "mgmt0" for g in job["report"]["gloo"])
    print(f"\nmulti-node jobs (3 at once) took {jobs['seconds']:.0f}s")


def test_ifname_moves_ray_and_collectives_to_that_interface(jobs):
    """--ifname fast0: Ray on the fast0 addresses; NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME=fast0 in every
    actor on every node (inherited from the raylets), and gloo really crosses the nodes over fast0."""
    job = jobs["jobs"]["fast"]
    nodes = _check_preflight(job, jobs["net"], subnet=1, interface="fast0")
    for n in nodes:
        assert n["env"]["NCCL_SOCKET_IFNAME"] == n["env"]["GLOO_SOCKET_IFNAME"] == "fast0"
    assert all(g["from_job"] and g["gloo_ifname"] == "fast0" for g in job["report"]["gloo"])
    assert "environment of every process: " in job["log"] and "NCCL_SOCKET_IFNAME=fast0" in job["log"]


def test_interface_missing_on_a_node_fails_the_bring_up(jobs):
    job = jobs["jobs"]["lopsided"]
    assert job["code"] == 3, _describe(job)
    log = job["log"]
    assert "FAILED: the Ray cluster did not come up (iapo-slurm: error: --ifname only0: no such interface on node " \
           "iapon1 (it has lo, mgmt0, fast0)" in log, _describe(job)
    assert "phase 3/4" not in log and job["report"] is None


def test_no_ray_process_outlives_the_jobs(jobs):
    left = kill_processes_mentioning(str(jobs["ray_root"]))
    assert not left, left
