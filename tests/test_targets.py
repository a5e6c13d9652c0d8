"""mcpo_jax.targets: the registry of compile targets, their compile-only devices and the TPU compiler's HBM limit."""

import importlib.resources
import importlib.util
import os

import jax
import pytest

from _aot import run_aot
from mcpo_jax import targets

REQUIRED = ("cpu", "h100", "h200", "h100x8", "h200x8", "tpu-v5e-4", "tpu-v5e-8", "tpu-v4-8", "tpu-v5p-8",
            "tpu-v5p-16", "tpu-v5p-64", "tpu-v6e-4", "tpu-v6e-8")


def test_registry_holds_the_targets_with_consistent_numbers():
    assert set(REQUIRED) <= set(targets.TARGETS)
    for name, t in targets.TARGETS.items():
        assert t.name == name and t.platform in ("cpu", "gpu", "tpu")
        if t.platform == "cpu":
            assert (t.hbm_bytes, t.usable_bytes, t.num_devices) == (None, None, None)
            continue
        assert 0 < t.usable_bytes < t.hbm_bytes and t.peak_bf16_tflops > 0
    assert targets.get("h100").usable_bytes == int(0.90 * 81559 * 2**20)  # the launchers' memory fraction
    assert targets.get("h200x8").num_devices == 8 and targets.get("h200x8").hbm_bytes == 143771 * 2**20
    assert [targets.get(f"tpu-v5p-{n}").num_devices for n in (8, 16, 64)] == [4, 8, 32]  # v5p-N counts cores
    # 16 GiB less the 258 MiB libtpu reserves, less the one-op program's code and output (< 64 KiB)
    assert 0 < 16 * 2**30 - 258 * 2**20 - targets.get("tpu-v5e-4").usable_bytes < 2**16


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(targets.TargetError, match="unknown compile target 'v5e'; known: cpu, h100, .*tpu-v6e-8"):
        targets.get("v5e")
    assert issubclass(targets.TargetError, ValueError)


@pytest.mark.parametrize("name, extra", [("tpu-v5p-8", "aot-tpu"), ("h100x8", "aot-gpu")])
def test_a_missing_plugin_says_what_to_install(monkeypatch, name, extra):
    real = importlib.util.find_spec
    absent = {"libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m in absent else real(m, *a))
    what = {"aot-tpu": "libtpu", "aot-gpu": "the JAX CUDA plugin"}[extra]
    message = f'compile target {name!r} needs {what}, which is not installed: pip install -e ".[{extra}]"'
    assert targets.missing_plugin(targets.get(name)) == message
    with pytest.raises(targets.TargetError) as err:
        targets.devices(targets.get(name))
    assert str(err.value) == message
    assert targets.missing_plugin(targets.get("cpu")) is None
    # either CUDA plugin serves the GPU targets: cuda12 alone
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: object() if m == "jax_cuda12_plugin" else None)
    assert targets.missing_plugin(targets.get("h100")) is None and targets.missing_plugin(targets.get("tpu-v4-8"))


def test_prepare_environment_after_the_backend_started(monkeypatch):
    """This session's jax started on the CPU: the TPU variables still take (libtpu reads them when it loads), and
    a backend started without JAX_PLATFORMS=cpu cannot be changed any more."""
    for key in ("TPU_SKIP_MDS_QUERY", "ALLOW_MULTIPLE_LIBTPU_LOAD"):
        monkeypatch.delenv(key, raising=False)
    jax.devices()
    assert targets.prepare_environment(targets.get("tpu-v5e-4"))
    assert os.environ["TPU_SKIP_MDS_QUERY"] == "1" and os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] == "1"
    assert targets.prepare_environment(targets.get("cpu"))
    old = jax.config.jax_platforms
    try:
        jax.config.update("jax_platforms", "cuda")
        assert not targets.prepare_environment(targets.get("h100"))
        assert not targets.prepare_environment(targets.get("cpu"))
    finally:
        jax.config.update("jax_platforms", old)
    assert targets.environment(targets.get("h100")) == {"JAX_PLATFORMS": "cpu"}


