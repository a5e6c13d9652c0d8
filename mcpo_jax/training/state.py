"""The train state: a plain dict pytree over the NNX model split into graph and parameters.

    state = {"params": nnx.State (nnx.Param leaves), "opt_state": optax state,
             "step": int32 [], "rng": uint32 [2] (the base key; the step folds in the step number),
             "loss_state": {...} only for objectives that carry state across steps (BCO's running
             mean of rewards, `step.initial_loss_state`), checkpointed with the rest}

The graph definition and non-parameter variables (`rest`) stay outside the state: they are
static for the step and not checkpointed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mcpo_jax import sharding as shd


def split_model(model):
    """(graphdef, params, rest) with params = every nnx.Param."""
    return nnx.split(model, nnx.Param, ...)


def merge_model(graphdef, params, rest):
    return nnx.merge(graphdef, params, rest)


def base_key(seed: int):
    return jax.random.PRNGKey(int(seed))  # raw uint32[2]: checkpoints as a plain array


def init_state(params, tx: optax.GradientTransformation, seed: int, *, shardings=None, loss_state=None):
    """A fresh train state (optimizer state created on the parameters' shardings). `loss_state`: the
    objective's state across steps (`step.initial_loss_state(cfg)`), None for most objectives."""
    init = jax.jit(tx.init, out_shardings=None if shardings is None else shardings["opt_state"])
    state = {
        "params": params,
        "opt_state": init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": base_key(seed),
    }
    if loss_state is not None:
        state["loss_state"] = jax.tree.map(jnp.asarray, loss_state)
    if shardings is not None:
        state = jax.device_put(state, shardings)
    return state


def state_shardings(tx, params, params_shardings, mesh, loss_state=None):
    """Shardings of the whole train state: optimizer moments follow their parameters; the loss state (if
    any: scalars) is replicated."""
    repl = shd.replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, params_shardings, transform_non_params=lambda _: repl
    )
    out = {"params": params_shardings, "opt_state": opt_shardings, "step": repl, "rng": repl}
    if loss_state is not None:
        out["loss_state"] = jax.tree.map(lambda _: repl, loss_state)
    return out


def abstract_state(state_like, shardings):
    """ShapeDtypeStructs with shardings (orbax restore target)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), state_like, shardings
    )


def count_params(params) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))
