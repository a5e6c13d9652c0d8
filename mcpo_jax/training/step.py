"""The jitted train step: all-candidate log-probs, MC kernel, gradient through y0 + M negatives.

    batch (micro-batches [A, b, ...])
      for each micro-batch (lax.scan, gradient accumulation):
        1. log-probs of all C = 1 + L rows under the policy and the reference, no gradient
           (or the reference column `ref_logps` precomputed by the trainer); the policy's only where the
           kernel reads them: not at all for `fixed` / `random` or M = L, not y0 unless it can be picked
        2. kernel.select_negatives(fold_in(fold_in(base_key, step), micro), ...) -> [b, M]
        3. gather y0 + the M selected rows; value_and_grad of the objective on those rows only
      4. optax update with the exact global mean gradient; metrics as (sum, count) -> means

Everything is one `jax.jit` with explicit shardings (`training.program.TrainProgram`); no host round
trips. The step knows nothing of configs files or data readers: it takes a `StepConfig`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mcpo_jax import kernel, logprobs, losses, ranking_metrics

log = logging.getLogger(__name__)

RANK_BINS = 16  # histogram of the dataset rank of each selected negative: ranks 0..15 (unknown ones apart)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    objective: str = "mcpo"
    sampler: str = "mc"
    num_negatives: int = 1
    beta: float = 0.01
    # Whether the kernel may pick y0 itself: None = Algorithm 1 (the MC kernel samples over w_0..w_L; max / min /
    # random / fixed pick among the candidates); True / False force it (kernel.preferred_eligible)
    include_preferred: bool | None = None
    reference: str = "online"  # "online" | "precomputed" | "none" (reference-free objectives)
    loss_hparams: tuple[tuple[str, Any], ...] = ()
    logprob_chunk_size: int = logprobs.DEFAULT_CHUNK_SIZE
    # The LM head and log-softmax run on this many positions per row, from its first completion token (the
    # data's max_completion_length); None: every position. Completion tokens past the window would be lost:
    # the metric `logprobs/window_overflow` counts them (it must stay 0).
    completion_window: int | None = None
    # The prompt encoded once per example in every pass (its keys and values shared by the example's rows):
    # the data's max_prompt_length, or None to encode each row whole. Used for a pass when it runs fewer
    # tokens than the rows whole (`logprobs.shared_prompt_windows`); needs `completion_window`. Every row of an
    # example must hold the same prompt (the tokenizer's layout): the metric `logprobs/prompt_mismatch` counts
    # the examples where one does not, or whose prompt is longer than the window (it must stay 0).
    prompt_window: int | None = None
    # With the shared prompt: the policy's prompt encoding computed once (with its backward kept, `jax.vjp`)
    # for both its no-gradient pass and its gradient pass: -2·N·P FLOPs per example, for a second
    # parameter-sized gradient stack (the prompt's and the completions' gradients are added at the end).
    reuse_prompt_encoding: bool = False
    # Leave out model work whose result nothing reads: the no-grad policy pass when the selection does not
    # depend on the policy, and y0 from that pass when the kernel cannot pick y0. Same loss and gradient;
    # False runs every pass (the before/after reference for tests and the benchmark).
    prune_passes: bool = True

    @property
    def y0_eligible(self) -> bool:
        return self.sampler != "fixed" and kernel.preferred_eligible(self.sampler, self.include_preferred)

    @property
    def needs_reference(self) -> bool:
        return self.reference != "none"

    @property
    def is_sft(self) -> bool:
        return self.objective == "sft"

    def selection_reads_policy(self, num_columns: int) -> bool:
        """Whether the negatives depend on the policy's log-probs: not for `fixed` / `random`, nor when every
        candidate is selected (M = L without y0: the selection is columns 1..L, whatever the kernel)."""
        if self.is_sft or not self.prune_passes:
            return not self.is_sft
        if self.sampler in ("fixed", "random"):
            return False
        return not (self.num_negatives == num_columns - 1 and not self.y0_eligible)


def negatives_key(rng, step, micro):
    """The key the kernel uses for micro-batch `micro` of step `step` (host recomputations use it too)."""
    return jax.random.fold_in(jax.random.fold_in(rng, step), micro)


def forward_logps(graphdef, params, rest, ids_NT, mask_NT, loss_mask_NT, *, chunk_size, window=None):
    model = nnx.merge(graphdef, params, rest)
    hidden_NTD = model.hidden_states(ids_NT, mask_NT)
    return logprobs.sequence_logps(
        hidden_NTD, model.lm_head_kernel(), ids_NT, loss_mask_NT, chunk_size=chunk_size, window=window
    )


def prompt_mismatch(ids_BCT, loss_mask_BCT, valid_BC, prompt_window: int):
    """[B] bool: examples the shared-prompt layout would get wrong: a valid row whose prompt (the tokens
    before its first loss-mask position) differs from row 0's, or a prompt longer than `prompt_window`."""
    t = ids_BCT.shape[-1]
    first_BC = jnp.argmax(loss_mask_BCT > 0, axis=-1)
    p_B = first_BC[:, 0]
    in_prompt_B1T = (jnp.arange(t)[None] < p_B[:, None])[:, None]
    same_BC = (first_BC == p_B[:, None]) & jnp.all((ids_BCT == ids_BCT[:, :1]) | ~in_prompt_B1T, axis=-1)
    return jnp.any(~same_BC & valid_BC, axis=1) | (p_B > prompt_window)


