#!/usr/bin/env python3
"""Run N JAX processes on this machine, each with its own CPU devices, as one multi-host job.

    python launch/local_multiprocess.py -n 2 -d 2 -- python -m mcpo_jax.train \
        --config configs/demo.py --workdir /tmp/mp_run

Every process gets JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=D and
MCPO_COORDINATOR / MCPO_NUM_PROCESSES / MCPO_PROCESS_ID, which
`mcpo_jax.sharding.initialize_distributed` turns into `jax.distributed.initialize` with gloo CPU
collectives. Together the processes see N*D devices, exactly like N hosts of a TPU slice or a
multi-node GPU job, so the multi-host code path (process-sharded data, process-0-only writes,
checkpoints written once) runs for real on a laptop or in CI.

Failures propagate: when one process exits non-zero, the survivors get `--grace` seconds to exit
on their own (the distributed runtime notices a dead peer), then they are terminated, and the
launcher exits with the failed process's code and a message naming it. `--timeout` bounds the
whole job (exit code 124), so a hang never outlives it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

TIMEOUT_EXIT_CODE = 124


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict[str, str], *, process_id: int, num_processes: int, devices: int,
                coordinator: str) -> dict[str, str]:
    env = dict(base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["MCPO_COORDINATOR"] = coordinator
    env["MCPO_NUM_PROCESSES"] = str(num_processes)
    env["MCPO_PROCESS_ID"] = str(process_id)
    return env


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _pump(stream, prefix: str, sink, log_file) -> None:
    for line in iter(stream.readline, b""):
        text = line.decode("utf-8", "replace")
        sink.write(prefix + text)
        sink.flush()
        if log_file is not None:
            log_file.write(text)
            log_file.flush()
    stream.close()


def _stop(procs: list[subprocess.Popen], kill_after: float) -> None:
    """SIGTERM every live process group, then SIGKILL what is left after `kill_after` seconds."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + kill_after
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in live:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated(signal.Signals(signum).name)


def run(command: list[str], *, num_processes: int, devices_per_process: int, port: int | None = None,
        timeout: float | None = None, grace: float = 0.0, log_dir: str | None = None,
        env: dict[str, str] | None = None, poll_interval: float = 0.1) -> int:
    """Start the processes, stream their output prefixed with [pK], return the job's exit code."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError("num_processes and devices_per_process must be >= 1")
    coordinator = f"127.0.0.1:{port or free_port()}"
    base = dict(os.environ if env is None else env)
    say = lambda msg: print(f"local_multiprocess: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"{num_processes} process(es) x {devices_per_process} CPU device(s), coordinator {coordinator}: "
        f"{shlex.join(command)}")
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    procs, pumps, logs = [], [], []
    start = time.monotonic()
    try:
        for pid in range(num_processes):
            p = subprocess.Popen(
                command,
                env=process_env(base, process_id=pid, num_processes=num_processes,
                                devices=devices_per_process, coordinator=coordinator),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: a kill reaches its children too
            )
            procs.append(p)
            say(f"process {pid}: pid {p.pid}")
            log_file = open(os.path.join(log_dir, f"process_{pid}.log"), "w") if log_dir else None
            logs.append(log_file)
            t = threading.Thread(target=_pump, args=(p.stdout, f"[p{pid}] ", sys.stdout, log_file), daemon=True)
            t.start()
            pumps.append(t)

        failed: tuple[int, int] | None = None  # (process id, exit code) of the first failure
        while True:
            codes = [p.poll() for p in procs]
            if failed is None:
                for pid, code in enumerate(codes):
                    if code not in (None, 0):
                        failed = (pid, code)
                        failed_at = time.monotonic()
                        others = sum(c is None for c in codes)
                        say(f"process {pid} {_describe(code)}; "
                            + (f"giving the other {others} process(es) {grace:g}s to exit" if others else
                               "no other process is running"))
                        break
            if all(c is not None for c in codes):
                break
            if failed is not None and time.monotonic() - failed_at >= grace:
                live = [i for i, c in enumerate(codes) if c is None]
                say(f"terminating process(es) {live} after the failure of process {failed[0]}")
                _stop(procs, kill_after=5.0)
                break
            if timeout is not None and time.monotonic() - start > timeout:
                live = [i for i, c in enumerate(codes) if c is None]
                say(f"timeout after {timeout:g}s; terminating process(es) {live}")
                _stop(procs, kill_after=5.0)
                for t in pumps:
                    t.join(timeout=5)
                return TIMEOUT_EXIT_CODE
            time.sleep(poll_interval)
    except (KeyboardInterrupt, _Terminated) as e:
        say(f"interrupted ({type(e).__name__} {e}); terminating all processes")
        _stop(procs, kill_after=5.0)
        return 130
    finally:
        for p in procs:
            if p.poll() is None:  # only on an unexpected exception
                _stop(procs, kill_after=1.0)
                break
        for t in pumps:
            t.join(timeout=5)
        for f in logs:
            if f is not None:
                f.close()

    codes = [p.returncode for p in procs]
    elapsed = time.monotonic() - start
    if failed is not None:
        summary = ", ".join(f"p{i}: {_describe(c)}" for i, c in enumerate(codes))
        say(f"FAILED after {elapsed:.1f}s: process {failed[0]} {_describe(failed[1])} first ({summary})")
        return failed[1] if failed[1] > 0 else 128 - failed[1]
    say(f"all {num_processes} process(es) finished OK in {elapsed:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s [options] -- command [args...]",
    )
    parser.add_argument("-n", "--num-processes", type=int, default=2)
    parser.add_argument("-d", "--devices-per-process", type=int, default=2,
                        help="CPU devices per process (xla_force_host_platform_device_count)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=None,
                        help=f"seconds before every process is killed (exit {TIMEOUT_EXIT_CODE})")
    parser.add_argument("--grace", type=float, default=0.0,
                        help="after a failure, seconds the others get to exit on their own before being killed")
    parser.add_argument("--log-dir", default=None, help="also write each process's output to LOG_DIR/process_K.log")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    # The processes run in their own sessions, so a SIGTERM to the launcher must be passed on.
    signal.signal(signal.SIGTERM, _raise_terminated)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    return run(command, num_processes=args.num_processes, devices_per_process=args.devices_per_process,
               port=args.port, timeout=args.timeout, grace=args.grace, log_dir=args.log_dir)


if __name__ == "__main__":
    sys.exit(main())
