"""The jitted train step: kernel in the step, gradient only through selected rows, accumulation, golden."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mcpo_jax import kernel, logprobs, losses
from mcpo_jax import sharding as shd
from mcpo_jax.training import state as st
from mcpo_jax.training import step as S
from mcpo_jax.training.program import TrainProgram

from _train_fixtures import TOY_AXES, ToyLM, sharded_step_metrics, toy_batch


def _setup(cfg, model=None, axes=None, lr=1e-2, accum=2, b=4, c=4, ref_shift=0.05):
    model = model or ToyLM()
    axes = axes if axes is not None else TOY_AXES
    graphdef, params, rest = st.split_model(model)
    ref = jax.tree.map(lambda x: x + ref_shift * jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)), params)
    tx, sched = S.make_optimizer(learning_rate=lr, total_steps=10, warmup_ratio=0.0)
    mesh = shd.make_mesh(1, 1, 1)
    program = TrainProgram(model, cfg, tx, sched, mesh=mesh, axes=axes, donate=False)
    state = program.init_state(params, 7)
    batch = toy_batch(b=b, c=c, accum=accum, vocab=model.lm_head_kernel().shape[1])
    compiled = program.compiled(batch)
    assert program.compiled(dict(batch)) is compiled  # one compile per batch shape
    info = next(iter(program.compile_info.values()))
    return dict(graphdef=graphdef, params=params, rest=rest, ref=ref, state=state, batch=batch,
                compiled=compiled, info=info, tx=tx, program=program)


def _micro_batch(cfg, graphdef, rest, params, ref, mb, key, **kw):
    """One micro-batch under the pass plan the train step builds for it."""
    plan = S.micro_batch_plan(cfg, graphdef, params, rest, mb)
    return S.micro_batch_grads_and_metrics(cfg, plan, graphdef, rest, params, ref, mb, key, **kw)


def _host_logps(model_params, graphdef, rest, ids, mask, loss_mask):
    """Independent path: full logits through the model's __call__ and a naive log-softmax."""
    model = nnx.merge(graphdef, model_params, rest)
    b, k, t = ids.shape
    logits = model(ids.reshape(b * k, t), mask.reshape(b * k, t))
    return logprobs.naive_sequence_logps(logits, ids.reshape(b * k, t), loss_mask.reshape(b * k, t)).reshape(b, k)


def test_kernel_in_step_matches_host_recomputation():
    cfg = S.StepConfig(objective="mcpo", sampler="mc", num_negatives=2, beta=2.0)
    s = _setup(cfg)
    _, metrics = s["compiled"](s["state"], s["ref"], s["batch"])
    selected = np.asarray(metrics["selected"])
    assert selected.shape == (2, 2, 2)
    for micro in range(2):
        mb = {k: v[micro] for k, v in s["batch"].items()}
        pol = _host_logps(s["params"], s["graphdef"], s["rest"], mb["input_ids"], mb["attention_mask"], mb["loss_mask"])
        ref = _host_logps(s["ref"], s["graphdef"], s["rest"], mb["input_ids"], mb["attention_mask"], mb["loss_mask"])
        key = S.negatives_key(s["state"]["rng"], 0, micro)
        want = kernel.select_negatives(key, pol, ref, beta=2.0, num_negatives=2, strategy="mc", valid=mb["valid"])
        np.testing.assert_array_equal(selected[micro], np.asarray(want))
    # A different step number draws differently somewhere over a few steps (the key folds in the step).
    state = dict(s["state"])
    draws = set()
    for step in range(6):
        state["step"] = jnp.asarray(step, jnp.int32)
        draws.add(np.asarray(s["compiled"](state, s["ref"], s["batch"])[1]["selected"]).tobytes())
    assert len(draws) > 1
    assert np.isin(selected, [0]).any()  # Algorithm 1 (the default): y0 is among the MC kernel's draws


