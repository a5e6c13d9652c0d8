"""The prompt encoded once per example (`Transformer.prefix_hidden_states`, `StepConfig.prompt_window`): the
same hidden states, log-probs, losses, negatives and gradients as encoding every row whole, for fewer FLOPs."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mcpo_jax import audit, logprobs, models
from mcpo_jax.data.example import DataError
from mcpo_jax.training import state as st
from mcpo_jax.training import step as S

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5)
VARIANTS = {
    "gqa": {},
    "sliding_window": {"sliding_window": 5, "model_type": "mistral"},
    "dynamic_rope": {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 8},
    "llama3_rope_untied_bias": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                                "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False},
}


def _config(variant):
    return models.ModelConfig(**{**BASE, **VARIANTS[variant]})


def _rows(prompt_ids, prompt_len, comp_ids, comp_len):
    """The tokenizer's layout: prompt + completion per row, right padded."""
    b, k, w = comp_ids.shape
    t = prompt_ids.shape[1] + w
    ids = np.zeros((b, k, t), np.int32)
    mask = np.zeros((b, k, t), np.int32)
    loss = np.zeros((b, k, t), np.int32)
    for i in range(b):
        for j in range(k):
            p, c = prompt_len[i], comp_len[i, j]
            ids[i, j, :p + c] = np.concatenate([prompt_ids[i, :p], comp_ids[i, j, :c]])
            mask[i, j, :p + c] = 1
            loss[i, j, p:p + c] = 1
    return ids, mask, loss


def _data(seed=0, b=3, k=3, p=6, w=7, vocab=64):
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(1, p + 1, size=b)
    prompt_len[0] = p
    comp_len = rng.integers(1, w + 1, size=(b, k))
    comp_len[0, 0] = w
    return (rng.integers(1, vocab, (b, p)), prompt_len, rng.integers(1, vocab, (b, k, w)), comp_len)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("remat", [False, "minimal", True])
