"""Objectives: the paper's identities (Prop. 2.1, Lemma 3.1/3.2, Prop. 3.3) and every baseline against an
independent float64 NumPy implementation written here from the formulas (TRL, early 2025)."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcpo_jax import kernel, losses

B = 24


# ------------------------------------------------------------------------------------------------ fixtures


def _inputs(seed, k=1, invalid_frac=0.25):
    """Random summed log-probs, lengths and a valid mask; invalid columns hold NaN / -inf garbage."""
    rng = np.random.default_rng(seed)
    c = 1 + k
    policy = -rng.uniform(5.0, 150.0, size=(B, c))
    ref = policy + rng.normal(0.0, 8.0, size=(B, c))
    policy, ref = (x.astype(np.float32).astype(np.float64) for x in (policy, ref))  # exact in float32
    lengths = rng.integers(3, 60, size=(B, c)).astype(np.float64)
    valid = rng.uniform(size=(B, c)) > invalid_frac
    valid[:, 0] = True
    valid[0, 1:] = True  # at least one complete row
    policy_in, ref_in = policy.copy(), ref.copy()
    policy_in[~valid] = np.nan
    ref_in[~valid] = -np.inf
    return policy, ref, lengths, valid, policy_in, ref_in


def _f32(*xs):
    return [jnp.asarray(x, jnp.float32) for x in xs]


# --------------------------------------------------------------------------- float64 NumPy references


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return np.exp(logsig(x))


def np_metrics(rew, valid):
    neg = valid[:, 1:]
    chosen = rew[:, 0]
    rej = np.array([rew[i, 1:][neg[i]].mean() if neg[i].any() else 0.0 for i in range(len(rew))])
    acc = np.array([float(np.all(chosen[i] > rew[i, 1:][neg[i]])) for i in range(len(rew))])
    return {"rewards/chosen": chosen, "rewards/rejected": rej, "rewards/margins": chosen - rej,
            "rewards/accuracies": acc}


def np_trl_nll(p, lengths, ok, reduction):
    """TRL's supervised term (RPO's nll_loss, CPO's policy_nll_loss): F.cross_entropy over the chosen
    tokens of the whole batch = sum of -log pi(y0) over the pair rows / their total token count, one scalar
    added to every row. Per row we return the share whose mean over the pair rows is that scalar (rows
    without a pair get 0, like their loss); ``reduction="example"`` = each row's own token mean."""
    if reduction == "example":
        return np.where(ok, -p[:, 0] / lengths[:, 0], 0.0)
    batch_token_mean = np.sum(-p[ok, 0]) / np.sum(lengths[ok, 0])
    share = -p[:, 0] / np.sum(-p[ok, 0]) * batch_token_mean * ok.sum()
    return np.where(ok, share, 0.0)


