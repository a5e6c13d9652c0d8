"""Named compile targets: the accelerators a program can be compiled for on this CPU host, without them.

XLA compiles for a TPU slice or a GPU node from a description of its devices ("deviceless" ahead-of-time
compilation): `devices(get("tpu-v5p-8"))` gives 4 compile-only "TPU v5" devices that a `Mesh` takes like
real ones, and `jax.jit(f, in_shardings=...).lower(...).compile()` over that mesh gives the program the
slice would run, its `memory_analysis()` per device and its optimized HLO (`mcpo_jax.audit` reads it).
Nothing runs: the devices cannot hold data.

Each `Target` also carries what a verdict needs: the HBM per device and how much of it one program may use,
and the chip's peak dense bf16 rate.

TPU targets need libtpu (`pip install -e ".[aot-tpu]"`), GPU targets the JAX CUDA plugin
(`pip install -e ".[aot-gpu]"`); both need `JAX_PLATFORMS=cpu` before jax starts (`prepare_environment`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pathlib

import jax

GiB = 2**30
MiB = 2**20
SPEC_DIR = pathlib.Path(__file__).resolve().parent / "aot"  # GPU target specs, see aot/README.md
# JAX preallocates this fraction of each GPU: the value our launchers export (launch/slurm_gpu.sbatch), so a
# GPU program may use hbm x 0.90. The GPU compiler does not check it: a program too big still compiles.
GPU_MEM_FRACTION = 0.90


class TargetError(ValueError):
    """A target that is unknown, or whose compiler plugin is not installed: the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "cpu" | "gpu" | "tpu": jax.Device.platform of its devices
    device_kind: str  # jax.Device.device_kind of its devices
    num_devices: int | None  # None: the host's own, however many (the cpu target)
    hbm_bytes: int | None  # physical HBM per device; None: no verdict (the cpu target)
    usable_bytes: int | None  # what one program may use per device (see the notes on TARGETS)
    peak_bf16_tflops: float | None  # per device, dense (no 2:4 sparsity), datasheet
    topology: str | None = None  # TPU: libtpu's topology name; GPU: "1x1xN"
    chip_config_name: str | None = None  # TPU: "megacore" where 2 TensorCores make one device (v4, v5p)
    chips_per_host_bounds: tuple[int, int, int] | None = None  # TPU: chips per host (sets the host count)
    gpu_spec: str | None = None  # GPU: XLA's target spec, a file in mcpo_jax/aot/

    @property
    def needs(self) -> str | None:
        """The pip extra whose plugin compiles for this target (None: jax's own CPU backend)."""
        return {"tpu": "aot-tpu", "gpu": "aot-gpu"}.get(self.platform)


def _tpu(name, kind, topology, chips, hbm, usable, tflops, *, megacore=False, hosts=(2, 2, 1)) -> Target:
    return Target(name, "tpu", kind, chips, hbm, usable, tflops, topology=topology,
                  chip_config_name="megacore" if megacore else "default", chips_per_host_bounds=hosts)


def _gpu(name, kind, spec, n, hbm, tflops) -> Target:
    return Target(name, "gpu", kind, n, hbm, int(hbm * GPU_MEM_FRACTION), tflops, topology=f"1x1x{n}", gpu_spec=spec)


