"""Preference objectives as pure functions on per-sequence log-probs.

Every objective has the signature

    fn(policy_logps_BC, ref_logps_BC, *, beta, lengths=None, valid=None, **hparams)
        -> (loss_B, metrics: dict[str, [B] array])

* ``policy_logps_BC`` / ``ref_logps_BC``: [B, 1+K] log-probs summed over completion tokens; column 0 is the
  preferred y0, columns 1..K the negatives in use. ``ref_logps_BC`` is ignored (may be ``None``) for the
  reference-free objectives in ``REFERENCE_FREE``.
* ``lengths``: [B, 1+K] completion token counts. Required by the objectives in ``NEEDS_LENGTHS`` (those
  that use length-averaged log-probs or a per-token NLL term).
* ``valid``: [B, 1+K] bool, False marks padding negatives (prompts with fewer candidates). Column 0 is
  always treated as valid. Values in invalid columns are never read (NaN / -inf there is harmless).
  Pairwise objectives give a row whose negative (column 1) is invalid a loss of exactly 0.
* hparams are keyword arguments specific to each objective (``DEFAULTS[name]`` lists them with the
  paper's values, Appendix B.2); an unknown keyword is a ``TypeError``.

Notation below: r_i = log pi(y_i) - log pi_ref(y_i) (the implicit reward before beta),
z = r_0 - r_1 (TRL's ``logits``), s_i = log pi(y_i) / |y_i| (length-averaged), eps = label_smoothing,
NLL = -log pi(y0) / |y0| (per-token mean cross-entropy of y0), sg = stop_gradient.

The paper ran its baselines through TRL (Appendix B.2, Table 5). The formulas here follow TRL's
implementation as of early 2025 (TRL 0.13 - 0.15: ``DPOTrainer.dpo_loss``, ``CPOTrainer.cpo_loss``,
``KTOTrainer.kto_loss``, ``BCOTrainer.bco_loss``); each docstring says where the paper's Table 5 writes
something else.

Provenance: every baseline was checked line by line against TRL's own source as released on PyPI (the
ordinary ``pip download trl==X`` wheels, whose files are the tagged source): 0.12.2 (Dec 2024), 0.13.0
(16 Dec 2024), 0.14.0 (29 Jan 2025, wheel sha256 2407df4ea0e9...), 0.15.2 (Feb 2025) and 0.16.0
(Mar 2025). ``dpo_loss``, ``cpo_loss`` and ``kto_loss`` are formula-identical in all five (0.12.2 lacks
only ``discopop``, unused here); the stored GitHub index held just one pre-2024 version of
huggingface/trl's dpo_trainer.py, so no git commit is cited (wheels carry none). "TRL @ v0.14.0" in a
docstring below means that release's file, with the same text in 0.13.0 and 0.15.2. Metrics follow TRL's names: ``rewards/chosen`` (reward of y0), ``rewards/rejected`` (mean
reward of the valid negatives), ``rewards/margins`` (their difference) and ``rewards/accuracies`` (1 if
y0's reward exceeds every valid negative's), computed from the same log-probs the loss uses, plus a few
objective-specific terms (``nll``, ``kl``, ``delta``).

Your own objective: ``register(name, fn, pairwise=..., reference_free=..., needs_lengths=..., defaults=...)``
adds it under ``name`` (then ``get(name)``, the trainer's ``config.objective = name`` and ``names()`` know it);
see `register`.

All objectives are jit / grad / vmap compatible and stay finite (loss and gradient) for log-prob gaps of
+-1e4: they are written with log-sigmoid, sigmoid and a masked log-sum-exp, never exp of a raw reward.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Objective = Callable[..., tuple[Array, dict[str, Array]]]

# Appendix B.2: beta = 0.01 everywhere, lambda = 0.1 for the supervised (NLL) term, gamma = 10 for SimPO.
DEFAULT_BETA = 0.01
DEFAULT_LAMBDA = 0.1
DEFAULT_GAMMA = 10.0

_OBJECTIVES: dict[str, Objective] = {}
NAMES: tuple[str, ...] = ()
REFERENCE_FREE = frozenset({"simpo", "cpo", "sft"})
MULTI_NEGATIVE = frozenset({"mcpo", "rnce"})
# sft is in neither PAIRWISE nor MULTI_NEGATIVE: it reads column 0 only and accepts any K >= 0.
PAIRWISE = frozenset(
    {"dpo", "ipo", "hinge", "robust", "rpo", "exo", "simpo", "cpo", "bco", "kto", "apo_zero", "apo_down",
     "sppo", "nca"}
)
NEEDS_LENGTHS = frozenset({"ipo", "rpo", "simpo", "cpo", "sft"})

DEFAULTS: dict[str, dict[str, float]] = {
    "mcpo": {"beta": DEFAULT_BETA},
    "rnce": {"beta": DEFAULT_BETA},
    "dpo": {"beta": DEFAULT_BETA, "label_smoothing": 0.0},
    "ipo": {"beta": DEFAULT_BETA},
    "hinge": {"beta": DEFAULT_BETA},
    "robust": {"beta": DEFAULT_BETA, "label_smoothing": 0.0},
    "rpo": {"beta": DEFAULT_BETA, "lam": DEFAULT_LAMBDA, "label_smoothing": 0.0},
    "exo": {"beta": DEFAULT_BETA, "label_smoothing": 0.0},
    "simpo": {"beta": DEFAULT_BETA, "gamma": DEFAULT_GAMMA, "lam": 0.0, "label_smoothing": 0.0},
    "cpo": {"beta": DEFAULT_BETA, "lam": DEFAULT_LAMBDA, "label_smoothing": 0.0},
    "bco": {"beta": DEFAULT_BETA},
    "kto": {"beta": DEFAULT_BETA, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    "apo_zero": {"beta": DEFAULT_BETA},
    "apo_down": {"beta": DEFAULT_BETA},
    "sppo": {"beta": DEFAULT_BETA},
    "nca": {"beta": DEFAULT_BETA},
    "sft": {"beta": DEFAULT_BETA},
}


def get(name: str) -> Objective:
    """The objective called ``name``; ValueError naming the known ones otherwise."""
    try:
        return _OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; known objectives: {', '.join(names())}") from None


def is_pairwise(name: str) -> bool:
    """Whether ``name`` reads exactly one negative (y0 vs y1)."""
    return name in PAIRWISE


# ----------------------------------------------------------------------------------------------------------
# Shared plumbing


class _Inputs:
    """Sanitized inputs: invalid columns replaced by harmless values so no NaN/inf reaches a gradient."""

    def __init__(self, name, policy_logps, ref_logps, lengths, valid, *, uses_ref, uses_lengths, pairwise):
        policy = jnp.asarray(policy_logps)
        if policy.ndim != 2:
            raise ValueError(f"objective {name!r}: policy_logps must be [B, 1+K], got shape {policy.shape}")
        b, c = policy.shape
        if pairwise and c != 2:
            raise ValueError(
                f"objective {name!r} is pairwise: it needs exactly one negative (arrays [B, 2]), got K={c - 1} "
                f"negatives (shape {policy.shape}); multi-negative objectives: {sorted(MULTI_NEGATIVE)}"
            )
        dtype = jnp.result_type(policy.dtype, jnp.float32)
        if valid is None:
            valid = jnp.ones((b, c), bool)
        else:
            valid = jnp.asarray(valid).astype(bool)
            if valid.shape != (b, c):
                raise ValueError(f"objective {name!r}: valid has shape {valid.shape}, expected {(b, c)}")
            valid = valid.at[:, 0].set(True)
        self.valid = valid
        self.policy = jnp.where(valid, policy.astype(dtype), 0.0)
        if uses_ref:
            if ref_logps is None:
                raise ValueError(
                    f"objective {name!r} needs ref_logps (reference-free objectives: {sorted(REFERENCE_FREE)})"
                )
            ref = jnp.asarray(ref_logps)
            if ref.shape != (b, c):
                raise ValueError(f"objective {name!r}: ref_logps has shape {ref.shape}, expected {(b, c)}")
            self.ref = jnp.where(valid, ref.astype(dtype), 0.0)
        else:
            self.ref = None
        if uses_lengths:
            if lengths is None:
                raise ValueError(f"objective {name!r} needs lengths (completion token counts, [B, 1+K])")
            lengths = jnp.asarray(lengths)
            if lengths.shape != (b, c):
                raise ValueError(f"objective {name!r}: lengths has shape {lengths.shape}, expected {(b, c)}")
            self.lengths = jnp.where(valid, jnp.maximum(lengths.astype(dtype), 1.0), 1.0)
        else:
            self.lengths = None
        self.dtype = dtype
        # Rows with a usable pair (pairwise objectives zero the others).
        self.has_negative = valid[:, 1] if c > 1 else jnp.zeros((b,), bool)

    @property
    def logratios(self):
        return self.policy - self.ref

    def nll_y0(self):
        """Per-example mean NLL of y0: -log pi(y0) / |y0| (used by ``sft``)."""
        return -self.policy[:, 0] / self.lengths[:, 0]

    def nll_term(self, reduction):
        """The supervised term of RPO / CPO / CPO-SimPO, per example, in TRL's batch reduction.

        ``reduction="token"`` (TRL): TRL adds one scalar, the cross-entropy averaged over *all* chosen
        completion tokens of the batch, sum_b -log pi(y0_b) / sum_b |y0_b|. Here row b gets
        -log pi(y0_b) / mean_b' |y0_b'| (the mean over the rows with a valid pair), so the mean of the
        per-example terms over those rows is exactly TRL's token mean (longer completions weigh more).
        ``reduction="example"``: -log pi(y0_b) / |y0_b|, each example's own token mean (a batch mean
        that weighs examples equally; not TRL's).
        """
        if reduction == "example":
            return self.nll_y0()
        if reduction != "token":
            raise ValueError(f"nll_reduction must be 'token' (TRL) or 'example', got {reduction!r}")
        rows = self.has_negative
        count = jnp.sum(rows)
        tokens = jnp.sum(jnp.where(rows, self.lengths[:, 0], 0.0))
        mean_len = jax.lax.stop_gradient(jnp.where(count > 0, tokens / jnp.maximum(count, 1), 1.0))
        return -self.policy[:, 0] / mean_len


def _reward_metrics(rewards_BC: Array, valid_BC: Array) -> dict[str, Array]:
    rewards_BC = jax.lax.stop_gradient(rewards_BC)
    chosen_B = rewards_BC[:, 0]
    neg_valid = valid_BC[:, 1:]
    count_B = jnp.sum(neg_valid, axis=1)
    rejected_B = jnp.sum(jnp.where(neg_valid, rewards_BC[:, 1:], 0.0), axis=1) / jnp.maximum(count_B, 1)
    beats_all_B = jnp.all(jnp.where(neg_valid, chosen_B[:, None] > rewards_BC[:, 1:], True), axis=1)
    return {
        "rewards/chosen": chosen_B,
        "rewards/rejected": rejected_B,
        "rewards/margins": chosen_B - rejected_B,
        "rewards/accuracies": beats_all_B.astype(rewards_BC.dtype),
    }


def _smoothed_sigmoid_loss(logits_B: Array, label_smoothing) -> Array:
    """-(1 - eps) log sigma(x) - eps log sigma(-x) (DPO sigmoid / cDPO; CPO; SimPO)."""
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits_B) - label_smoothing * jax.nn.log_sigmoid(-logits_B)


def _pair_mean(x_B2: Array, has_negative_B: Array) -> Array:
    """Mean over rows with a valid pair of the mean of their two entries; 0 if there is none."""
    total = jnp.sum(jnp.where(has_negative_B, x_B2[:, 0] + x_B2[:, 1], 0.0))
    return total / jnp.maximum(2.0 * jnp.sum(has_negative_B), 1.0)


def _register(name: str, *, uses_ref: bool, uses_lengths: bool, pairwise: bool):
    """Wraps `body(inputs, beta, **hparams) -> (loss_B, metrics)` into the public signature."""

    return lambda body: _objective(name, body, uses_ref=uses_ref, uses_lengths=uses_lengths, pairwise=pairwise)


def _objective(name: str, body, *, uses_ref: bool, uses_lengths: bool | None, pairwise: bool):
    """The public objective around `body(inputs, beta, **hparams) -> (loss_B, metrics)`, registered under `name`
    (built-in and user objectives alike). `uses_lengths=None`: lengths are used when they are passed."""

    def objective(policy_logps, ref_logps=None, *, beta, lengths=None, valid=None, **hparams):
        inputs = _Inputs(name, policy_logps, ref_logps, lengths, valid, uses_ref=uses_ref,
                         uses_lengths=lengths is not None if uses_lengths is None else uses_lengths,
                         pairwise=pairwise)
        loss_B, metrics = body(inputs, beta, **hparams)
        if pairwise:
            loss_B = jnp.where(inputs.has_negative, loss_B, 0.0)
        return loss_B, metrics

    objective.__name__ = objective.__qualname__ = name
    objective.__doc__ = body.__doc__
    _OBJECTIVES[name] = objective
    return objective


# ----------------------------------------------------------------------------------------------------------
# MC-PO / RNCE


def _mcpo(x: _Inputs, beta):
    """MC-PO / RNCE (paper Eq. 7):  -beta r_0 + log sum_{i in {0..K}, valid} exp(beta r_i).

    MC-PO and RNCE are the same objective; they differ only in how the negatives were chosen (the MC kernel's
    reward-proportional sampling vs uniform sampling), which is ``mcpo_jax.kernel``'s job. With K = 1 it
    equals DPO (Proposition 2.1). Matches Table 5. Invalid columns are left out of the sum; a row whose
    negatives are all invalid has loss 0. The log-sum-exp is taken over beta (r_i - r_0), shifted by its
    (stop-gradient) maximum, so gaps of +-1e4 stay finite.
    """
    rewards = beta * x.logratios
    diff = jnp.where(x.valid, rewards - rewards[:, :1], 0.0)
    shift = jax.lax.stop_gradient(jnp.max(jnp.where(x.valid, diff, -jnp.inf), axis=1, keepdims=True))
    total = jnp.sum(jnp.where(x.valid, jnp.exp(diff - shift), 0.0), axis=1)
    loss = shift[:, 0] + jnp.log(total)
    return loss, _reward_metrics(rewards, x.valid)


mcpo = _register("mcpo", uses_ref=True, uses_lengths=False, pairwise=False)(_mcpo)
rnce = _register("rnce", uses_ref=True, uses_lengths=False, pairwise=False)(_mcpo)


# ----------------------------------------------------------------------------------------------------------
# DPOTrainer losses (TRL dpo_trainer.py `dpo_loss`)


@_register("dpo", uses_ref=True, uses_lengths=False, pairwise=True)
def dpo(x: _Inputs, beta, *, label_smoothing=0.0):
    """DPO (TRL loss_type="sigmoid"; cDPO with label_smoothing):
    -(1 - eps) log sigma(beta z) - eps log sigma(-beta z).  Matches Table 5 (which has eps = 0).

    Checked against TRL trl/trainer/dpo_trainer.py @ v0.14.0 (Jan 2025), ``dpo_loss`` "sigmoid" branch
    (same in 0.12.2 - 0.16.0): z = (pi_c - pi_r) - (ref_c - ref_r) on summed log-probs; matches."""
    rewards = beta * x.logratios
    logits = x.logratios[:, 0] - x.logratios[:, 1]
    return _smoothed_sigmoid_loss(beta * logits, label_smoothing), _reward_metrics(rewards, x.valid)


@_register("ipo", uses_ref=True, uses_lengths=True, pairwise=True)
def ipo(x: _Inputs, beta):
    """IPO (TRL loss_type="ipo"):  (z_avg - 1 / (2 beta))^2  with
    z_avg = (s_0 - s_1) - (s_ref_0 - s_ref_1), i.e. TRL divides both policy and reference log-probs by the
    completion length for IPO (``all_logps / loss_mask.sum(-1)``); the rewards in the metrics use the same
    averaged log-probs, as TRL's do. Not in Table 5.

    Checked against TRL trl/trainer/dpo_trainer.py @ v0.14.0 (Jan 2025): ``dpo_loss`` "ipo" branch and
    ``concatenated_forward`` (the length division, applied to the reference pass too via
    ``compute_ref_log_probs``); same in 0.12.2 - 0.16.0; matches."""
    avg_ratios = x.logratios / x.lengths
    logits = avg_ratios[:, 0] - avg_ratios[:, 1]
    return (logits - 1.0 / (2.0 * beta)) ** 2, _reward_metrics(beta * avg_ratios, x.valid)


@_register("hinge", uses_ref=True, uses_lengths=False, pairwise=True)
def hinge(x: _Inputs, beta):
    """Hinge / SLiC (TRL loss_type="hinge"):  max(0, 1 - beta z). Not in Table 5.

    Checked against TRL trl/trainer/dpo_trainer.py @ v0.14.0 (Jan 2025), "hinge" branch
    (``torch.relu(1 - self.beta * logits)``, same in 0.12.2 - 0.16.0); matches."""
    logits = x.logratios[:, 0] - x.logratios[:, 1]
    return jax.nn.relu(1.0 - beta * logits), _reward_metrics(beta * x.logratios, x.valid)


@_register("robust", uses_ref=True, uses_lengths=False, pairwise=True)
def robust(x: _Inputs, beta, *, label_smoothing=0.0):
    """Robust DPO (TRL loss_type="robust", rDPO, unbiased under label-flip rate eps < 1/2):
    ((1 - eps)(-log sigma(beta z)) + eps log sigma(-beta z)) / (1 - 2 eps). Not in Table 5.

    Checked against TRL trl/trainer/dpo_trainer.py @ v0.14.0 (Jan 2025), "robust" branch (note the + on
    the eps term, unlike cDPO; same in 0.12.2 - 0.16.0); matches."""
    if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"objective 'robust' needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    logits = beta * (x.logratios[:, 0] - x.logratios[:, 1])
    loss = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits)
            + label_smoothing * jax.nn.log_sigmoid(-logits)) / (1.0 - 2.0 * label_smoothing)
    return loss, _reward_metrics(beta * x.logratios, x.valid)


@_register("rpo", uses_ref=True, uses_lengths=True, pairwise=True)
def rpo(x: _Inputs, beta, *, lam=DEFAULT_LAMBDA, label_smoothing=0.0, nll_reduction="token"):
    """RPO (TRL DPOTrainer with loss_type="sigmoid" and rpo_alpha = lam):  DPO + lam * NLL(y0).

    NLL(y0) is TRL's ``nll_loss``: ``F.cross_entropy`` over the chosen half of the batch, i.e. the mean over
    *all* chosen completion tokens of the batch, sum_b -log pi(y0_b) / sum_b |y0_b|, one scalar added to
    every example's DPO loss. With the default ``nll_reduction="token"`` each row gets
    -log pi(y0_b) / mean_b |y0_b| so that the batch mean of the loss is exactly TRL's
    mean(DPO) + lam * token-mean NLL (see ``_Inputs.nll_term``); ``nll_reduction="example"`` uses each
    example's own token mean instead (weighs examples equally). The per-example ``nll`` metric is this
    per-row term, so its batch mean is TRL's ``nll_loss``. Table 5 writes the regulariser as
    -lam log(pi(y0) / pi_ref(y0)) (a log-ratio, not normalised by length); TRL, followed here, uses the NLL.

    Checked against TRL trl/trainer/dpo_trainer.py @ v0.14.0 (Jan 2025): ``concatenated_forward``
    (``output["nll_loss"] = F.cross_entropy(flatten(chosen_logits), flatten(chosen_labels), ignore_index=0)``
    with ``labels[~loss_mask] = 0``) and ``get_batch_loss_metrics`` (``losses + rpo_alpha * nll_loss``, then
    ``losses.mean()``); same in 0.12.2 - 0.16.0. Not reproduced: TRL's ``ignore_index=0`` also drops real
    completion tokens whose id is 0, and TRL's token mean is per device / per micro-batch where this one is
    over the rows given to the function. Changed (this review): the NLL was a per-example mean.
    """
    rewards = beta * x.logratios
    logits = x.logratios[:, 0] - x.logratios[:, 1]
    nll = jnp.where(x.has_negative, x.nll_term(nll_reduction), 0.0)
    loss = _smoothed_sigmoid_loss(beta * logits, label_smoothing) + lam * nll
    metrics = _reward_metrics(rewards, x.valid)
    metrics["nll"] = jax.lax.stop_gradient(nll)
    return loss, metrics


@_register("exo", uses_ref=True, uses_lengths=False, pairwise=True)
def exo(x: _Inputs, beta, *, label_smoothing=0.0):
    """EXO (TRL loss_type="exo_pair", EXO paper Eq. 16), with u = beta z:
    sigma(u) (log sigma(u) - log(1 - eps)) + sigma(-u) (log sigma(-u) - log eps),
    where eps = label_smoothing, replaced by 1e-3 when it is 0 (as TRL does).
    Table 5 differs: it writes logits = r_0 only (no y1 term) and drops the log(1 - eps), log eps constants.

    Checked against TRL trl/trainer/dpo_trainer.py @ v0.14.0 (Jan 2025), "exo_pair" branch: logits = z (the
    DPO logits, with the y1 term), beta inside both sigmoids, ``math.log(1 - eps)`` / ``math.log(eps)``
    constants (same in 0.12.2 - 0.16.0); matches. (TRL writes the 1e-3 back into ``self.label_smoothing``.)
    """
    eps = jnp.where(jnp.asarray(label_smoothing) == 0, 1e-3, label_smoothing).astype(x.dtype)
    u = beta * (x.logratios[:, 0] - x.logratios[:, 1])
    loss = (jax.nn.sigmoid(u) * (jax.nn.log_sigmoid(u) - jnp.log1p(-eps))
            + jax.nn.sigmoid(-u) * (jax.nn.log_sigmoid(-u) - jnp.log(eps)))
    return loss, _reward_metrics(beta * x.logratios, x.valid)


@_register("bco", uses_ref=True, uses_lengths=False, pairwise=True)
def bco(x: _Inputs, beta, *, delta=None):
    """BCO (TRL DPOTrainer loss_type="bco_pair" = BCOTrainer without UDM):
    -log sigma(beta r_0 - delta) - log sigma(-(beta r_1 - delta)).

    TRL's delta is a running mean (over steps) of the detached batch-mean reward mean(beta r_0, beta r_1),
    updated with the current batch before use. Pass that as ``delta`` (see ``bco_batch_reward`` and
    ``running_mean_update``); with ``delta=None`` the detached mean of the current batch is used.
    Table 5 writes the second term as -log sigma(-beta r_1 - delta) (sign of delta flipped); TRL's sign is
    used here. BCOTrainer averages the chosen and rejected terms over 2B items; this is their per-pair sum
    (DPOTrainer's bco_pair), i.e. twice BCOTrainer's scale.

    Checked against TRL trl/trainer/dpo_trainer.py @ v0.14.0 (Jan 2025), "bco_pair" branch
    (``rewards = cat(beta r_c, beta r_r).mean().detach(); self.running.update(rewards); delta =
    self.running.mean``; ``RunningMoments.update`` in trl/trainer/utils.py weights each update by its
    element count, here 1, so after n steps delta is the plain mean of the n batch means on one process) and
    trl/trainer/bco_trainer.py ``bco_loss`` @ v0.14.0 (same delta and terms, plus the optional UDM density
    ratio weights on the rejected terms, not reproduced); same in 0.12.2 - 0.16.0; matches.
    """
    rewards = beta * x.logratios
    if delta is None:
        delta = jax.lax.stop_gradient(_pair_mean(rewards, x.has_negative))
    loss = -jax.nn.log_sigmoid(rewards[:, 0] - delta) - jax.nn.log_sigmoid(-(rewards[:, 1] - delta))
    metrics = _reward_metrics(rewards, x.valid)
    metrics["delta"] = jnp.broadcast_to(jax.lax.stop_gradient(jnp.asarray(delta, x.dtype)), loss.shape)
    return loss, metrics


@_register("kto", uses_ref=True, uses_lengths=False, pairwise=True)
def kto(x: _Inputs, beta, *, kl=None, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO, paired (TRL KTOTrainer.kto_loss on a paired dataset):
    w_d (1 - sigma(beta (r_0 - kl))) + w_u (1 - sigma(beta (kl - r_1))),
    kl = sg(max(0, mean over the batch of the log-ratios r)).

    TRL estimates kl from mismatched (prompt, completion) pairs of the batch; a pure function on per-sequence
    log-probs has only the matched pairs, so the default here is the detached batch mean of r over y0 and
    y1, clamped at 0. Pass ``kl`` to use another estimate (e.g. the trainer's mismatched-pair one).
    KTOTrainer averages desirable and undesirable terms over 2B items; this is their per-pair sum.
    Table 5 writes -log sigma(beta r_0 - Delta) - log sigma(-beta r_1 - Delta) (log-sigmoid form, Delta not
    multiplied by beta); TRL's 1 - sigmoid form is used here.

    Checked against TRL trl/trainer/kto_trainer.py @ v0.14.0 (Jan 2025), ``kto_loss`` loss_type="kto":
    ``kl = (policy_KL_logps - reference_KL_logps).mean().detach()``, gathered over processes, ``.clamp(min=0)``;
    chosen ``1 - sigmoid(beta (r_c - kl))``, rejected ``1 - sigmoid(beta (kl - r_r))``, weighted by
    desirable / undesirable_weight; the KL completions are the batch's completions rotated by one prompt
    (mismatched pairs). Same in 0.12.2 - 0.16.0 (0.12.2 / 0.13.0 gather with ``gather`` instead of
    ``gather_for_metrics``). Matches, with the matched-pair KL proxy above as the only difference. In early
    2025 KTO was only KTOTrainer: DPOTrainer's old ``loss_type="kto_pair"`` raises "Support for kto_pair
    has been removed in DPOTrainer. Please use KTOTrainer." in 0.12.2 - 0.16.0. That removed variant
    (TRL <= 0.8) used cross-half, *non-detached* estimates, chosen vs max(0, mean r_1) and rejected vs
    max(0, mean r_0); it is not what the paper could have run and is not implemented.
    """
    rewards = beta * x.logratios
    if kl is None:
        kl = jnp.maximum(_pair_mean(x.logratios, x.has_negative), 0.0)
    kl = jax.lax.stop_gradient(jnp.asarray(kl, x.dtype))
    loss = (desirable_weight * (1.0 - jax.nn.sigmoid(beta * (x.logratios[:, 0] - kl)))
            + undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (kl - x.logratios[:, 1]))))
    metrics = _reward_metrics(rewards, x.valid)
    metrics["kl"] = jnp.broadcast_to(kl, loss.shape)
    return loss, metrics