def np_reference(name, p, r, lengths, valid, beta, **hp):
    """(loss [B], metrics) in float64, straight from each objective's formula."""
    ratio = p - r
    ok = valid[:, 1] if p.shape[1] > 1 else np.zeros(len(p), bool)
    red = hp.get("nll_reduction", "token")
    z = ratio[:, 0] - ratio[:, 1] if p.shape[1] > 1 else None
    ls = hp.get("label_smoothing", 0.0)
    rew = beta * ratio
    extra = {}
    if name in ("mcpo", "rnce"):
        loss = np.array([
            -beta * ratio[i, 0] + np.logaddexp.reduce(beta * ratio[i][valid[i]]) for i in range(len(p))
        ])
        return loss, np_metrics(rew, valid)
    if name == "dpo":
        loss = -(1 - ls) * logsig(beta * z) - ls * logsig(-beta * z)
    elif name == "ipo":
        avg = p / lengths - r / lengths
        loss = (avg[:, 0] - avg[:, 1] - 1 / (2 * beta)) ** 2
        rew = beta * avg
    elif name == "hinge":
        loss = np.maximum(0.0, 1 - beta * z)
    elif name == "robust":
        loss = ((1 - ls) * -logsig(beta * z) + ls * logsig(-beta * z)) / (1 - 2 * ls)
    elif name == "rpo":
        nll = np_trl_nll(p, lengths, ok, red)
        loss = -(1 - ls) * logsig(beta * z) - ls * logsig(-beta * z) + hp["lam"] * nll
        extra["nll"] = nll
    elif name == "exo":
        eps = ls if ls > 0 else 1e-3
        u = beta * z
        loss = sig(u) * (logsig(u) - np.log(1 - eps)) + sig(-u) * (logsig(-u) - np.log(eps))
    elif name == "bco":
        delta = hp.get("delta")
        if delta is None:
            delta = np.concatenate([rew[ok, 0], rew[ok, 1]]).mean()
        loss = -logsig(rew[:, 0] - delta) - logsig(-(rew[:, 1] - delta))
        extra["delta"] = np.full(len(p), delta)
    elif name == "kto":
        kl = hp.get("kl")
        if kl is None:
            kl = max(np.concatenate([ratio[ok, 0], ratio[ok, 1]]).mean(), 0.0)
        loss = (hp.get("desirable_weight", 1.0) * (1 - sig(beta * (ratio[:, 0] - kl)))
                + hp.get("undesirable_weight", 1.0) * (1 - sig(beta * (kl - ratio[:, 1]))))
        extra["kl"] = np.full(len(p), kl)
    elif name == "apo_zero":
        loss = 1 - sig(beta * ratio[:, 0]) + sig(beta * ratio[:, 1])
    elif name == "apo_down":
        loss = sig(beta * ratio[:, 0]) + 1 - sig(beta * z)
    elif name == "sppo":
        loss = (ratio[:, 0] - 0.5 / beta) ** 2 + (ratio[:, 1] + 0.5 / beta) ** 2
    elif name == "nca":
        loss = -logsig(beta * ratio[:, 0]) - 0.5 * logsig(-beta * ratio[:, 0]) - 0.5 * logsig(-beta * ratio[:, 1])
    elif name == "simpo":
        s = p / lengths
        u = beta * (s[:, 0] - s[:, 1]) - hp["gamma"]
        nll = np_trl_nll(p, lengths, ok, red)
        loss = -(1 - ls) * logsig(u) - ls * logsig(-u) + hp.get("lam", 0.0) * nll
        rew, extra["nll"] = beta * s, nll
    elif name == "cpo":
        u = beta * (p[:, 0] - p[:, 1])
        nll = np_trl_nll(p, lengths, ok, red)
        loss = -(1 - ls) * logsig(u) - ls * logsig(-u) + hp["lam"] * nll
        rew, extra["nll"] = beta * p, nll
    elif name == "sft":
        nll = -p[:, 0] / lengths[:, 0]
        return nll, {**np_metrics(beta * p, valid), "nll": nll}
    else:
        raise KeyError(name)
    loss = np.where(ok, loss, 0.0)
    return loss, {**np_metrics(rew, valid), **extra}


CASES = [
    ("mcpo", {}), ("rnce", {}),
    ("dpo", {}), ("dpo", {"label_smoothing": 0.2}),
    ("ipo", {}), ("hinge", {}), ("robust", {"label_smoothing": 0.15}),
    ("rpo", {"lam": 0.1}), ("rpo", {"lam": 0.7, "label_smoothing": 0.1}),
    ("rpo", {"lam": 0.4, "nll_reduction": "example"}),
    ("exo", {}), ("exo", {"label_smoothing": 0.1}),
    ("bco", {}), ("bco", {"delta": 0.3}),
    ("kto", {}), ("kto", {"kl": 0.7, "desirable_weight": 1.3, "undesirable_weight": 0.6}),
    ("apo_zero", {}), ("apo_down", {}), ("sppo", {}), ("nca", {}),
    ("simpo", {"gamma": 1.0}), ("simpo", {"gamma": 0.5, "lam": 0.3, "label_smoothing": 0.1}),
    ("cpo", {"lam": 0.1}), ("cpo", {"lam": 1.0, "label_smoothing": 0.2}),
    ("cpo", {"lam": 0.5, "nll_reduction": "example"}),
    ("sft", {}),
]


