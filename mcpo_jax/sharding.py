"""Mesh, logical-axis rules and multi-host initialisation.

Model code names the axes of every parameter with logical names ("embed", "mlp", "heads", ...);
this module turns those names into `PartitionSpec`s over a device mesh with axes
("data", "fsdp", "tensor"). Nothing here knows about models, data or training, so every
other module may import it.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None for replicated). The first rule that
# names a logical axis wins. "batch" shards the example axis of every input over data x fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


def resolve_mesh(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with the one -1 axis filled in; ValueError naming the problem otherwise."""
    sizes = [int(data), int(fsdp), int(tensor)]
    named = dict(zip(MESH_AXES, sizes))
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {named}")
    for name, s in named.items():
        if s == 0 or s < -1:
            raise ValueError(f"mesh.{name} must be a positive integer or -1, got {s}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes {named}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} ({named}) but there are "
                         f"{num_devices} devices")
    return tuple(sizes)


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over all devices; one axis may be -1 (= all remaining)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh(data, fsdp, tensor, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _mesh_axes_for(name: str | None, rules: Sequence[tuple[str, Any]]):
    if name is None:
        return None
    for logical, mesh_axes in rules:
        if logical == name:
            return mesh_axes
    raise KeyError(f"no sharding rule for logical axis {name!r}; rules cover {[r[0] for r in rules]}")


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry the logical names `axes`.

    When `shape` and `mesh` are given, a dimension whose size is not divisible by its mesh axes
    is replicated instead (e.g. 2 KV heads on a tensor axis of 4), and a mesh axis is never used
    twice in one spec.
    """
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        mesh_axes = _mesh_axes_for(name, rules)
        if mesh_axes is None:
            out.append(None)
            continue
        group = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        group = tuple(a for a in group if a not in used)
        if mesh is not None:
            group = tuple(a for a in group if mesh.shape[a] > 1)
            if shape is not None and group:
                size = math.prod(mesh.shape[a] for a in group)
                if shape[i] % size:
                    log.debug("replicating dim %d (%s, size %d) not divisible by %s", i, name, shape[i], group)
                    group = ()
        used.update(group)
        out.append(None if not group else group[0] if len(group) == 1 else group)
    return PartitionSpec(*out)


def logical_to_sharding(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a pytree of arrays given a matching pytree of logical-axis tuples."""
    return jax.tree.map(
        lambda axes, x: logical_to_sharding(axes, np.shape(x), mesh, rules),
        axes_tree,
        shapes_tree,
        is_leaf=lambda a: isinstance(a, tuple) and all(isinstance(n, (str, type(None))) for n in a),
    )


def rules_from_config(overrides: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """DEFAULT_RULES with per-logical-axis overrides (e.g. {"embed": None} turns FSDP off)."""
    if not overrides:
        return DEFAULT_RULES
    known = {r[0] for r in DEFAULT_RULES}
    for k in overrides:
        if k not in known:
            raise ValueError(f"sharding rule override for unknown logical axis {k!r}; known: {sorted(known)}")
    return tuple((k, overrides.get(k, v)) for k, v in DEFAULT_RULES)


# ---------------------------------------------------------------------------------------------
# Activations: where a program's intermediate values live, from the same rules as the parameters.

# The `checkpoint_name` of every weight gathered for compute (`Layout.gather`): a remat policy never saves these
# (the backward gathers again from the sharded stack instead of keeping a full copy of every layer's weights).
GATHERED_WEIGHT = "fsdp_gathered_weight"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Activation sharding on a mesh, read from the logical-axis rules that place the parameters.

    Rows of every activation (sequences, examples) go where the "batch" rule says (data x fsdp by default);
    heads, kv heads, MLP features and the vocabulary where their rules say (tensor); the model dimension of an
    activation is never split. A weight is used whole on the batch axes: `gather` constrains it to its own spec
    without the batch's mesh axes, so under FSDP each layer's weights are all-gathered where they are used (and
    their gradients reduce-scattered) while the activations stay on their rows. Left alone, GSPMD partitions
    the matmuls over the fsdp-sharded weight dimension and moves activations instead.

    Frozen and hashable: a model keeps it as static structure (`Transformer.layout`).
    """

    mesh: Mesh
    rules: tuple = DEFAULT_RULES

    @property
    def platform(self) -> str:
        """"gpu", "tpu" or "cpu": the devices the program is compiled for (compile-only devices included)."""
        return self.mesh.devices.flat[0].platform

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """The mesh axes rows are split over (sizes 1 left out)."""
        return tuple(a for a in batch_axes(self.mesh, self.rules) if self.mesh.shape[a] > 1)

    @property
    def trivial(self) -> bool:
        return self.mesh.size == 1

    def spec(self, axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
        return logical_to_spec(axes, shape, self.mesh, self.rules)

    def constrain(self, x, axes: Sequence[str | None]):
        """`x` placed by its dimensions' logical names (a no-op on one device)."""
        if self.trivial:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(axes, x.shape)))

    def weight_spec(self, axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
        """A parameter's spec for compute: its own, without the mesh axes that split the rows."""
        drop = set(self.batch_axes)
        out = []
        for entry in self.spec(axes, shape):
            group = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            group = tuple(a for a in group if a not in drop)
            out.append(None if not group else group[0] if len(group) == 1 else group)
        return PartitionSpec(*out)

    def gather(self, w, axes: Sequence[str | None]):
        """`w` gathered for compute (all-gathered over the FSDP axes; tensor-parallel splits kept), tagged
        `GATHERED_WEIGHT` so that no remat policy saves it."""
        if self.trivial:
            return w
        # The barrier pins the all-gather after the cast to the compute dtype: XLA otherwise moves a float32
        # master weight's cast past the all-gather, moving (and holding) twice the bytes.
        w = jax.lax.optimization_barrier(w)
        w = jax.lax.with_sharding_constraint(w, NamedSharding(self.mesh, self.weight_spec(axes, w.shape)))
        return checkpoint_name(w, GATHERED_WEIGHT)

    def shared_axis(self, logical: str, *sizes: int) -> str | tuple[str, ...] | None:
        """The mesh axes `logical` maps to when every size in `sizes` divides by them (q heads and kv heads must
        split alike for a fused attention kernel), else None."""
        spec = self.spec((logical,), (math.lcm(*sizes),))[0]
        if spec is None:
            return None
        group = (spec,) if isinstance(spec, str) else tuple(spec)
        size = math.prod(self.mesh.shape[a] for a in group)
        return spec if all(s % size == 0 for s in sizes) else None


def model_layout(mesh: Mesh | None, rules=None) -> Layout | None:
    """The Layout of a mesh under `rules` (None without a mesh)."""
    if mesh is None:
        return None
    rules = DEFAULT_RULES if rules is None else rules
    frozen = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
    return Layout(mesh, frozen)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    initialization_timeout: int = 300,
    heartbeat_timeout_seconds: int | None = None,
) -> bool:
    """`jax.distributed.initialize` when this is a multi-process launch; a no-op otherwise.

    Arguments fall back to MCPO_COORDINATOR / MCPO_NUM_PROCESSES / MCPO_PROCESS_ID, then to
    JAX's own cluster detection (SLURM, TPU pods, Open MPI) when none is given. Returns True when
    the distributed runtime was started. CPU processes use gloo collectives.
    `heartbeat_timeout_seconds` (default MCPO_HEARTBEAT_TIMEOUT, else JAX's 100): how long after a
    process dies its peers abort instead of waiting in a collective (passed when the installed jax
    takes it).
    """
    if heartbeat_timeout_seconds is None:
        heartbeat_timeout_seconds = int(os.environ.get("MCPO_HEARTBEAT_TIMEOUT") or 100)
    coordinator_address = coordinator_address or os.environ.get("MCPO_COORDINATOR")
    if num_processes is None and os.environ.get("MCPO_NUM_PROCESSES"):
        num_processes = int(os.environ["MCPO_NUM_PROCESSES"])
    if process_id is None and os.environ.get("MCPO_PROCESS_ID"):
        process_id = int(os.environ["MCPO_PROCESS_ID"])
    explicit = coordinator_address is not None
    cluster = any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"))
    if not explicit and not cluster:
        return False
    if explicit and (num_processes is None or process_id is None):
        raise ValueError(
            "multi-process launch: a coordinator address was given but num_processes / process_id "
            "were not (flags or MCPO_NUM_PROCESSES / MCPO_PROCESS_ID)"
        )
    if explicit and num_processes == 1:
        return False
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or jax.config.jax_platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    extra = {}
    if "heartbeat_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
        extra["heartbeat_timeout_seconds"] = heartbeat_timeout_seconds
    elif heartbeat_timeout_seconds != 100:
        log.warning("this jax has no heartbeat_timeout_seconds: using its default, not %ds", heartbeat_timeout_seconds)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
        **extra,
    )
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def is_primary() -> bool:
    """True on the process that writes single files (logs, metrics, HF export)."""
    return jax.process_index() == 0


