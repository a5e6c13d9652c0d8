"""mcpo_jax.audit: the HLO reader counts dots through loops and fusions exactly."""

import jax
import jax.numpy as jnp
import pytest

from _aot import run_aot
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

    mc = StepConfig(objective="mcpo", sampler="mc", num_negatives=1)  # Algorithm 1: y0 in the kernel's pass
    assert audit.pass_rows(mc, 6) == {"policy_no_grad": 6, "reference_no_grad": 6, "trained": 2}
    mc_old = StepConfig(objective="mcpo", sampler="mc", num_negatives=1, include_preferred=False)
    assert audit.pass_rows(mc_old, 6) == {"policy_no_grad": 5, "reference_no_grad": 6, "trained": 2}
    assert audit.pass_rows(StepConfig(objective="mcpo", num_negatives=5, include_preferred=False),
                           6)["policy_no_grad"] == 0  # M = L, y0 excluded: every candidate selected
    assert audit.pass_rows(StepConfig(objective="mcpo", num_negatives=5), 6)["policy_no_grad"] == 6
    dpo = StepConfig(objective="dpo", sampler="fixed", reference="precomputed")
    assert audit.pass_rows(dpo, 2) == {"policy_no_grad": 0, "reference_no_grad": 0, "trained": 2}
    unpruned = StepConfig(objective="dpo", sampler="fixed", prune_passes=False)
    assert audit.pass_rows(unpruned, 2) == {"policy_no_grad": 2, "reference_no_grad": 2, "trained": 2}


@pytest.mark.parametrize("shared", [True, False])
def test_the_step_and_the_audit_read_one_pass_plan(monkeypatch, shared):
    """The train step builds its PassPlan once (not per micro-batch nor per pass), every micro-batch runs that
    plan, and the audit credits the same plan's passes: rows, shared-prompt windows and prompt reuse."""
    from flax import nnx

    from _train_fixtures import toy_batch
    from mcpo_jax import models
    from mcpo_jax.training import state as st
    from mcpo_jax.training import step as S

    built, ran = [], []
    build, run = S.StepConfig.pass_plan, S.micro_batch_grads_and_metrics
    monkeypatch.setattr(S.StepConfig, "pass_plan", lambda *a, **kw: built.append(build(*a, **kw)) or built[-1])
    monkeypatch.setattr(S, "micro_batch_grads_and_metrics", lambda cfg, plan, *a, **kw: ran.append(plan) or run(
        cfg, plan, *a, **kw))
    config = models.ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                                max_position_embeddings=64, rms_norm_eps=1e-5)
    graphdef, params, rest = st.split_model(nnx.eval_shape(lambda: models.Transformer(config, rngs=nnx.Rngs(0))))
    tx, _ = S.make_optimizer(learning_rate=1e-2, total_steps=4, warmup_ratio=0.0)
    state = jax.eval_shape(lambda p: st.init_state(p, tx, 1), params)
    batch = toy_batch(b=6, c=4, t=12, vocab=32, accum=3)  # prompts of 4 tokens, completions of at most 8
    cfg = S.StepConfig(objective="mcpo", sampler="mc", num_negatives=2, include_preferred=False,
                       completion_window=8, prompt_window=4 if shared else None, reuse_prompt_encoding=True,
                       logprob_chunk_size=4)
    jax.eval_shape(S.make_train_step(cfg, graphdef, rest, tx), state, params, batch)
    assert len(built) == 1 and ran and all(plan is built[0] for plan in ran)  # the scan traces its body once
    plan = built[0]
    assert audit.pass_rows(cfg, 4) == plan.rows() == {"policy_no_grad": 3, "reference_no_grad": 4, "trained": 3}
    assert (plan.policy_windows, plan.trained_windows, plan.reference_windows) == (((4, 8),) * 3 if shared
                                                                                   else (None,) * 3)
    assert plan.reuses_prompt_encoding == shared
    work = audit.executed_work(cfg, prompts=2, columns=4, prompt_len=4, completion_len=8)
    # the prompts the audit credits: the trained pass's and the reference's; the policy's no-gradient pass
    # reuses the trained pass's encoding, as the plan says
    assert (work.prompt_trained_tokens, work.prompt_forward_tokens) == ((2 * 4, 2 * 4) if shared else (0, 0))


# ----------------------------------------------------------------------------------------------
# Reading hand-written HLO: each form the compilers print, with a number a wrong parser would miss

