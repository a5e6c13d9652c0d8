"""The multi-host path with real processes: N local JAX processes x K CPU devices, gloo collectives.

Every test starts real processes through launch/local_multiprocess.py (the launcher users run),
with a hard timeout on each so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
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
        env={"MCPO_TEST_DIE": "1:1", "MCPO_HEARTBEAT_TIMEOUT": str(HEARTBEAT_S)},
    )
    assert result is None
    assert code != 0, output
    assert "process 1 killed by SIGKILL" in output
    assert "terminating process(es)" not in output, "the survivor had to be killed by the launcher:\n" + output
    assert "another task died" in output  # JAX's own message in process 0's log
    assert "p0: killed by SIGABRT" in output, output
    assert wall < HEARTBEAT_S + 40, wall


def test_reference_cache_hit_or_miss_is_decided_by_all_processes(tmp_path):
    """Per-host caches (a gs:// workdir): process 0 holds the reference log-probs, process 1 does not. A per-process
    decision made process 1 start the (collective) computation alone and hang; now both compute, both write."""
    os.makedirs(tmp_path / "p0")
    np.save(tmp_path / "p0" / "ref_logps-k.npy", np.full((3, 2), 4.0, np.float32))  # what compute() gives
    script = REPO / "tests" / "_multiprocess_refcache.py"
    code, output, _ = launch([sys.executable, str(script), str(tmp_path)], num_processes=2, devices=2,
                             timeout=90, env={"MCPO_HEARTBEAT_TIMEOUT": str(HEARTBEAT_S)})
    assert code == 0, output
    results = [json.loads((tmp_path / f"result{p}.json").read_text()) for p in (0, 1)]
    for r in results:
        assert r["hit"] is False and r["calls"] == 1 and r["value"] == 4.0  # computed together: 4 devices
        assert r["hit2"] is True and r["again"] == 4.0  # then every process has its copy
    assert (tmp_path / "p1" / "ref_logps-k.npy").exists()


def test_failed_process_makes_launcher_stop_the_rest(tmp_path):
    """A Python error on process 1: the launcher stops process 0 at once and reports who failed."""
    code, output, wall, result = run_worker(
        tmp_path, "raise", num_processes=2, devices=2, grace=0,
        env={"MCPO_TEST_DIE": "1:1:raise", "MCPO_HEARTBEAT_TIMEOUT": str(HEARTBEAT_S)},
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


def test_slurm_script_compiles_for_its_gpus_before_starting(tmp_path):
    """MCPO_TARGET: the batch host compiles the run for the allocation first; a check that fails (exit 2, as
    `--compile-only` does for a run that does not fit) ends the job before srun starts any task."""
    calls = tmp_path / "calls"
    shim = tmp_path / "python_shim"
    shim.write_text(f'#!/bin/sh\necho "$*" >> {calls}\ncase "$*" in *--compile-only*) exit "$CHECK_EXIT";; esac\n')
    shim.chmod(0o755)
    code, output = run_sbatch(tmp_path, ntasks=2, per_node=1, python=shim,
                              extra_env={"MCPO_TARGET": "h100x16", "CHECK_EXIT": "2"}, args=["--config.seed=3"])
    assert code == 2 and "does not compile or fit on h100x16" in output, output
    assert calls.read_text().splitlines() == [
        "-m mcpo_jax.train --config configs/demo.py --config.seed=3 --compile-only --target h100x16"]
    calls.unlink()
    code, output = run_sbatch(tmp_path, ntasks=2, per_node=1, python=shim,
                              extra_env={"MCPO_TARGET": "h100x16", "CHECK_EXIT": "0"})
    assert code == 0, output
    assert len(calls.read_text().splitlines()) == 3  # the check, then the two tasks
    calls.unlink()
    code, output = run_sbatch(tmp_path, ntasks=2, per_node=1, python=shim,
                              extra_env={"MCPO_TARGET": "h100x16", "CHECK_EXIT": "2", "MCPO_SKIP_CHECK": "1"})
    assert code == 0 and len(calls.read_text().splitlines()) == 2, output


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
    # first, here: the run compiled for the slice (nothing is created before it fits)
    assert lines[0] == ("+ python3 -m mcpo_jax.train --config configs/nectar.py:mcpo --config.mesh.fsdp=-1 "
                        f"--compile-only --target tpu-{accelerator}")
    assert lines[1] == (f"+ gcloud compute tpus tpu-vm create t1 --zone=us-east5-b --accelerator-type={accelerator} "
                        f"--version={version} --scopes=https://www.googleapis.com/auth/cloud-platform")
    train = lines[-1]
    assert "--worker=all" in train and "MCPO_COORDINATOR=WORKER0_IP:8476" in train
    assert "agent-worker-number" in train
    assert "-m\\ mcpo_jax.train\\ --config\\ configs/nectar.py:mcpo\\ --workdir\\ gs://bucket/run\\ --config.mesh.fsdp=-1" \
        in train


def test_tpu_pod_up_stops_before_creating_a_slice_the_run_does_not_fit(tmp_path):
    """`up` compiles the run for the slice here first: a check that fails (a stand-in python exiting 2, as
    `--compile-only` does for a run that does not fit) stops the launch before any gcloud command; --skip-check
    goes straight to gcloud."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "gcloud").write_text(f'#!/bin/sh\necho "gcloud $*" >> {calls}\nexit 1\n')
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho "python $*" >> {calls}\necho "error: does not fit on tpu-v5e-4 by 3.2 GB" >&2\n'
                      'exit 2\n')
    for f in (bin_dir / "gcloud", python):
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MCPO_LOCAL_PYTHON": str(python)}
    args = ["bash", str(REPO / "launch" / "tpu_pod.sh"), "up", "--name", "t1", "--zone", "z", "--accelerator-type",
            "v5e-4", "--workdir", "gs://b/r", "--config", "configs/nectar.py", "--", "--config.seed=1"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "does not fit on tpu-v5e-4 by 3.2 GB" in proc.stderr and "nothing was created or started" in proc.stderr
    assert calls.read_text().splitlines() == [
        "python -m mcpo_jax.train --config configs/nectar.py --config.seed=1 --compile-only --target tpu-v5e-4"]
    calls.unlink()
    proc = subprocess.run(args[:2] + ["up", "--skip-check"] + args[3:], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env=env)
    assert calls.read_text().splitlines()[0].startswith("gcloud compute tpus tpu-vm describe t1"), calls.read_text()


# ------------------------------------------------------------------- data pipeline across processes


def test_each_process_reads_its_own_shard_and_together_they_cover_each_epoch(tmp_path):
    worker = REPO / "tests" / "_multiprocess_data_worker.py"
    code, output, _ = launch([sys.executable, str(worker), str(tmp_path)], num_processes=2, devices=1, timeout=90)
    assert code == 0, output
    runs = [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in range(2)]
    assert [r["process_index"] for r in runs] == [0, 1] and runs[0]["process_count"] == 2
    n = runs[0]["num_examples"]
    assert n == 40 and sorted(runs[0]["all_ids"]) == list(range(n))
    per_epoch = n // (4 * 2)  # global batch = 4 per process x 2 processes
    assert len(runs[0]["batches"]) == len(runs[1]["batches"]) == 2 * per_epoch  # lockstep: no host waits
    for epoch in range(2):
        mine = [sum(r["batches"][epoch * per_epoch:(epoch + 1) * per_epoch], []) for r in runs]
        assert not set(mine[0]) & set(mine[1]), f"epoch {epoch}: the processes share examples"
        assert sorted(mine[0] + mine[1]) == list(range(n)), f"epoch {epoch}: not every example once"
    # A new shuffle each epoch, and not the identity order.
    assert runs[0]["batches"][:per_epoch] != runs[0]["batches"][per_epoch:]


# ------------------------------------------------------------------------------ the trainer itself

TRAIN_CONFIG = REPO / "tests" / "_multiprocess_config.py"
AUDIT = REPO / "tests" / "_multiprocess_audit"

# Each trainer run costs 15-40 s of CPU on a small machine (two processes compiling the step); all of them run
# by default (the 2 x 2 vs 1 x 4 comparison, checkpoints, resume, SIGTERM on one process).
# Cheaper XLA CPU compiles (about 40 % less compile time on the tiny step); every run compared uses them.
FAST_COMPILE = {"XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}


def require_trainer():
    if not (REPO / "mcpo_jax" / "train.py").exists() or not (REPO / "configs" / "demo.py").exists():
        pytest.skip("the trainer (mcpo_jax/train.py, configs/demo.py) is not there yet")


def train_run(workdir, *, num_processes, devices, audit_dir=None, overrides=(), env=None, timeout=400):
    """`python -m mcpo_jax.train` under the launcher; returns (exit code, output)."""
    run_env = {"PYTHONPATH": f"{REPO}{os.pathsep}{AUDIT}", **FAST_COMPILE, **(env or {})}
    if audit_dir is not None:
        run_env.update(MCPO_TEST_AUDIT_DIR=str(audit_dir), MCPO_TEST_AUDIT_ROOT=str(workdir))
    command = [sys.executable, "-m", "mcpo_jax.train", "--config", str(TRAIN_CONFIG), "--workdir", str(workdir),
               *overrides]
    code, output, _ = launch(command, num_processes=num_processes, devices=devices, timeout=timeout, env=run_env,
                             log_dir=Path(str(workdir) + "-logs"))
    return code, output


def train_records(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def audit(audit_dir, process):
    return set(json.loads((Path(audit_dir) / f"process_{process}.json").read_text()))


NO_ACCUMULATION = ["--config.micro_batch_size=16"]  # = batch_size


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """The runs the trainer tests compare (each started once per module):

    two:      2 processes x 2 devices: steps 1-2 (stopping as if preempted, checkpoint 2), then the same
              command again, which restores checkpoint 2 and trains step 3 (checkpoint 3, HF export).
    one:      1 process x 4 devices, steps 1-3 from scratch.
    reshard:  1 process x 4 devices resuming from a copy of the 2-process checkpoint 2: step 3.
    One micro-batch per step (no gradient accumulation): see test_trainer_two_processes_x_two_devices_....
    """
    require_trainer()
    root = tmp_path_factory.mktemp("trainer")
    runs = {"root": root}
    # Single-process compiles may share a persistent cache (the 1-process runs compile the same step).
    # Not the 2-process runs: a cache hit on one process and a miss on the other desynchronises them.
    cache_env = {"JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                 "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

    two = root / "two"
    code, out = train_run(two, num_processes=2, devices=2, audit_dir=root / "audit_two_a",
                          overrides=["--config.debug.stop_after_steps=2", *NO_ACCUMULATION])
    assert code == 0, out
    runs["two_first_summary"] = json.loads((two / "summary.json").read_text())
    reshard = root / "reshard"
    shutil.copytree(two, reshard)
    (reshard / "metrics.jsonl").unlink()
    code, out = train_run(two, num_processes=2, devices=2, audit_dir=root / "audit_two_b", overrides=NO_ACCUMULATION)
    assert code == 0, out
    runs["two_output"] = out

    one = root / "one"
    code, out = train_run(one, num_processes=1, devices=4, env=cache_env, overrides=NO_ACCUMULATION)
    assert code == 0, out
    code, out = train_run(reshard, num_processes=1, devices=4, env=cache_env, overrides=NO_ACCUMULATION)
    assert code == 0, out
    runs.update(two=two, one=one, reshard=reshard)
    return runs


def test_trainer_two_processes_match_one_process(trainer_runs):
    two, one = train_records(trainer_runs["two"]), train_records(trainer_runs["one"])
    assert [r["step"] for r in two] == [1, 2, 3] and [r["step"] for r in one] == [1, 2, 3]
    for key in ("loss", "grad_norm", "rewards/accuracies", "tokens"):
        if key in one[0]:
            np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=2e-5, atol=1e-6,
                                       err_msg=key)
    assert two[2]["loss"] < two[0]["loss"] - 1e-3  # it trains
    assert trainer_runs["two_first_summary"]["status"] == "stopped"
    summary = json.loads((trainer_runs["two"] / "summary.json").read_text())
    assert (summary["status"], summary["start_step"], summary["step"]) == ("completed", 2, 3)


def test_trainer_checkpoint_restores_on_one_process(trainer_runs):
    """The 2-process checkpoint of step 2, restored by 1 process on 4 devices (arrays resharded across a
    different process layout), continues exactly: its step 3 is the 2-process run's step 3."""
    resumed, two = train_records(trainer_runs["reshard"]), train_records(trainer_runs["two"])
    assert [r["step"] for r in resumed] == [3]
    np.testing.assert_allclose(resumed[0]["loss"], two[2]["loss"], rtol=2e-5)
    np.testing.assert_allclose(resumed[0]["grad_norm"], two[2]["grad_norm"], rtol=2e-5)
    summary = json.loads((trainer_runs["reshard"] / "summary.json").read_text())
    assert (summary["status"], summary["start_step"]) == ("completed", 2)


def test_trainer_writes_single_files_from_process_zero_only(trainer_runs):
    workdir, root = trainer_runs["two"], trainer_runs["root"]
    for run in ("audit_two_a", "audit_two_b"):
        p0, p1 = audit(root / run, 0), audit(root / run, 1)
        shared_ok = ("cache", "checkpoints")  # tokenizer cache (atomic renames) and orbax (per-process shards)
        assert not [f for f in p1 if f != "." and not f.startswith(shared_ok)], f"{run}: process 1 wrote {sorted(p1)}"
        assert {"metrics.jsonl", "summary.json", "config.json", "train.log"} <= p0, sorted(p0)
        # No file of the checkpoint is written by both processes.
        both = {f for f in p0 & p1 if f.startswith("checkpoints") and (workdir / f).is_file()}
        assert not both, f"{run}: both processes wrote {sorted(both)}"
    second = audit(root / "audit_two_b", 0)
    assert any(f.startswith("hf/") for f in second), sorted(second)  # the HF export: process 0
    assert not any(f.startswith("hf") for f in audit(root / "audit_two_b", 1))
    # Each checkpoint exists once, with one array shard file set per process, merged by process 0.
    steps = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert steps == ["2", "3"], steps
    assert not list((workdir / "checkpoints").glob("*tmp*"))
    # Logged once: process 0's "step 3/3" line, never process 1's.
    out = trainer_runs["two_output"]
    assert "[p0] " in out and not [l for l in out.splitlines() if l.startswith("[p1]") and "step 3/3" in l]
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 3
    assert (workdir / "hf" / "config.json").exists()


def test_trainer_process_killed_mid_run_ends_the_job_with_a_clear_error(tmp_path):
    require_trainer()
    argv = [sys.executable, str(LAUNCHER), "-n", "2", "-d", "2", "--timeout", "150", "--grace", "5", "--",
            sys.executable, "-m", "mcpo_jax.train", "--config", str(TRAIN_CONFIG), "--workdir", str(tmp_path / "w")]
    proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **FAST_COMPILE},
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    pids, lines, killed_at = {}, [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("local_multiprocess: process ") and ": pid " in line:
                k, pid = line.split("process ", 1)[1].split(": pid ")
                pids[int(k)] = int(pid)
            if killed_at is None and line.startswith("[p0]") and "model:" in line:
                os.kill(pids[1], signal.SIGKILL)  # after the processes have run collectives together
                killed_at = time.monotonic()
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines)
    assert killed_at is not None, output
    assert time.monotonic() - killed_at < 60, "the job outlived its dead process by a minute"
    assert code == 128 + signal.SIGKILL, output
    assert "process 1 killed by SIGKILL" in output
    assert "FAILED" in output and "process 1 killed by SIGKILL first" in output


def test_trainer_two_processes_x_two_devices_train_as_one_process_x_four(tmp_path):
    """Issue 7's check, by default: 2 processes x 2 CPU devices train 3 steps of the tiny demo model with
    gradient accumulation (2 micro-batches): loss, gradient norm and metrics equal a 1-process 4-device run.
    The two launches run side by side (the 1-process run fills the 2-process run's waits)."""
    require_trainer()
    overrides = ["--config.export_hf=False"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = {n: pool.submit(train_run, tmp_path / f"p{n}", num_processes=n, devices=4 // n, overrides=overrides,
                               timeout=240) for n in (2, 1)}
        results = {n: run.result() for n, run in runs.items()}
    for n, (code, out) in results.items():
        assert code == 0, f"{n} process(es):\n{out}"
    two, one = train_records(tmp_path / "p2"), train_records(tmp_path / "p1")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    for key in ("loss", "grad_norm", "rewards/accuracies", "rewards/margins", "kernel/entropy", "tokens", "examples"):
        # step 1 runs with policy = reference: its margins are rounding noise (below 1e-6) between the reference
        # pass and the gradient pass, whose sign (the accuracy) differs with the device layout
        first = 1 if key == "rewards/accuracies" else 0
        np.testing.assert_allclose([r[key] for r in two][first:], [r[key] for r in one][first:], rtol=2e-5,
                                   atol=1e-6, err_msg=key)
    assert abs(two[0]["rewards/margins"]) < 1e-6 and abs(one[0]["rewards/margins"]) < 1e-6
    assert [r["kernel/rank_hist"] for r in two] == [r["kernel/rank_hist"] for r in one]  # the same negatives
    assert two[0]["examples"] == 16
    assert two[2]["loss"] < two[0]["loss"] - 1e-3  # it trains
    assert "all 2 process(es) finished OK" in results[2][1]


def test_trainer_sigterm_on_one_process_stops_every_process_at_the_same_step(tmp_path):
    """A preemption notice reaches the hosts of a slice at different moments: the job must still stop
    cleanly (all processes save the same step and exit 0), never hang."""
    require_trainer()
    workdir = tmp_path / "w"
    argv = [sys.executable, str(LAUNCHER), "-n", "2", "-d", "2", "--timeout", "300", "--grace", "60", "--",
            sys.executable, "-m", "mcpo_jax.train", "--config", f"{TRAIN_CONFIG}:10", "--workdir", str(workdir),
            "--config.checkpoint.save_every=1000"]
    proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **FAST_COMPILE},
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    pids, lines = {}, []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("local_multiprocess: process ") and ": pid " in line:
                k, pid = line.split("process ", 1)[1].split(": pid ")
                pids[int(k)] = int(pid)
            if not signalled_event.is_set() and line.startswith("[p0]") and "step 2/" in line:
                os.kill(pids[0], signal.SIGTERM)  # process 0 only
                signalled_event.set()

    signalled_event = threading.Event()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not signalled_event.wait(timeout=240):
            pytest.fail("the run never reached step 2:\n" + "".join(lines))
        signalled = time.monotonic()
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            code = None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the launcher stops its processes
            proc.wait(timeout=30)
        reader.join(timeout=10)
    output = "".join(lines)
    assert code is not None, f"hung for 90 s after process 0 got SIGTERM:\n{output[-3000:]}"
    assert code == 0, output
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    assert (workdir / "checkpoints" / str(summary["step"])).is_dir()
    assert time.monotonic() - signalled < 90
