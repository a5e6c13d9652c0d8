"""Shared fixtures for the trainer tests: a toy causal LM with the Transformer's interface."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class ToyLM(nnx.Module):
    """Embedding -> causal prefix mean -> MLP -> LM head: cheap, causal, with logical axes."""

    def __init__(self, vocab=23, dim=8, *, seed=0):
        rngs = nnx.Rngs(seed)
        init = nnx.initializers.normal(0.5)
        self.embed = nnx.Param(init(rngs.params(), (vocab, dim)))
        self.w1 = nnx.Param(init(rngs.params(), (dim, 2 * dim)))
        self.w2 = nnx.Param(init(rngs.params(), (2 * dim, dim)))
        self.head = nnx.Param(init(rngs.params(), (dim, vocab)))

    def hidden_states(self, input_ids, attention_mask=None):
        h = self.embed[...][input_ids]
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        count = jnp.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        prefix = jnp.cumsum(h, axis=1) / count
        return prefix + jnp.tanh(prefix @ self.w1[...]) @ self.w2[...]

    def lm_head_kernel(self):
        return self.head[...]

    def __call__(self, input_ids, attention_mask=None):
        return self.hidden_states(input_ids, attention_mask) @ self.head[...]


TOY_AXES = {"embed": ("vocab", "embed"), "w1": ("embed", "mlp"), "w2": ("mlp", "embed"), "head": ("embed", "vocab")}


def toy_batch(b=4, c=4, t=12, vocab=23, seed=0, accum=None):
    """A random preference batch with the data pipeline's keys ([b, C, T] etc.)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(b, c, t)).astype(np.int32)
    prompt_len = 4
    lengths = rng.integers(3, t - prompt_len + 1, size=(b, c))
    pos = np.arange(t)[None, None, :]
    attn = (pos < prompt_len + lengths[..., None]).astype(np.int32)
    loss_mask = ((pos >= prompt_len) & (attn == 1)).astype(np.int32)
    ids = ids * attn
    valid = np.ones((b, c), bool)
    if c > 2:
        valid[0, -1] = False
    batch = {
        "input_ids": ids,
        "attention_mask": attn,
        "loss_mask": loss_mask,
        "valid": valid,
        "ranks": np.tile(np.arange(1, c + 1, dtype=np.int32), (b, 1)),
        "fixed_index": np.full((b,), 1, np.int32),
    }
    if accum:
        batch = {k: v.reshape((accum, b // accum) + v.shape[1:]) for k, v in batch.items()}
    return batch


# ------------------------------------------------------------------------------------ trainer configs


def tiny_config(**overrides):
    """A trainer config on the synthetic task with a 1-layer, 32-wide Llama: seconds per run on a CPU."""
    from mcpo_jax.data.synthetic import TOKEN_LIMITS
    from mcpo_jax.training.config import base_config

    c = base_config()
    c.name = "test"
    c.seed = 3
    c.tokenizer = "synthetic"
    c.model.preset = "tiny"
    c.model.overrides = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.data.source = "synthetic"
    c.data.synthetic_rows = 72
    c.data.eval_fraction = 0.12
    c.data.max_prompt_length = TOKEN_LIMITS["max_prompt_length"]
    c.data.max_completion_length = TOKEN_LIMITS["max_completion_length"]
    c.data.max_length = TOKEN_LIMITS["max_length"]
    c.num_candidates = 5
    c.num_negatives = 2
    c.beta = 0.5
    c.reference = "precomputed"
    c.batch_size = 8
    c.micro_batch_size = 4
    c.num_epochs = 1
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_ratio = 0.0
    c.optimizer.decay = "constant"
    c.checkpoint.save_every = 2
    c.checkpoint.keep = 10
    c.eval_every = 3
    c.progress_bar = False
    c.tensorboard = True
    c.export_hf = False
    return set_keys(c, overrides)


def set_keys(config, overrides: dict):
    """`config` with dotted keys set ({"optimizer.learning_rate": 1e-3, ...})."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def deterministic_params(params):
    """Weights from a fixed formula (same placement): golden values pin the step, not the model's initializer."""
    def one(x):
        value = 0.3 * jnp.sin(0.7 * jnp.arange(x.size, dtype=jnp.float32) + x.ndim).reshape(x.shape)
        if x.ndim == 1 or (x.ndim == 2 and x.shape[-1] == 16 and x.shape[0] <= 4):  # norm scales near 1
            value = value + 1.0
        return jax.device_put(value.astype(x.dtype), x.sharding)

    return jax.tree.map(one, params)


SHARDED_CONFIG = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=4, max_position_embeddings=64,
                      rms_norm_eps=1e-5)


def shared_prompt_batch(**kw):
    """`toy_batch` whose rows of an example share its prompt (the tokenizer's layout; 4 prompt tokens)."""
    batch = toy_batch(**kw)
    ids = batch["input_ids"]
    ids[..., 1:, :4] = ids[..., :1, :4]
    return batch


@functools.lru_cache(maxsize=None)
def sharded_step_metrics(fsdp: int, tensor: int, variant: str = "rows", include_preferred: bool | None = None) -> dict:
    """Loss / grad norm / updated-param checksum of one step of a tiny Llama on a (1, fsdp, tensor) mesh.

    variant "rows": MC-PO, every row encoded whole; "shared": MC-PO with the shared prompt, the policy's prompt
    encoding reused (two scans) and the reference in the step; "dpo": DPO on the shared-prompt layout."""
    from mcpo_jax import models
    from mcpo_jax import sharding as shd
    from mcpo_jax.training import state as st
    from mcpo_jax.training import step as S

    config = models.ModelConfig(**SHARDED_CONFIG)
    mesh = shd.make_mesh(1, fsdp, tensor)
    model = models.init_random(config, seed=5, mesh=mesh)
    axes = models.logical_axes(model)
    graphdef, params, rest = st.split_model(model)
    params = deterministic_params(params)
    ref = jax.tree.map(lambda x: x * 0.98, params)
    tx, sched = S.make_optimizer(learning_rate=1e-2, total_steps=4, warmup_ratio=0.0)
    ps = shd.param_shardings(axes, params, mesh)
    ss = st.state_shardings(tx, params, ps, mesh)
    state = st.init_state(params, tx, 1, shardings=ss)
    if variant == "rows":
        local = toy_batch(b=8, c=4, t=12, vocab=32, seed=2, accum=2)
        cfg = S.StepConfig(objective="mcpo", sampler="mc", num_negatives=2, beta=1.0,
                           include_preferred=include_preferred)
    else:
        local = shared_prompt_batch(b=8, c=4, t=12, vocab=32, seed=2, accum=2)
        shared = dict(completion_window=8, prompt_window=4)
        cfg = (S.StepConfig(objective="mcpo", sampler="mc", num_negatives=2, beta=1.0, reuse_prompt_encoding=True,
                            **shared) if variant == "shared"
               else S.StepConfig(objective="dpo", sampler="random", num_negatives=1, beta=1.0, **shared))
    batch = shd.global_batch(local, mesh, batch_axis=1)
    fn = S.make_train_step(cfg, graphdef, rest, tx, sched)
    compiled = jax.jit(fn, in_shardings=(ss, ps, jax.tree.map(lambda x: x.sharding, batch)),
                       out_shardings=(ss, shd.replicated(mesh)), donate_argnums=(0,))
    new_state, m = compiled(state, ref, batch)
    checksum = float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(new_state["params"])))
    specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(new_state["params"])})
    return {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "checksum": checksum,
            "selected": np.asarray(m["selected"]).tolist(), "devices": len(jax.devices()), "specs": specs}