def _prompt_lengths(loss_mask_BKT):
    """[B] int32: each example's prompt length, the first loss-mask position of its first row."""
    return jnp.argmax(loss_mask_BKT[:, 0] > 0, axis=-1).astype(jnp.int32)


def _last_prompt_hidden(h_BPD, p_len_B):
    """[B, D]: the hidden state at each prompt's last real position (it predicts the first completion token)."""
    return jnp.take_along_axis(h_BPD, jnp.maximum(p_len_B - 1, 0)[:, None, None], axis=1)[:, 0]


def encode_prompts(graphdef, params, rest, ids_BKT, loss_mask_BKT, *, prompt_len: int):
    """Each example's prompt encoded once (`Transformer.encode_prompt`): (the prompt's last final-norm hidden
    state [B, D], every layer's keys and values) for `shared_prompt_logps(encoded=...)`. The step encodes the
    prompt once for the policy's no-gradient pass and its gradient pass together (`jax.vjp`)."""
    model = nnx.merge(graphdef, params, rest)
    p_len_B = _prompt_lengths(loss_mask_BKT)
    h_BPD, k, v = model.encode_prompt(ids_BKT[:, 0, :prompt_len], p_len_B)
    return _last_prompt_hidden(h_BPD, p_len_B), k, v


def shared_prompt_logps(graphdef, params, rest, ids_BKT, loss_mask_BKT, *, prompt_len: int, window: int,
                        chunk_size, encoded=None):
    """`_rows_logps` with each example's prompt encoded once (`Transformer.prefix_hidden_states`): [B, K].

    The rows' layout is the tokenizer's (prompt, then completion, right padded; the prompt's length is the
    first loss-mask position, the same in every row of an example); `prompt_len` / `window` are the static
    prompt and completion positions kept (at least the longest prompt / completion). `encoded`: the prompts
    already encoded by `encode_prompts` with these parameters (then only the completions run here)."""
    model = nnx.merge(graphdef, params, rest)
    b, k, t = ids_BKT.shape
    p_len_B = _prompt_lengths(loss_mask_BKT)
    idx_BKW = jnp.broadcast_to(p_len_B[:, None, None] + jnp.arange(window, dtype=jnp.int32), (b, k, window))
    inside = idx_BKW < t
    idx_BKW = jnp.minimum(idx_BKW, t - 1)
    comp_BKW = jnp.take_along_axis(ids_BKT, idx_BKW, axis=-1)
    comp_mask_BKW = jnp.take_along_axis(loss_mask_BKT, idx_BKW, axis=-1) * inside
    comp_len_BK = jnp.sum(comp_mask_BKW, axis=-1, dtype=jnp.int32)
    if encoded is None:
        h_prompt_BPD, h_comp_BKWD = model.prefix_hidden_states(ids_BKT[:, 0, :prompt_len], p_len_B, comp_BKW,
                                                               comp_len_BK)
        h_last_BD = _last_prompt_hidden(h_prompt_BPD, p_len_B)
    else:
        h_last_BD, k_prompt, v_prompt = encoded
        h_comp_BKWD = model.encode_completions(k_prompt, v_prompt, p_len_B, comp_BKW, comp_len_BK)
    # completion token i is predicted from the position before it: the prompt's last for i = 0
    h_last_BK1D = jnp.broadcast_to(h_last_BD[:, None, None], (b, k, 1, h_last_BD.shape[-1]))
    hidden_NWD = jnp.concatenate([h_last_BK1D, h_comp_BKWD[:, :, :-1]], axis=2).reshape(b * k, window, -1)
    # token_logps predicts position i + 1 from i: one dummy position at the end, one dummy target in front
    hidden_NWD = jnp.pad(hidden_NWD, ((0, 0), (0, 1), (0, 0)))
    ids_NW = jnp.pad(comp_BKW.reshape(b * k, window), ((0, 0), (1, 0)))
    mask_NW = comp_mask_BKW.reshape(b * k, window).astype(jnp.float32)
    logps_NW = logprobs.token_logps(hidden_NWD, model.lm_head_kernel(), ids_NW, chunk_size=chunk_size)
    return jnp.sum(logps_NW * mask_NW, axis=-1).reshape(b, k)


