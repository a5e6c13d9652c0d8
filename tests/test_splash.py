"""Splash attention (`mcpo_jax.models.splash`) in Pallas interpret mode on the CPU against dense float32 XLA
attention with the boolean mask written out from the semantics: values and q/k/v gradients, for right padding,
the shared-prompt prefix layout, a sliding window, GQA, lengths off every block size, several tiles per row, and
under shard_map on 8 CPU devices; plus a deviceless compile for a v5e 2x2 slice at Llama-3.2-1B shapes, whose
temporaries must stay below XLA attention's float32 [rows, heads, T, S] scores.

Also a script, for the cases that need their own process:
    python tests/test_splash.py shard_map   (with XLA_FLAGS=--xla_force_host_platform_device_count=8)
    python tests/test_splash.py v5e         (with libtpu; prints RESULT {json})
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcpo_jax.models import splash

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = dict(rtol=1e-5, atol=1e-5)


def allowed_NTS(kv_valid_NS, T, causal_offset, window):
    """The mask the docstring promises, in numpy: key j for query i iff valid, j <= i + offset, within window."""
    last_T1 = np.arange(T)[:, None] + causal_offset
    j_1S = np.arange(kv_valid_NS.shape[1])[None]
    ok_TS = j_1S <= last_T1
    if window is not None:
        ok_TS &= last_T1 - j_1S < window
    return ok_TS[None] & np.asarray(kv_valid_NS)[:, None, :]


def reference(q_NTHD, k_NSKD, v_NSKD, allowed, scale):
    return jax.nn.dot_product_attention(q_NTHD, k_NSKD, v_NSKD, mask=jnp.asarray(allowed)[:, None], scale=scale,
                                        implementation="xla")


def numpy_attention(q_NTHD, k_NSKD, v_NSKD, allowed_NTS, scale):
    """Float64 attention in numpy (a quick second reference, for masks the tests compare against)."""
    q_NKGTD = np.asarray(q_NTHD, np.float64).reshape(*q_NTHD.shape[:2], k_NSKD.shape[2], -1,
                                                     q_NTHD.shape[3]).transpose(0, 2, 3, 1, 4)
    scores_NKGTS = np.einsum("nkgtd,nskd->nkgts", q_NKGTD, np.asarray(k_NSKD, np.float64)) * scale
    scores_NKGTS = np.where(allowed_NTS[:, None, None], scores_NKGTS, -np.inf)
    probs_NKGTS = np.exp(scores_NKGTS - scores_NKGTS.max(-1, keepdims=True))
    probs_NKGTS /= probs_NKGTS.sum(-1, keepdims=True)
    out_NKGTD = np.einsum("nkgts,nskd->nkgtd", probs_NKGTS, np.asarray(v_NSKD, np.float64))
    return out_NKGTD.transpose(0, 3, 1, 2, 4).reshape(q_NTHD.shape)


def right_padded(lengths, S):
    return np.arange(S)[None] < np.asarray(lengths)[:, None]


def prefix_valid(prompt_lengths, P, W):
    """[prompt keys | own keys]: prompt key j valid when j < the row's prompt length, own keys always."""
    return np.concatenate([right_padded(prompt_lengths, P), np.ones((len(prompt_lengths), W), bool)], axis=1)


def inputs(N, T, S, H, K, D, seed=0):
    r = np.random.default_rng(seed)
    q, k, v, ct = (jnp.asarray(r.normal(size=shape), jnp.float32)
                   for shape in ((N, T, H, D), (N, S, K, D), (N, S, K, D), (N, T, H, D)))
    return q, k, v, ct


def out_and_vjp(attend):
    """One jitted program: the output and the q, k, v cotangents for a given output cotangent."""
    def run(q, k, v, ct):
        out, pullback = jax.vjp(attend, q, k, v)
        return out, pullback(ct)
    return jax.jit(run)


