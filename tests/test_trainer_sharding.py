"""Same step on 1 CPU device and on 8 virtual CPU devices (fsdp=4, tensor=2)."""

import json
import os
import subprocess
import sys

import numpy as np

from _train_fixtures import sharded_step_metrics

HERE = os.path.dirname(os.path.abspath(__file__))


def test_one_device_equals_eight_devices_fsdp4_tensor2():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_train_fixtures.py"), "4", "2"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=os.path.dirname(HERE))
    assert proc.returncode == 0, proc.stderr[-3000:]
    eight = json.loads(proc.stdout.split("RESULT ", 1)[1])
    one = sharded_step_metrics(1, 1)
    assert eight["devices"] == 8 and one["devices"] == 1
    assert any("fsdp" in s for s in eight["specs"]) and any("tensor" in s for s in eight["specs"])
    assert eight["selected"] == one["selected"]  # the kernel's draws do not depend on the mesh
    np.testing.assert_allclose(eight["loss"], one["loss"], rtol=1e-5)
    np.testing.assert_allclose(eight["grad_norm"], one["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(eight["checksum"], one["checksum"], rtol=1e-5)
