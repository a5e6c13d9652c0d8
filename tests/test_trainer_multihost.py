"""The trainer's multi-host plumbing without starting processes: fail-fast exit, the stop decision,
the heartbeat setting, run folders under a URL (gs://)."""

from __future__ import annotations

import json
import os
import types

import jax
import pytest

from mcpo_jax import sharding
from mcpo_jax import pipeline
from mcpo_jax.training import files
from mcpo_jax.training.signals import StopFlag
from mcpo_jax.training import metrics as metrics_lib


# ------------------------------------------------------------------------- fail fast (train.py)


class _Exit(Exception):
    pass


def test_error_on_one_process_of_many_exits_at_once(monkeypatch, capsys):
    """A Python error in a multi-process run: traceback, then os._exit(1) (no 300 s shutdown barrier)."""
    from mcpo_jax import train as cli

    def boom(config, workdir, **kwargs):
        raise RuntimeError("deliberate")

    def fake_exit(code):
        raise _Exit(code)

    for name in ("_COORDINATOR", "_NUM_PROCESSES", "_PROCESS_ID"):
        monkeypatch.setattr(cli, name, types.SimpleNamespace(value=None))  # as if the flags were parsed
    monkeypatch.setattr(cli, "_HELPCONFIG", types.SimpleNamespace(value=False))
    monkeypatch.setattr(cli, "_COMPILE_ONLY", types.SimpleNamespace(value=False))
    monkeypatch.setattr(cli, "_CONFIG", types.SimpleNamespace(value=object()))
    monkeypatch.setattr(cli, "_WORKDIR", types.SimpleNamespace(value="/tmp/unused"))
    monkeypatch.setattr(pipeline, "run", boom)
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
    flag = StopFlag()
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


# ------------------------------------------------------------------------- URL workdirs


def test_url_workdir_is_never_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(files.workdir_path("gs://bucket/run")) == "gs://bucket/run"
    assert os.fspath(files.workdir_path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
    assert os.fspath(files.workdir_path("run")) == str(tmp_path / "run")
    assert not files.local_cache_dir("gs://bucket/run").startswith("gs:")
    assert files.local_cache_dir("/x/run") == "/x/run/cache"


def test_run_files_under_a_url(fake_gcs):
    run = "gs://bucket/run"
    writer = metrics_lib.MetricsWriter(run, tensorboard=False)
    writer.write(1, {"loss": 0.7, "grad_norm": 1.0})
    writer.close()
    writer = metrics_lib.MetricsWriter(run, tensorboard=False)  # a resumed run appends
    writer.write(2, {"loss": 0.6, "grad_norm": 0.9})
    writer.close()
    stored = fake_gcs / "bucket" / "run"
    assert [r["step"] for r in map(json.loads, (stored / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    assert [r["loss"] for r in metrics_lib.read_jsonl(f"{run}/metrics.jsonl")] == [0.7, 0.6]
    assert metrics_lib.plot_curves(run) == f"{run}/curves.png"
    assert (stored / "curves.png").read_bytes()[:4] == b"\x89PNG"

    handler = pipeline._RunLogHandler(f"{run}/train.log")
    handler.stream.write("hello\n")
    handler.close()
    assert (stored / "train.log").read_text() == "hello\n"


def test_append_file_under_a_url_uploads_on_flush_at_most_every_interval(fake_gcs):
    f = files.AppendFile("gs://bucket/log.txt", upload_every=3600)
    target = fake_gcs / "bucket" / "log.txt"
    f.write("a\n")
    f.flush()
    assert not target.exists()  # throttled: no upload per line
    f.close()
    assert target.read_text() == "a\n"
