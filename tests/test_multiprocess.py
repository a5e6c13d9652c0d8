"""The multi-host path with real processes: N local JAX processes x K CPU devices, gloo collectives.

Every test starts real processes through launch/local_multiprocess.py (the launcher users run),
with a hard timeout on each so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from local_multiprocess import free_port  # noqa: E402

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


@pytest.fixture(scope="module")
def single_worker_result(tmp_path_factory):
    """The reference: the same computation in one process on 4 CPU devices."""
    code, output, _, single = run_worker(tmp_path_factory.mktemp("single"), "single", num_processes=1, devices=4)
    assert code == 0, output
    assert (single["distributed"], single["process_count"], single["device_count"]) == (False, 1, 4)
    return single


def test_two_processes_match_one_process_on_four_devices(tmp_path, single_worker_result):
    code, output, _, multi = run_worker(tmp_path, "multi", num_processes=2, devices=2)
    assert code == 0, output
    assert (multi["distributed"], multi["process_count"], multi["device_count"], multi["local_device_count"]) \
        == (True, 2, 4, 2), multi
    # Each process fed only its own half of the batch (rows 0-7 for process 0 on a data x fsdp mesh).
    assert multi["rows_of_process_0"] == list(range(8))
    assert "all 2 process(es) finished OK" in output
    assert output.count("done: losses") == 2, output

    single = single_worker_result
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


FAKE_SRUN = r'''#!PYTHON
"""Stand-in for srun on one machine: runs SLURM_NTASKS copies of the command with SLURM's per-task
variables, as srun does on a real allocation (all tasks on "localhost")."""
import os, subprocess, sys
args = sys.argv[1:]
chdir = None
while args and args[0].startswith("--"):
    if args[0].startswith("--chdir="):
        chdir = args[0].split("=", 1)[1]
    args = args[1:]
n = int(os.environ["SLURM_NTASKS"])
per_node = int(os.environ["SLURM_NTASKS_PER_NODE"])
procs = [subprocess.Popen(args, cwd=chdir, env={**os.environ, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i % per_node),
                                              "SLURM_NODEID": str(i // per_node), "SLURM_STEP_NODELIST": "localhost"})
         for i in range(n)]
sys.exit(max(abs(p.wait()) for p in procs))
'''


def run_sbatch(tmp_path, *, ntasks, per_node, python, extra_env=None, args=()):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN.replace("PYTHON", sys.executable))
    srun.chmod(0o755)
    env = {
        **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": str(ntasks // per_node),
        "SLURM_NTASKS": str(ntasks), "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_GPUS_ON_NODE": "8",
        "SLURM_SUBMIT_DIR": str(REPO), "MCPO_PYTHON": str(python), "MCPO_CONFIG": "configs/demo.py",
        "MCPO_WORKDIR": str(tmp_path / "work"),
        "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        **(extra_env or {}),
    }
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm_gpu.sbatch"), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=90)
    return proc.returncode, proc.stdout + proc.stderr


def test_slurm_script_per_node_layout_sees_all_gpus(tmp_path):
    shim = tmp_path / "python_shim"
    shim.write_text('#!/bin/sh\necho "task $SLURM_PROCID ids=$JAX_LOCAL_DEVICE_IDS coord=${MCPO_COORDINATOR:-auto} '
                    'pid=${MCPO_PROCESS_ID:-auto} args=$*"\n')
    shim.chmod(0o755)
    code, output = run_sbatch(tmp_path, ntasks=2, per_node=1, python=shim, args=["--config.seed=3"])
    assert code == 0, output
    assert "one process per node (GPUs 0,1,2,3,4,5,6,7)" in output
    for i in range(2):
        assert (f"task {i} ids=0,1,2,3,4,5,6,7 coord=auto pid=auto args=-m mcpo_jax.train --config configs/demo.py "
                f"--workdir {tmp_path / 'work'} --config.seed=3") in output, output
    code, output = run_sbatch(tmp_path, ntasks=2, per_node=1, python=shim, extra_env={"MCPO_COORDINATOR": "h0:1234"})
    assert code == 0, output
    assert "task 1 ids=0,1,2,3,4,5,6,7 coord=h0:1234 pid=1" in output, output


def test_slurm_script_runs_multiprocess_jax_from_slurm_environment(tmp_path, single_worker_result):
    """The sbatch script under a fake srun: JAX's own SLURM detection (coordinator from the node list,
    ids from SLURM_PROCID) forms a 2-process job whose numbers equal the 1-process run."""
    out = tmp_path / "slurm.json"
    shim = tmp_path / "python_shim"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} {WORKER} {out}\n')
    shim.chmod(0o755)
    code, output = run_sbatch(tmp_path, ntasks=2, per_node=2, python=shim,
                              extra_env={"JAX_COORDINATOR_PORT": str(free_port())})
    assert code == 0, output
    assert "one process per GPU (2 per node)" in output
    result = json.loads(out.read_text())
    assert (result["distributed"], result["process_count"], result["device_count"]) == (True, 2, 4), result
    np.testing.assert_allclose(result["losses"], single_worker_result["losses"], rtol=1e-5)


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm_gpu.sbatch", "local_multiprocess.sh"])
def test_launch_scripts_parse_and_lint(script):
    path = REPO / "launch" / script
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    if shutil.which("shellcheck"):
        lint = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True, timeout=60)
        assert lint.returncode == 0, lint.stdout


@pytest.mark.parametrize("accelerator, version", [
    ("v6e-16", "v2-alpha-tpuv6e"), ("v5p-32", "v2-alpha-tpuv5"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
])
def test_tpu_pod_dry_run_runs_the_trainer_on_every_worker(accelerator, version):
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "tpu_pod.sh"), "up", "--dry-run", "--name", "t1", "--zone", "us-east5-b",
         "--accelerator-type", accelerator, "--workdir", "gs://bucket/run", "--config", "configs/nectar.py:mcpo",
         "--", "--config.mesh.fsdp=-1"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == (f"+ gcloud compute tpus tpu-vm create t1 --zone=us-east5-b --accelerator-type={accelerator} "
                        f"--version={version} --scopes=https://www.googleapis.com/auth/cloud-platform")
    train = lines[-1]
    assert "--worker=all" in train and "MCPO_COORDINATOR=WORKER0_IP:8476" in train
    assert "agent-worker-number" in train
    assert "-m\\ mcpo_jax.train\\ --config\\ configs/nectar.py:mcpo\\ --workdir\\ gs://bucket/run\\ --config.mesh.fsdp=-1" \
        in train
