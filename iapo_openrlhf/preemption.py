"""Preemption: on SIGTERM or SIGUSR1, finish the current step, save a checkpoint, exit 128 + signal.

SLURM sends SIGTERM when a job is preempted or cancelled, and, with `--signal=B:TERM@120` (what
`iapo-slurm submit` asks for; `--signal-seconds N` for another lead), that long before the time
limit. The job script (slurm/job.sbatch.template) forwards it to the training and requeues the job
when the training exits non-zero after a signal; the next run resumes from the checkpoint.
SIGUSR1 is handled the same way, for a job script of one's own that asks for `--signal=B:USR1@N`.
Both backends handle the signal the same way:

- the first SIGTERM / SIGUSR1 only records the request (later ones are reported and ignored:
  SIGKILL ends the process when SLURM's grace runs out);
- the step in progress runs to its end (rollout, update, logging), then a checkpoint of that step
  is saved (unless the periodic save just wrote it), and the process exits with 128 + the signal
  number: 143 for SIGTERM, 138 for SIGUSR1, the code a shell reports for a process the signal
  ended, so a wrapper that requeues on "killed by the signal" behaves the same;
- a signal before the first step of the run (start-up, the initial evaluation) exits at once with
  the same code: there is nothing new to save;
- a signal during the last step lets the run finish normally (exit 0: nothing to requeue).

The local backend checks the request between its steps (`LocalTrainer.train`); the Ray backend's
driver forwards it to the trainer actor, which checks it between OpenRLHF's steps
(`openrlhf/trainer.py`).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def exit_code(signum: int) -> int:
    """The exit code of a run that saved and stopped on `signum` (143 for SIGTERM, 138 for SIGUSR1)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Preempted(Exception):
    """The run stopped on `signum`; `saved`: the checkpoint of `step` was written for it (or by the
    periodic save of that step); else it stopped before a step of its own (`step`: where it started)."""

    def __init__(self, signum: int, step: int | None = None, saved: bool = False):
        self.signum, self.step, self.saved = int(signum), step, bool(saved)
        if saved:
            what = f"saved the checkpoint of step {step}"
        elif step:
            what = f"stopped before a new step; the latest checkpoint is step {step}'s"
        else:
            what = "stopped before its first step, nothing to save"
        super().__init__(f"{signal_name(signum)}: {what}; exit code {exit_code(signum)} (resume to continue)")

    def __reduce__(self):  # raised in a Ray actor, re-raised in the driver
        return (type(self), (self.signum, self.step, self.saved))


class StopSignals:
    """SIGTERM / SIGUSR1 handlers that record a stop request instead of ending the process.

    `requested` is the first signal's number (None before). Callbacks added with `on_request` run
    once, in a helper thread (not in the signal handler: Python runs handlers in the main thread
    between bytecodes, where a Ray call or a print could re-enter what the main thread was doing).
    While `raise_in_main()` is on, the handler raises `Preempted` in the main thread instead (the
    Ray driver, before its trainer actor exists: there is no step to finish)."""

    def __init__(self, prog: str):
        self.prog = prog
        self.requested: int | None = None
        self._previous: dict[int, object] = {}
        self._pending: list[Callable[[int], None]] = []  # not run yet; each runs once
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._raise_in_main = False
        self._thread: threading.Thread | None = None

    # -- installation ------------------------------------------------------------------------

    def install(self) -> "StopSignals":
        """(Re)install the handlers: call again after anything that sets its own (ray.init does)."""
        for signum in SIGNALS:
            previous = signal.signal(signum, self._handle)
            if previous is not self._handle and signum not in self._previous:
                self._previous[signum] = previous
        return self

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    # -- the request -------------------------------------------------------------------------

    def on_request(self, callback: Callable[[int], None]) -> Callable[[], None]:
        """Run `callback(signum)` once a signal has arrived (at once, in the helper thread, if one
        already has). Returns a function that unregisters it if it has not run: a callback keeps
        what it refers to alive (a Ray actor handle keeps the actor running)."""
        with self._lock:
            self._pending.append(callback)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run_callbacks, name="iapo-stop-signals", daemon=True)
                self._thread.start()
        if self.requested is not None:
            self._event.set()
        box = [callback]  # emptied on use: the returned function does not keep the callback either

        def unregister() -> None:
            with self._lock:
                if box:
                    gone = box.pop()
                    self._pending = [c for c in self._pending if c is not gone]
        return unregister

    def raise_in_main(self, on: bool = True) -> None:
        """While on, a signal raises Preempted in the main thread at once (there is no step to finish)."""
        self._raise_in_main = on

    def _run_callbacks(self) -> None:
        while True:
            self._event.wait()
            self._event.clear()
            with self._lock:
                pending, self._pending = self._pending, []
            for callback in pending:
                try:
                    callback(self.requested)
                except Exception as e:  # noqa: BLE001 - report, keep the process running
                    self._say(f"stop request not delivered: {type(e).__name__}: {e}")

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            self._say(f"{signal_name(signum)} received again: still finishing the step and saving")
            return
        self.requested = int(signum)
        if self._raise_in_main:
            self._say(f"{signal_name(signum)} received before the first step: exiting with code {exit_code(signum)}")
            raise Preempted(signum)
        self._say(f"{signal_name(signum)} received: finishing the current step, then saving a checkpoint and exiting "
                  f"with code {exit_code(signum)} (the job requeues and resumes from it)")
        self._event.set()

    def _say(self, message: str) -> None:
        # os.write: a print here could re-enter a write the main thread was in the middle of
        os.write(2, f"{self.prog}: {message}\n".encode())