@pytest.mark.parametrize("name,hp", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_float64_reference(name, hp, beta):
    k = 4 if name in losses.MULTI_NEGATIVE else (3 if name == "sft" else 1)
    p, r, lengths, valid, p_in, r_in = _inputs(zlib.crc32(f"{name}-{beta}".encode()), k=k)
    ref_loss, ref_metrics = np_reference(name, p, r, lengths, valid, beta, **hp)
    fn = losses.get(name)
    loss, metrics = fn(*_f32(p_in, r_in), beta=beta, lengths=jnp.asarray(lengths), valid=jnp.asarray(valid), **hp)
    assert loss.shape == (B,) and loss.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=2e-5, atol=2e-5)
    assert set(metrics) == set(ref_metrics)
    for key, expected in ref_metrics.items():
        np.testing.assert_allclose(np.asarray(metrics[key]), expected, rtol=2e-5, atol=2e-5, err_msg=key)
    if name in losses.PAIRWISE:
        assert np.all(np.asarray(loss)[~valid[:, 1]] == 0.0)


# ------------------------------------------------------------------------------------- paper identities


def test_prop_2_1_mcpo_with_one_negative_is_dpo():
    for seed in range(3):
        p, r, *_ = _inputs(seed, k=1, invalid_frac=0.0)
        for beta in (0.01, 0.1, 1.0):
            mc, _ = losses.get("mcpo")(*_f32(p, r), beta=beta)
            dpo, _ = losses.get("dpo")(*_f32(p, r), beta=beta)
            np.testing.assert_allclose(np.asarray(mc), np.asarray(dpo), rtol=1e-6, atol=1e-6)


def test_lemma_3_2_gradient_of_mcpo_with_one_negative():
    rng = np.random.default_rng(1)
    rewards = jnp.asarray(rng.normal(0.0, 30.0, size=(B, 2)), jnp.float32)
    beta = 0.1
    grad = jax.grad(lambda r: jnp.sum(losses.get("mcpo")(r, jnp.zeros_like(r), beta=beta)[0]))(rewards)
    r = np.asarray(rewards, np.float64)
    expected_r0 = -beta * sig(beta * r[:, 1] - beta * r[:, 0])
    np.testing.assert_allclose(np.asarray(grad[:, 0]), expected_r0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad[:, 1]), -expected_r0, rtol=1e-5, atol=1e-7)


def test_lemma_3_1_gradient_is_softmax_weighted_estimate():
    """Eq. (9): grad L = -beta grad r_0 + sum_i w_i beta grad r_i, w = softmax(beta r) over {0..K} valid,
    for rewards r_i = phi_i . theta of a linear model."""
    rng = np.random.default_rng(2)
    k, dim, beta = 5, 7, 0.3
    phi = jnp.asarray(rng.normal(size=(B, 1 + k, dim)), jnp.float32)
    theta = jnp.asarray(rng.normal(size=(dim,)), jnp.float32)
    valid = jnp.asarray(rng.uniform(size=(B, 1 + k)) > 0.3).at[:, 0].set(True)

    def total_loss(t):
        r = phi @ t
        return jnp.sum(losses.get("mcpo")(r, jnp.zeros_like(r), beta=beta, valid=valid)[0])

    grad = jax.grad(total_loss)(theta)
    r = phi @ theta
    w = kernel.weights(r, None, beta=beta, valid=valid, include_preferred=True)
    estimate = jnp.sum(-beta * phi[:, 0] + beta * jnp.einsum("bc,bcd->bd", w, phi), axis=0)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(estimate), rtol=1e-4, atol=1e-4)


