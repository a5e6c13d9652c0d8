"""KV-cache generation: exact against full forwards and PyTorch transformers, sampling law, top-k/p, EOS."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcpo_jax.online import generate
from mcpo_jax.online.generate import filter_logits
from tests._online_fixtures import tiny_model

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]


def pad(rows, side, width=None, pad_id=0):
    width = width or max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


@pytest.fixture(scope="module")
def model():
    return tiny_model()


N_NEW = 12  # one max_new_tokens for all batch tests, so they share compiled programs


def test_greedy_equals_argmax_of_full_forward_at_every_step(model):
    right = np.asarray(generate(model, *pad(PROMPTS, "right", width=7), max_new_tokens=N_NEW))
    left = np.asarray(generate(model, *pad(PROMPTS, "left"), max_new_tokens=N_NEW))
    np.testing.assert_array_equal(right, left)
    # one full forward of prompt + generated tokens (right padded); the argmax at each position predicts
    # the next generated token
    full_ids, full_mask = pad([p + list(new) for p, new in zip(PROMPTS, right)], "right")
    logits = np.asarray(model(jnp.asarray(full_ids), jnp.asarray(full_mask)))
    for i, (prompt, new) in enumerate(zip(PROMPTS, right)):
        np.testing.assert_array_equal(new, logits[i, len(prompt) - 1:len(prompt) - 1 + N_NEW].argmax(-1))
    assert len({tuple(r) for r in right}) == 3  # the rows really differ


def test_sampling_law_temperature_top_k_top_p_per_row(model):
    """One batch, four groups of rows with their own sampling parameters (one compiled program):
    T=1, T=0.7, top-k=2, top-p needing exactly 4 tokens; the first token's frequencies match the law."""
    n = 2500
    prompt = np.array([[5, 6, 7]], np.int32)
    logits = np.asarray(model(jnp.asarray(prompt)))[0, -1].astype(np.float64)

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    probs = softmax(logits)
    order = np.argsort(-probs)
    cum = np.cumsum(probs[order])
    top_p = float((cum[2] + cum[3]) / 2)  # the smallest prefix reaching it has exactly 4 tokens
    top2, top4 = np.zeros_like(probs), np.zeros_like(probs)
    top2[order[:2]] = probs[order[:2]] / probs[order[:2]].sum()
    top4[order[:4]] = probs[order[:4]] / probs[order[:4]].sum()
    laws = [probs, softmax(logits / 0.7), top2, top4]
    temperature = np.repeat([1.0, 0.7, 1.0, 1.0], n)
    top_k = np.repeat([0, 0, 2, 0], n)
    top_ps = np.repeat([1.0, 1.0, 1.0, top_p], n)
    out = np.asarray(generate(model, np.repeat(prompt, 4 * n, axis=0), None, max_new_tokens=1,
                              temperature=temperature, top_k=top_k, top_p=top_ps, key=jax.random.key(1)))[:, 0]
    for g, law in enumerate(laws):
        freq = np.bincount(out[g * n:(g + 1) * n], minlength=law.size) / n
        tol = 4.5 * np.sqrt(law * (1 - law) / n) + 1e-3
        assert np.all(np.abs(freq - law) <= tol), (g, np.abs(freq - law).max())
        assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(law))  # never outside top-k / nucleus
    assert len(np.unique(out[:n])) > 6 and np.bincount(out[:n]).max() < 0.9 * n  # a real spread, not greedy
    assert set(out[2 * n:3 * n]) == set(order[:2]) and set(out[3 * n:]) == set(order[:4])


def test_filter_logits_hand_made():
    # probs .125 .5 .125 .25
    lg = jnp.log(jnp.array([[0.125, 0.5, 0.125, 0.25]]))

    def keep(k, p):
        out = filter_logits(lg, top_k_B=jnp.array([k]), top_p_B=jnp.array([p]))
        return np.isfinite(np.asarray(out))[0].tolist()

    assert keep(0, 0.5) == [False, True, False, False]
    assert keep(0, 0.75) == [False, True, False, True]
    assert keep(0, 0.76) == [True, True, True, True]  # tied 3rd/4th both kept
    assert keep(1, 1.0) == [False, True, False, False]
    assert keep(3, 1.0) == [True, True, True, True]  # ties at the k-th value are kept


def test_eos_stops_each_row_and_pads_with_eos(model):
    n = N_NEW
    ids, mask = pad(PROMPTS, "left")
    free = np.asarray(generate(model, ids, mask, max_new_tokens=n))
    eos = int(free[0, 3])  # row 0 emits this token at step 3 (maybe earlier too)
    out = np.asarray(generate(model, ids, mask, max_new_tokens=n, eos_id=eos))
    for f, o in zip(free, out):
        hits = np.flatnonzero(f == eos)
        stop = hits[0] if hits.size else n
        np.testing.assert_array_equal(o[:stop + 1], f[:stop + 1])
        assert np.all(o[stop:] == eos)
    # several EOS ids: stop at the first of any, pad with the first id
    other = int(free[1, 2])
    out2 = np.asarray(generate(model, ids, mask, max_new_tokens=n, eos_id=(eos, other)))
    stop1 = min(np.flatnonzero(np.isin(free[1], [eos, other])))
    assert stop1 <= 2 and np.all(out2[1, stop1 + 1:] == eos)


def test_seeded_reproducible_and_per_row_temperature(model):
    ids, mask = pad(PROMPTS, "right", width=7)
    kw = dict(max_new_tokens=N_NEW, temperature=1.0, key=jax.random.key(7))
    a = np.asarray(generate(model, ids, mask, **kw))
    b = np.asarray(generate(model, ids, mask, **kw))
    c = np.asarray(generate(model, ids, mask, **{**kw, "key": jax.random.key(8)}))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = np.asarray(generate(model, ids, mask, max_new_tokens=N_NEW))
    mixed = np.asarray(generate(model, ids, mask, max_new_tokens=N_NEW, temperature=np.array([0.0, 1.0, 0.0]),
                                key=jax.random.key(7)))
    np.testing.assert_array_equal(mixed[[0, 2]], greedy[[0, 2]])
    with pytest.raises(ValueError, match="needs a jax.random key"):
        generate(model, ids, mask, max_new_tokens=2, temperature=0.5)
    with pytest.raises(ValueError, match="expected a scalar or"):
        generate(model, ids, mask, max_new_tokens=2, temperature=[0.1, 0.2])


def test_sharded_params_on_a_multi_device_mesh():
    """4 CPU devices need XLA_FLAGS before jax starts: run tests/_online_multidevice.py in a subprocess."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "_online_multidevice.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_greedy_matches_transformers_generate_token_for_token(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mcpo_jax.models import from_pretrained

    # Mistral with GQA and a sliding window (6) shorter than prompt + generation, so the cached decode path
    # must apply the window exactly as transformers does.
    hf_config = transformers.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=6, max_position_embeddings=128, rms_norm_eps=1e-5,
        initializer_range=0.3, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path)
    model = from_pretrained(str(tmp_path))
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    ids, mask = pad(prompts, "left")
    n = 14
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                          do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                          pad_token_id=0)[:, ids.shape[1]:].numpy()
    ours = np.asarray(generate(model, ids, mask, max_new_tokens=n))
    np.testing.assert_array_equal(ours, ref)
    assert len(set(ref.ravel().tolist())) > 5  # not a degenerate repeat
