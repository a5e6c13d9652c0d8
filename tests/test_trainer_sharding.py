"""Same step on 1 CPU device and on 8 virtual CPU devices (fsdp=4, tensor=2): rows encoded whole, and the shared
prompt with the reused prompt encoding and the reference in the step; and what FSDP moves in the layer loops."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from _train_fixtures import sharded_step_metrics

HERE = os.path.dirname(os.path.abspath(__file__))


VARIANTS = ("rows", "shared")


@pytest.fixture(scope="module")
def eight_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_train_fixtures.py"), "4", "2", ",".join(VARIANTS)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=os.path.dirname(HERE))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_device_equals_eight_devices_fsdp4_tensor2(eight_devices, variant):
    eight = eight_devices[variant]
    one = sharded_step_metrics(1, 1, variant)
    assert eight["devices"] == 8 and one["devices"] == 1
    assert any("fsdp" in s for s in eight["specs"]) and any("tensor" in s for s in eight["specs"])
    assert eight["selected"] == one["selected"]  # the kernel's draws do not depend on the mesh
    np.testing.assert_allclose(eight["loss"], one["loss"], rtol=1e-5)
    np.testing.assert_allclose(eight["grad_norm"], one["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(eight["checksum"], one["checksum"], rtol=1e-5)


def test_fsdp_moves_weights_not_activations(eight_devices):
    """Inside the layer loops of the step compiled for fsdp=8, every collective moves a weight (a layer's weights
    all-gathered where used, their gradients reduced), never an activation: GSPMD left alone partitions the
    matmuls over the fsdp-split weight dimension and all-gathers / all-reduces activations instead."""
    report = eight_devices["layer_collectives"]
    assert report["layer_loops"] >= 3  # policy and reference no-gradient passes, the gradient pass
    gathers = [c for c in report["collectives"] if c[0] == "all-gather"]
    assert gathers, "no weight all-gather in the layer loops: the weights are not FSDP-sharded"
    for kind, sizes, _ in report["collectives"]:
        assert max(sizes) <= report["largest_weight"], (kind, sizes, report["largest_weight"])