@_register("apo_zero", uses_ref=True, uses_lengths=False, pairwise=True)
def apo_zero(x: _Inputs, beta):
    """APO-zero (TRL loss_type="apo_zero", APO paper Eq. 7):  (1 - sigma(beta r_0)) + sigma(beta r_1).
    Table 5 writes a log-sigmoid form -log sigma(beta r_0) + log sigma(beta r_1); TRL's sigmoid form is used.

    Checked against TRL trl/trainer/dpo_trainer.py @ v0.14.0 (Jan 2025), "apo_zero" branch
    (``1 - F.sigmoid(beta * chosen_logratios) + F.sigmoid(beta * rejected_logratios)``, same in
    0.12.2 - 0.16.0); matches."""
    rewards = beta * x.logratios
    loss = (1.0 - jax.nn.sigmoid(rewards[:, 0])) + jax.nn.sigmoid(rewards[:, 1])
    return loss, _reward_metrics(rewards, x.valid)


@_register("apo_down", uses_ref=True, uses_lengths=False, pairwise=True)
def apo_down(x: _Inputs, beta):
    """APO-down (TRL loss_type="apo_down", APO paper Eq. 8):  sigma(beta r_0) + (1 - sigma(beta (r_0 - r_1))).
    Not distinguished in Table 5 (which lists one APO form, see ``apo_zero``).

    Checked against TRL trl/trainer/dpo_trainer.py @ v0.14.0 (Jan 2025), "apo_down" branch
    (``F.sigmoid(beta r_c) + 1 - F.sigmoid(beta (r_c - r_r))``, same in 0.12.2 - 0.16.0); matches."""
    rewards = beta * x.logratios
    loss = jax.nn.sigmoid(rewards[:, 0]) + (1.0 - jax.nn.sigmoid(rewards[:, 0] - rewards[:, 1]))
    return loss, _reward_metrics(rewards, x.valid)


