"""The trainer's multi-host plumbing without starting processes: fail-fast exit, the stop decision,
the heartbeat setting, run folders under a URL (gs://)."""

from __future__ import annotations


import jax

from mcpo_jax.training import loop


# ------------------------------------------------------------------------- the stop decision


def test_stop_decision_is_local_in_one_process_and_gathered_across_processes(monkeypatch):
    from jax.experimental import multihost_utils

    calls = []

    def gather(x):
        calls.append(bool(x))
        return jax.numpy.asarray([bool(x), True])  # another process got the signal

    monkeypatch.setattr(multihost_utils, "process_allgather", gather)
    flag = loop._StopFlag()
    assert not flag.should_stop() and calls == []  # one process: no collective at all
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert flag.should_stop() and calls == [False]  # stops with the others, though it got no signal