def layer_loop_collectives(fsdp: int, tensor: int) -> dict:
    """The collectives inside the layer loops of the compiled MC-PO step (shared prompt, reference in the step,
    remat "minimal", 12 rows of 16 tokens) on a (1, fsdp, tensor) mesh: [(kind, [[elements of each array]],
    times)], with the largest per-layer weight's element count to compare them with."""
    import math

    from flax import nnx

    from mcpo_jax import audit, models
    from mcpo_jax import batch as batch_lib
    from mcpo_jax import sharding as shd
    from mcpo_jax.training import program
    from mcpo_jax.training import step as S

    config = models.ModelConfig(**SHARDED_CONFIG)
    mesh = shd.make_mesh(1, fsdp, tensor)
    model = nnx.eval_shape(lambda: models.Transformer(config, remat="minimal", rngs=nnx.Rngs(0)))
    tx, sched = S.make_optimizer(learning_rate=1e-2, total_steps=4, warmup_ratio=0.0)
    cfg = S.StepConfig(objective="mcpo", sampler="mc", num_negatives=1, beta=1.0, completion_window=12,
                       prompt_window=4)
    prog = program.TrainProgram(model, cfg, tx, sched, mesh=mesh)
    shapes = batch_lib.abstract_shapes((1, 8), columns=3, length=16, precomputed_ref=False)
    text = prog.lower(prog.abstract_batch(shapes)).compile().as_text()
    comps, entry = audit.parse_hlo(text)
    mult, loops = audit.multiplicities(comps, entry)
    bodies = {}
    for name, instrs in comps.items():
        for ins in instrs:
            if ins.opcode == "while":
                trip = audit._TRIP.search(ins.rest)
                body = [callee for kind, callee in audit._CALLEE.findall(ins.rest) if kind == "body"]
                if trip and int(trip.group(1)) == config.num_hidden_layers and body:
                    bodies[body[0]] = True

    def inside(name, seen=()):  # a computation called (transitively) from a layer loop's body
        return name in bodies or any(inside(caller, seen + (name,)) for caller, instrs in comps.items()
                                     if caller not in seen and any(f"%{name}" in i.rest for i in instrs))

    found = []
    kinds = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
    for name, instrs in comps.items():
        for ins in instrs:
            if ins.opcode.removesuffix("-start") in kinds and inside(name):
                found.append((ins.opcode.removesuffix("-start"),
                              [math.prod(dims) for _, dims in audit._shapes(ins.result)], mult.get(name, 0)))
    weights = max(math.prod(shape) for shape, _, _ in models.decoder.layer_param_specs(config).values())
    return {"collectives": found, "largest_weight": weights, "layer_loops": len(bodies)}


if __name__ == "__main__":
    import json
    import sys

    variants = sys.argv[3].split(",") if len(sys.argv) > 3 else ["rows"]
    result = {v: sharded_step_metrics(int(sys.argv[1]), int(sys.argv[2]), v) for v in variants}
    result["layer_collectives"] = layer_loop_collectives(8, 1)
    print("RESULT " + json.dumps(result))
