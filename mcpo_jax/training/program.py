"""The compiled train program, built in one place: model -> parameter shardings -> state -> compiled step.

    program = TrainProgram(model, step_cfg, tx, schedule, mesh=mesh, with_reference=True)
    state = program.init_state(params, seed)          # or program.abstract_state() (shapes only)
    compiled = program.compiled(batch)                 # cached per batch shape: one compile per bucket
    state, metrics = compiled(state, ref_params, batch)

`model` may be abstract (`nnx.eval_shape(lambda: Transformer(...))`): the program then compiles from shapes
(`program.lower(program.abstract_batch(shapes))`), which is what the compile-only audit does. Batches are
the step's `[A, b, ...]` micro-batch layout; each distinct (key, shape, dtype) signature compiles once, so a
length-bucketed loader compiles one program per bucket and reuses it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import numpy as np
import optax

from mcpo_jax import audit
from mcpo_jax import sharding as shd
from mcpo_jax.models import logical_axes
from mcpo_jax.models.decoder import AUTO_REMAT
from mcpo_jax.training import state as state_lib
from mcpo_jax.training import step as step_lib

log = logging.getLogger(__name__)


def _signature(batch) -> tuple:
    return tuple(sorted((k, tuple(np.shape(v)), str(np.asarray(v).dtype if not hasattr(v, "dtype") else v.dtype))
                        for k, v in batch.items()))


def device_memory_budget(mesh) -> int | None:
    """Bytes one program may use on each of the mesh's devices, as the runtime says (`bytes_limit` of a GPU / TPU
    device's memory statistics); None where it keeps none (the CPU, compile-only devices)."""
    try:
        stats = mesh.devices.flat[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - compile-only and CPU devices keep no statistics
        return None
    return int(stats["bytes_limit"]) if "bytes_limit" in stats else None


class DoesNotFit(RuntimeError):
    """No remat choice gives a step that fits the devices' memory."""


class TrainProgram:
    """One train step program for a model, a StepConfig, an optimizer and a mesh.

    Attributes: `graphdef`, `rest` (static model parts), `param_shardings`, `state_shardings`,
    `ref_shardings` (None without a reference in the step),
    `axes`: the parameters' logical axes (default `models.logical_axes(model)`); `step_fn` (the pure step), `compile_info`
    (per batch signature: compile seconds, XLA's memory analysis and the remat choice).

    `remat="auto"`: each batch shape compiles with the first of `models.decoder.AUTO_REMAT` whose program fits
    `memory_budget` bytes per device (default: the devices' own limit, `device_memory_budget`; none on a CPU, where
    the first is taken): no recomputation; the MLP's saved tensors offloaded to host memory (GPU / TPU); every layer
    recomputed. A TPU compiler that refuses a program for its size counts as "does not fit". None: the model's own
    `remat`.
    """

    def __init__(self, model, cfg: step_lib.StepConfig, tx: optax.GradientTransformation, schedule=None, *,
                 mesh, rules=shd.DEFAULT_RULES, axes=None, with_reference: bool | None = None,
                 donate: bool = True, batch_axis: int = 1, remat: str | None = None,
                 memory_budget: int | None = None):
        self.cfg, self.tx, self.schedule, self.mesh = cfg, tx, schedule, mesh
        layout = shd.model_layout(mesh, rules)
        if getattr(model, "layout", layout) != layout:  # the activations' placement follows the program's mesh
            model.layout = layout
        if remat not in (None, "auto"):
            raise ValueError(f"TrainProgram(remat={remat!r}): None (the model's own) or 'auto'")
        self.remat_choices = (None,)
        if remat == "auto":
            platform = layout.platform
            self.remat_choices = tuple(r for r in AUTO_REMAT if platform != "cpu" or r != "minimal_offload")
            model.remat = self.remat_choices[0]
        self.memory_budget = memory_budget if memory_budget is not None else device_memory_budget(mesh)
        self.graphdef, params, self.rest = state_lib.split_model(model)
        self.abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
        self.rules = rules
        self.param_shardings = shd.param_shardings(logical_axes(model) if axes is None else axes, params, mesh,
                                                   rules)
        self.loss_state = step_lib.initial_loss_state(cfg)
        self.state_shardings = state_lib.state_shardings(tx, self.abstract_params, self.param_shardings, mesh,
                                                         loss_state=self.loss_state)
        if with_reference is None:
            with_reference = cfg.reference == "online" and not cfg.is_sft
        self.ref_shardings = self.param_shardings if with_reference else None
        self.metric_shardings = shd.replicated(mesh)
        self.batch_axis = batch_axis
        self.donate = donate
        self.step_fn = step_lib.make_train_step(cfg, self.graphdef, self.rest, tx, schedule)
        self._jitted: dict[Any, Any] = {}
        self._cache: dict[tuple, Any] = {}
        self.compile_info: dict[tuple, dict[str, Any]] = {}

    # -- state ------------------------------------------------------------------------------

    def init_state(self, params, seed: int):
        """A fresh train state on the program's shardings."""
        return state_lib.init_state(params, self.tx, seed, shardings=self.state_shardings, loss_state=self.loss_state)

    def abstract_state(self):
        """The state as ShapeDtypeStructs with shardings (compile from shapes; orbax restore target)."""
        shapes = jax.eval_shape(lambda p: state_lib.init_state(p, self.tx, 0, loss_state=self.loss_state),
                                self.abstract_params)
        return state_lib.abstract_state(shapes, self.state_shardings)

    def abstract_ref(self):
        if self.ref_shardings is None:
            return None
        return state_lib.abstract_state(self.abstract_params, self.ref_shardings)

    # -- batches ----------------------------------------------------------------------------

    def batch_shardings(self, batch):
        return {k: shd.batch_sharding(self.mesh, len(np.shape(v)), self.batch_axis, self.rules)
                for k, v in batch.items()}

    def abstract_batch(self, batch_shapes: dict[str, tuple[tuple[int, ...], Any]]):
        """{key: (shape, dtype)} -> ShapeDtypeStructs with the batch shardings."""
        return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shd.batch_sharding(self.mesh, len(shape),
                                                                                 self.batch_axis, self.rules))
                for k, (shape, dtype) in batch_shapes.items()}

    # -- compilation ------------------------------------------------------------------------

    def jitted(self, remat=None):
        """The jitted step (with `remat`, one of `remat_choices`, under remat="auto")."""
        if remat not in self._jitted:
            step_fn = self.step_fn
            if remat is not None:  # the same model with another remat setting: only its graph definition changes
                model = state_lib.merge_model(self.graphdef, self.abstract_params, self.rest)
                model.remat = remat
                graphdef = state_lib.split_model(model)[0]
                step_fn = step_lib.make_train_step(self.cfg, graphdef, self.rest, self.tx, self.schedule)
            self._jitted[remat] = jax.jit(
                step_fn,
                in_shardings=(self.state_shardings, self.ref_shardings, None),
                out_shardings=(self.state_shardings, self.metric_shardings),
                donate_argnums=(0,) if self.donate else (),
            )
        return self._jitted[remat]

    def lower(self, batch, remat=None):
        """Lower for this batch's shapes (arrays or ShapeDtypeStructs); nothing is allocated."""
        batch = {k: (v if isinstance(v, jax.ShapeDtypeStruct) else
                     jax.ShapeDtypeStruct(np.shape(v), v.dtype,
                                          sharding=shd.batch_sharding(self.mesh, np.ndim(v), self.batch_axis,
                                                                      self.rules)))
                 for k, v in batch.items()}
        return self.jitted(remat).lower(self.abstract_state(), self.abstract_ref(), batch)

    def is_compiled(self, batch) -> bool:
        """Whether `compiled(batch)` would return at once (a step for this batch's shapes exists)."""
        return _signature(batch) in self._cache

    def compiled(self, batch):
        """The compiled step for this batch's shapes, compiled on first use and cached. Under remat="auto", the
        first remat choice that fits (`DoesNotFit` when none does)."""
        key = _signature(batch)
        if key in self._cache:
            return self._cache[key]
        tried = []
        for i, remat in enumerate(self.remat_choices):
            last = i == len(self.remat_choices) - 1
            t0 = time.perf_counter()
            try:
                compiled = self.lower(batch, remat).compile()
            except Exception as e:  # noqa: BLE001 - the TPU compiler refuses a program too big for the chip
                if last or not is_out_of_memory(e):
                    raise
                tried.append(f"remat={remat!r}: {first_line(e)}")
                continue
            info: dict[str, Any] = {"compile_seconds": time.perf_counter() - t0}
            info.update(audit.memory_fields(compiled))
            need = audit.program_bytes(info)
            if remat is not None:
                info["remat"] = remat
                fits = self.memory_budget is None or need is None or need <= self.memory_budget
                if not fits:
                    tried.append(f"remat={remat!r}: {need / 1e9:.1f} GB > {self.memory_budget / 1e9:.1f} GB")
                    if not last:
                        continue
                    raise DoesNotFit(f"the train step for {dict((k, s) for k, s, _ in key)} does not fit the "
                                     f"devices' {self.memory_budget / 1e9:.1f} GB with any remat choice: "
                                     + "; ".join(tried))
                if tried:
                    log.info("remat=auto: %s; chose remat=%r", "; ".join(tried), remat)
            log.info("compiled train step for %s in %.1fs; memory %s", dict((k, s) for k, s, _ in key),
                     info["compile_seconds"], {k: v for k, v in info.items() if k != "compile_seconds"})
            self._cache[key], self.compile_info[key] = compiled, info
            return compiled
        raise AssertionError("unreachable")

    def __call__(self, state, ref_params, batch):
        return self.compiled(batch)(state, ref_params, batch)


def is_out_of_memory(error: BaseException) -> bool:
    """The compiler (TPU) or the runtime refusing a program for its size."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "exceeds available" in text or "Ran out of memory" in text


def first_line(error: BaseException, limit: int = 300) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]