LOOP = """
HloModule m

%body (p: (s32[], f32[8,16], s32[])) -> (s32[], f32[8,16], s32[]) {
  %p = (s32[], f32[8,16], s32[]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %n = s32[] get-tuple-element(%p), index=2
  %w = f32[16,16]{1,0} constant({...})
  %d = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %step = s32[] constant(STEP)
  %next = s32[]{:T(128)} UPDATE(%i, %step)
  ROOT %t = (s32[], f32[8,16], s32[]) tuple(%next, %d, BOUND_OUT)
}

%lt_fusion (param_0: s32[], param_1: s32[]) -> pred[] {
  %param_0 = s32[] parameter(0)
  %param_1 = s32[] parameter(1)
  ROOT %cmp = pred[] compare(%param_0, %param_1), direction=LT
}

%cond (q: (s32[], f32[8,16], s32[])) -> pred[] {
  %q = (s32[], f32[8,16], s32[]) parameter(0)
  %c = s32[]{:T(128)} get-tuple-element(%q), index=0
  %b = s32[] get-tuple-element(%q), index=2
  %k = s32[]{:T(128)} constant(BOUND)
  ROOT %r = pred[]{:T(512)} COMPARE
}

ENTRY %main (a: f32[8,16]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %start = s32[] constant(START)
  %init = s32[]{:T(128)} copy(%start)
  %limit = s32[] constant(LIMIT)
  %tup = (s32[], f32[8,16], s32[]) tuple(%init, %a, %limit)
  %loop = (s32[], f32[8,16], s32[]) while(%tup), condition=%cond, body=%body
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%loop), index=1
}
"""


def loop_hlo(compare: str, *, start=0, step=1, update="add", bound=0, limit=0, bound_out="%n") -> str:
    text = LOOP.replace("COMPARE", compare)
    for key, value in (("START", start), ("STEP", step), ("UPDATE", update), ("BOUND_OUT", bound_out),
                       ("BOUND", bound), ("LIMIT", limit)):
        text = text.replace(key, str(value))
    return text


@pytest.mark.parametrize("compare, kw, trips", [
    ("compare(%c, %k), direction=LT", dict(bound=7), 7),
    ("compare(%k, %c), direction=GT", dict(bound=5), 5),  # the counter on the right: c < 5
    ("compare(%c, %k), direction=LE", dict(start=2, step=3, bound=11), 4),  # 2, 5, 8, 11
    ("compare(%c, %k), direction=GE", dict(start=10, step=2, update="subtract", bound=1), 5),  # 10 .. 2
    ("compare(%c, %k), direction=GT", dict(start=9, step=-3, bound=0), 3),  # 9, 6, 3
    ("compare(%c, %k), direction=NE", dict(start=0, step=4, bound=12), 3),
    ("compare(%c, %b), direction=LT", dict(limit=6), 6),  # the bound: a tuple element the body passes on
    ("fusion(%c, %k), kind=kLoop, calls=%lt_fusion", dict(bound=7), 7),  # the compare inside a fusion
    ("compare(%c, %b), direction=LT", dict(limit=6, bound_out="%next"), None),  # the bound moves: unknown
])
def test_trip_count_read_from_the_condition(compare, kw, trips):
    rep = audit.hlo_report(loop_hlo(compare, **kw), num_layers=trips)
    assert [(lp["trip_count"], lp["trip_count_from"]) for lp in rep["while_loops"]] == [
        (trips, "condition" if trips is not None else None)]
    assert rep["dot_flops"] == (trips or 1) * 2 * 8 * 16 * 16  # an unknown loop counts once
    assert rep["unknown_loops"] == (trips is None) and rep["layer_passes"] == (trips is not None)


