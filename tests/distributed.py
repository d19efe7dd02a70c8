"""Run a test function on N gloo processes on this CPU, with a deadline instead of a hang."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

# DeepSpeed 0.19.8 (vocab-parallel LM head) installed beside the pinned 0.19.6 by .ci/run:
# pip install --no-deps --target DIR deepspeed==0.19.8, then IAPO_DEEPSPEED_0198=DIR.
OVERLAY_ENV = "IAPO_DEEPSPEED_0198"


def deepspeed_0198_overlay() -> str:
    """The overlay folder, or a skip saying how to make it."""
    path = os.environ.get(OVERLAY_ENV, "")
    if not path or not os.path.isdir(os.path.join(path, "deepspeed")):
        pytest.skip(f"needs DeepSpeed 0.19.8 beside the pinned 0.19.6: pip install --no-deps --target DIR "
                    f"deepspeed==0.19.8 and export {OVERLAY_ENV}=DIR (.ci/run does)")
    return path


def _entry(rank: int, world: int, init_file: str, target: tuple[str, str], pythonpath: str | None, args) -> None:
    # What torchrun would export; DeepSpeed reads them and runs on its CPU accelerator.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    if pythonpath:  # before the test module (and its deepspeed import) is loaded
        sys.path.insert(0, pythonpath)
        # The overlay's JIT-built ops (shm comm) in their own folder: sharing torch's default one
        # with the pinned DeepSpeed would rebuild them at every switch between the two versions.
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(pythonpath, "torch_extensions")
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce when it starts its comm
    # backend: 30-65 s per DeepSpeed version on a fresh machine, for a speed-up these tests do not
    # need (gloo's all-reduce is used instead, as `iapo-train-ray --cpu` does: cpu_mode.py).
    # (import_module: `import deepspeed.comm.torch as m` binds the torch package, which the
    # deepspeed.comm package's own `torch` name shadows)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    fn = getattr(importlib.import_module(target[0]), target[1])
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world: int = 2, timeout: float = 120.0, *args, pythonpath: str | None = None) -> None:
    """Spawn `world` processes running fn(rank, world, *args); raise if one fails or the deadline passes.

    fn must be importable (a module-level function of a test module). pythonpath: a folder put
    first on the children's path (the DeepSpeed 0.19.8 overlay)."""
    init_file = tempfile.mktemp(prefix="iapo_gloo_")
    # fn travels by name: unpickling it would import its module, and DeepSpeed with it, before
    # the overlay is on the path.
    target = (fn.__module__, fn.__name__)
    ctx = mp.start_processes(_entry, args=(world, init_file, target, pythonpath, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"distributed test did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        if os.path.exists(init_file):
            os.unlink(init_file)