def test_prop_3_3_online_estimate_is_unbiased():
    """Small categorical model: outcomes 0..n-1, mu uniform, r_theta(y) = theta_y, so
    p_theta = softmax(beta theta) and grad log Z = beta p_theta. The Monte-Carlo mean of grad log Zhat
    (Zhat over y0 and M proposals) matches it when y0 ~ p_theta, and is biased when y0 ~ mu."""
    n, m, beta, draws = 5, 2, 1.0, 20_000
    theta = jnp.asarray([2.0, 0.5, -1.0, 0.0, 1.2], jnp.float32)
    p_theta = np.asarray(jax.nn.softmax(beta * theta), np.float64)
    truth = beta * p_theta

    def mc_mean_and_se(y0_logits, key):
        k0, k1 = jax.random.split(key)
        y0 = jax.random.categorical(k0, y0_logits, shape=(draws,))
        ys = jnp.concatenate([y0[:, None], jax.random.randint(k1, (draws, m), 0, n)], axis=1)  # [D, 1+M]

        r = theta[ys]  # [D, 1+M]

        def log_zhat_sum(r):
            loss, _ = losses.get("mcpo")(r, jnp.zeros_like(r), beta=beta)
            return jnp.sum(loss + beta * r[:, 0])  # sum over draws of log sum_i exp(beta r_i)

        # Draws are independent rows, so the gradient w.r.t. r holds every draw's gradient; the chain rule
        # through r = theta[ys] scatters it onto theta.
        g_r = jax.grad(log_zhat_sum)(r)
        per_draw = np.asarray(jnp.einsum("dm,dmn->dn", g_r, jax.nn.one_hot(ys, n)), np.float64)
        return per_draw.mean(0), per_draw.std(0, ddof=1) / np.sqrt(draws)

    online, se = mc_mean_and_se(beta * theta, jax.random.key(0))
    assert np.all(np.abs(online - truth) < 4 * se + 1e-4), (online, truth, se)

    offline, se_off = mc_mean_and_se(jnp.zeros(n), jax.random.key(1))  # y0 ~ mu (uniform)
    assert np.max(np.abs(offline - truth) / se_off) > 10, (offline, truth, se_off)


# ------------------------------------------------------------------------- stability, transforms, errors


def _extreme_inputs(k):
    """Log-prob gaps of +-1e4, invalid columns full of NaN / inf."""
    c = 1 + k
    policy, ref = np.zeros((4, c)), np.zeros((4, c))
    policy[0, 0] = -1e4  # y0 far below the negatives
    policy[1, 1:] = -1e4  # negatives far below y0
    policy[2, 1:] = -2e4
    ref[3, 0] = 1e4  # log-ratio of y0 = -1e4 through the reference
    lengths = np.full((4, c), 7.0)
    valid = np.ones((4, c), bool)
    if k > 1:
        valid[1, -1] = False
        policy[1, -1], ref[1, -1] = np.nan, np.inf
    return _f32(policy, ref, lengths) + [jnp.asarray(valid)]


@pytest.mark.parametrize("name", losses.NAMES)
def test_finite_loss_and_gradient_at_extreme_gaps(name):
    k = 3 if name in losses.MULTI_NEGATIVE or name == "sft" else 1
    policy, ref, lengths, valid = _extreme_inputs(k)
    fn = losses.get(name)
    for beta in (0.01, 1.0):
        hp = {key: v for key, v in losses.DEFAULTS[name].items() if key != "beta"}

        def total(p, r):
            return jnp.sum(fn(p, r, beta=beta, lengths=lengths, valid=valid, **hp)[0])

        value, (gp, gr) = jax.value_and_grad(total, argnums=(0, 1))(policy, ref)
        assert np.isfinite(float(value)), (name, beta)
        assert np.all(np.isfinite(np.asarray(gp))) and np.all(np.isfinite(np.asarray(gr))), (name, beta)
        assert np.all(np.asarray(gp)[~np.asarray(valid)] == 0.0)