def test_gpu_specs_are_package_data():
    aot = importlib.resources.files("mcpo_jax") / "aot"
    for t in targets.TARGETS.values():
        if t.gpu_spec:
            assert f'name: "{t.device_kind}"' in (aot / t.gpu_spec).read_text(encoding="utf-8")
    setup = (targets.SPEC_DIR.parents[1] / "setup.py").read_text(encoding="utf-8")
    assert '"aot/*.txtpb"' in setup and '"aot-tpu"' in setup and '"aot-gpu"' in setup


DEVICES = """
result = {}
for name, t in targets.TARGETS.items():
    if t.platform == target.platform:
        found = targets.devices(t)
        result[name] = [len(found), found[0].device_kind, found[0].platform, len({d.process_index for d in found})]
"""


def test_every_tpu_target_gives_its_compile_only_devices():
    got = run_aot(DEVICES, "tpu-v5e-4")
    hosts = {"tpu-v5p-16": 2, "tpu-v5p-64": 8}  # 4 chips a host; the others are one host
    assert got == {n: [t.num_devices, t.device_kind, "tpu", hosts.get(n, 1)]
                   for n, t in targets.TARGETS.items() if t.platform == "tpu"}


def test_every_gpu_target_gives_its_compile_only_devices():
    got = run_aot(DEVICES, "h100")
    assert got == {n: [t.num_devices, t.device_kind, "gpu", 1] for n, t in targets.TARGETS.items()
                   if t.platform == "gpu"}


def test_tpu_usable_bytes_is_what_the_compiler_accepts():
    """`usable_bytes` is the largest argument a one-op program may take (measured by bisection); one byte more
    and the TPU compiler refuses the program."""
    got = run_aot("""
        result = {}
        for name, t in targets.TARGETS.items():
            if t.platform != "tpu":
                continue
            mesh = Mesh(targets.devices(t)[:1], ("x",))
            verdicts = []
            for n in (t.usable_bytes, t.usable_bytes + 1):
                arg = jax.ShapeDtypeStruct((n,), jnp.uint8, sharding=NamedSharding(mesh, P()))
                try:
                    jax.jit(lambda x: x[:512]).lower(arg).compile()
                    verdicts.append("fits")
                except Exception as e:  # noqa: BLE001
                    refused = "RESOURCE_EXHAUSTED" in str(e) and "hbm" in str(e)
                    verdicts.append("RESOURCE_EXHAUSTED" if refused else str(e)[:200])
            result[name] = verdicts
        """, "tpu-v5e-4")
    assert got == {n: ["fits", "RESOURCE_EXHAUSTED"] for n, t in targets.TARGETS.items() if t.platform == "tpu"}


def test_any_slice_size_by_name():
    """The launchers' accelerator types beyond the registry: topology and device count per generation."""
    cases = {"tpu-v5litepod-16": ("tpu-v5e-16", "v5e:4x4", 16), "tpu-v6e-64": ("tpu-v6e-64", "v6e:8x8", 64),
             "tpu-v5p-32": ("tpu-v5p-32", "v5:2x2x4", 16), "tpu-v4-16": ("tpu-v4-16", "v4:2x2x2", 8),
             "h100x16": ("h100x16", "1x2x8", 16), "h200x4": ("h200x4", "1x1x4", 4)}
    for name, (canonical, topology, devices) in cases.items():
        t = targets.get(name)
        assert (t.name, t.topology, t.num_devices) == (canonical, topology, devices), name
        assert 0 < t.usable_bytes < t.hbm_bytes
    assert targets.get("tpu-v5p-8") is targets.TARGETS["tpu-v5p-8"]  # the registry's measured entry first
    for bad in ("tpu-v5p-7", "tpu-v5e-12", "h100x12", "a100x8"):
        with pytest.raises(targets.TargetError, match="unknown compile target"):
            targets.get(bad)