CONV = """
HloModule m

%fused (p0: LHS, p1: RHS) -> OUT {
  %p0 = LHS{2,1,0:T(8,128)(2,1)} parameter(0)
  %p1 = RHS parameter(1)
  ROOT %conv = OUT{2,1,0:T(8,128)(2,1)} convolution(%p0, %p1), ATTRS, metadata={op_name="dot_general"}
}

%body (p: (s32[], LHS, RHS)) -> (s32[], LHS, RHS) {
  %p = (s32[], LHS, RHS) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %a = LHS get-tuple-element(%p), index=1
  %b = RHS get-tuple-element(%p), index=2
  %f = OUT fusion(%a, %b), kind=kOutput, calls=%fused
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], LHS, RHS) tuple(%next, %a, %b)
}

%cond (q: (s32[], LHS, RHS)) -> pred[] {
  %q = (s32[], LHS, RHS) parameter(0)
  %c = s32[] get-tuple-element(%q), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%c, %three), direction=LT
}

ENTRY %main (a: LHS, b: RHS) -> LHS {
  %a = LHS parameter(0)
  %b = RHS parameter(1)
  %zero = s32[] constant(0)
  %tup = (s32[], LHS, RHS) tuple(%zero, %a, %b)
  %loop = (s32[], LHS, RHS) while(%tup), condition=%cond, body=%body
  ROOT %out = LHS get-tuple-element(%loop), index=1
}
"""


@pytest.mark.parametrize("lhs, rhs, out, attrs, flops", [
    # a matmul as the TPU writes it: [32, 256] x [256, 512]
    ("bf16[32,256]", "bf16[256,512]", "bf16[32,512]", "dim_labels=bf_io->bf", 2 * 32 * 512 * 256),
    # a batched matmul, the batch a spatial dimension with lhs dilation: one real tap of the window's 4
    ("bf16[4,128,64]", "bf16[4,256,64]", "bf16[4,128,256]",
     "window={size=4 stride=3 lhs_dilate=4}, dim_labels=0bf_0oi->0bf", 2 * 4 * 128 * 256 * 64),
    # 3x3 'SAME' convolution: per dimension 8 x 3 taps less the 2 on padding
    ("bf16[2,8,8,16]", "bf16[3,3,16,32]", "bf16[2,8,8,32]", "window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f",
     2 * (2 * 32) * 16 * 22 * 22),
    # grouped: 4 groups of 2 input features
    ("bf16[2,10,8]", "bf16[3,2,8]", "bf16[2,8,8]", "window={size=3}, dim_labels=b0f_0io->b0f, feature_group_count=4",
     2 * (2 * 8) * 2 * (8 * 3)),
    # strided, dilated kernel: every tap reads data
    ("bf16[1,9,4]", "bf16[2,4,6]", "bf16[1,4,6]", "window={size=2 stride=2 rhs_dilate=2}, dim_labels=b0f_0io->b0f",
     2 * 6 * 4 * (4 * 2)),
])
def test_convolution_flops_in_a_fusion_in_a_loop(lhs, rhs, out, attrs, flops):
    text = CONV.replace("LHS", lhs).replace("RHS", rhs).replace("OUT", out).replace("ATTRS", attrs)
    rep = audit.hlo_report(text)
    assert rep["dot_flops"] == 3 * flops and rep["while_loops"][0]["trip_count_from"] == "condition"