@pytest.mark.parametrize("name", losses.NAMES)
def test_jit_vmap_and_finite_difference_gradient(name):
    k = 3 if name in losses.MULTI_NEGATIVE else 1
    p, r, lengths, valid, *_ = _inputs(7, k=k, invalid_frac=0.2 if k > 1 else 0.0)
    hp = {key: v for key, v in losses.DEFAULTS[name].items() if key != "beta"}
    hp.update({"bco": {"delta": 0.2}, "kto": {"kl": 0.4}}.get(name, {}))
    hp["beta"] = 0.2
    fn = losses.get(name)
    args = _f32(p, r, lengths) + [jnp.asarray(valid)]
    halves = lambda x: x.reshape(2, B // 2, -1)
    # Per half: rpo / cpo / simpo normalise their NLL by the batch's token count (TRL), so each vmapped
    # half is its own batch.
    eager = jnp.concatenate([fn(*[halves(x)[h] for x in args[:2]], lengths=halves(args[2])[h],
                                valid=halves(args[3])[h], **hp)[0] for h in range(2)])
    mapped, metrics = jax.jit(jax.vmap(lambda a, b_, c, d: fn(a, b_, lengths=c, valid=d, **hp)))(
        *[halves(x) for x in args])
    np.testing.assert_allclose(np.asarray(mapped).reshape(-1), np.asarray(eager), rtol=1e-6, atol=1e-6)
    assert all(v.shape == (2, B // 2) for v in metrics.values())

    with jax.enable_x64(True):  # gradient vs central differences, in one compiled float64 call
        p64, r64 = jnp.asarray(p[:4]), jnp.asarray(r[:4])
        kw = dict(lengths=jnp.asarray(lengths[:4]), valid=jnp.asarray(valid[:4]), **hp)
        total = lambda a: jnp.sum(fn(a, r64, **kw)[0])
        h = 1e-6
        steps = jnp.asarray(h * np.eye(p64.size).reshape((-1,) + p64.shape))

        @jax.jit
        def grad_and_differences(a):
            values = jax.vmap(total)(jnp.concatenate([a + steps, a - steps]))
            return jax.grad(total)(a), (values[: len(steps)] - values[len(steps):]) / (2 * h)

        grad, fd = (np.asarray(x) for x in grad_and_differences(p64))
        np.testing.assert_allclose(grad, fd.reshape(grad.shape), rtol=1e-5, atol=1e-6)


def test_errors_name_the_objective():
    p = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="'dpo'.*pairwise"):
        losses.get("dpo")(p, p, beta=0.1)
    with pytest.raises(ValueError, match="'nope'.*mcpo"):
        losses.get("nope")
    with pytest.raises(ValueError, match="'ipo' needs lengths"):
        losses.get("ipo")(p[:, :2], p[:, :2], beta=0.1)
    with pytest.raises(ValueError, match="'nca' needs ref_logps"):
        losses.get("nca")(p[:, :2], None, beta=0.1)
    with pytest.raises(TypeError):
        losses.get("cpo")(p[:, :2], None, beta=0.1, lengths=p[:, :2] + 1, gamma=1.0)
    # reference-free objectives ignore ref_logps
    a, _ = losses.get("simpo")(p[:, :2] - 1, None, beta=0.1, lengths=p[:, :2] + 2)
    b, _ = losses.get("simpo")(p[:, :2] - 1, p[:, :2] + 5, beta=0.1, lengths=p[:, :2] + 2)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_registry_and_defaults():
    expected = {"mcpo", "rnce", "dpo", "ipo", "hinge", "robust", "rpo", "exo", "simpo", "cpo", "bco", "kto",
                "apo_zero", "apo_down", "sppo", "nca", "sft"}
    assert set(losses.NAMES) == expected == set(losses.DEFAULTS)
    assert losses.REFERENCE_FREE == {"simpo", "cpo", "sft"}
    assert losses.MULTI_NEGATIVE == {"mcpo", "rnce"}
    assert losses.PAIRWISE == expected - {"mcpo", "rnce", "sft"}
    assert all(d["beta"] == 0.01 for d in losses.DEFAULTS.values())
    assert losses.DEFAULTS["rpo"]["lam"] == losses.DEFAULTS["cpo"]["lam"] == 0.1
    assert losses.DEFAULTS["simpo"]["gamma"] == 10.0
    for name, hp in losses.DEFAULTS.items():  # every default set is accepted as is
        k = 2 if name in losses.MULTI_NEGATIVE else 1
        x = -jnp.ones((2, 1 + k))
        loss, _ = losses.get(name)(x, x * 2, lengths=-x, **hp)
        assert loss.shape == (2,)


def test_bco_running_delta_helpers():
    p, r, _, valid, *_ = _inputs(3, k=1)
    beta = 0.2
    batch = losses.bco_batch_reward(jnp.asarray(p), jnp.asarray(r), beta=beta, valid=jnp.asarray(valid))
    ok = valid[:, 1]
    np.testing.assert_allclose(float(batch), beta * np.concatenate([(p - r)[ok, 0], (p - r)[ok, 1]]).mean(),
                               rtol=1e-6)
    mean, count = 0.0, 0.0
    for value in (1.0, 2.0, 6.0):
        mean, count = losses.running_mean_update(mean, count, value)
    assert (mean, count) == (3.0, 3.0)


@pytest.mark.parametrize("name", ["rpo", "cpo", "simpo"])
def test_nll_batch_mean_is_trl_token_mean(name):
    """TRL's batch loss: mean over pairs of the preference term + lam * (sum of chosen-token NLL / number
    of chosen tokens), computed here from token-level log-probs of ragged completions (no per-sequence
    shortcut); the objective's per-example losses must average to exactly that."""
    rng = np.random.default_rng(11)
    n, beta, lam = 8, 0.3, 0.7
    lens = rng.integers(1, 40, size=(n, 2))
    tok = [[-rng.uniform(0.01, 4.0, size=lens[i, j]) for j in range(2)] for i in range(n)]  # per-token log-probs
    p = np.array([[t.sum() for t in row] for row in tok])
    r = p + rng.normal(0.0, 3.0, size=p.shape)
    all_chosen_tokens = np.concatenate([row[0] for row in tok])
    trl_nll = -all_chosen_tokens.mean()  # F.cross_entropy(..., reduction="mean") over the chosen half
    hp = {"lam": lam} if name != "simpo" else {"lam": lam, "gamma": 0.5}
    loss, metrics = losses.get(name)(*_f32(p, r), beta=beta, lengths=jnp.asarray(lens, jnp.float32), **hp)
    no_nll, _ = losses.get(name)(*_f32(p, r), beta=beta, lengths=jnp.asarray(lens, jnp.float32), **{**hp, "lam": 0.0})
    np.testing.assert_allclose(float(jnp.mean(loss)), float(jnp.mean(no_nll)) + lam * trl_nll, rtol=1e-5)
    np.testing.assert_allclose(float(jnp.mean(metrics["nll"])), trl_nll, rtol=1e-5)
    # the per-example reduction differs whenever lengths differ
    ex, _ = losses.get(name)(*_f32(p, r), beta=beta, lengths=jnp.asarray(lens, jnp.float32),
                             nll_reduction="example", **hp)
    assert abs(float(jnp.mean(ex)) - float(jnp.mean(loss))) > 1e-3
    with pytest.raises(ValueError, match="nll_reduction"):
        losses.get(name)(*_f32(p, r), beta=beta, lengths=jnp.asarray(lens, jnp.float32), nll_reduction="sum", **hp)


# ---------------------------------------------------------------------------------------------- register


def _scaled_mcpo(policy, ref, *, beta, lengths, valid, scale=1.0):
    """MC-PO written by hand on the sanitized arrays (invalid columns are zeros), times `scale`."""
    rewards = beta * (policy - ref)
    logits = jnp.where(valid, rewards, -jnp.inf)
    return scale * (jax.nn.logsumexp(logits, axis=1) - rewards[:, 0])


@pytest.fixture
def registered():
    made = []

    def reg(name, fn, **kw):
        made.append(name)
        return losses.register(name, fn, **kw)

    yield reg
    for name in made:  # leave the registry as the other tests expect it
        losses._OBJECTIVES.pop(name, None)
        losses.DEFAULTS.pop(name, None)
        losses.NAMES = tuple(losses._OBJECTIVES)
        for attr in ("PAIRWISE", "MULTI_NEGATIVE", "REFERENCE_FREE", "NEEDS_LENGTHS"):
            setattr(losses, attr, getattr(losses, attr) - {name})


def test_register_custom_objective_is_a_first_class_name(registered):
    fn = registered("scaled_mcpo", _scaled_mcpo, defaults={"scale": 1.0})
    assert losses.get("scaled_mcpo") is fn and "scaled_mcpo" in losses.names() == losses.NAMES
    assert losses.names()[: len(losses.BUILTIN_NAMES)] == losses.BUILTIN_NAMES
    assert "scaled_mcpo" in losses.MULTI_NEGATIVE and "scaled_mcpo" not in losses.PAIRWISE
    assert losses.DEFAULTS["scaled_mcpo"] == {"beta": 0.01, "scale": 1.0}
    rng = np.random.default_rng(0)
    p, r = rng.normal(size=(4, 3)) * 5, rng.normal(size=(4, 3)) * 5
    valid = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 0], [1, 1, 1]], bool)
    p_nan = np.where(valid, p, np.nan)  # invalid columns are sanitized before the custom function sees them
    got, metrics = fn(*_f32(p_nan, r), beta=0.5, valid=valid, scale=2.0)
    want, want_metrics = losses.get("mcpo")(*_f32(p, r), beta=0.5, valid=valid)
    np.testing.assert_allclose(got, 2.0 * np.asarray(want), rtol=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5)  # added for the trainer's curves
    g = jax.grad(lambda x: jnp.sum(fn(x, jnp.asarray(r, jnp.float32), beta=0.5, valid=valid)[0]))(
        jnp.asarray(p_nan, jnp.float32))
    assert np.isfinite(np.asarray(g)).all()