def check(kv_valid_NS, T, H, K, D, *, causal_offset, window, block_sizes=None, seed=0, mesh_kwargs=None):
    """Splash against the dense reference: outputs of queries with a key, and gradients under a cotangent
    masked to those queries (the rest have no defined softmax: splash zeroes them). Returns what it compared."""
    kv_valid_NS = np.asarray(kv_valid_NS)
    N, S = kv_valid_NS.shape
    q, k, v, ct = inputs(N, T, S, H, K, D, seed)
    scale = D**-0.5
    allowed = allowed_NTS(kv_valid_NS, T, causal_offset, window)
    has_key_NT = allowed.any(-1)
    ct_real = ct * jnp.asarray(has_key_NT)[:, :, None, None]

    got = out_and_vjp(lambda q, k, v: splash.splash_attention(
        q, k, v, kv_valid_NS=jnp.asarray(kv_valid_NS), causal_offset=causal_offset, window=window, scale=scale,
        interpret=True, block_sizes=block_sizes, **(mesh_kwargs or {})))
    out, grads = got(q, k, v, ct_real)
    want_out, want_grads = out_and_vjp(lambda q, k, v: reference(q, k, v, allowed, scale))(q, k, v, ct_real)

    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out[has_key_NT], want_out[has_key_NT], **TOL)
    np.testing.assert_array_equal(out[~has_key_NT], 0.0)
    for name, g, want in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(g, want, **TOL, err_msg=f"d{name}")
    # the tolerance sees an off-by-one mask: the same comparison fails against a reference shifted by one key
    shifted = allowed_NTS(kv_valid_NS, T, causal_offset + 1, window)
    assert (shifted != allowed).any()
    real = has_key_NT & shifted.any(-1)
    with np.errstate(invalid="ignore"):  # the rows with no key, dropped by `real`
        assert np.allclose(out[real], numpy_attention(q, k, v, allowed, scale)[real], **TOL)
        assert not np.allclose(out[real], numpy_attention(q, k, v, shifted, scale)[real], **TOL)
    return dict(got=got, q=q, k=k, v=v, ct=ct, has_key_NT=has_key_NT)


def test_causal_right_padding_and_an_empty_row():
    T = 64
    seen = check(right_padded([64, 37, 0], T), T, H=2, K=2, D=16, causal_offset=0, window=None)
    # the empty row (every key masked), under a cotangent that is not masked: zeros out, nothing sent back
    out, (dq, dk, dv) = seen["got"](seen["q"], seen["k"], seen["v"], seen["ct"])
    assert all(bool(jnp.isfinite(x).all()) for x in (out, dq, dk, dv))
    np.testing.assert_array_equal(out[2], 0.0)
    for g in (dq, dk, dv):
        np.testing.assert_array_equal(g[2], 0.0)


def test_prefix_layout_prompt_padding_per_row():
    P, W = 16, 24
    check(prefix_valid([16, 9, 1], P, W), W, H=2, K=2, D=16, causal_offset=P, window=None)


def test_sliding_window_over_several_tiles():
    """T = S = 160 in 128-blocks: a 2 x 2 tile grid where causality skips the upper tile, and a window of 40
    that crosses the tile boundary."""
    T = 160
    blocks = splash.splash_kernel.BlockSizes(
        block_q=128, block_kv=128, block_q_dkv=128, block_kv_dkv=128, block_q_dq=128, block_kv_dq=128)
    check(right_padded([160, 131], T), T, H=2, K=1, D=16, causal_offset=0, window=40, block_sizes=blocks)


def test_sliding_window_in_the_prefix_layout():
    P, W = 16, 24
    check(prefix_valid([16, 5], P, W), W, H=2, K=2, D=16, causal_offset=P, window=12)


def test_window_with_a_query_block_of_padding_only():
    """block_q 128 and block_q_dkv 256 pad 40 queries to 256: the forward's second query block is all padding,
    its window (8 keys from query 128 + 16) far right of the 56 keys. Keys are padded on until it sees one;
    without that its softmax sums to 0 and dk, dv come back NaN."""
    P, W = 16, 40
    blocks = splash.splash_kernel.BlockSizes(
        block_q=128, block_kv=128, block_q_dkv=256, block_kv_dkv=128, block_q_dq=128, block_kv_dq=128)
    assert splash._padded_lengths(W, P + W, P, 8, blocks) == (256, 384)
    check(prefix_valid([3, 16], P, W), W, H=2, K=1, D=16, causal_offset=P, window=8, block_sizes=blocks)


