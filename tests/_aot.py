"""Deviceless compilation in a subprocess, for the tests: `run_aot(code, target)`.

libtpu must load with JAX_PLATFORMS=cpu (and TPU_SKIP_MDS_QUERY=1) set before jax starts, and a test session has
started jax already; a fresh Python with the target's environment does not depend on what the session did.
A test whose target's plugin is not installed (libtpu, the CUDA plugin) is skipped with the install line (fails under
CI=true: .ci/run installs both).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from mcpo_jax import targets

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARKER = "AOT_RESULT "

PRELUDE = """
import json
from mcpo_jax import audit, targets
target = targets.get({target!r})
assert targets.prepare_environment(target)
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
devices = targets.devices(target)
"""


def run_aot(code: str, target: str, *, timeout: float = 300) -> dict:
    """Run `code` in a fresh Python with `target`'s environment and names `target`, `devices` (its compile-only
    devices), `audit`, `targets`, `jax`, `jnp`, `np`, `Mesh`, `NamedSharding`, `P`; return the JSON value the code
    leaves in `result`."""
    message = targets.missing_plugin(targets.get(target))
    if message:
        if os.environ.get("CI") == "true":  # .ci/run installs both plugins: there these tests run, never skip
            pytest.fail(f"CI must run the deviceless compile tests: {message}")
        pytest.skip(message)
    script = PRELUDE.format(target=target) + textwrap.dedent(code) + f"\nprint({MARKER!r} + json.dumps(result))\n"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # compile as a launch would
    env.update(targets.environment(targets.get(target)))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode or not lines:
        raise AssertionError(f"the {target} snippet failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(MARKER):])