def prompt_reuse(cfg: StepConfig, num_columns: int, length: int, *, with_grad: bool = True,
                 dynamic_rope: bool = False) -> tuple[int, int] | None:
    """(P, W) when the policy's prompt encoding is shared by its no-gradient pass and its gradient pass (both
    passes in the shared layout with the same windows), else None. Not with dynamic NTK RoPE, whose angles
    depend on the longest row of each pass."""
    if (dynamic_rope or cfg.is_sft or not cfg.reuse_prompt_encoding
            or not (with_grad and cfg.selection_reads_policy(num_columns))):
        return None
    nograd_rows = num_columns - 1 if cfg.prune_passes and not cfg.y0_eligible else num_columns
    windows = {logprobs.shared_prompt_windows(cfg.prompt_window, cfg.completion_window, k, length)
               for k in (nograd_rows, 1 + cfg.num_negatives)}
    return windows.pop() if len(windows) == 1 else None


def _rows_logps(graphdef, params, rest, ids_BKT, mask_BKT, loss_mask_BKT, chunk_size, window=None,
                prompt_window=None):
    b, k, t = ids_BKT.shape
    shared = logprobs.shared_prompt_windows(prompt_window, window, k, t)
    if shared is not None:
        return shared_prompt_logps(graphdef, params, rest, ids_BKT, loss_mask_BKT, prompt_len=shared[0],
                                   window=shared[1], chunk_size=chunk_size)
    flat = lambda x: x.reshape(b * k, t)
    logps_N = forward_logps(
        graphdef, params, rest, flat(ids_BKT), flat(mask_BKT), flat(loss_mask_BKT), chunk_size=chunk_size,
        window=window,
    )
    return logps_N.reshape(b, k)


def _gather_cols(x_BC, cols_BK):
    idx = cols_BK.reshape(cols_BK.shape + (1,) * (x_BC.ndim - 2))
    return jnp.take_along_axis(x_BC, idx, axis=1)


def select_columns(cfg: StepConfig, key, policy_BC, ref_BC, valid_BC, fixed_index_B):
    """Columns [b, 1 + M] fed to the objective: y0 first, then the M selected negatives.

    `policy_BC` is None when `cfg.selection_reads_policy(C)` is False."""
    b, c = valid_BC.shape
    zero_B1 = jnp.zeros((b, 1), jnp.int32)
    if cfg.is_sft:
        return zero_B1, None
    if cfg.sampler == "fixed":
        neg_BM = fixed_index_B.astype(jnp.int32)[:, None]
    else:
        strategy = cfg.sampler
        if policy_BC is None:
            # `random` reads only the shape and `valid`; with M = L every eligible column is selected (and,
            # were a row short of candidates, the same tie-break fills it): "max" on a constant gives that
            # set in column order.
            policy_BC, ref_BC = jnp.zeros((b, c), jnp.float32), None
            strategy = "random" if strategy == "random" else "max"
        neg_BM = kernel.select_negatives(
            key,
            policy_BC,
            ref_BC,
            beta=cfg.beta,
            num_negatives=cfg.num_negatives,
            strategy=strategy,
            include_preferred=cfg.y0_eligible,
            valid=valid_BC,
        ).astype(jnp.int32)
    return jnp.concatenate([zero_B1, neg_BM], axis=1), neg_BM


