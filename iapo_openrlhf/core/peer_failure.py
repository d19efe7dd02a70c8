"""One rank's error inside the estimator ends every rank of the job within seconds.

The estimator's forwards are collectives (AutoTP layers, ZeRO-3 gathers, the vocab-parallel
reductions). If one rank raises inside a call (out of memory, a bad batch), the others wait in a
collective it will never join, until the process group's timeout (60 minutes in OpenRLHF), and the
job's log shows nothing until then. `fail_together` closes that gap:

- the rank that raises writes its error to the process group's store before re-raising;
- every rank runs a watcher thread for the duration of the call that polls the store; seeing a
  peer's error while its own call is still running, it logs that error and aborts the process
  group (NCCL's abort makes the blocked collective raise), and if the call is still blocked a few
  seconds later (gloo cannot abort a running collective), ends the process. Under Ray the actor's
  death then fails OpenRLHF's driver at once, with the peer's error in the log.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import traceback
from typing import Iterator

import torch.distributed as dist

KEY = "iapo/estimator_failure"
POLL_SECONDS = 1.0
ABORT_GRACE_SECONDS = 10.0


def _store():
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # noqa: BLE001 - no store reachable: nothing to watch
        return None


def _watch(store, inside: threading.Event, stop: threading.Event) -> None:
    while not stop.wait(POLL_SECONDS):
        try:
            if not store.check([KEY]):
                continue
            message = store.get(KEY).decode(errors="replace")
        except Exception:  # noqa: BLE001 - the store went away with the job: stop watching
            return
        if stop.wait(POLL_SECONDS) or not inside.is_set():
            return  # this rank left the call on its own (it failed too, or finished)
        rank = dist.get_rank() if dist.is_initialized() else "?"
        print(f"[rank {rank}] IAPO estimator: {message}; aborting this rank, which waits in a collective the "
              "failed rank will not join", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            from torch.distributed.distributed_c10d import _abort_process_group

            _abort_process_group()
        if not stop.wait(ABORT_GRACE_SECONDS):
            print(f"[rank {rank}] IAPO estimator: still blocked {ABORT_GRACE_SECONDS:.0f} s after the abort; "
                  "exiting", file=sys.stderr, flush=True)
            os._exit(1)
        return


@contextlib.contextmanager
def fail_together() -> Iterator[None]:
    """Run an estimator call so that an exception on any rank ends all ranks (see module doc).
    A no-op without torch.distributed or with a single rank. Also a decorator."""
    store = _store() if dist.is_initialized() and dist.get_world_size() > 1 else None
    if store is None:
        yield
        return
    inside, stop = threading.Event(), threading.Event()
    inside.set()
    watcher = threading.Thread(target=_watch, args=(store, inside, stop), name="iapo-peer-failure", daemon=True)
    watcher.start()
    try:
        yield
    except Exception as e:
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
        with contextlib.suppress(Exception):
            store.set(KEY, f"rank {dist.get_rank()} failed inside the estimator: {detail}")
        raise
    finally:
        inside.clear()
        stop.set()
        watcher.join()
