"""No silent cuDNN fallback: on a GPU in half precision, attention that cannot use cuDNN says so once, loudly,
and is recorded (`decoder.attention_fallbacks()`, for the run's summary). Simulated on the CPU."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mcpo_jax import models
from mcpo_jax.models import decoder

CONFIG = models.ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                            rms_norm_eps=1e-5)


@pytest.fixture(autouse=True)
def _fresh_record(monkeypatch):
    monkeypatch.setattr(decoder, "_ATTENTION_FALLBACKS", [])


def test_unsupported_head_dim_on_gpu_is_recorded(caplog):
    with caplog.at_level(logging.WARNING, logger=decoder.__name__):
        assert decoder._attention_impl(jnp.bfloat16, 100, platform="gpu") == "xla"
        assert decoder._attention_impl(jnp.bfloat16, 100, platform="gpu") == "xla"
    assert len(decoder.attention_fallbacks()) == 1  # once per reason
    assert "head_dim 100" in decoder.attention_fallbacks()[0]["reason"]
    assert sum("cuDNN attention NOT used" in r.getMessage() for r in caplog.records) == 1
    # nothing to say where cuDNN is not wanted: CPU, or float32
    assert decoder._attention_impl(jnp.bfloat16, 64, platform="cpu") == "xla"
    assert decoder._attention_impl(jnp.float32, 64, platform="gpu") == "xla"
    assert len(decoder.attention_fallbacks()) == 1


def test_cudnn_call_that_raises_falls_back_loudly(monkeypatch, caplog):
    """Auto mode chose cuDNN (simulated on the CPU, where the cuDNN call raises): XLA attention runs, the same
    logits come out, and the reason is logged and recorded."""
    monkeypatch.setattr(decoder, "_attention_impl", lambda dtype, head_dim, platform=None: "cudnn")
    model = models.Transformer(CONFIG, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.arange(12).reshape(2, 6) % 32, jnp.int32)
    with caplog.at_level(logging.WARNING, logger=decoder.__name__):
        got = model(ids)
    record = decoder.attention_fallbacks()
    assert len(record) == 1 and record[0]["reason"], record
    assert any("cuDNN attention NOT used" in r.getMessage() for r in caplog.records)
    want = models.Transformer(CONFIG, attention_impl="xla", rngs=nnx.Rngs(0))(ids)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # asked for explicitly, cuDNN failing is an error, not a fallback
    with pytest.raises(Exception):
        models.Transformer(CONFIG, attention_impl="cudnn", rngs=nnx.Rngs(0))(ids)


def test_prompt_prefix_attention_falls_back_loudly(monkeypatch):
    """The shared prompt's masked completion attention (a bias for cuDNN): where cuDNN raises it falls back to XLA
    with the same hidden states, and says so, naming the prompt-prefix attention."""
    monkeypatch.setattr(decoder, "_attention_impl", lambda dtype, head_dim, platform=None: "cudnn")
    model = models.Transformer(CONFIG, rngs=nnx.Rngs(0))
    args = (jnp.asarray([[3, 4, 5, 0], [6, 7, 0, 0]]), jnp.asarray([3, 2]),
            jnp.asarray([[[8, 9, 10, 0], [11, 0, 0, 0]], [[12, 13, 0, 0], [14, 15, 16, 17]]]),
            jnp.asarray([[3, 1], [2, 4]]))
    got = model.prefix_hidden_states(*args)
    reasons = [r["reason"] for r in decoder.attention_fallbacks()]
    assert any(r.startswith("prompt-prefix attention:") for r in reasons), reasons
    want = models.Transformer(CONFIG, attention_impl="xla", rngs=nnx.Rngs(0)).prefix_hidden_states(*args)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_attention_follows_the_target_not_the_host():
    """The kernel is chosen from the devices the program is compiled for: splash on TPU, cuDNN on GPU in half
    precision, XLA elsewhere; a model on a mesh reads its mesh's platform, a model without one the host's."""
    assert decoder._attention_impl(jnp.bfloat16, 64, platform="tpu") == "splash"
    assert decoder._attention_impl(jnp.float32, 64, platform="tpu") == "splash"
    assert decoder._attention_impl(jnp.bfloat16, 64, platform="gpu") == "cudnn"
    assert decoder._attention_impl(jnp.bfloat16, 64, platform="cpu") == "xla"
    model = models.Transformer(CONFIG, rngs=nnx.Rngs(0))
    assert model.platform == jax.devices()[0].platform == "cpu"
    from mcpo_jax import sharding

    model.layout = sharding.model_layout(sharding.make_mesh(1, 1, 1))
    assert model.platform == "cpu"


def test_splash_that_raises_falls_back_loudly(monkeypatch, caplog):
    """On a TPU target (simulated: auto mode picks splash, whose call raises here), XLA attention runs with the
    same values, and the fallback is logged and recorded naming the kernel; asked for by name, it raises."""
    monkeypatch.setattr(decoder, "_attention_impl", lambda dtype, head_dim, platform=None: "splash")

    def refuse(*args, **kwargs):
        raise NotImplementedError("this chip does not take it")

    monkeypatch.setattr(decoder.Transformer, "_splash", refuse)
    ids = jnp.asarray(np.arange(12).reshape(2, 6) % 32, jnp.int32)
    with caplog.at_level(logging.WARNING, logger=decoder.__name__):
        got = models.Transformer(CONFIG, rngs=nnx.Rngs(0))(ids)
    (record,) = decoder.attention_fallbacks()
    assert record["kernel"] == "splash" and "does not take it" in record["reason"]
    assert any("splash attention NOT used" in r.getMessage() for r in caplog.records)
    want = models.Transformer(CONFIG, attention_impl="xla", rngs=nnx.Rngs(0))(ids)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(NotImplementedError):
        models.Transformer(CONFIG, attention_impl="splash", rngs=nnx.Rngs(0))(ids)