@_register("sppo", uses_ref=True, uses_lengths=False, pairwise=True)
def sppo(x: _Inputs, beta):
    """SPPO, hard labels (TRL loss_type="sppo_hard"):  (r_0 - 1/(2 beta))^2 + (r_1 + 1/(2 beta))^2.
    Table 5 writes the targets as +-0.5 beta; TRL (and the SPPO paper, eta = 1/beta) use +-0.5 / beta.

    Checked against TRL trl/trainer/dpo_trainer.py @ v0.14.0 (Jan 2025), "sppo_hard" branch
    (``(a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2`` on the unscaled log-ratios a, b; same in
    0.12.2 - 0.16.0); matches."""
    half = 0.5 / beta
    loss = (x.logratios[:, 0] - half) ** 2 + (x.logratios[:, 1] + half) ** 2
    return loss, _reward_metrics(beta * x.logratios, x.valid)


@_register("nca", uses_ref=True, uses_lengths=False, pairwise=True)
def nca(x: _Inputs, beta):
    """NCA (TRL loss_type="nca_pair"):
    -log sigma(beta r_0) - 0.5 log sigma(-beta r_0) - 0.5 log sigma(-beta r_1).  Matches Table 5.

    Checked against TRL trl/trainer/dpo_trainer.py @ v0.14.0 (Jan 2025), "nca_pair" branch (same in
    0.12.2 - 0.16.0); matches."""
    rewards = beta * x.logratios
    loss = (-jax.nn.log_sigmoid(rewards[:, 0]) - 0.5 * jax.nn.log_sigmoid(-rewards[:, 0])
            - 0.5 * jax.nn.log_sigmoid(-rewards[:, 1]))
    return loss, _reward_metrics(rewards, x.valid)