def test_gqa_four_query_heads_on_two_kv_heads():
    T = 48
    check(right_padded([48, 20], T), T, H=4, K=2, D=32, causal_offset=0, window=None)
    # bfloat16 in, bfloat16 out
    q, k, v = (jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((2, T, 4, 32), (2, T, 2, 32), (2, T, 2, 32)))
    out = jax.eval_shape(lambda q, k, v: splash.splash_attention(
        q, k, v, kv_valid_NS=jnp.ones((2, T), bool), causal_offset=0, window=None, scale=0.2, interpret=True),
        q, k, v)
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape


def test_lengths_off_every_block_size():
    P, W = 16, 40  # T = 40, S = 56, both padded to 128
    check(prefix_valid([3, 16], P, W), W, H=4, K=2, D=16, causal_offset=P, window=None)


def test_default_blocks_divide_and_prefer_512():
    assert splash.default_block_sizes(1024, 1024).block_q == 512
    sizes = splash.default_block_sizes(768, 1024)  # the 1B prefix case: W = 768 queries, P + W = 1024 keys
    assert (sizes.block_q, sizes.block_kv, sizes.block_q_dkv, sizes.block_kv_dq) == (256, 512, 256, 512)
    assert splash.default_block_sizes(128, 384).block_kv == 128


def test_shard_map_on_eight_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "shard_map"], env=env, capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(HERE))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "SHARD_MAP OK" in proc.stdout


def _shard_map_cases():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    kw = dict(mesh=mesh, batch_axes=("data", "fsdp"), head_axis="tensor")
    # rows over data x fsdp (4 | 4), q and kv heads over tensor (2 | 4 and 2 | 2); prefix layout
    P_, W = 16, 24
    seen = check(prefix_valid([16, 9, 2, 12], P_, W), W, H=4, K=2, D=16, causal_offset=P_, window=None,
                 mesh_kwargs=kw)
    out, _ = seen["got"](seen["q"], seen["k"], seen["v"], seen["ct"])
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")), 4), out.sharding
    print("SHARD_MAP OK")


def test_shard_spec_splits_only_what_divides():
    from jax.sharding import AbstractMesh, PartitionSpec as P

    mesh = AbstractMesh((2, 4, 2), ("data", "fsdp", "tensor"))
    rows, heads = ("data", "fsdp"), "tensor"
    assert splash.shard_spec(mesh, 8, 4, 2, rows, heads) == P(("data", "fsdp"), None, "tensor", None)
    assert splash.shard_spec(mesh, 2, 4, 1, rows, heads) == P(("data",), None, None, None)  # K = 1: heads whole
    assert splash.shard_spec(mesh, 4, 3, 3, ("fsdp", "data"), heads) == P(("fsdp",), None, None, None)
    assert splash.shard_spec(mesh, 3, 4, 2, rows, None) == P(None, None, None, None)


