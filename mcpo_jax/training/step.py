"""The jitted train step: all-candidate log-probs, MC kernel, gradient through y0 + M negatives.

    batch (micro-batches [A, b, ...])
      for each micro-batch (lax.scan, gradient accumulation):
        1. log-probs of all C = 1 + L rows under the policy and the reference, no gradient
           (or the reference column `ref_logps` precomputed by the trainer); the policy's only where the
           kernel reads them: not at all for `fixed` / `random` or M = L, not y0 unless it can be picked
        2. kernel.select_negatives(fold_in(fold_in(base_key, step), micro), ...) -> [b, M]
        3. gather y0 + the M selected rows; value_and_grad of the objective on those rows only
      4. optax update with the exact global mean gradient; metrics as (sum, count) -> means

Which passes run, over how many rows, in which shared-prompt windows, is decided once per step from the
`StepConfig` and the batch shapes (`PassPlan`); every micro-batch runs that plan and the audit credits it.

Everything is one `jax.jit` with explicit shardings (`training.program.TrainProgram`); no host round
trips. The step knows nothing of configs files or data readers: it takes a `StepConfig`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, NamedTuple

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

    def pass_plan(self, columns: int, length: int, *, rope_type: str, trains: bool = True) -> PassPlan:
        """The model passes of a micro-batch of `columns` candidates of `length` tokens (`PassPlan`).
        `rope_type`: the model's (`ModelConfig.rope_type`); `trains`: the selected rows' pass takes a gradient."""
        window = self.completion_window
        prompt_window = self.prompt_window if window is not None else None
        policy_rows = 0
        if self.selection_reads_policy(columns):
            # y0 can never be a negative: the kernel reads no value of its column
            policy_rows = columns - 1 if self.prune_passes and not self.y0_eligible else columns
        trained_rows = 1 if self.is_sft else 1 + self.num_negatives
        windows = lambda rows: logprobs.shared_prompt_windows(prompt_window, window, rows, length) if rows else None
        policy_windows, trained_windows = windows(policy_rows), windows(trained_rows)
        return PassPlan(
            columns=columns, length=length, completion_window=window, prompt_window=prompt_window, trains=trains,
            policy_rows=policy_rows, reference_rows=columns if self.reference == "online" and not self.is_sft else 0,
            trained_rows=trained_rows, policy_windows=policy_windows, trained_windows=trained_windows,
            all_rows_windows=windows(columns),
            reuses_prompt_encoding=(self.reuse_prompt_encoding and trains and rope_type != "dynamic"
                                    and policy_windows is not None and policy_windows == trained_windows),
        )


@dataclasses.dataclass(frozen=True)
class PassPlan:
    """The model passes of one micro-batch, decided once per step from the `StepConfig` and the batch shapes
    (`StepConfig.pass_plan`): the step runs these passes and the audit credits them (`audit.executed_work`).

    Rows are per example; 0: the pass does not run. Windows are the (P, W) prompt and completion positions of the
    shared-prompt layout for a pass of that many rows (`logprobs.shared_prompt_windows`), or None: the pass
    encodes its rows whole (no shared prompt, or a layout that would not run fewer tokens)."""

    columns: int  # C = 1 + L candidates per example
    length: int  # T tokens per row
    completion_window: int | None  # LM-head positions per row (None: every position)
    prompt_window: int | None  # the shared prompt's positions (None: every row encoded whole)
    trains: bool  # the selected rows' pass takes a gradient (False: the held-out evaluation)
    # The policy without gradient: C; C - 1 when y0 can never be a negative (its column is not run); 0 when the
    # selection does not read the policy (`StepConfig.selection_reads_policy`)
    policy_rows: int
    reference_rows: int  # the online reference without gradient: C; 0 for a precomputed or no reference, SFT
    trained_rows: int  # the objective's rows: y0 and the M negatives (y0 alone for SFT)
    policy_windows: tuple[int, int] | None
    trained_windows: tuple[int, int] | None
    all_rows_windows: tuple[int, int] | None  # a pass over all C rows: the reference, the held-out ranking
    # The policy's prompt encoded once (`jax.vjp`) for its no-gradient and its gradient pass: both passes in the
    # shared layout with the same windows. Not with dynamic NTK RoPE, whose angles depend on each pass's rows.
    reuses_prompt_encoding: bool

    @property
    def policy_skips_y0(self) -> bool:
        return 0 < self.policy_rows == self.columns - 1

    @property
    def reference_windows(self) -> tuple[int, int] | None:
        return self.all_rows_windows if self.reference_rows else None

    def rows(self) -> dict[str, int]:
        """Rows per example of each pass, as the audit names them."""
        return {"policy_no_grad": self.policy_rows, "reference_no_grad": self.reference_rows,
                "trained": self.trained_rows}


def model_rope_type(graphdef, params, rest) -> str:
    """The model's RoPE type (`ModelConfig.rope_type`); "default" for a model without a config (the tests' toy LMs)."""
    return getattr(getattr(nnx.merge(graphdef, params, rest), "config", None), "rope_type", "default")


def micro_batch_plan(cfg: StepConfig, graphdef, params, rest, batch, *, trains: bool = True) -> PassPlan:
    """The `PassPlan` of every micro-batch of `batch` (input ids [..., C, T]) under this model."""
    columns, length = batch["input_ids"].shape[-2:]
    return cfg.pass_plan(columns, length, rope_type=model_rope_type(graphdef, params, rest), trains=trains)


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


def prompt_kv_states(graphdef, params, rest, ids_BKT, loss_mask_BKT, *, prompt_len: int):
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
    already encoded by `prompt_kv_states` with these parameters (then only the completions run here)."""
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