# ----------------------------------------------------------------------------------------------------------
# Reference-free (TRL CPOTrainer) and SFT


@_register("simpo", uses_ref=False, uses_lengths=True, pairwise=True)
def simpo(x: _Inputs, beta, *, gamma=DEFAULT_GAMMA, lam=0.0, label_smoothing=0.0, nll_reduction="token"):
    """SimPO (TRL CPOTrainer loss_type="simpo"; cpo_alpha = lam, 0 for pure SimPO):
    -(1 - eps) log sigma(u) - eps log sigma(-u) + lam * NLL(y0),   u = beta (s_0 - s_1) - gamma.

    gamma is the absolute margin (TRL subtracts simpo_gamma / beta before multiplying by beta). Rewards in
    the metrics are beta * s_i, as in TRL. Matches Table 5 for lam = 0. With lam > 0 this is TRL's
    "CPO-SimPO", which is what Table 5's CPO row writes (length-normalised, with gamma, plus lam * NLL).
    NLL(y0) is TRL's batch token mean, as in ``cpo`` (``nll_reduction``, see ``_Inputs.nll_term``).
    Note TRL's CPOConfig defaults are cpo_alpha = 1.0 and simpo_gamma = 0.5; the defaults here are the
    paper's (lam = 0 for SimPO, gamma = 10, Appendix B.2).

    Checked against TRL trl/trainer/cpo_trainer.py @ v0.14.0 (Jan 2025): ``cpo_loss`` "simpo" branch
    (``logits = (pi_c - pi_r) - simpo_gamma / beta``, then the smoothed sigmoid of ``beta * logits``),
    ``concatenated_forward`` (``average_log_prob=self.loss_type in ["ipo", "simpo"]``; the NLL is
    ``nn.CrossEntropyLoss()`` over the chosen half, labels -100 on prompt and padding, i.e. the batch token
    mean) and ``get_batch_loss_metrics`` (``losses.mean() + cpo_alpha * nll_loss``); same in
    0.12.2 - 0.16.0. Matches; changed (this review): the NLL was a per-example mean.
    """
    avg = x.policy / x.lengths
    u = beta * (avg[:, 0] - avg[:, 1]) - gamma
    nll = jnp.where(x.has_negative, x.nll_term(nll_reduction), 0.0)
    loss = _smoothed_sigmoid_loss(u, label_smoothing) + lam * nll
    metrics = _reward_metrics(beta * avg, x.valid)
    metrics["nll"] = jax.lax.stop_gradient(nll)
    return loss, metrics