TPU_ENV = dict(JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_compiles_for_v5e_with_less_memory_than_xla():
    """Llama-3.2-1B attention (bf16, H = 32, K = 8, D = 64), 8 rows on a v5e 2x2 slice (fsdp = 4), forward and
    backward: splash compiles, with Mosaic kernels, and its per-chip temporaries are a fraction of XLA's, which
    hold the float32 scores [2 rows, 32 heads, T, S]."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "v5e"], env=dict(os.environ, **TPU_ENV),
                          capture_output=True, text=True, timeout=300, cwd=os.path.dirname(HERE))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for case, T, S in (("causal", 1024, 1024), ("prefix", 768, 1024)):
        scores_bytes = 2 * 32 * T * S * 4  # float32 scores of the 2 rows on one chip
        xla, flash = result[f"{case}/xla/fwd+bwd"], result[f"{case}/splash/fwd+bwd"]
        assert flash["mosaic_kernels"] == 3 and xla["mosaic_kernels"] == 0  # forward, dkv, dq
        assert xla["temp_bytes"] >= scores_bytes, xla
        assert flash["temp_bytes"] < scores_bytes // 16, flash


def _v5e_compile(kinds=("fwd+bwd",)):
    """Compiles splash and XLA attention for a v5e 2x2 slice without one; returns per-chip memory and times."""
    import time

    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    mesh = Mesh(np.array(devices).reshape(1, 4, 1), ("data", "fsdp", "tensor"))
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    N, H, K, D = 8, 32, 8, 64
    result = {}
    for case, T, S in (("causal", 1024, 1024), ("prefix", 768, 1024)):
        offset = S - T
        args = [jax.ShapeDtypeStruct(shape, dtype, sharding=rows) for shape, dtype in (
            ((N, T, H, D), jnp.bfloat16), ((N, S, K, D), jnp.bfloat16), ((N, S, K, D), jnp.bfloat16),
            ((N, S), jnp.bool_))]

        def flash(q, k, v, kv_valid):
            return splash.splash_attention(q, k, v, kv_valid_NS=kv_valid, causal_offset=offset, window=None,
                                           scale=D**-0.5, mesh=mesh, batch_axes=("data", "fsdp"),
                                           head_axis="tensor")

        def xla(q, k, v, kv_valid):
            causal_TS = jnp.arange(S)[None] <= jnp.arange(T)[:, None] + offset
            mask = causal_TS[None, None] & kv_valid[:, None, None, :]
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=D**-0.5, implementation="xla")

        for name, attend in (("splash", flash), ("xla", xla)):
            programs = {
                "fwd": attend,
                "fwd+bwd": jax.grad(lambda q, k, v, m, f=attend: f(q, k, v, m).astype(jnp.float32).sum(),
                                    argnums=(0, 1, 2)),
            }
            for kind in kinds:
                start = time.perf_counter()
                compiled = jax.jit(programs[kind], in_shardings=tuple(a.sharding for a in args)).lower(
                    *args).compile()
                seconds = time.perf_counter() - start
                memory = compiled.memory_analysis()
                result[f"{case}/{name}/{kind}"] = dict(
                    temp_bytes=memory.temp_size_in_bytes, argument_bytes=memory.argument_size_in_bytes,
                    output_bytes=memory.output_size_in_bytes, compile_s=round(seconds, 2),
                    mosaic_kernels=compiled.as_text().count('custom_call_target="tpu_custom_call"'))
    return result


if __name__ == "__main__":
    if sys.argv[1] == "shard_map":
        _shard_map_cases()
    elif sys.argv[1] == "v5e":
        print("RESULT " + json.dumps(_v5e_compile(tuple(sys.argv[2:]) or ("fwd+bwd",))))


def test_the_model_through_splash_equals_xla_attention():
    """The decoder on TPU attention (splash, interpret mode here) in the shared-prompt layout (the prompt's own
    causal attention, the completions' over [prompt keys | own keys]): the XLA path's hidden states and parameter
    gradients, with a sliding window shorter than the rows (the prompt's keys moved so that array distance is
    position distance) and GQA."""
    from flax import nnx

    from mcpo_jax import models

    config = models.ModelConfig(model_type="mistral", vocab_size=48, hidden_size=32, intermediate_size=48,
                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                max_position_embeddings=64, rms_norm_eps=1e-5, sliding_window=5)
    rng = np.random.default_rng(0)
    prompt = (jnp.asarray(rng.integers(1, 48, (2, 4)), jnp.int32), jnp.asarray([4, 2]))
    completions = (jnp.asarray(rng.integers(1, 48, (2, 2, 5)), jnp.int32), jnp.asarray([[5, 3], [2, 5]]))
    real_p = (np.arange(4)[None] < np.asarray(prompt[1])[:, None])[..., None]
    real_c = (np.arange(5)[None, None] < np.asarray(completions[1])[..., None])[..., None]

    def run(impl):
        graphdef, params = nnx.split(models.Transformer(config, attention_impl=impl, rngs=nnx.Rngs(1)))

        def loss(p):
            h_p, h_c = nnx.merge(graphdef, p).prefix_hidden_states(*prompt, *completions)
            h_p, h_c = h_p * real_p, h_c * real_c
            return jnp.sum(jnp.sin(h_p)) + jnp.sum(jnp.sin(h_c)), (h_p, h_c)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (got, got_hidden), got_grads = run("splash")
    (want, want_hidden), want_grads = run("xla")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(got_hidden + tuple(jax.tree.leaves(got_grads)), want_hidden + tuple(jax.tree.leaves(want_grads))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