def test_prefix_hidden_states_equal_whole_rows(variant, remat):
    model = models.Transformer(_config(variant), remat=remat, rngs=nnx.Rngs(1))
    prompt_ids, prompt_len, comp_ids, comp_len = _data()
    hp, hc = model.prefix_hidden_states(prompt_ids, prompt_len, comp_ids, comp_len)
    ids, mask, _ = _rows(prompt_ids, prompt_len, comp_ids, comp_len)
    b, k, t = ids.shape
    h = np.asarray(model.hidden_states(ids.reshape(b * k, t), mask.reshape(b * k, t))).reshape(b, k, t, -1)
    for i in range(b):
        for j in range(k):
            p, c = prompt_len[i], comp_len[i, j]
            np.testing.assert_allclose(hp[i, :p], h[i, j, :p], rtol=1e-5, atol=2e-6)
            np.testing.assert_allclose(hc[i, j, :c], h[i, j, p:p + c], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("variant", ["gqa", "sliding_window"])
def test_shared_logps_and_gradients_equal_whole_rows(variant):
    graphdef, params, rest = st.split_model(models.Transformer(_config(variant), rngs=nnx.Rngs(2)))
    ids, mask, loss = _rows(*_data(seed=1))
    weights = jnp.asarray(np.random.default_rng(3).normal(size=ids.shape[:2]), jnp.float32)

    def f(p, prompt_window):
        return S._rows_logps(graphdef, p, rest, ids, mask, loss, 4, 7, prompt_window)

    assert logprobs.shared_prompt_windows(6, 7, 3, 13) == (6, 8)  # W rounded up to even
    # jitted programs (values, gradients): eager dispatch of the scans is the slow part
    whole, shared = (jax.jit(lambda p, w=w: f(p, w))(params) for w in (None, 6))
    np.testing.assert_allclose(shared, whole, rtol=1e-5, atol=1e-5)
    g_whole, g_shared = (jax.jit(jax.grad(lambda p, w=w: jnp.sum(f(p, w) * weights)))(params) for w in (None, 6))
    for a, b in zip(jax.tree.leaves(g_shared), jax.tree.leaves(g_whole)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _batch(seed=0, b=4, c=4, p=5, w=7):
    prompt_ids, prompt_len, comp_ids, comp_len = _data(seed=seed, b=b, k=c, p=p, w=w)
    ids, mask, loss = _rows(prompt_ids, prompt_len, comp_ids, comp_len)
    valid = np.ones((b, c), bool)
    valid[1, -1] = False
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss, "valid": valid,
            "ranks": np.tile(np.arange(c, dtype=np.int32), (b, 1)), "fixed_index": np.full((b,), 2, np.int32)}


@pytest.mark.parametrize("objective,sampler,m,include_preferred,prune,variant,reuse", [
    ("mcpo", "mc", 2, False, True, "gqa", True),  # the policy's prompt encoding reused by both its passes
    ("mcpo", "mc", 2, False, True, "gqa", False),
    ("mcpo", "mc", 1, True, True, "sliding_window", True),  # y0 in the no-gradient pass too
    ("mcpo", "max", 1, False, False, "dynamic_rope", True),  # RoPE depends on each pass's rows: no reuse
    ("dpo", "fixed", 1, False, True, "gqa", True),  # no policy pass without gradient
])
def test_step_same_loss_negatives_and_gradient(objective, sampler, m, include_preferred, prune, variant, reuse):
    graphdef, params, rest = st.split_model(models.Transformer(_config(variant), rngs=nnx.Rngs(4)))
    ref = jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)), params)
    mb = _batch()
    key = jax.random.PRNGKey(5)
    runs = {}
    for pw in (None, 5):
        cfg = S.StepConfig(objective=objective, sampler=sampler, num_negatives=m, beta=0.5,
                           include_preferred=include_preferred, prune_passes=prune, completion_window=7,
                           prompt_window=pw, reuse_prompt_encoding=reuse, logprob_chunk_size=4)
        plan = S.micro_batch_plan(cfg, graphdef, params, rest, mb)
        runs[pw] = jax.jit(lambda p, r, b, k, cfg=cfg, plan=plan: S.micro_batch_grads_and_metrics(
            cfg, plan, graphdef, rest, p, r, b, k, ranking=True))(params, ref, mb, key)
    g0, sums0, neg0 = runs[None].grads, runs[None].sums, runs[None].negatives_BM
    g1, sums1, neg1 = runs[5].grads, runs[5].sums, runs[5].negatives_BM
    np.testing.assert_array_equal(neg1, neg0)
    for name in sums0:
        np.testing.assert_allclose(sums1[name], sums0[name], rtol=2e-5, atol=2e-6, err_msg=name)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(sums1["logprobs/prompt_mismatch"][0]) == 0.0 and "logprobs/prompt_mismatch" not in sums0
    expect_reuse = reuse and objective == "mcpo" and variant != "dynamic_rope"
    assert plan.reuses_prompt_encoding == expect_reuse  # the plan the step ran (the model's RoPE type)


def test_mismatched_prompts_and_long_prompts_are_counted():
    mb = _batch()
    ids, loss, valid = mb["input_ids"].copy(), mb["loss_mask"], mb["valid"]
    ok = S.prompt_mismatch(ids, loss, valid, 5)
    assert not np.any(ok)
    ids[2, 1, 0] += 1  # one row of example 2 holds another prompt
    np.testing.assert_array_equal(S.prompt_mismatch(ids, loss, valid, 5), [False, False, True, False])
    ids = mb["input_ids"].copy()
    ids[1, 3, 0] += 1  # example 1's last row is invalid: its content is never read
    assert not np.any(S.prompt_mismatch(ids, loss, valid, 5))
    assert np.all(S.prompt_mismatch(mb["input_ids"], loss, valid, 0))  # every prompt longer than the window


def test_the_layout_is_used_only_where_it_runs_fewer_tokens():
    assert logprobs.shared_prompt_windows(256, 768, 6, 1024) == (256, 768)
    assert logprobs.shared_prompt_windows(256, 768, 1, 1024) is None  # one row: nothing to share
    assert logprobs.shared_prompt_windows(512, 512, 5, 256) is None  # a short length bucket: 255 + 5 * 255 > 5 * 256
    assert logprobs.shared_prompt_windows(7, 9, 3, 24) == (8, 10)  # even lengths for cuDNN's masked attention
    assert logprobs.shared_prompt_windows(63, 121, 4, 201) == (64, 122)
    assert logprobs.shared_prompt_windows(None, 768, 6, 1024) is None
    assert logprobs.shared_prompt_windows(256, None, 6, 1024) is None