@_register("cpo", uses_ref=False, uses_lengths=True, pairwise=True)
def cpo(x: _Inputs, beta, *, lam=DEFAULT_LAMBDA, label_smoothing=0.0, nll_reduction="token"):
    """CPO (TRL CPOTrainer loss_type="sigmoid", cpo_alpha = lam):
    -(1 - eps) log sigma(beta (log pi(y0) - log pi(y1))) - eps log sigma(-...) + lam * NLL(y0),
    on summed log-probs. Rewards in the metrics are beta log pi(y_i), as in TRL.

    Table 5's CPO row is length-normalised with a margin gamma and a -lam * beta * s_0 term; TRL's CPO
    (followed here) has neither normalisation nor margin (TRL ignores simpo_gamma for loss_type="sigmoid")
    and its supervised term is the token-mean NLL. Table 5's form is ``simpo`` with ``lam`` > 0.
    NLL(y0) is TRL's: the mean over all chosen completion tokens of the batch (``nll_reduction="token"``,
    see ``_Inputs.nll_term``; ``"example"`` for each example's own token mean).

    Checked against TRL trl/trainer/cpo_trainer.py @ v0.14.0 (Jan 2025): ``cpo_loss`` "sigmoid" branch
    (``logits = policy_chosen_logps - policy_rejected_logps`` on summed log-probs, since
    ``average_log_prob`` is only set for ipo / simpo; ``simpo_gamma`` unused), the NLL in
    ``concatenated_forward`` (``nn.CrossEntropyLoss()`` over the chosen half: batch token mean) and
    ``get_batch_loss_metrics`` (``losses.mean() + self.cpo_alpha * policy_nll_loss``); same in
    0.12.2 - 0.16.0. Matches; changed (this review): the NLL was a per-example mean.
    """
    logits = beta * (x.policy[:, 0] - x.policy[:, 1])
    nll = jnp.where(x.has_negative, x.nll_term(nll_reduction), 0.0)
    loss = _smoothed_sigmoid_loss(logits, label_smoothing) + lam * nll
    metrics = _reward_metrics(beta * x.policy, x.valid)
    metrics["nll"] = jax.lax.stop_gradient(nll)
    return loss, metrics