COLLECTIVES = """
HloModule m

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%body (p: (s32[], bf16[64,128], f32[128], f32[32])) -> (s32[], bf16[64,128], f32[128], f32[32]) {
  %p = (s32[], bf16[64,128], f32[128], f32[32]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %w = bf16[64,128]{1,0} get-tuple-element(%p), index=1
  %u = f32[128]{0} get-tuple-element(%p), index=2
  %v = f32[32]{0} get-tuple-element(%p), index=3
  %ag = (bf16[64,128]{1,0}, bf16[256,128]{1,0}) all-gather-start(%w), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
  %agd = bf16[256,128]{1,0} all-gather-done(%ag)
  %rs = bf16[64,128]{1,0} reduce-scatter(%agd), channel_id=2, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  %ar = (f32[128]{0}, f32[32]{0}) all-reduce-start(%u, %v), channel_id=3, replica_groups={{0,1,2,3}}, to_apply=%add
  %ard = (f32[128]{0}, f32[32]{0}) all-reduce-done(%ar)
  %u2 = f32[128]{0} get-tuple-element(%ard), index=0
  %v2 = f32[32]{0} get-tuple-element(%ard), index=1
  ROOT %t = (s32[], bf16[64,128], f32[128], f32[32]) tuple(%i, %rs, %u2, %v2)
}

%cond (q: (s32[], bf16[64,128], f32[128], f32[32])) -> pred[] {
  %q = (s32[], bf16[64,128], f32[128], f32[32]) parameter(0)
  %c = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%c, %n), direction=LT
}

%ag_start (param_0: bf16[8,16]) -> bf16[32,16] {
  %param_0 = bf16[8,16]{1,0} parameter(0)
  ROOT %all-gather.1 = bf16[32,16]{1,0} all-gather(%param_0), channel_id=9, replica_groups={{0,1,2,3}}, dimensions={0}
}

%ag_done (param_0.1: bf16[8,16]) -> bf16[32,16] {
  %param_0.1 = bf16[8,16]{1,0} parameter(0)
  ROOT %all-gather.2 = bf16[32,16]{1,0} all-gather(%param_0.1), channel_id=9, replica_groups={{0,1,2,3}}, dimensions={0}
}

%all-reduce-scatter.1 (input: f32[64,8]) -> f32[16,8] {
  %input = f32[64,8]{1,0} parameter(0)
  %all-reduce.1 = f32[64,8]{1,0} all-reduce(%input), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %pid = u32[] partition-id()
  %sixteen = u32[] constant(16)
  %off = u32[] multiply(%pid, %sixteen)
  %z = u32[] constant(0)
  ROOT %ds = f32[16,8]{1,0} dynamic-slice(%all-reduce.1, %off, %z), dynamic_slice_sizes={16,8}
}

ENTRY %main (w: bf16[64,128], g: bf16[8,16], h: f32[4,8], r: f32[64,8]) -> bf16[64,128] {
  %w = bf16[64,128]{1,0} parameter(0)
  %g = bf16[8,16]{1,0} parameter(1)
  %h = f32[4,8]{1,0} parameter(2)
  %r = f32[64,8]{1,0} parameter(3)
  %cp = (bf16[8,16]{1,0}, bf16[8,16]{1,0}, u32[], u32[]) collective-permute-start(%g), channel_id=4, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %cpd = bf16[8,16]{1,0} collective-permute-done(%cp)
  %a2a = f32[4,8]{1,0} all-to-all(%h), channel_id=5, replica_groups={{0,1,2,3}}, dimensions={0}
  %f1 = bf16[32,16]{1,0} fusion(%cpd), kind=kCustom, calls=%ag_start
  %f2 = bf16[32,16]{1,0} fusion(%cpd), kind=kCustom, calls=%ag_done
  %f3 = f32[16,8]{1,0} fusion(%r), kind=kCustom, calls=%all-reduce-scatter.1
  %z = s32[] constant(0)
  %u = f32[128]{0} constant({...})
  %v = f32[32]{0} constant({...})
  %tup = (s32[], bf16[64,128], f32[128], f32[32]) tuple(%z, %w, %u, %v)
  %loop = (s32[], bf16[64,128], f32[128], f32[32]) while(%tup), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %out = bf16[64,128]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_collectives_per_kind_with_loop_multiplicity_and_bytes():
    rep = audit.hlo_report(COLLECTIVES)["collectives"]
    assert rep["by_kind"] == {
        "all-gather": {"count": 3 + 1, "bytes": 3 * 256 * 128 * 2 + 32 * 16 * 2},  # result; two copies of channel 9
        "reduce-scatter": {"count": 3 + 1, "bytes": 3 * 256 * 128 * 2 + 64 * 8 * 4},  # operand; the TPU's form
        "all-reduce": {"count": 3, "bytes": 3 * (128 + 32) * 4},  # both operands of the combined op
        "all-to-all": {"count": 1, "bytes": 4 * 8 * 4},
        "collective-permute": {"count": 1, "bytes": 8 * 16 * 2},  # the -start/-done pair once
    }
    top = rep["largest_collectives"]
    assert [(e["kind"], e["shape"], e["times"], e["in_loop"], e["loop_trip_count"]) for e in top[:2]] == [
        ("all-gather", [256, 128], 3, True, 3), ("reduce-scatter", [256, 128], 3, True, 3)]
    assert {e["kind"]: e["in_loop"] for e in top[2:]} == {
        "all-reduce": True, "reduce-scatter": False, "all-gather": False, "all-to-all": False,
        "collective-permute": False}


CUDNN = """
HloModule m