def test_register_pairwise_reference_free_and_errors(registered):
    def margin(policy, ref, *, beta, lengths, valid):
        assert ref is None  # reference-free: never given a reference
        avg = policy / lengths
        return -jax.nn.log_sigmoid(beta * (avg[:, 0] - avg[:, 1])), {"avg_chosen": avg[:, 0]}

    fn = registered("avg_margin", margin, pairwise=True, reference_free=True, needs_lengths=True)
    assert {"avg_margin"} <= losses.PAIRWISE & losses.REFERENCE_FREE & losses.NEEDS_LENGTHS
    p = jnp.asarray([[-3.0, -4.0], [-1.0, -9.0]])
    loss, metrics = fn(p, None, beta=1.0, lengths=jnp.asarray([[1.0, 2.0], [1.0, 1.0]]),
                       valid=jnp.asarray([[True, True], [True, False]]))
    np.testing.assert_allclose(loss, [-np.log(1 / (1 + np.exp(-(-3.0 + 2.0)))), 0.0], rtol=1e-5)
    np.testing.assert_allclose(metrics["avg_chosen"], [-3.0, -1.0])
    with pytest.raises(ValueError, match="pairwise"):
        fn(jnp.zeros((2, 3)), None, beta=1.0, lengths=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="needs lengths"):
        fn(p, None, beta=1.0)
    with pytest.raises(ValueError, match="built-in"):
        losses.register("dpo", margin)
    bad = registered("bad_shape", lambda policy, ref, **kw: policy)
    with pytest.raises(ValueError, match=r"one loss per example"):
        bad(p, p, beta=1.0)