@_register("sft", uses_ref=False, uses_lengths=True, pairwise=False)
def sft(x: _Inputs, beta):
    """SFT on y0:  NLL(y0) = -log pi(y0) / |y0|, each example's per-token mean cross-entropy. Accepts any
    number of negatives and ignores them (their rewards beta log pi(y_i) only appear in the metrics).
    Unlike ``rpo`` / ``cpo`` (TRL's batch token mean, since this review) this stays a per-example mean
    (the trainer's SFT stage is not a TRL baseline of the paper and tests/test_step.py pins this form)."""
    nll = x.nll_y0()
    metrics = _reward_metrics(beta * x.policy, x.valid)
    metrics["nll"] = jax.lax.stop_gradient(nll)
    return nll, metrics


NAMES = tuple(_OBJECTIVES)
BUILTIN_NAMES = NAMES


def names() -> tuple[str, ...]:
    """Every objective `get` accepts: the built-ins, then the registered ones in registration order."""
    return NAMES


def register(
    name: str,
    fn: Callable,
    *,
    pairwise: bool = False,
    reference_free: bool = False,
    needs_lengths: bool = False,
    defaults: dict[str, float] | None = None,
) -> Objective:
    """Adds a custom objective `fn` under `name`; returns the wrapped objective (also `get(name)`).

    ``fn(policy_logps_BC, ref_logps_BC, *, beta, lengths_BC, valid_BC, **hparams)`` returns ``loss_B`` or
    ``(loss_B, metrics)`` (a dict of [B] arrays). It receives sanitized arrays: values in invalid columns
    are zeros (lengths ones) and ``valid_BC[:, 0]`` is True, so it may sum over columns without masking
    NaNs; ``ref_logps_BC`` is None when ``reference_free`` (the trainer then builds no reference model)
    and ``lengths_BC`` is None unless the caller passes it (the trainer always does; ``needs_lengths``
    makes it required). ``pairwise=True``: the arrays are [B, 2] (the trainer needs ``num_negatives=1``)
    and rows whose negative is invalid get loss 0; otherwise any number of negatives [B, 1+K] (like mcpo).
    Without ``rewards/*`` metrics, TRL's reward metrics are added from beta (log pi - log pi_ref) (beta
    log pi when reference-free), so the trainer's accuracy / margin curves work. `defaults` (hparams,
    beta included) are recorded in ``DEFAULTS[name]``. A built-in name cannot be replaced; registering a
    custom name again replaces it (re-running a notebook cell).
    """
    global NAMES, PAIRWISE, REFERENCE_FREE, MULTI_NEGATIVE, NEEDS_LENGTHS
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"objective name must be an identifier-like string, got {name!r}")
    if name in BUILTIN_NAMES:
        raise ValueError(f"{name!r} is a built-in objective; register yours under another name")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")

    def body(x: _Inputs, beta, **hparams):
        out = fn(x.policy, x.ref, beta=beta, lengths=x.lengths, valid=x.valid, **hparams)
        loss_B, metrics = out if isinstance(out, tuple) else (out, {})
        loss_B = jnp.asarray(loss_B)
        if loss_B.shape != x.policy.shape[:1]:
            raise ValueError(f"objective {name!r} returned a loss of shape {loss_B.shape}; expected "
                             f"[B] = {x.policy.shape[:1]} (one loss per example)")
        rewards = beta * (x.policy if x.ref is None else x.logratios)
        return loss_B, {**_reward_metrics(rewards, x.valid), **dict(metrics)}

    body.__doc__ = fn.__doc__
    objective = _objective(name, body, uses_ref=not reference_free, uses_lengths=True if needs_lengths else None,
                           pairwise=pairwise)
    NAMES = tuple(_OBJECTIVES)
    PAIRWISE = (PAIRWISE | {name}) if pairwise else (PAIRWISE - {name})
    MULTI_NEGATIVE = (MULTI_NEGATIVE - {name}) if pairwise else (MULTI_NEGATIVE | {name})
    REFERENCE_FREE = (REFERENCE_FREE | {name}) if reference_free else (REFERENCE_FREE - {name})
    NEEDS_LENGTHS = (NEEDS_LENGTHS | {name}) if needs_lengths else (NEEDS_LENGTHS - {name})
    DEFAULTS[name] = {"beta": DEFAULT_BETA, **(defaults or {})}
    return objective


# ----------------------------------------------------------------------------------------------------------
# BCO's running delta (TRL RunningMoments) as pure helpers for the trainer


def bco_batch_reward(policy_logps, ref_logps, *, beta, valid=None) -> Array:
    """Detached batch mean of beta r over y0 and y1 of the rows with a valid negative: the value TRL feeds
    into BCO's running mean each step (and what ``bco`` uses when called with ``delta=None``)."""
    x = _Inputs("bco", policy_logps, ref_logps, None, valid, uses_ref=True, uses_lengths=False, pairwise=True)
    return jax.lax.stop_gradient(_pair_mean(beta * x.logratios, x.has_negative))


def running_mean_update(mean, count, value):
    """One step of TRL's RunningMoments mean with one scalar per update: returns (new_mean, new_count).
    Start from (0.0, 0.0); after n updates the mean is the plain average of the n values."""
    count = count + 1
    return mean + (value - mean) / count, count