def initial_loss_state(cfg: StepConfig):
    """The objective's state across steps, kept in the train state (None: the objective has none).

    BCO: TRL's running mean of the detached batch-mean reward (`delta`), updated with each micro-batch before
    the loss uses it (`losses.running_mean_update`); starts at (0, 0)."""
    if cfg.objective == "bco":
        return {"bco_delta": jnp.zeros((), jnp.float32), "bco_count": jnp.zeros((), jnp.float32)}
    return None


def _micro_step(cfg: StepConfig, graphdef, rest, params, ref_params, mb, key, with_grad=True, ranking=False):
    """Gradient sum and metric (sum, count) pairs of one micro-batch (objectives without a loss state);
    `ranking`: also the held-out metrics over every candidate (mcpo_jax/ranking_metrics.py)."""
    return _micro_step_with_state(cfg, graphdef, rest, params, ref_params, mb, key, with_grad,
                                  ranking=ranking)[:5]


def _micro_step_with_state(cfg: StepConfig, graphdef, rest, params, ref_params, mb, key, with_grad=True,
                           loss_state=None, ranking=False):
    """`_micro_step` and the objective's updated loss state (None when `loss_state` is None)."""
    ids_BCT, mask_BCT, loss_mask_BCT = mb["input_ids"], mb["attention_mask"], mb["loss_mask"]
    valid_BC = mb["valid"].astype(bool)
    b, c, t = ids_BCT.shape
    chunk = cfg.logprob_chunk_size
    window = cfg.completion_window
    prompt_window = cfg.prompt_window if window is not None else None
    sums: dict[str, jax.Array] = {}

    def add(name, total, count):
        sums[name] = (jnp.asarray(total, jnp.float32), jnp.asarray(count, jnp.float32))

    # 0. The policy's prompts, encoded once for its no-gradient and gradient passes (shared-prompt layout).
    reuse = None
    if prompt_window is not None:
        model_config = getattr(nnx.merge(graphdef, params, rest), "config", None)
        reuse = prompt_reuse(cfg, c, t, with_grad=with_grad,
                             dynamic_rope=getattr(model_config, "rope_type", None) == "dynamic")
    encoded = encoded_vjp = None
    if reuse is not None:
        encoded, encoded_vjp = jax.vjp(
            lambda p: encode_prompts(graphdef, p, rest, ids_BCT, loss_mask_BCT, prompt_len=reuse[0]), params)

    def policy_logps(p, ids, mask, loss_mask, enc):
        if enc is None:
            return _rows_logps(graphdef, p, rest, ids, mask, loss_mask, chunk, window, prompt_window)
        return shared_prompt_logps(graphdef, p, rest, ids, loss_mask, prompt_len=reuse[0], window=reuse[1],
                                   chunk_size=chunk, encoded=enc)

    # 1. No-gradient log-probs of every candidate the kernel reads (SFT only needs y0).
    policy_BC = ref_BC = None
    if cfg.selection_reads_policy(c):
        enc = None if encoded is None else jax.lax.stop_gradient(encoded)
        if cfg.prune_passes and not cfg.y0_eligible:
            # y0 is never a negative: its column is masked out of the kernel's weights (any finite value).
            rest_BL = policy_logps(params, ids_BCT[:, 1:], mask_BCT[:, 1:], loss_mask_BCT[:, 1:], enc)
            policy_BC = jnp.concatenate([jnp.zeros_like(rest_BL[:, :1]), rest_BL], axis=1)
        else:
            policy_BC = policy_logps(params, ids_BCT, mask_BCT, loss_mask_BCT, enc)
        policy_BC = jax.lax.stop_gradient(policy_BC)
    if not cfg.is_sft:
        if cfg.reference == "online" and reuse is not None:
            # the policy's passes' arithmetic (prompt, then completions), so that policy = reference (the first
            # step) gives rewards of rounding size only, not two different fusions of the same sums
            ref_enc = encode_prompts(graphdef, ref_params, rest, ids_BCT, loss_mask_BCT, prompt_len=reuse[0])
            ref_BC = jax.lax.stop_gradient(shared_prompt_logps(
                graphdef, ref_params, rest, ids_BCT, loss_mask_BCT, prompt_len=reuse[0], window=reuse[1],
                chunk_size=chunk, encoded=ref_enc))
        elif cfg.reference == "online":
            ref_BC = jax.lax.stop_gradient(_rows_logps(graphdef, ref_params, rest, ids_BCT, mask_BCT, loss_mask_BCT,
                                                       chunk, window, prompt_window))
        elif cfg.reference == "precomputed":
            ref_BC = mb["ref_logps"].astype(jnp.float32)

    # 2. The MC kernel (or max/min/random/fixed) picks the negatives.
    cols_BK, neg_BM = select_columns(cfg, key, policy_BC, ref_BC, valid_BC, mb.get("fixed_index"))
    take = lambda x: _gather_cols(x, cols_BK)
    sel_ids, sel_mask, sel_loss_mask = take(ids_BCT), take(mask_BCT), take(loss_mask_BCT)
    sel_valid_BK = take(valid_BC)
    lengths_BK = jnp.sum(sel_loss_mask[..., 1:], axis=-1).astype(jnp.float32)
    sel_ref_BK = None if ref_BC is None else take(ref_BC)
    objective = losses.get(cfg.objective)
    hparams = dict(cfg.loss_hparams)

    # 3. Gradient through the selected rows only.
    def loss_fn(p, enc=None):
        sel_policy_BK = policy_logps(p, sel_ids, sel_mask, sel_loss_mask, enc)
        extra, new_state = {}, None
        if loss_state is not None and cfg.objective == "bco":
            # TRL: the running mean takes this batch's detached mean reward first, then the loss uses it
            reward = losses.bco_batch_reward(sel_policy_BK, sel_ref_BK, beta=cfg.beta, valid=sel_valid_BK)
            mean, count = losses.running_mean_update(loss_state["bco_delta"], loss_state["bco_count"], reward)
            extra["delta"], new_state = mean, {"bco_delta": mean, "bco_count": count}
        per_example_B, aux = objective(
            sel_policy_BK, sel_ref_BK, beta=cfg.beta, lengths=lengths_BK, valid=sel_valid_BK, **hparams, **extra
        )
        return jnp.sum(per_example_B), (per_example_B, aux, sel_policy_BK, new_state)

    if with_grad and encoded is not None:
        # the gradient through the completions, then through the shared prompt encoding (its vjp)
        (loss_sum, (_, aux, sel_policy_BK, new_loss_state)), (grads, d_encoded) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True)(params, encoded)
        grads = jax.tree.map(jnp.add, grads, encoded_vjp(d_encoded)[0])
    elif with_grad:
        (loss_sum, (_, aux, sel_policy_BK, new_loss_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params)
    else:
        loss_sum, (_, aux, sel_policy_BK, new_loss_state) = loss_fn(params)
        grads = None
    add("loss", loss_sum, b)
    if window is not None and window < t - 1:
        dropped = logprobs.window_overflow(loss_mask_BCT.reshape(b * c, t), window)
        add("logprobs/window_overflow", jnp.sum(dropped), b)
    if prompt_window is not None:
        add("logprobs/prompt_mismatch", jnp.sum(prompt_mismatch(ids_BCT, loss_mask_BCT, valid_BC, prompt_window)), b)
    # The objective's own metrics (TRL names: rewards/chosen, rewards/rejected, rewards/margins,
    # rewards/accuracies, nll, ...) are per-example [B] arrays: summed here, averaged over all examples.
    for name, value_B in aux.items():
        value_B = jnp.asarray(value_B, jnp.float32)
        if value_B.ndim == 1:
            add(name, jnp.sum(value_B), b)
    # Tokens of the examples this micro-batch (all C rows; y0 only for SFT), whatever passes ran.
    tokens = jnp.sum(mask_BCT[:, 0] if cfg.is_sft else mask_BCT)
    if cfg.is_sft:
        add("nll_per_token", -jnp.sum(sel_policy_BK[:, 0]), jnp.sum(loss_mask_BCT[:, 0, 1:]))
        return (grads, sums, jnp.zeros((RANK_BINS,), jnp.float32), tokens, jnp.zeros((b, 0), jnp.int32),
                new_loss_state)

    if ranking:  # held-out metrics over every candidate, comparable across samplers (mcpo_jax/ranking_metrics.py)
        all_BC = jax.lax.stop_gradient(_rows_logps(graphdef, params, rest, ids_BCT, mask_BCT, loss_mask_BCT, chunk,
                                                    window, prompt_window))
        for name, (total, count) in ranking_metrics.sums(all_BC, ref_BC, cfg.beta, valid_BC, mb.get("ranks")).items():
            add(name, total, count)
    neg_valid_BM = _gather_cols(valid_BC, neg_BM)
    if policy_BC is not None:  # the MC weights' entropy; without the policy pass it is not computed
        weights_BC = kernel.weights(
            policy_BC, ref_BC, beta=cfg.beta, valid=valid_BC, include_preferred=cfg.y0_eligible
        )
        entropy_B = -jnp.sum(jnp.where(weights_BC > 0, weights_BC * jnp.log(jnp.maximum(weights_BC, 1e-30)), 0.0),
                             1)
        add("kernel/entropy", jnp.sum(entropy_B), b)
    add("kernel/selected_is_y0", jnp.sum((neg_BM == 0).astype(jnp.float32)), neg_BM.size)
    # A negative without a dataset rank (-1: pairs rows, online rows ranked by their winner only, the injected
    # noise candidate) is counted apart, never as a rank of the histogram.
    ranks_BM = _gather_cols(mb["ranks"], neg_BM) if "ranks" in mb else jnp.full_like(neg_BM, -1)
    ranked_BM = neg_valid_BM & (ranks_BM >= 0)
    add("kernel/rank_unknown", jnp.sum(neg_valid_BM & (ranks_BM < 0)), jnp.sum(neg_valid_BM))
    bins_BM = jnp.clip(ranks_BM, 0, RANK_BINS - 1)
    hist = jnp.sum(jax.nn.one_hot(bins_BM, RANK_BINS) * ranked_BM[..., None], axis=(0, 1))
    return grads, sums, hist, tokens, neg_BM, new_loss_state


def make_train_step(cfg: StepConfig, graphdef, rest, tx: optax.GradientTransformation, schedule=None):
    """The pure step function `(state, ref_params, batch) -> (state, metrics)`.

    `state` = {"params", "opt_state", "step", "rng"} (+ "loss_state" for BCO: `initial_loss_state`, updated
    every micro-batch); batch arrays are [A, b, ...] with A the
    number of accumulated micro-batches; metrics are exact global means over all A * b examples.
    """

    def train_step(state, ref_params, batch):
        batch = dict(batch)
        stop_request = batch.pop("stop_request", None)
        params = state["params"]
        step = state["step"]
        num_micro = jax.tree.leaves(batch)[0].shape[0]
        loss_state = state.get("loss_state")

        def body(carry, xs):
            grad_acc, sums_acc, hist_acc, tok_acc, loss_state = carry
            micro, mb = xs
            grads, sums, hist, tokens, selected_BM, loss_state = _micro_step_with_state(
                cfg, graphdef, rest, params, ref_params, mb, negatives_key(state["rng"], step, micro),
                loss_state=loss_state)
            # float32 accumulation whatever the parameter dtype: bf16 sums of micro-batch gradients lose bits
            grad_acc = jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), grad_acc, grads)
            sums_acc = jax.tree.map(jnp.add, sums_acc, sums)
            return (grad_acc, sums_acc, hist_acc + hist, tok_acc + tokens, loss_state), selected_BM

        first_mb = jax.tree.map(lambda x: x[0], batch)
        if num_micro == 1:
            # No accumulation: no loop and no float32 gradient-sized accumulator (8B: 32 GB) around one call.
            grad_sum, sums, hist, tokens, selected_BM, loss_state = _micro_step_with_state(
                cfg, graphdef, rest, params, ref_params, first_mb, negatives_key(state["rng"], step, 0),
                loss_state=loss_state)
            selected_ABM = selected_BM[None]
        else:
            sums_shape = jax.eval_shape(
                lambda: _micro_step(cfg, graphdef, rest, params, ref_params, first_mb, state["rng"], False)[1]
            )
            init = (
                jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape),
                jnp.zeros((RANK_BINS,), jnp.float32),
                jnp.zeros((), jnp.int32),
                loss_state,
            )
            (grad_sum, sums, hist, tokens, loss_state), selected_ABM = jax.lax.scan(
                body, init, (jnp.arange(num_micro, dtype=jnp.int32), batch)
            )
        num_examples = sums["loss"][1]
        grads = jax.tree.map(lambda g, p: (g.astype(jnp.float32) / num_examples).astype(p.dtype), grad_sum, params)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {name: total / jnp.maximum(count, 1.0) for name, (total, count) in sums.items()}
        metrics["grad_norm"] = grad_norm
        metrics["examples"] = num_examples
        metrics["tokens"] = tokens.astype(jnp.float32)
        metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(step), jnp.float32)
        if stop_request is not None:  # any process asked to stop (a max over the batch, so over all processes)
            metrics["stop_request"] = jnp.max(stop_request).astype(jnp.float32)
        if not cfg.is_sft:
            metrics["kernel/rank_hist"] = hist
            metrics["selected"] = selected_ABM  # [A, b, M] column indices of the negatives
        new_state = dict(state, params=new_params, opt_state=opt_state, step=step + 1)
        if loss_state is not None:
            new_state["loss_state"] = loss_state
        return new_state, metrics

    return train_step