def test_gradient_flows_only_through_selected_rows():
    cfg = S.StepConfig(objective="mcpo", sampler="mc", num_negatives=1, beta=1.0)
    model = ToyLM(seed=3)
    graphdef, params, rest = st.split_model(model)
    ref = jax.tree.map(lambda x: x * 0.9, params)
    mb = toy_batch(b=3, c=5, seed=4)
    key = jax.random.PRNGKey(11)
    out = jax.jit(lambda p, r, b, k: _micro_batch(cfg, graphdef, rest, p, r, b, k))(params, ref, mb, key)
    grads, sums, neg = out.grads, out.sums, np.asarray(out.negatives_BM)
    cols = np.concatenate([np.zeros((3, 1), np.int32), neg], axis=1)
    take = lambda x: np.take_along_axis(x, cols.reshape(cols.shape + (1,) * (x.ndim - 2)), axis=1)
    ids, mask, lm = take(mb["input_ids"]), take(mb["attention_mask"]), take(mb["loss_mask"])
    ref_sel = _host_logps(ref, graphdef, rest, ids, mask, lm)

    def only_selected(p):
        pol = _host_logps(p, graphdef, rest, ids, mask, lm)
        loss, _ = losses.get("mcpo")(pol, ref_sel, beta=1.0, valid=take(mb["valid"]))
        return jnp.sum(loss)

    want_loss, want = jax.value_and_grad(only_selected)(params)
    np.testing.assert_allclose(sums["loss"][0], want_loss, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5)
    # Changing the tokens of an unselected candidate changes neither the loss nor the gradient: with the
    # `fixed` sampler the choice (column 1) does not depend on the tokens, and prune_passes=False keeps the
    # no-grad policy pass over every row, so a leak of its gradient would show.
    cfg_fixed = S.StepConfig(objective="mcpo", sampler="fixed", num_negatives=1, beta=1.0, prune_passes=False)
    run = jax.jit(lambda p, r, b, k: _micro_batch(cfg_fixed, graphdef, rest, p, r, b, k))
    out = run(params, ref, mb, key)
    g1, s1, n1 = out.grads, out.sums, out.negatives_BM
    mb2 = {k: v.copy() for k, v in mb.items()}
    for row in range(3):
        other = [c for c in range(2, 5) if mb["valid"][row, c]][0]
        mb2["input_ids"][row, other] = np.where(mb["loss_mask"][row, other] == 1, 0, mb["input_ids"][row, other])
    assert not np.array_equal(mb2["input_ids"], mb["input_ids"])
    out = run(params, ref, mb2, key)
    g2, s2, n2 = out.grads, out.sums, out.negatives_BM
    np.testing.assert_array_equal(np.asarray(n1), np.asarray(n2))
    np.testing.assert_array_equal(np.asarray(n1)[:, 0], mb["fixed_index"])
    np.testing.assert_allclose(s1["loss"][0], s2["loss"][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_accumulation_is_exact_global_mean():
    cfg = S.StepConfig(objective="mcpo", sampler="max", num_negatives=2, beta=1.0)
    one = _setup(cfg, accum=1)
    two = _setup(cfg, accum=2)
    s1, m1 = one["compiled"](one["state"], one["ref"], one["batch"])
    s2, m2 = two["compiled"](two["state"], two["ref"], two["batch"])
    for k in ("loss", "grad_norm", "rewards/accuracies", "rewards/margins", "kernel/entropy"):
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(m1["kernel/rank_hist"], m2["kernel/rank_hist"])
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
        # after one Adam step (lr 1e-2) a coordinate whose gradient is ~0 moves by float noise (seen: 2.7e-6)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-6)
    assert int(s1["step"]) == 1 and float(m1["examples"]) == 4


def test_rank_histogram_counts_known_ranks_only():
    """Negatives without a dataset rank (-1: pairs rows, online rows ranked by their winner only) are counted as
    unknown, not put in bin 0 as if they had rank 0."""
    cfg = S.StepConfig(objective="mcpo", sampler="max", num_negatives=2, beta=1.0)
    run = _setup(cfg, accum=1, b=4, c=4)
    batch = dict(run["batch"])
    batch["ranks"] = np.array(batch["ranks"])
    batch["ranks"][..., 2:] = -1  # columns 2 and 3 unranked
    _, m = run["compiled"](run["state"], run["ref"], batch)
    hist, unknown = np.asarray(m["kernel/rank_hist"]), float(m["kernel/rank_unknown"])
    picks = 4 * 2  # B x M, every example has at least 2 valid candidates
    assert hist[0] == 0 and hist[3:].sum() == 0  # only column 1 (rank 2) is ranked among the candidates
    np.testing.assert_allclose(hist[2] + unknown * picks, picks)
    assert 0 < unknown < 1


def test_fixed_sampler_and_precomputed_reference():
    cfg = S.StepConfig(objective="dpo", sampler="fixed", num_negatives=1, beta=0.5)
    s = _setup(cfg)
    _, m_online = s["compiled"](s["state"], s["ref"], s["batch"])
    np.testing.assert_array_equal(np.asarray(m_online["selected"])[..., 0], s["batch"]["fixed_index"])
    # Same step with the reference column precomputed on the host.
    batch = dict(s["batch"])
    batch["ref_logps"] = np.stack([
        np.asarray(_host_logps(s["ref"], s["graphdef"], s["rest"], *(batch[k][i] for k in ("input_ids", "attention_mask", "loss_mask"))))
        for i in range(2)])
    cfg_pre = S.StepConfig(objective="dpo", sampler="fixed", num_negatives=1, beta=0.5, reference="precomputed")
    tx, sched = S.make_optimizer(learning_rate=1e-2, total_steps=10, warmup_ratio=0.0)
    fn = jax.jit(S.make_train_step(cfg_pre, s["graphdef"], s["rest"], tx, sched))
    _, m_pre = fn(s["state"], None, batch)
    for k in ("loss", "grad_norm", "rewards/chosen", "rewards/margins"):
        np.testing.assert_allclose(m_pre[k], m_online[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_sft_objective_uses_y0_only():
    cfg = S.StepConfig(objective="sft", reference="none")
    s = _setup(cfg)
    _, m = s["compiled"](s["state"], None, s["batch"])
    ids, mask, lm = (s["batch"][k].reshape((-1,) + s["batch"][k].shape[2:]) for k in ("input_ids", "attention_mask", "loss_mask"))
    pol = _host_logps(s["params"], s["graphdef"], s["rest"], ids[:, :1], mask[:, :1], lm[:, :1])[:, 0]
    want = np.mean(-np.asarray(pol) / lm[:, 0].sum(-1))
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5)


def test_golden_one_step_tiny_transformer():
    """Pins loss and grad norm of one MC-PO step (M = 2, 2 accumulated micro-batches) of a tiny Llama with
    formula weights on a fixed batch; the same run is the 1-device side of the 1-vs-8-devices test. The default
    kernel is Algorithm 1's (y0 among the draws: here 5 of the 8 rows draw it); the earlier kernel
    (candidates only) keeps its own golden."""
    m = sharded_step_metrics(1, 1)
    np.testing.assert_allclose(m["loss"], GOLDEN_LOSS, rtol=2e-5)
    np.testing.assert_allclose(m["grad_norm"], GOLDEN_GRAD_NORM, rtol=2e-4)
    assert sum(0 in row for mb in m["selected"] for row in mb) == 5
    old = sharded_step_metrics(1, 1, include_preferred=False)
    np.testing.assert_allclose(old["loss"], GOLDEN_LOSS_Y0_EXCLUDED, rtol=2e-5)
    np.testing.assert_allclose(old["grad_norm"], GOLDEN_GRAD_NORM_Y0_EXCLUDED, rtol=2e-4)
    assert not any(0 in row for mb in old["selected"] for row in mb)


GOLDEN_LOSS = 1.1071075201034546
GOLDEN_GRAD_NORM = 8.055423736572266
GOLDEN_LOSS_Y0_EXCLUDED = 1.1086039543151855
GOLDEN_GRAD_NORM_Y0_EXCLUDED = 8.90254020690918


def test_random_negative_fixed_per_prompt_by_default():
    """DPO / RNCE (sampler random, M = 1): the negative is drawn once per prompt when the data is built (App.
    B.1, TRL), so the step uses it as a fixed index; negative_draw='per_step' redraws in the step."""
    from mcpo_jax.training import build
    from mcpo_jax.training.config import base_config

    c = base_config()
    assert c.include_preferred is True and c.negative_draw == "per_prompt"
    c.objective, c.sampler = "dpo", "random"
    assert S.step_config_from(c).sampler == "fixed"
    c.negative_draw = "per_step"
    assert S.step_config_from(c).sampler == "random"
    c.objective, c.sampler, c.num_negatives, c.negative_draw = "mcpo", "random", 2, "per_prompt"
    assert S.step_config_from(c).sampler == "random"  # M > 1 redraws
    c.num_negatives, c.sampler = 1, "mc"
    assert S.step_config_from(c).include_preferred is True and S.step_config_from(c).y0_eligible
    c.sampler = "max"
    assert not S.step_config_from(c).y0_eligible  # Max / Min / random pick among the candidates
    valid = np.ones((4000, 6), bool)
    valid[::2, 4:] = False  # even rows: candidates 1..3 only
    ids = np.arange(4000) * 7
    draw = build.random_negative_per_prompt(valid, ids, seed=3)
    assert draw.dtype == np.int32 and np.all(np.take_along_axis(valid, draw[:, None], 1))
    np.testing.assert_allclose(np.bincount(draw[1::2], minlength=6)[1:] / 2000, [0.2] * 5, atol=0.03)
    np.testing.assert_allclose(np.bincount(draw[::2], minlength=6)[1:4] / 2000, [1 / 3] * 3, atol=0.035)
    # a function of (seed, example id): the same prompt keeps its negative when rows are reordered or dropped
    np.testing.assert_array_equal(build.random_negative_per_prompt(valid[::-1], ids[::-1], seed=3), draw[::-1])
    assert not np.array_equal(build.random_negative_per_prompt(valid, ids, seed=4), draw)


def test_a_drawn_fixed_index_survives_the_trip_to_data_workers(tmp_path):
    """A cached dataset pickles as its path (grain workers re-open the files); the per-prompt negatives drawn
    in memory must travel with it, not be re-read from the cache (the dataset's own `fixed_index`)."""
    import pickle

    from mcpo_jax.data import PreferenceExample, synthetic, tokenize_examples

    examples = [PreferenceExample(prompt=f"sort {d}", preferred="".join(sorted(d)),
                                  candidates=[d, d[::-1], "999", "000"]) for d in ("5391", "8172", "6254")]
    ds = tokenize_examples(examples, synthetic.make_tokenizer(), num_candidates=4, max_prompt_length=16,
                           max_completion_length=8, max_length=24, cache_dir=str(tmp_path))
    assert isinstance(ds.fixed_index, np.memmap) and list(ds.fixed_index) == [1, 1, 1]
    ds.fixed_index = np.asarray([4, 2, 3], np.int32)
    back = pickle.loads(pickle.dumps(ds))
    assert list(back.fixed_index) == [4, 2, 3] and isinstance(back.input_ids, np.memmap)
    assert list(back.take([0, 2])["fixed_index"]) == [4, 3]


PRUNABLE = [
    dict(objective="dpo", sampler="random", num_negatives=1),  # the selection reads no log-probs
    dict(objective="dpo", sampler="fixed", num_negatives=1, reference="precomputed"),
    # with y0 out of the kernel (include_preferred=False; Algorithm 1's default draws y0 and needs its log-prob):
    dict(objective="mcpo", sampler="mc", num_negatives=3, include_preferred=False),  # M = L: every candidate selected
    dict(objective="mcpo", sampler="mc", num_negatives=2, include_preferred=False),  # y0 left out of the kernel's pass
]


def _flops(compiled):
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


@pytest.mark.parametrize("kw", PRUNABLE, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_pruned_passes_give_the_same_loss_and_gradient_with_less_work(kw):
    """StepConfig.prune_passes (the default) leaves out the no-grad policy pass when the selection does not
    depend on it and y0 from that pass when y0 cannot be a negative: same loss, gradient, metrics, negatives."""
    graphdef, params, rest = st.split_model(ToyLM())
    ref = jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)), params)
    mb = toy_batch(b=4, c=4, vocab=23)
    if kw.get("reference") == "precomputed":
        mb["ref_logps"] = np.asarray(_host_logps(ref, graphdef, rest, mb["input_ids"], mb["attention_mask"],
                                                 mb["loss_mask"]))
        ref = None
    key = jax.random.PRNGKey(5)
    runs = {}
    for prune in (False, True):
        cfg = S.StepConfig(beta=0.5, prune_passes=prune, **kw)
        compiled = jax.jit(lambda p, r, b, k, cfg=cfg: _micro_batch(cfg, graphdef, rest, p, r, b, k)).lower(
            params, ref, mb, key).compile()
        runs[prune] = (compiled(params, ref, mb, key), _flops(compiled))
    (out0, f0), (out1, f1) = runs[False], runs[True]
    g0, sums0, hist0, tok0, neg0 = out0.grads, out0.sums, out0.rank_hist, out0.tokens, out0.negatives_BM
    g1, sums1, hist1, tok1, neg1 = out1.grads, out1.sums, out1.rank_hist, out1.tokens, out1.negatives_BM
    for k in ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies"):
        np.testing.assert_allclose(sums1[k], sums0[k], rtol=1e-6, atol=1e-7, err_msg=k)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(hist1, hist0)
    assert int(tok1) == int(tok0)
    # The same negatives (as a set per example: with M = L they come in column order once pruned).
    np.testing.assert_array_equal(np.sort(np.asarray(neg1), -1), np.sort(np.asarray(neg0), -1))
    assert f1 < f0, (f1, f0)
    # The kernel entropy is reported only when the kernel read the policy.
    reads_policy = kw["sampler"] == "mc" and kw["num_negatives"] < 3
    assert ("kernel/entropy" in sums1) == reads_policy and "kernel/entropy" in sums0


def test_dpo_step_runs_one_model_pass_less():
    """The DPO step (random negative, precomputed reference) of a scanned-layer Llama: the program loses exactly
    the loops of one model pass (the no-grad policy pass over all C rows). Counted in the lowered program
    (as bench.hlo_census counts while loops in the compiled one), which needs no XLA compile."""
    from mcpo_jax import models

    config = models.ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                                max_position_embeddings=64, rms_norm_eps=1e-5)
    # Shapes only: lowering needs no weights (nor the initializer's compile).
    graphdef, params, rest = st.split_model(nnx.eval_shape(lambda: models.Transformer(config, rngs=nnx.Rngs(0))))
    tx, _ = S.make_optimizer(learning_rate=1e-2, total_steps=4, warmup_ratio=0.0)
    state = jax.eval_shape(lambda p: st.init_state(p, tx, 1), params)
    batch = toy_batch(b=4, c=4, t=12, vocab=32, seed=2, accum=1)
    batch["ref_logps"] = np.zeros((1, 4, 4), np.float32)
    loops = lambda lowered: lowered.as_text().count("stablehlo.while")
    one_pass = loops(jax.jit(lambda p, ids, mask, lm: S.forward_logps(graphdef, p, rest, ids, mask, lm, chunk_size=4))
                     .lower(params, *(batch[k][0, :, 0] for k in ("input_ids", "attention_mask", "loss_mask"))))
    assert one_pass >= 1  # the layer scan
    step_loops = {}
    for prune in (False, True):
        cfg = S.StepConfig(objective="dpo", sampler="random", num_negatives=1, reference="precomputed",
                           prune_passes=prune, logprob_chunk_size=4)
        step_loops[prune] = loops(jax.jit(S.make_train_step(cfg, graphdef, rest, tx)).lower(state, None, batch))
    assert step_loops[False] - step_loops[True] == one_pass, (step_loops, one_pass)


