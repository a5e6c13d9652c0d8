"""The trainer's multi-host plumbing without starting processes: fail-fast exit, the stop decision,
the heartbeat setting, run folders under a URL (gs://)."""

from __future__ import annotations

import os
import types

import jax
import pytest

from mcpo_jax import sharding
from mcpo_jax.training import loop


# ------------------------------------------------------------------------- fail fast (train.py)


class _Exit(Exception):
    pass


def test_error_on_one_process_of_many_exits_at_once(monkeypatch, capsys):
    """A Python error in a multi-process run: traceback, then os._exit(1) (no 300 s shutdown barrier)."""
    from mcpo_jax import train as cli

    def boom(config, workdir):
        raise RuntimeError("deliberate")

    def fake_exit(code):
        raise _Exit(code)

    for name in ("_CONFIG", "_WORKDIR", "_COORDINATOR", "_NUM_PROCESSES", "_PROCESS_ID"):
        monkeypatch.setattr(cli, name, types.SimpleNamespace(value=None))  # as if the flags were parsed
    monkeypatch.setattr(loop, "train", boom)
    monkeypatch.setattr(sharding, "initialize_distributed", lambda *a, **k: True)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(os, "_exit", fake_exit)
    with pytest.raises(_Exit) as e:
        cli._main(["train"])
    assert e.value.args == (1,)
    assert "RuntimeError: deliberate" in capsys.readouterr().err

    # One process: the exception propagates as usual (absl prints it and exits 1).
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    with pytest.raises(RuntimeError, match="deliberate"):
        cli._main(["train"])


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


# ------------------------------------------------------------------------- heartbeat


def test_heartbeat_timeout_from_argument_or_environment(monkeypatch):
    seen = []

    def initialize(*, heartbeat_timeout_seconds=100, **kw):  # the installed jax takes the argument
        seen.append(heartbeat_timeout_seconds)

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # no gloo switch in this test process
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setenv("MCPO_HEARTBEAT_TIMEOUT", "7")
    assert sharding.initialize_distributed("localhost:1", 2, 0)
    assert sharding.initialize_distributed("localhost:1", 2, 0, heartbeat_timeout_seconds=3)
    monkeypatch.delenv("MCPO_HEARTBEAT_TIMEOUT")
    assert sharding.initialize_distributed("localhost:1", 2, 0)
    assert seen == [7, 3, 100]