# Physical HBM per device. GPUs: what nvidia-smi reports on the machines we run (H100 SXM "80GB": 81559 MiB;
# H200 "141GB": 143771 MiB); XLA's spec files say 84942979072 and 151397597184 bytes, which the GPU compiler
# does not use to refuse anything. TPUs: the datasheet figures (v5e 16 GiB, v4 32 GiB, v6e 32 GB, v5p 95 GB per
# chip) checked against libtpu's own accounting, which the compiler prints when a program does not fit
# ("Total hbm usage >= ...: reserved ..."): reserved + usable = 16 GiB on v5e, 32 GiB on v4, 31.5 GiB on v6e,
# and 96 GiB on v5p, kept as its hbm_bytes so that usable <= hbm holds.
#
# Usable bytes per TPU device, measured (libtpu 0.0.42.1, jax 0.10.2): the largest u8 argument the TPU
# compiler accepts in a one-op program (`x[:512]`, ~40-55 KB of code), by bisection; one byte more is
# RESOURCE_EXHAUSTED ("Ran out of memory in memory space hbm"). libtpu reserves 258 MiB (v5e), 260 MiB (v6e),
# 1.25 GiB (v4) and 263 MiB (v5p) of each chip; multi-host slices a few KB more (so the values differ per slice).
#
# Topology names: MaxText's accelerator_to_spec_map.py (also axlearn's aot_compilation.py): v5p-N and v4-N
# count TensorCores (v5p-64 = 32 chips = "v5:2x4x4", megacore), v5e-N and v6e-N count chips. v5e-8 and
# v6e-8 are one host of 8 chips (ct5lp-hightpu-8t, ct6e-standard-8t): chips_per_host_bounds (2, 4, 1).
# Peak dense bf16 TFLOP/s per chip: v4 275, v5e 197, v5p 459, v6e 918 (Google's TPU pages); H100 SXM and H200
# 989.4 (NVIDIA's datasheets give 1979 with sparsity).
TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("cpu", "cpu", "cpu", None, None, None, None),
    _gpu("h100", "NVIDIA H100 80GB HBM3", "h100_sxm.txtpb", 1, 81559 * MiB, 989.4),
    _gpu("h100x8", "NVIDIA H100 80GB HBM3", "h100_sxm.txtpb", 8, 81559 * MiB, 989.4),
    _gpu("h200", "NVIDIA H200 141GB HBM3e", "h200.txtpb", 1, 143771 * MiB, 989.4),
    _gpu("h200x8", "NVIDIA H200 141GB HBM3e", "h200.txtpb", 8, 143771 * MiB, 989.4),
    _tpu("tpu-v5e-4", "TPU v5 lite", "v5e:2x2", 4, 16 * GiB, 16_909_295_616, 197.0),
    _tpu("tpu-v5e-8", "TPU v5 lite", "v5e:2x4", 8, 16 * GiB, 16_909_293_568, 197.0, hosts=(2, 4, 1)),
    _tpu("tpu-v4-8", "TPU v4", "v4:2x2x1", 4, 32 * GiB, 33_014_376_448, 275.0, megacore=True),
    _tpu("tpu-v5p-8", "TPU v5", "v5:2x2x1", 4, 96 * GiB, 102_803_380_224, 459.0, megacore=True),
    _tpu("tpu-v5p-16", "TPU v5", "v5:2x2x2", 8, 96 * GiB, 102_803_378_176, 459.0, megacore=True),
    _tpu("tpu-v5p-64", "TPU v5", "v5:2x4x4", 32, 96 * GiB, 102_803_365_888, 459.0, megacore=True),
    _tpu("tpu-v6e-4", "TPU v6 lite", "v6e:2x2", 4, 32 * GiB, 33_550_187_520, 918.0),
    _tpu("tpu-v6e-8", "TPU v6 lite", "v6e:2x4", 8, 32 * GiB, 33_550_185_472, 918.0, hosts=(2, 4, 1)),
)}

# The modules that hold each platform's compiler. One CUDA plugin per environment: either serves (see setup.py).
_PLUGINS = {"tpu": ("libtpu",), "gpu": ("jax_cuda13_plugin", "jax_cuda12_plugin")}
_PLUGIN_WHAT = {"tpu": "libtpu", "gpu": "the JAX CUDA plugin"}


# Any slice size by name, beyond the registry (the launchers' accelerator types): per TPU generation, the slice's
# topology for its chip count (chips_per_host_bounds as Cloud TPU builds them: one 8-chip host for v5e-8 / v6e-8,
# 4-chip hosts in larger slices) and the usable bytes of the registry's entries less 64 KiB (multi-host slices
# measured up to 14 KB below single-host ones); for GPUs, N devices on ceil(N / 8) hosts of 8.
_TPU_GENERATIONS = {  # name prefix: (topology prefix, device kind, megacore, hbm, usable, tflops)
    "v5e": ("v5e", "TPU v5 lite", False, 16 * GiB, 16_909_293_568 - 64 * 1024, 197.0),
    "v6e": ("v6e", "TPU v6 lite", False, 32 * GiB, 33_550_185_472 - 64 * 1024, 918.0),
    "v5p": ("v5", "TPU v5", True, 96 * GiB, 102_803_365_888 - 64 * 1024, 459.0),
    "v4": ("v4", "TPU v4", True, 32 * GiB, 33_014_376_448 - 64 * 1024, 275.0),
}
_TWO_D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_THREE_D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
            512: "8x8x8"}