def test_registered_objective_runs_in_the_train_step(registered):
    """The jitted step and the trainer's validation accept a registered name like a built-in."""
    from _train_fixtures import TOY_AXES, ToyLM, toy_batch

    from mcpo_jax import sharding as shd
    from mcpo_jax.training import state as st
    from mcpo_jax.training import step as S

    registered("scaled_mcpo", _scaled_mcpo)
    outs = {}
    for name, hp in (("mcpo", ()), ("scaled_mcpo", (("scale", 3.0),))):
        cfg = S.StepConfig(objective=name, sampler="mc", num_negatives=2, beta=1.0, loss_hparams=hp)
        graphdef, params, rest = st.split_model(ToyLM(seed=1))
        ref = jax.tree.map(lambda x: x * 0.9, params)
        tx, sched = S.make_optimizer(learning_rate=1e-2, total_steps=4, warmup_ratio=0.0)
        mesh = shd.make_mesh(1, 1, 1)
        ss = st.state_shardings(tx, params, shd.param_shardings(TOY_AXES, params, mesh), mesh)
        state = st.init_state(params, tx, 7, shardings=ss)
        batch = toy_batch(b=4, c=4, accum=1, vocab=ToyLM().lm_head_kernel().shape[1])
        _, metrics = jax.jit(S.make_train_step(cfg, graphdef, rest, tx, sched))(state, ref, batch)
        outs[name] = jax.device_get(metrics)
    np.testing.assert_allclose(outs["scaled_mcpo"]["loss"], 3.0 * outs["mcpo"]["loss"], rtol=1e-5)
    np.testing.assert_array_equal(outs["scaled_mcpo"]["selected"], outs["mcpo"]["selected"])
    assert outs["scaled_mcpo"]["rewards/accuracies"] == outs["mcpo"]["rewards/accuracies"]