def make_eval_step(cfg: StepConfig, graphdef, rest):
    """Metric (sum, count) pairs of one batch without an update (held-out split). `rng` is the kernel's key
    for the negatives, given by the caller (the trainer passes a fixed key, so every evaluation draws alike)."""

    def eval_step(params, ref_params, rng, batch):
        _, sums, _, _, _ = _micro_step(cfg, graphdef, rest, params, ref_params, batch, rng, with_grad=False,
                                       ranking=True)
        return sums

    return eval_step


def make_optimizer(
    *,
    learning_rate: float,
    total_steps: int,
    warmup_ratio: float = 0.1,
    decay: str = "linear",
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    max_grad_norm: float | None = 1.0,
):
    """AdamW with linear warmup then linear / cosine / constant decay, after global-norm clipping."""
    total_steps = max(int(total_steps), 1)
    warmup = int(round(warmup_ratio * total_steps))
    decay_steps = max(total_steps - warmup, 1)
    if decay == "linear":
        after = optax.linear_schedule(learning_rate, 0.0, decay_steps)
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(learning_rate, decay_steps)
    elif decay == "constant":
        after = optax.constant_schedule(learning_rate)
    else:
        raise ValueError(f"optimizer.decay must be linear, cosine or constant, got {decay!r}")
    if warmup:
        schedule = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup), after], [warmup])
    else:
        schedule = after
    parts = []
    if max_grad_norm:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts), schedule


def step_config_from(config) -> StepConfig:
    """StepConfig from the validated trainer config (training/config.py owns every default)."""
    from mcpo_jax.training.config import kernel_includes_preferred, negative_fixed_per_prompt

    reference = "none" if config.objective in losses.REFERENCE_FREE else config.reference
    return StepConfig(
        objective=config.objective,
        # a random negative drawn once per prompt is in the data's `fixed_index` (training/build.py draws it)
        sampler="fixed" if negative_fixed_per_prompt(config) else config.sampler,
        num_negatives=int(config.num_negatives),
        beta=float(config.beta),
        include_preferred=kernel_includes_preferred(config),
        reference=reference,
        loss_hparams=tuple(sorted(config.loss_hparams.to_dict().items())),
        logprob_chunk_size=int(config.logprob_chunk_size),
        # the tokenizer cuts every completion to max_completion_length: the LM head runs on those positions only
        completion_window=int(config.data.max_completion_length),
        # every row of an example holds the same prompt, cut to max_prompt_length: encoded once per example
        prompt_window=int(config.data.max_prompt_length) if config.share_prompt else None,
        reuse_prompt_encoding=bool(config.reuse_prompt_encoding),
    )
