"""Ctrl-C and SIGTERM for a whole run: the first asks every phase to stop at its next safe point (the trainer
saves and the run exits 0 with the resume command); a second exits at once.

A preemption notice may reach one process of a multi-process job only, and a process that saves (a
collective) while the others run the next step hangs the job. The trainer's loop sends each process's request
through the train step (batch key `stop_request`, its maximum returned with the metrics, read one step late):
every process stops after the same step with no host-side collective per step. `should_stop` agrees across
processes with one tiny all-gather (none in a single process), for the rare points outside the step loop
(between phases, before an evaluation).

Long blocking calls (XLA compilation) run in a worker thread through `run_interruptible`, so the handler runs
in the main thread while they last: a second signal there exits at once instead of waiting for the compiler.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import jax
import numpy as np

log = logging.getLogger("mcpo_jax.train")

SECOND_SIGNAL_EXIT = 130  # the shell's status for a process stopped by SIGINT


class StopFlag:
    def __init__(self):
        self.signal: str | None = None
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def install(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is not None:
            sys.stderr.write(f"\n{name} again: exiting now without saving (the last checkpoint is kept)\n")
            sys.stderr.flush()
            os._exit(SECOND_SIGNAL_EXIT)  # no unwinding through XLA's threads: no half-torn-down runtime
        self.signal = name
        log.warning("%s received: stopping at the next safe point (in training, the steps already dispatched, at "
                    "most two, finish first), then saving and exiting (send it again to exit at once without "
                    "saving)", name)

    def should_stop(self) -> bool:
        """Whether every process stops now (agreed across processes)."""
        stop_now = self.requested
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            stop_now = bool(multihost_utils.process_allgather(np.asarray(stop_now)).any())
        return stop_now

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def run_interruptible(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a worker thread while the main thread keeps handling signals."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    worker = threading.Thread(target=target, name="mcpo-compile", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if "error" in box:
        raise box["error"]
    return box["value"]
