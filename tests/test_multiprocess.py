"""The multi-host path with real processes: N local JAX processes x K CPU devices, gloo collectives.

Every test starts real processes through launch/local_multiprocess.py (the launcher users run),
with a hard timeout on each so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "local_multiprocess.py"
WORKER = REPO / "tests" / "_multiprocess_worker.py"

# Short enough that a dead peer is noticed quickly, long enough that a loaded CI machine does not
# miss heartbeats (JAX's default is 100 s).
HEARTBEAT_S = 10


def launch(command, *, num_processes, devices, timeout, grace=0.0, env=None, log_dir=None):
    """Run the launcher; returns (exit code, combined output, wall seconds)."""
    argv = [sys.executable, str(LAUNCHER), "-n", str(num_processes), "-d", str(devices),
            "--timeout", str(timeout), "--grace", str(grace)]
    if log_dir is not None:
        argv += ["--log-dir", str(log_dir)]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    start = time.monotonic()
    # The launcher's own --timeout kills its processes; this one only guards against the launcher.
    proc = subprocess.run(argv + ["--", *command], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout + 30)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def run_worker(tmp_path, name, *, num_processes, devices, env=None, grace=0.0, timeout=60):
    out = tmp_path / f"{name}.json"
    code, output, wall = launch([sys.executable, str(WORKER), str(out)], num_processes=num_processes,
                                devices=devices, timeout=timeout, grace=grace, env=env)
    return code, output, wall, (json.loads(out.read_text()) if out.exists() else None)


def test_two_processes_match_one_process_on_four_devices(tmp_path):
    code, output, _, multi = run_worker(tmp_path, "multi", num_processes=2, devices=2)
    assert code == 0, output
    assert (multi["distributed"], multi["process_count"], multi["device_count"], multi["local_device_count"]) \
        == (True, 2, 4, 2), multi
    # Each process fed only its own half of the batch (rows 0-7 for process 0 on a data x fsdp mesh).
    assert multi["rows_of_process_0"] == list(range(8))
    assert "all 2 process(es) finished OK" in output
    assert output.count("done: losses") == 2, output

    code, output, _, single = run_worker(tmp_path, "single", num_processes=1, devices=4)
    assert code == 0, output
    assert (single["distributed"], single["process_count"], single["device_count"]) == (False, 1, 4)

    # Same numbers up to float32 reduction order (gloo vs in-process all-reduce).
    np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-5)
    np.testing.assert_allclose(multi["w1"], single["w1"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(multi["w2"], single["w2"], rtol=1e-5, atol=1e-6)
    assert multi["losses"][2] < multi["losses"][0]  # the step trains: not a constant function


def test_killed_process_makes_peers_abort_on_their_own(tmp_path):
    """A SIGKILLed non-coordinator leaves process 0 blocked in a collective; the distributed runtime
    (heartbeat timeout) must abort it, well before the launcher's grace period would."""
    grace = 6 * HEARTBEAT_S
    code, output, wall, result = run_worker(
        tmp_path, "kill", num_processes=2, devices=2, grace=grace, timeout=grace + 30,
        env={"MCPO_TEST_DIE": "1:1", "MCPO_TEST_HEARTBEAT": str(HEARTBEAT_S)},
    )
    assert result is None
    assert code != 0, output
    assert "process 1 killed by SIGKILL" in output
    assert "terminating process(es)" not in output, "the survivor had to be killed by the launcher:\n" + output
    assert "another task died" in output  # JAX's own message in process 0's log
    assert "p0: killed by SIGABRT" in output, output
    assert wall < HEARTBEAT_S + 40, wall


def test_failed_process_makes_launcher_stop_the_rest(tmp_path):
    """A Python error on process 1: the launcher stops process 0 at once and reports who failed."""
    code, output, wall, result = run_worker(
        tmp_path, "raise", num_processes=2, devices=2, grace=0,
        env={"MCPO_TEST_DIE": "1:1:raise", "MCPO_TEST_HEARTBEAT": str(HEARTBEAT_S)},
    )
    assert result is None
    assert code == 1, output
    assert "RuntimeError: deliberate failure of process 1 before step 1" in output
    assert "terminating process(es) [0] after the failure of process 1" in output
    assert "FAILED" in output and "process 1 exited with code 1 first" in output
    assert wall < 40, wall


def test_launcher_timeout_kills_a_hung_job(tmp_path):
    hang = [sys.executable, "-c", "import os, time; print('pid', os.environ['MCPO_PROCESS_ID'], flush=True); time.sleep(600)"]
    code, output, wall = launch(hang, num_processes=2, devices=1, timeout=3)
    assert code == 124, output
    assert "timeout after 3s" in output
    assert "[p0] pid 0" in output and "[p1] pid 1" in output
    assert wall < 20, wall