def _pass_logps(graphdef, params, rest, ids_BKT, mask_BKT, loss_mask_BKT, windows, *, chunk_size,
                completion_window, encoded=None):
    """[B, K] log-probs of one pass: in the shared-prompt layout when `windows` (P, W) is given (the prompts
    already `encoded` by `prompt_kv_states` or not), else every row whole."""
    if windows is not None:
        return shared_prompt_logps(graphdef, params, rest, ids_BKT, loss_mask_BKT, prompt_len=windows[0],
                                   window=windows[1], chunk_size=chunk_size, encoded=encoded)
    b, k, t = ids_BKT.shape
    flat = lambda x: x.reshape(b * k, t)
    logps_N = forward_logps(
        graphdef, params, rest, flat(ids_BKT), flat(mask_BKT), flat(loss_mask_BKT), chunk_size=chunk_size,
        window=completion_window,
    )
    return logps_N.reshape(b, k)


def _rows_logps(graphdef, params, rest, ids_BKT, mask_BKT, loss_mask_BKT, chunk_size, window=None,
                prompt_window=None):
    """[B, K] log-probs of these rows as the step's pass over them runs (the reference cache's entry)."""
    shared = logprobs.shared_prompt_windows(prompt_window, window, *ids_BKT.shape[1:])
    return _pass_logps(graphdef, params, rest, ids_BKT, mask_BKT, loss_mask_BKT, shared, chunk_size=chunk_size,
                       completion_window=window)


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


class MicroBatchResult(NamedTuple):
    """What one micro-batch adds to the step."""

    grads: Any  # the gradient summed over the micro-batch's examples (None when the plan does not train)
    sums: dict[str, tuple[jax.Array, jax.Array]]  # metric (sum, count) pairs
    rank_hist: jax.Array  # [RANK_BINS] dataset ranks of the selected negatives
    tokens: jax.Array  # the examples' tokens (all C rows; y0 only for SFT), whatever passes ran
    negatives_BM: jax.Array  # the selected columns [b, M] ([b, 0] for SFT)
    loss_state: Any  # the objective's updated state (None when it keeps none)


class _Passes(NamedTuple):
    """The model and how its log-probs are taken: what every pass of a micro-batch shares."""

    graphdef: Any
    rest: Any
    chunk_size: int
    completion_window: int | None

    def logps(self, params, ids_BKT, mask_BKT, loss_mask_BKT, windows, encoded=None):
        return _pass_logps(self.graphdef, params, self.rest, ids_BKT, mask_BKT, loss_mask_BKT, windows,
                           chunk_size=self.chunk_size, completion_window=self.completion_window, encoded=encoded)

    def prompt_kv_states(self, params, ids_BCT, loss_mask_BCT, windows):
        return prompt_kv_states(self.graphdef, params, self.rest, ids_BCT, loss_mask_BCT, prompt_len=windows[0])