def test_trainer_stops_with_a_data_error_on_a_prompt_mismatch():
    from mcpo_jax.training.loop import Trainer

    fake = types.SimpleNamespace(config=types.SimpleNamespace(data=types.SimpleNamespace(max_prompt_length=5)),
                                 last_saved=3)
    metrics = {"finite": np.bool_(True), "loss": np.float32(0.5), "grad_norm": np.float32(1.0),
               "logprobs/prompt_mismatch": np.float32(0.25)}
    with pytest.raises(DataError, match="step 4: 25% of the examples.*share_prompt=False.*step 3"):
        Trainer._drain(fake, (4, metrics, 0.0), None)


def test_audit_counts_the_shared_prompt_work():
    """Compiled from shapes: the shared layout's HLO FLOPs equal the formula for the work it executes, and are
    fewer than encoding every row whole."""
    config = models.preset_config("tiny")
    model = nnx.eval_shape(lambda: models.Transformer(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                      attention_impl=audit.opaque_attention, rngs=nnx.Rngs(0)))
    from mcpo_jax import batch as batch_lib
    from mcpo_jax import sharding as shd
    from mcpo_jax.training.program import TrainProgram

    tx, sched = S.make_optimizer(learning_rate=1e-6, total_steps=10, warmup_ratio=0.0)
    flops = {}
    # layer passes: whole rows = policy, reference, trained forward + backward; shared with reuse = the policy's
    # prompt (forward + backward), its completions without gradient, the reference's prompt and completions,
    # the trained completions (forward + backward); without reuse every pass is one scan of both streams
    for pw, reuse, passes in ((None, True, 4), (16, True, 7), (16, False, 4)):
        cfg = S.StepConfig(objective="mcpo", sampler="mc", num_negatives=1, completion_window=48, prompt_window=pw,
                           reuse_prompt_encoding=reuse)
        program = TrainProgram(model, cfg, tx, sched, mesh=shd.make_mesh(1, 1, 1))
        shapes = batch_lib.abstract_shapes((1, 2), columns=4, length=64)
        report = audit.hlo_report(program.lower(program.abstract_batch(shapes)).compile().as_text(),
                                  num_layers=config.num_hidden_layers, vocab_size=config.vocab_size)
        work = audit.executed_work(cfg, prompts=2, columns=4, prompt_len=16, completion_len=48)
        flops[pw, reuse] = report["hlo_flops"]
        assert report["hlo_flops"] == pytest.approx(work.flops(audit.Shapes.of(config)), rel=0.005), (pw, report)
        assert report["layer_passes"] == passes
    assert flops[16, False] < 0.9 * flops[None, True] and flops[16, True] < flops[16, False]


@pytest.mark.parametrize("remat", [False, "minimal", True])
def test_prompt_then_completions_equal_one_scan_with_gradients(remat):
    """`encode_prompt` + `encode_completions` (the reused prompt encoding, two scans) give the hidden states and
    the gradients of `prefix_hidden_states` (one scan), whatever the remat setting."""
    graphdef, params, rest = st.split_model(models.Transformer(_config("sliding_window"), remat=remat,
                                                               rngs=nnx.Rngs(6)))
    prompt_ids, prompt_len, comp_ids, comp_len = _data(seed=2)
    w = jnp.asarray(np.random.default_rng(7).normal(size=(3, 3, 7, 32)), jnp.float32)

    def one_scan(p):
        return nnx.merge(graphdef, p, rest).prefix_hidden_states(prompt_ids, prompt_len, comp_ids, comp_len)[1]

    def two_scans(p):
        model = nnx.merge(graphdef, p, rest)
        _, k, v = model.encode_prompt(prompt_ids, prompt_len)
        return model.encode_completions(k, v, prompt_len, comp_ids, comp_len)

    mask = (np.arange(7)[None, None] < comp_len[..., None])[..., None]
    np.testing.assert_allclose(jax.jit(two_scans)(params) * mask, jax.jit(one_scan)(params) * mask, rtol=1e-5,
                               atol=2e-6)
    g1 = jax.jit(jax.grad(lambda p: jnp.sum(one_scan(p) * w * mask)))(params)
    g2 = jax.jit(jax.grad(lambda p: jnp.sum(two_scans(p) * w * mask)))(params)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
        # one scan sums each weight's gradient over both streams in one matmul, two scans add two: float32 rounding
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6 * float(np.abs(b).max()))
