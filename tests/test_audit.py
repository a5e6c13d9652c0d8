"""mcpo_jax.audit: the HLO reader counts dots through loops and fusions exactly."""

import jax
import jax.numpy as jnp
import pytest

from mcpo_jax import audit


def test_dot_flops_multiply_loop_trip_counts():
    """A scan of 5 matmuls of [3, 8] x [8, 16] inside a scan of 4: 4 x 5 x 2·3·8·16 FLOPs (its backward too)."""

    def f(w, x):
        def outer(c, _):
            def inner(c, wi):
                return jnp.tanh(c @ wi), None

            c, _ = jax.lax.scan(inner, c, w)
            return c, None

        c, _ = jax.lax.scan(outer, x, None, length=4)
        return jnp.sum(c)

    w = jax.ShapeDtypeStruct((5, 8, 8), jnp.float32)
    x = jax.ShapeDtypeStruct((3, 8), jnp.float32)
    fwd = audit.hlo_report(jax.jit(f).lower(w, x).compile().as_text(), num_layers=5)
    assert fwd["dot_flops"] == 4 * 5 * 2 * 3 * 8 * 8
    assert fwd["layer_passes"] == 4  # the inner loop runs 4 times
    # cost_analysis counts each loop body once
    grad = audit.hlo_report(jax.jit(jax.grad(f)).lower(w, x).compile().as_text())
    assert grad["dot_flops"] == 3 * 4 * 5 * 2 * 3 * 8 * 8  # forward, dx, dw


def test_attention_standin_counts_calls_and_flops():
    from mcpo_jax.models import decoder

    q = jax.ShapeDtypeStruct((2, 16, 4, 8), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 16, 2, 8), jnp.bfloat16)

    def loss(q, k):
        v = k
        kk = jnp.repeat(k, 2, axis=2)
        return jnp.sum(audit.opaque_attention(q, kk, jnp.repeat(v, 2, axis=2), None, 0.1, None).astype(jnp.float32))

    rep = audit.hlo_report(jax.jit(jax.grad(loss)).lower(q, k).compile().as_text())
    assert (rep["attention"]["forward_calls"], rep["attention"]["backward_calls"]) == (1, 1)
    assert rep["attention"]["flops"] == (4 + 8) * 2 * 16 * 16 * 4 * 8
    with pytest.raises(Exception):
        jax.jit(loss)(jnp.zeros(q.shape, q.dtype), jnp.zeros(k.shape, k.dtype))  # compile-only: never runs
    assert callable(decoder.Transformer)  # the stand-in plugs in as attention_impl (see test_bench)


def test_executed_work_follows_the_step_config():
    from mcpo_jax.training.step import StepConfig

    mc = StepConfig(objective="mcpo", sampler="mc", num_negatives=1)
    assert audit.pass_rows(mc, 6) == {"policy_no_grad": 5, "reference_no_grad": 6, "trained": 2}
    assert audit.pass_rows(StepConfig(objective="mcpo", num_negatives=5), 6)["policy_no_grad"] == 0  # M = L
    dpo = StepConfig(objective="dpo", sampler="fixed", reference="precomputed")
    assert audit.pass_rows(dpo, 2) == {"policy_no_grad": 0, "reference_no_grad": 0, "trained": 2}
    unpruned = StepConfig(objective="dpo", sampler="fixed", prune_passes=False)
    assert audit.pass_rows(unpruned, 2) == {"policy_no_grad": 2, "reference_no_grad": 2, "trained": 2}