class _Selection(NamedTuple):
    """y0 and the selected negatives: the objective's rows [b, K = 1 + M]."""

    negatives_BM: jax.Array | None  # None for SFT
    ids_BKT: jax.Array
    mask_BKT: jax.Array
    loss_mask_BKT: jax.Array
    valid_BK: jax.Array
    lengths_BK: jax.Array  # completion tokens per row
    ref_BK: jax.Array | None


class _Objective(NamedTuple):
    loss_sum: jax.Array
    aux: dict[str, jax.Array]  # the objective's per-example metrics
    policy_BK: jax.Array  # the selected rows' policy log-probs
    loss_state: Any
    grads: Any  # None when the plan does not train


def _shared_prompt_encoding(plan: PassPlan, passes: _Passes, params, mb):
    """0. The policy's prompts encoded once for its no-gradient and gradient passes, with the encoding's vjp
    (`plan.reuses_prompt_encoding`), else (None, None)."""
    if not plan.reuses_prompt_encoding:
        return None, None
    return jax.vjp(lambda p: passes.prompt_kv_states(p, mb["input_ids"], mb["loss_mask"], plan.policy_windows),
                   params)


def _no_grad_logps(cfg: StepConfig, plan: PassPlan, passes: _Passes, params, ref_params, mb, encoded):
    """1. The log-probs [b, C] of every candidate the kernel reads: the policy's (None when the selection does
    not read it) and the reference's (None without one; SFT needs neither)."""
    ids_BCT, mask_BCT, loss_mask_BCT = mb["input_ids"], mb["attention_mask"], mb["loss_mask"]
    policy_BC = ref_BC = None
    if plan.policy_rows:
        enc = None if encoded is None else jax.lax.stop_gradient(encoded)
        if plan.policy_skips_y0:
            # y0 is never a negative: its column is masked out of the kernel's weights (any finite value).
            rest_BL = passes.logps(params, ids_BCT[:, 1:], mask_BCT[:, 1:], loss_mask_BCT[:, 1:], plan.policy_windows,
                                   enc)
            policy_BC = jnp.concatenate([jnp.zeros_like(rest_BL[:, :1]), rest_BL], axis=1)
        else:
            policy_BC = passes.logps(params, ids_BCT, mask_BCT, loss_mask_BCT, plan.policy_windows, enc)
        policy_BC = jax.lax.stop_gradient(policy_BC)
    if plan.reference_rows and plan.reuses_prompt_encoding:
        # the policy's passes' arithmetic (prompt, then completions), so that policy = reference (the first
        # step) gives rewards of rounding size only, not two different fusions of the same sums
        ref_enc = passes.prompt_kv_states(ref_params, ids_BCT, loss_mask_BCT, plan.reference_windows)
        ref_BC = jax.lax.stop_gradient(passes.logps(ref_params, ids_BCT, mask_BCT, loss_mask_BCT,
                                                    plan.reference_windows, ref_enc))
    elif plan.reference_rows:
        ref_BC = jax.lax.stop_gradient(passes.logps(ref_params, ids_BCT, mask_BCT, loss_mask_BCT,
                                                    plan.reference_windows))
    elif cfg.reference == "precomputed" and not cfg.is_sft:
        ref_BC = mb["ref_logps"].astype(jnp.float32)
    return policy_BC, ref_BC


def _select(cfg: StepConfig, key, mb, policy_BC, ref_BC) -> _Selection:
    """2. The MC kernel (or max / min / random / fixed) picks the negatives; their rows and y0's are gathered."""
    valid_BC = mb["valid"].astype(bool)
    cols_BK, neg_BM = select_columns(cfg, key, policy_BC, ref_BC, valid_BC, mb.get("fixed_index"))
    take = lambda x: _gather_cols(x, cols_BK)
    ids_BKT, mask_BKT, loss_mask_BKT = take(mb["input_ids"]), take(mb["attention_mask"]), take(mb["loss_mask"])
    valid_BK = take(valid_BC)
    lengths_BK = jnp.sum(loss_mask_BKT[..., 1:], axis=-1).astype(jnp.float32)
    return _Selection(neg_BM, ids_BKT, mask_BKT, loss_mask_BKT, valid_BK, lengths_BK,
                      None if ref_BC is None else take(ref_BC))