def _parse(name: str) -> Target | None:
    """A target for a slice or node size the registry does not list: tpu-v5e-16 (tpu-v5litepod-16), tpu-v6e-64,
    tpu-v5p-32 (cores), tpu-v4-16 (cores), h100x16, h200x32 (GPUs)."""
    import re

    m = re.fullmatch(r"(h100|h200)x(\d+)", name)
    if m:
        base = TARGETS[m.group(1)]
        n = int(m.group(2))
        hosts = -(-n // 8)
        if n < 1 or (hosts > 1 and n % 8):
            return None
        return dataclasses.replace(base, name=name, num_devices=n, topology=f"1x{hosts}x{min(n, 8)}")
    m = re.fullmatch(r"tpu-(v5e|v5litepod|v6e|v5p|v4)-(\d+)", name)
    if not m:
        return None
    gen = "v5e" if m.group(1) == "v5litepod" else m.group(1)
    prefix, kind, megacore, hbm, usable, tflops = _TPU_GENERATIONS[gen]
    count = int(m.group(2))
    chips = count // 2 if megacore else count  # v5p-N and v4-N count TensorCores, two per chip
    shape = (_THREE_D if megacore else _TWO_D).get(chips)
    if shape is None or (megacore and count % 2):
        return None
    hosts = (2, 4, 1) if chips == 8 and not megacore else (1, 1, 1) if chips == 1 else (2, 2, 1)
    return _tpu(f"tpu-{gen}-{count}", kind, f"{prefix}:{shape}", chips, hbm, usable, tflops, megacore=megacore,
                hosts=hosts)


def get(name: str) -> Target:
    """A registered target, or one named by its slice / node size (`_parse`)."""
    if name in TARGETS:
        return TARGETS[name]
    parsed = _parse(name)
    if parsed is None:
        raise TargetError(f"unknown compile target {name!r}; known: {', '.join(TARGETS)} (or another slice size: "
                          "tpu-v5e-16, tpu-v6e-64, tpu-v5p-32, tpu-v4-16, h100x16, ...)")
    return parsed


def missing_plugin(target: Target) -> str | None:
    """None when `target` can be compiled for here, else the one-line TargetError message saying what to install."""
    modules = _PLUGINS.get(target.platform, ())
    if not modules or any(importlib.util.find_spec(m) is not None for m in modules):
        return None
    return (f"compile target {target.name!r} needs {_PLUGIN_WHAT[target.platform]}, which is not installed: "
            f'pip install -e ".[{target.needs}]"')


def environment(target: Target) -> dict[str, str]:
    """The environment variables a process compiling for `target` needs before jax starts (`prepare_environment`
    sets them in this process; give them to a subprocess): JAX_PLATFORMS=cpu (no backend tries to open an
    accelerator; the cpu target too), and for TPUs TPU_SKIP_MDS_QUERY=1 (libtpu asks no metadata server: the
    slice is described by its topology) and ALLOW_MULTIPLE_LIBTPU_LOAD=1 (several processes may load libtpu)."""
    env = {"JAX_PLATFORMS": "cpu"}
    if target.platform == "tpu":
        env.update(TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    return env


def prepare_environment(target: Target) -> bool:
    """Set `environment(target)` in this process. Returns whether jax runs as needed: True when set before any
    backend started, or when the running backends were started with JAX_PLATFORMS=cpu already (the TPU
    variables are read when libtpu loads, at the first TPU target's `devices`, so setting them late works).
    False when a backend started otherwise: JAX_PLATFORMS cannot change in a running process; compile in a
    fresh one."""
    from jax._src import xla_bridge

    env = environment(target)
    platforms = env.pop("JAX_PLATFORMS")
    for key, value in env.items():
        os.environ.setdefault(key, value)
    if not xla_bridge.backends_are_initialized():
        os.environ["JAX_PLATFORMS"] = platforms
        jax.config.update("jax_platforms", platforms)  # jax read the variable when it was imported
        return True
    running = jax.config.jax_platforms or ""
    if target.platform == "cpu":
        return not running or "cpu" in running.split(",")
    return running == platforms


def devices(target: Target) -> list[jax.Device]:
    """The target's devices: the host's own for `cpu`, compile-only ones described by its topology otherwise."""
    if target.platform == "cpu":
        return jax.devices("cpu")
    message = missing_plugin(target)
    if message:
        raise TargetError(message)
    return list(_topology_devices(target))


@functools.cache
def _topology_devices(target: Target) -> tuple[jax.Device, ...]:
    from jax.experimental import topologies

    if target.platform == "tpu":
        topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu",
                                            chip_config_name=target.chip_config_name,
                                            chips_per_host_bounds=target.chips_per_host_bounds)
    else:
        spec = (SPEC_DIR / target.gpu_spec).read_text(encoding="utf-8")
        topo = topologies.get_topology_desc(platform="cuda", topology=target.topology, target_config=spec)
    found = tuple(topo.devices)
    if len(found) != target.num_devices or found[0].device_kind != target.device_kind:
        raise TargetError(f"compile target {target.name!r}: the topology gave {len(found)} x "
                          f"{found[0].device_kind!r}, expected {target.num_devices} x {target.device_kind!r}")
    return found