# ---------------------------------------------------------------------------------------------
# Trainer-side helpers: mesh from config, parameter/batch shardings, global input arrays.

def mesh_and_rules(config) -> tuple[Mesh, tuple[tuple[str, Any], ...]]:
    """The mesh (`config.mesh`) and the logical-axis rules (`config.sharding_rules` over the defaults) of a trainer
    config: every program of a run (training, evaluation, generation, an online run's initial model) uses these."""
    return mesh_from_config(config.mesh), rules_from_config(config.sharding_rules.to_dict() or None)


def mesh_from_config(mesh_config) -> Mesh:
    """Mesh from a config with `data`, `fsdp`, `tensor` (one may be -1 = all remaining devices)."""
    return make_mesh(int(mesh_config.data), int(mesh_config.fsdp), int(mesh_config.tensor))


def batch_axes(mesh: Mesh, rules=DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes the example axis is split over: the "batch" rule (axes of size 1 or absent left out)."""
    axes = _mesh_axes_for("batch", rules)
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return tuple(a for a in axes if a in mesh.shape)


def data_parallel_size(mesh: Mesh, rules=DEFAULT_RULES) -> int:
    """How many ways the example axis is split (the "batch" rule's axes; data x fsdp by default)."""
    return int(math.prod(mesh.shape[a] for a in batch_axes(mesh, rules)))


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0, rules=DEFAULT_RULES) -> NamedSharding:
    """Shard dimension `batch_axis` of an input as the "batch" rule says; the rest replicated."""
    spec = [None] * ndim
    spec[batch_axis] = batch_axes(mesh, rules) or None
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _is_axes(a) -> bool:
    return isinstance(a, tuple) and all(isinstance(n, (str, type(None))) for n in a)


def _path_names(path) -> tuple[str, ...]:
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name not in ("value", "raw_value"):
                names.append(k.name)
        else:
            names.append(str(k))
    return tuple(names)


def param_shardings(axes_tree, params, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings with the structure of `params` (an nnx.State or nested dict).

    `axes_tree` holds a tuple of logical names per parameter (e.g. `models.logical_axes(model)`);
    leaves are matched by path, so wrappers such as nnx.Param on either side do not matter.
    """
    axes_by_path = {
        _path_names(path): axes
        for path, axes in jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=_is_axes)[0]
    }

    def one(path, x):
        key = _path_names(path)
        if key not in axes_by_path:
            raise KeyError(f"no logical axes for parameter {'/'.join(key)}")
        return logical_to_sharding(axes_by_path[key], np.shape(x), mesh, rules)

    return jax.tree_util.tree_map_with_path(one, params)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, batch_axis: int = 0):
    """Global jax.Arrays from this process's slice of the batch (multi-host safe)."""
    out = {}
    for k, x in local_batch.items():
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim, batch_axis)
        global_shape = list(x.shape)
        global_shape[batch_axis] *= jax.process_count()
        out[k] = jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))
    return out
