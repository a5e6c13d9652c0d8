"""remat="minimal": the backward keeps only the named layer tensors; same gradients, fewer saved bytes, and
no matmul or attention recomputed (read in the compiled program)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mcpo_jax import audit, models

CONFIG = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                            rms_norm_eps=1e-5)


def _grads(remat, ids, mask):
    model = models.Transformer(CONFIG, remat=remat, rngs=nnx.Rngs(3))
    graphdef, state = nnx.split(model)
    loss = jax.jit(jax.value_and_grad(lambda s: jnp.mean(nnx.merge(graphdef, s)(ids, mask) ** 2)))
    return loss(state)


def test_minimal_policy_same_loss_and_gradients():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 64, (3, 11)), jnp.int32)
    mask = jnp.asarray(np.arange(11)[None] < np.array([[11], [7], [9]]), jnp.int32)
    (v0, g0), (v1, g1) = _grads(False, ids, mask), _grads("minimal", ids, mask)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_minimal_policy_saves_less_and_recomputes_no_matmul():
    def model(remat):
        return nnx.eval_shape(lambda: models.Transformer(CONFIG, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                         remat=remat, attention_impl=audit.opaque_attention,
                                                         rngs=nnx.Rngs(0)))

    plain, minimal = (audit.saved_bytes_per_token_per_layer(model(r)) for r in (False, "minimal"))
    # bf16: x, q, k, v, attention output, x_mid (6 x 32... by width) + gate, up (2 x 96) + float32 stats
    d, kv, f = 32, 2 * 8, 96
    expect = 2 * (d + d + kv + kv + d + d + f + f) + 4 * 4  # 4 heads of float32 softmax statistics
    assert minimal["bytes_per_token"] == expect, minimal["residuals"]
    assert plain["bytes_per_token"] > 1.5 * minimal["bytes_per_token"]

    def program_report(remat):
        m = model(remat)
        graphdef, state = nnx.split(m)
        ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
        f = jax.jit(jax.grad(lambda s, i: jnp.mean(nnx.merge(graphdef, s).hidden_states(i).astype(jnp.float32))))
        return audit.hlo_report(f.lower(state, ids).compile().as_text(), num_layers=2)

    a, b = program_report(False), program_report("minimal")
    assert b["dot_flops"] == a["dot_flops"]  # no matmul recomputed
    assert b["attention"]["forward_calls"] == a["attention"]["forward_calls"] == 2  # nor attention