ENTRY %main (q: bf16[2,256,8,64], k: bf16[2,384,2,64], v: bf16[2,384,2,64]) -> bf16[2,256,8,64] {
  %q = bf16[2,256,8,64]{3,2,1,0} parameter(0)
  %k = bf16[2,384,2,64]{3,2,1,0} parameter(1)
  %v = bf16[2,384,2,64]{3,2,1,0} parameter(2)
  %call = (bf16[2,8,256,64]{3,1,2,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="TARGET", operand_layout_constraints={bf16[2,256,8,64]{3,2,1,0}, bf16[2,384,2,64]{3,2,1,0}, bf16[2,384,2,64]{3,2,1,0}}, backend_config={"operation_queue_id": "0", "cudnn_fmha_backend_config": {"fmha_scale": 0.125, SCORES"is_flash_attention": true, "mask_type": "NO_MASK"}}
  ROOT %out = bf16[2,8,256,64]{3,1,2,0} get-tuple-element(%call), index=0
}
"""
SCORES = ('"intermediate_tensor_shape": {"element_type": "BF16", "dimensions": ["2", "8", "256", "384"], '
          '"tuple_shapes": [], "layout": {"minor_to_major": ["3", "2", "1", "0"], "tiles": []}}, ')


@pytest.mark.parametrize("target", [f"__cudnn$fmha{name}{bwd}" for bwd in ("", "Backward") for name in (
    "Softmax", "ScaleBiasSoftmax", "SoftmaxDropout", "ScaleBiasSoftmaxDropout",
    "ScaleMaskSoftmax", "ScaleBiasMaskSoftmax", "ScaleMaskSoftmaxDropout")] + [
        "__cudnn$fmhaSoftmaxF8", "__cudnn$fmhaSoftmaxBackwardF8"])
def test_every_cudnn_attention_call_counts_the_query_heads(target):
    """B 2, T 256, S 384, 8 query heads over 2 KV heads, hd 64: 4·B·T·S·H·hd forward, twice that backward."""
    rep = audit.hlo_report(CUDNN.replace("TARGET", target).replace("SCORES", SCORES))["attention"]
    backward = "Backward" in target
    assert rep["flops"] == (8 if backward else 4) * 2 * 256 * 384 * 8 * 64
    assert (rep["forward_calls"], rep["backward_calls"], rep["cudnn_calls"], rep["kernels"]) == (
        int(not backward), int(backward), 1, {target: 1})
    # without the scores' shape in the config: q [B, T, H, hd] and k [B, S, K, hd] give the same
    assert audit.hlo_report(CUDNN.replace("TARGET", target).replace("SCORES", ""))["attention"]["flops"] == rep["flops"]


SPLASH = """
HloModule m

ENTRY %main (q.1: bf16[2,4,256,128], k.1: bf16[2,4,512,128], v.1: bf16[2,4,512,128]) -> bf16[2,4,256,128] {
  %q.1 = bf16[2,4,256,128]{3,2,1,0} parameter(0)
  %k.1 = bf16[2,4,512,128]{3,2,1,0} parameter(1)
  %v.1 = bf16[2,4,512,128]{3,2,1,0} parameter(2)
  %m = s8[1,2,4]{2,1,0} constant({...})
  %KERNEL.1 = (f32[2,128,128]{2,1,0:T(8,128)}, bf16[2,4,256,128]{3,2,1,0:T(8,128)(2,1)}) custom-call(%m, %m, %q.1, %k.1, %v.1), custom_call_target="tpu_custom_call", operand_layout_constraints={s8[1,2,4]{2,1,0}, s8[1,2,4]{2,1,0}, bf16[2,4,256,128]{3,2,1,0}, bf16[2,4,512,128]{3,2,1,0}, bf16[2,4,512,128]{3,2,1,0}}, frontend_attributes={kernel_metadata={
"xprof_metadata":"{\\"block_q\\": 128, \\"q_layout\\": 1, \\"k_layout\\": 1, \\"v_layout\\": 1}"
}}, metadata={op_name="jit(f)/jit(_splash_attention)/KERNEL/KERNEL/pallas_call" stack_frame_id=7}, backend_config={"custom_call_config":{"body":"TUzvUgFNTElSMjMu"}}
  ROOT %out = bf16[2,4,256,128]{3,2,1,0} get-tuple-element(%KERNEL.1), index=1, frontend_attributes={kernel_metadata={
"xprof_metadata":"{\\"block_q\\": 128}"
}}, metadata={op_name="jit(f)/jit(_splash_attention)/KERNEL/KERNEL/pallas_call"}
}
"""


@pytest.mark.parametrize("kernel, phase, factor", [
    ("splash_mha_fwd_no_residuals", "forward", 4), ("splash_mha_fwd_residuals", "forward", 4),
    ("splash_mqa_fwd_segmented_no_residuals", "forward", 4), ("splash_mha_dkv_no_residuals", "backward", 8),
    ("splash_mha_dq_no_residuals", None, 0)])
def test_splash_attention_kernels_over_continuation_lines(kernel, phase, factor):
    """A Pallas call's attributes run over several lines; q [B, H, T=256, hd], k [B, H, S=512, hd]."""
    rep = audit.hlo_report(SPLASH.replace("KERNEL", kernel))["attention"]
    assert rep["flops"] == factor * 2 * 4 * 256 * 512 * 128
    assert (rep["forward_calls"], rep["backward_calls"]) == (int(phase == "forward"), int(phase == "backward"))
    assert (rep["pallas_calls"], rep["cudnn_calls"], rep["kernels"]) == (1, 0, {kernel: 1})
    seq_minor = SPLASH.replace("KERNEL", kernel).replace('k_layout\\": 1', 'k_layout\\": 2').replace(
        "bf16[2,4,512,128]{3,2,1,0}, bf16[2,4,512", "bf16[2,4,128,512]{3,2,1,0}, bf16[2,4,512")
    assert 'k_layout\\": 2' in seq_minor and "bf16[2,4,128,512]" in seq_minor
    assert audit.hlo_report(seq_minor)["attention"]["flops"] == rep["flops"]  # k [B, H, hd, S]


# ----------------------------------------------------------------------------------------------
# Real deviceless compiles (tests/_aot.py; skipped without libtpu / the CUDA plugin)

SCAN_GATHER = """
n = len(devices)
mesh = Mesh(devices, ("x",))
D, F, B = 256, 512, 16 * n

def program(layers):
    def local(w, x):  # w [L, D, F/n], x [B/n, D]
        def layer(c, wi):
            full = jax.lax.all_gather(wi, "x", axis=1, tiled=True)  # [D, F]: the layer's weight
            h = jax.lax.psum(jnp.tanh(c @ full).astype(jnp.float32), "x")  # [B/n, F]: an activation
            return h.astype(c.dtype) @ full.T, None
        return jax.lax.scan(layer, x, w)[0]
    f = jax.shard_map(local, mesh=mesh, in_specs=(P(None, None, "x"), P("x")), out_specs=P("x"))
    w = jax.ShapeDtypeStruct((layers, D, F), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, None, "x")))
    x = jax.ShapeDtypeStruct((B, D), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
    return audit.hlo_report(jax.jit(f).lower(w, x).compile().as_text(), num_layers=layers)

result = {"seven": program(7), "one": program(1), "devices": n}
"""


@pytest.mark.parametrize("target, trip_count_from", [("tpu-v5e-4", "condition"), ("h100x8", "backend_config")])
def test_layer_scan_flops_and_collectives_compiled_for(target, trip_count_from):
    """7 layers of a matmul pair on the weight all-gathered in the loop, an activation all-reduced: per device
    7 x one layer's FLOPs (the TPU's loop has no known_trip_count: read from its condition), 7 all-gathers of the
    weight's shape and 7 all-reduces of the activation's, inside the loop."""
    got = run_aot(SCAN_GATHER, target)
    seven, one, n = got["seven"], got["one"], got["devices"]
    assert one["dot_flops"] == 2 * 2 * 16 * 256 * 512  # [B/n, D] x [D, F] and back, B/n = 16
    assert seven["dot_flops"] == 7 * one["dot_flops"]
    assert [(lp["trip_count"], lp["trip_count_from"]) for lp in seven["while_loops"]] == [(7, trip_count_from)]
    assert seven["layer_passes"] == 1 and seven["unknown_loops"] == 0
    assert seven["collectives"]["by_kind"] == {
        "all-gather": {"count": 7, "bytes": 7 * 256 * 512 * 2}, "all-reduce": {"count": 7, "bytes": 7 * 16 * 512 * 4},
        "reduce-scatter": {"count": 0, "bytes": 0}, "all-to-all": {"count": 0, "bytes": 0},
        "collective-permute": {"count": 0, "bytes": 0}}
    in_loop = {(e["kind"], tuple(d for d in e["shape"] if d != 1)) for e in seven["collectives"]["largest_collectives"]
               if e["in_loop"] and e["loop_trip_count"] == 7}
    assert in_loop == {("all-gather", (256, 512)), ("all-reduce", (16, 512))}  # the weight; the activation


SPLASH_FWD_BWD = """
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

B, H, T, hd = 2, 2, 256, 128
mesh = Mesh(devices[:1], ("x",))
kernel = sk.make_splash_mha(mask=sm.MultiHeadMask([sm.CausalMask((T, T))] * H), head_shards=1, q_seq_shards=1)

def loss(q, k, v):
    return jnp.sum(jax.vmap(kernel)(q, k, v).astype(jnp.float32))

qkv = [jax.ShapeDtypeStruct((B, H, T, hd), jnp.bfloat16, sharding=NamedSharding(mesh, P()))] * 3
text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*qkv).compile().as_text()
result = audit.hlo_report(text)["attention"]
"""


def test_splash_attention_compiled_for_tpu():
    """Splash attention forward + backward (causal, vmapped over the batch) on a v5e: its three Pallas kernels by
    name, (4 + 8)·B·T·S·H·hd FLOPs (the causal mask's skipped blocks counted, as the formula does)."""
    attn = run_aot(SPLASH_FWD_BWD, "tpu-v5e-4")
    assert attn["kernels"] == {"splash_mha_fwd_residuals": 1, "splash_mha_dkv_no_residuals": 1,
                               "splash_mha_dq_no_residuals": 1}
    assert (attn["forward_calls"], attn["backward_calls"], attn["pallas_calls"], attn["cudnn_calls"]) == (1, 1, 3, 0)
    assert attn["flops"] == (4 + 8) * 2 * 256 * 256 * 2 * 128


CUDNN_FWD_BWD = """
B, T, S, H, K, hd = 2, 256, 384, 8, 2, 64
mesh = Mesh(devices, ("x",))
spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))
q, k, v = spec((B, T, H, hd)), spec((B, S, K, hd)), spec((B, S, K, hd))
variants = {"plain": {}, "causal": {"is_causal": True}, "mask": {"mask": spec((B, 1, T, S), jnp.bool_)},
            "bias": {"bias": spec((1, H, T, S))}}
result = {}
for name, kw in variants.items():
    arrays = {a: b for a, b in kw.items() if isinstance(b, jax.ShapeDtypeStruct)}
    flags = {a: b for a, b in kw.items() if a not in arrays}

    def loss(q, k, v, arrays):
        out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **arrays, **flags)
        return jnp.sum(out.astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, arrays).compile().as_text()
    result[name] = audit.hlo_report(text)["attention"]
"""


def test_cudnn_attention_compiled_for_h100():
    """cuDNN flash attention forward + backward in bf16 for an H100, 8 query heads over 2 KV heads, S != T: every
    variant counts (4 + 8)·B·T·S·H·hd with H the query heads. A mask arrives as a bias (ScaleBiasSoftmax): the
    variant the audit used to miss."""
    got = run_aot(CUDNN_FWD_BWD, "h100")
    names = {"plain": "Softmax", "causal": "Softmax", "mask": "ScaleBiasSoftmax", "bias": "ScaleBiasSoftmax"}
    for variant, name in names.items():
        attn = got[variant]
        assert attn["kernels"] == {f"__cudnn$fmha{name}": 1, f"__cudnn$fmha{name}Backward": 1}, variant
        assert (attn["forward_calls"], attn["backward_calls"], attn["cudnn_calls"], attn["pallas_calls"]) == (
            1, 1, 2, 0), variant
        assert attn["flops"] == (4 + 8) * 2 * 256 * 384 * 8 * 64, variant


def test_device_bytes_takes_the_tpu_peak_and_the_sum_elsewhere():
    """A step's device memory: the sum of arguments, outputs and temporaries less donated buffers, except on TPU,
    whose compiler reports a live peak below that sum (nectar.py on a v6e-8: sum 36.1 GB, peak 31.0 GB, accepted by
    a compiler that refuses what exceeds 31.25 GiB); the CPU's peak leaves temporaries out."""
    sizes = dict(argument=16, output=12, temp=20, alias=12)
    assert audit.device_bytes(**sizes, peak=31, platform="tpu") == 31
    assert audit.device_bytes(**sizes, peak=31, platform="cpu") == 36
    assert audit.device_bytes(**sizes, peak=36, platform="gpu") == 36
    assert audit.device_bytes(**sizes, peak=0, platform="tpu") == 36  # no peak reported