def _loss_and_grad(cfg: StepConfig, plan: PassPlan, passes: _Passes, params, sel: _Selection, loss_state,
                   encoded, encoded_vjp) -> _Objective:
    """3. The objective on the selected rows, and its gradient through them only when the plan trains."""
    objective = losses.get(cfg.objective)
    hparams = dict(cfg.loss_hparams)

    def loss_fn(p, enc=None):
        policy_BK = passes.logps(p, sel.ids_BKT, sel.mask_BKT, sel.loss_mask_BKT, plan.trained_windows, enc)
        extra, new_state = {}, None
        if loss_state is not None and cfg.objective == "bco":
            # TRL: the running mean takes this batch's detached mean reward first, then the loss uses it
            reward = losses.bco_batch_reward(policy_BK, sel.ref_BK, beta=cfg.beta, valid=sel.valid_BK)
            mean, count = losses.running_mean_update(loss_state["bco_delta"], loss_state["bco_count"], reward)
            extra["delta"], new_state = mean, {"bco_delta": mean, "bco_count": count}
        per_example_B, aux = objective(
            policy_BK, sel.ref_BK, beta=cfg.beta, lengths=sel.lengths_BK, valid=sel.valid_BK, **hparams, **extra
        )
        return jnp.sum(per_example_B), (aux, policy_BK, new_state)

    if plan.trains and encoded is not None:
        # the gradient through the completions, then through the shared prompt encoding (its vjp)
        (loss_sum, (aux, policy_BK, new_state)), (grads, d_encoded) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True)(params, encoded)
        grads = jax.tree.map(jnp.add, grads, encoded_vjp(d_encoded)[0])
    elif plan.trains:
        (loss_sum, (aux, policy_BK, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    else:
        loss_sum, (aux, policy_BK, new_state) = loss_fn(params)
        grads = None
    return _Objective(loss_sum, aux, policy_BK, new_state, grads)


def _metrics(cfg: StepConfig, plan: PassPlan, passes: _Passes, params, mb, policy_BC, ref_BC, sel: _Selection,
             obj: _Objective, ranking: bool):
    """4. The metric (sum, count) pairs, the rank histogram [RANK_BINS] and the token count of a micro-batch;
    `ranking`: also the held-out metrics over every candidate (one more policy pass)."""
    ids_BCT, mask_BCT, loss_mask_BCT = mb["input_ids"], mb["attention_mask"], mb["loss_mask"]
    valid_BC = mb["valid"].astype(bool)
    b, c, t = ids_BCT.shape
    sums: dict[str, tuple[jax.Array, jax.Array]] = {}

    def add(name, total, count):
        sums[name] = (jnp.asarray(total, jnp.float32), jnp.asarray(count, jnp.float32))

    add("loss", obj.loss_sum, b)
    if plan.completion_window is not None and plan.completion_window < t - 1:
        dropped = logprobs.window_overflow(loss_mask_BCT.reshape(b * c, t), plan.completion_window)
        add("logprobs/window_overflow", jnp.sum(dropped), b)
    if plan.prompt_window is not None:
        add("logprobs/prompt_mismatch", jnp.sum(prompt_mismatch(ids_BCT, loss_mask_BCT, valid_BC, plan.prompt_window)),
            b)
    # The objective's own metrics (TRL names: rewards/chosen, rewards/rejected, rewards/margins,
    # rewards/accuracies, nll, ...) are per-example [B] arrays: summed here, averaged over all examples.
    for name, value_B in obj.aux.items():
        value_B = jnp.asarray(value_B, jnp.float32)
        if value_B.ndim == 1:
            add(name, jnp.sum(value_B), b)
    # Tokens of the examples this micro-batch (all C rows; y0 only for SFT), whatever passes ran.
    tokens = jnp.sum(mask_BCT[:, 0] if cfg.is_sft else mask_BCT)
    if cfg.is_sft:
        add("nll_per_token", -jnp.sum(obj.policy_BK[:, 0]), jnp.sum(loss_mask_BCT[:, 0, 1:]))
        return sums, jnp.zeros((RANK_BINS,), jnp.float32), tokens

    if ranking:  # held-out metrics over every candidate, comparable across samplers (mcpo_jax/ranking_metrics.py)
        all_BC = jax.lax.stop_gradient(passes.logps(params, ids_BCT, mask_BCT, loss_mask_BCT, plan.all_rows_windows))
        for name, (total, count) in ranking_metrics.sums(all_BC, ref_BC, cfg.beta, valid_BC, mb.get("ranks")).items():
            add(name, total, count)
    neg_BM = sel.negatives_BM
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
    return sums, hist, tokens


def micro_batch_grads_and_metrics(cfg: StepConfig, plan: PassPlan, graphdef, rest, params, ref_params, mb, key, *,
                                  loss_state=None, ranking=False) -> MicroBatchResult:
    """One micro-batch [b, C, T] through the passes of `plan` (`micro_batch_plan`): the gradient sum (when the
    plan trains), the metric (sum, count) pairs and the negatives. `loss_state`: the objective's state across
    steps (`initial_loss_state`; None: the objective keeps none); `ranking`: also the held-out metrics over every
    candidate (mcpo_jax/ranking_metrics.py)."""
    passes = _Passes(graphdef, rest, cfg.logprob_chunk_size, plan.completion_window)
    encoded, encoded_vjp = _shared_prompt_encoding(plan, passes, params, mb)
    policy_BC, ref_BC = _no_grad_logps(cfg, plan, passes, params, ref_params, mb, encoded)
    sel = _select(cfg, key, mb, policy_BC, ref_BC)
    obj = _loss_and_grad(cfg, plan, passes, params, sel, loss_state, encoded, encoded_vjp)
    sums, hist, tokens = _metrics(cfg, plan, passes, params, mb, policy_BC, ref_BC, sel, obj, ranking)
    neg_BM = sel.negatives_BM if sel.negatives_BM is not None else jnp.zeros((mb["valid"].shape[0], 0), jnp.int32)
    return MicroBatchResult(obj.grads, sums, hist, tokens, neg_BM, obj.loss_state)


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
        plan = micro_batch_plan(cfg, graphdef, params, rest, batch)  # one plan for every micro-batch

        def micro_batch(mb, micro, loss_state):
            return micro_batch_grads_and_metrics(cfg, plan, graphdef, rest, params, ref_params, mb,
                                                 negatives_key(state["rng"], step, micro), loss_state=loss_state)

        def body(carry, xs):
            grad_acc, sums_acc, hist_acc, tok_acc, loss_state = carry
            micro, mb = xs
            out = micro_batch(mb, micro, loss_state)
            # float32 accumulation whatever the parameter dtype: bf16 sums of micro-batch gradients lose bits
            grad_acc = jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), grad_acc, out.grads)
            sums_acc = jax.tree.map(jnp.add, sums_acc, out.sums)
            carry = (grad_acc, sums_acc, hist_acc + out.rank_hist, tok_acc + out.tokens, out.loss_state)
            return carry, out.negatives_BM

        first_mb = jax.tree.map(lambda x: x[0], batch)
        if num_micro == 1:
            # No accumulation: no loop and no float32 gradient-sized accumulator (8B: 32 GB) around one call.
            out = micro_batch(first_mb, 0, state.get("loss_state"))
            grad_sum, sums, hist, tokens, loss_state = out.grads, out.sums, out.rank_hist, out.tokens, out.loss_state
            selected_ABM = out.negatives_BM[None]
        else:
            sums_shape = jax.eval_shape(lambda: micro_batch(first_mb, 0, state.get("loss_state")).sums)
            init = (
                jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape),
                jnp.zeros((RANK_BINS,), jnp.float32),
                jnp.zeros((), jnp.int32),
                state.get("loss_state"),
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
        plan = micro_batch_plan(cfg, graphdef, params, rest, batch, trains=False)
        return micro_batch_grads_and_metrics(cfg, plan, graphdef, rest, params, ref_params, batch, rng,
                                             ranking=True).sums

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
