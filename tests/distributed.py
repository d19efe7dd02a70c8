"""Run a test function on N gloo processes on this CPU, with a deadline instead of a hang."""

from __future__ import annotations

import os
import tempfile
import time

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, fn, args) -> None:
    # What torchrun would export; DeepSpeed reads them and runs on its CPU accelerator.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world: int = 2, timeout: float = 120.0, *args) -> None:
    """Spawn `world` processes running fn(rank, world, *args); raise if one fails or the deadline passes.

    fn must be importable (a module-level function of a test module)."""
    init_file = tempfile.mktemp(prefix="iapo_gloo_")
    ctx = mp.start_processes(_entry, args=(world, init_file, fn, args), nprocs=world, join=False, start_method="spawn")
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