def test_completion_window_same_loss_and_gradient():
    """StepConfig.completion_window (the LM head on completion positions only) changes neither the loss, nor
    the gradient, nor the negatives, and reports no dropped completion token."""
    graphdef, params, rest = st.split_model(ToyLM())
    ref = jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)), params)
    mb = toy_batch(b=4, c=4, t=12, vocab=23)  # prompts of 4 tokens, completions of 3..8
    key = jax.random.PRNGKey(5)
    runs = {}
    for window in (None, 8):
        cfg = S.StepConfig(objective="mcpo", sampler="mc", num_negatives=2, beta=0.5, completion_window=window,
                           logprob_chunk_size=4)
        runs[window] = jax.jit(lambda p, r, b, k, cfg=cfg: _micro_batch(cfg, graphdef, rest, p, r, b, k))(
            params, ref, mb, key)
    g0, sums0, neg0 = runs[None].grads, runs[None].sums, runs[None].negatives_BM
    g1, sums1, neg1 = runs[8].grads, runs[8].sums, runs[8].negatives_BM
    np.testing.assert_array_equal(neg1, neg0)
    for k in ("loss", "rewards/chosen", "rewards/margins", "kernel/entropy"):
        np.testing.assert_allclose(sums1[k], sums0[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(sums1["logprobs/window_overflow"][0]) == 0.0 and "logprobs/window_overflow" not in sums0


def test_bco_delta_is_a_running_mean_kept_in_the_state():
    """BCO's delta is TRL's running mean of the detached batch-mean reward: in the train state (and so in the
    checkpoint), updated each micro-batch before the loss uses it."""
    cfg = S.StepConfig(objective="bco", sampler="fixed", num_negatives=1, beta=0.5)
    s = _setup(cfg, accum=2)
    state = s["state"]
    assert set(state["loss_state"]) == {"bco_delta", "bco_count"} and float(state["loss_state"]["bco_count"]) == 0
    abstract = s["program"].abstract_state()  # the orbax restore target has the entry too
    assert jax.tree.structure(abstract) == jax.tree.structure(state)

    def batch_rewards(params, batch):
        out = []
        for micro in range(2):
            mb = {k: v[micro] for k, v in batch.items()}
            cols = np.stack([np.zeros_like(mb["fixed_index"]), mb["fixed_index"]], 1)
            take = lambda x: np.take_along_axis(x, cols.reshape(cols.shape + (1,) * (x.ndim - 2)), axis=1)
            ids, mask, lm = (take(mb[k]) for k in ("input_ids", "attention_mask", "loss_mask"))
            pol = _host_logps(params, s["graphdef"], s["rest"], ids, mask, lm)
            ref = _host_logps(s["ref"], s["graphdef"], s["rest"], ids, mask, lm)
            out.append(float(losses.bco_batch_reward(pol, ref, beta=0.5, valid=take(mb["valid"]))))
        return out

    r = batch_rewards(state["params"], s["batch"])
    state1, m1 = s["compiled"](state, s["ref"], s["batch"])
    np.testing.assert_allclose(state1["loss_state"]["bco_delta"], np.mean(r), rtol=1e-5, atol=1e-7)
    assert float(state1["loss_state"]["bco_count"]) == 2
    # the second micro-batch's loss used the mean of both batch rewards: metric "delta" averages r0 and mean(r)
    np.testing.assert_allclose(m1["delta"], (r[0] + np.mean(r)) / 2, rtol=1e-5, atol=1e-7)
    r2 = batch_rewards(state1["params"], s["batch"])
    state2, _ = s["compiled"](state1, s["ref"], s["batch"])
    np.testing.assert_allclose(state2["loss_state"]["bco_delta"], np.mean(r + r2), rtol=1e-5, atol=1e-7)


def test_program_compiles_once_per_batch_shape():
    """TrainProgram caches the compiled step per batch signature: a second length bucket compiles once more,
    the first bucket's program is reused."""
    cfg = S.StepConfig(objective="dpo", sampler="fixed", num_negatives=1, beta=0.5)
    s = _setup(cfg, accum=1)
    program = s["program"]
    longer = toy_batch(b=4, c=4, t=16, accum=1)
    first = program.compiled(s["batch"])
    second = program.compiled(longer)
    assert second is not first and program.compiled(longer) is second and len(program.compile_info) == 2
    _, m = program(s["state"], s["ref"], longer)
    assert np.isfinite(float(m["loss"]))


def test_stop_request_is_the_maximum_over_the_batch():
    """Multi-process runs send each process's stop request through the step (batch key `stop_request`, one
    value per row): the metric is its maximum over the global batch, so every process reads the same answer
    one step late, with no host-side collective per step."""
    cfg = S.StepConfig(objective="mcpo", sampler="mc", num_negatives=2, beta=2.0)
    s = _setup(cfg)
    for rows, want in (([0, 0, 0, 0], 0.0), ([0, 0, 1, 0], 1.0)):
        batch = dict(s["batch"], stop_request=np.asarray(rows, np.int32).reshape(2, 2))
        _, metrics = s["program"].compiled(batch)(s["state"], s["ref"], batch)
        assert float(metrics["stop_request"]) == want
    _, metrics = s["compiled"](s["state"], s["ref"], s["batch"])
    assert "stop_request" not in metrics  # one process: no key, no metric
