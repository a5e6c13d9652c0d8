"""GGUF (llama.cpp's file format) -> a normal Hugging Face folder, in NumPy (no torch).

A GGUF file holds the weights (often quantized: Q4_1, Q8_0, ...), the architecture as ``llama.*`` metadata and
the tokenizer (vocabulary, merges, special ids, chat template). :func:`convert_gguf` writes what the rest of the
library reads: ``config.json``, fp32 ``model.safetensors`` (dequantized with the ``gguf`` package), a
``tokenizer.json`` built from the vocabulary and merges, ``tokenizer_config.json`` with the chat template, and
``generation_config.json``. Then ``mcpo_jax.models.from_pretrained(folder)`` and transformers both load it.

Only the Llama architecture with a byte-level BPE ("gpt2") tokenizer is converted; anything else fails naming
the field. Dequantization is exact (the fp32 values are the ones llama.cpp computes); the model is the
quantized model, not the original fp32 one.

Two things GGUF changes that are undone here:

* llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` (Hugging Face's rotate-half RoPE layout ->
  GGML's interleaved layout); :func:`_unpermute` is its inverse.
* GGUF shapes are written fastest-axis first; ``gguf.GGUFReader`` already returns row-major (HF) arrays.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator

import numpy as np

# GGUF tensor name -> Hugging Face key ("{i}" = layer).
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4
# llama.cpp's pre-tokenizer names -> whether digits are split one by one before the GPT-2 byte-level regex.
_PRE_TOKENIZERS = {"smollm": True, "gpt2": False, "default": False}


class GGUFError(ValueError):
    """A GGUF file this converter cannot turn into a Hugging Face folder (names the field)."""


def _reader(path: str):
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a runtime dependency
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from e
    return gguf.GGUFReader(path)


def read_metadata(path: str) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as Python values (arrays as lists)."""
    reader = _reader(path)
    return {k: f.contents() for k, f in reader.fields.items()}


def _field(meta: dict, key: str, path: str):
    if key not in meta:
        raise GGUFError(f"{path}: GGUF metadata has no {key!r}")
    return meta[key]


def hf_config(meta: dict, path: str = "<gguf>") -> dict:
    """``config.json`` (LlamaForCausalLM) from the ``llama.*`` metadata."""
    arch = _field(meta, "general.architecture", path)
    if arch != "llama":
        raise GGUFError(f"{path}: general.architecture={arch!r}; only 'llama' is converted")
    p = f"{arch}."
    heads = int(_field(meta, p + "attention.head_count", path))
    hidden = int(_field(meta, p + "embedding_length", path))
    head_dim = int(meta.get(p + "attention.key_length", hidden // heads))
    rope_dim = int(meta.get(p + "rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFError(f"{path}: {p}rope.dimension_count={rope_dim} != head_dim {head_dim} (partial RoPE)")
    if p + "rope.scaling.type" in meta and meta[p + "rope.scaling.type"] not in ("none", ""):
        raise GGUFError(f"{path}: {p}rope.scaling.type={meta[p + 'rope.scaling.type']!r} is not converted")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(meta.get(p + "vocab_size", len(tokens) if tokens else 0))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(_field(meta, p + "feed_forward_length", path)),
        "num_hidden_layers": int(_field(meta, p + "block_count", path)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(p + "attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        # GGUF stores float32: the shortest decimal that round-trips (1e-05, not 9.99999974e-06)
        "rms_norm_eps": float(str(np.float32(_field(meta, p + "attention.layer_norm_rms_epsilon", path)))),
        "rope_theta": float(meta.get(p + "rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(meta.get(p + "context_length", 2048)),
        "tie_word_embeddings": True,  # set from the tensors by convert_gguf
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "dtype": "float32",
    }


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``LlamaModel.permute`` (interleaved RoPE rows -> rotate-half rows)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_key(name: str, path: str) -> str:
    for gguf_name, hf in _NAMES.items():
        parts = gguf_name.split("{i}")
        if len(parts) == 1 and name == parts[0]:
            return hf
        if len(parts) == 2 and name.startswith(parts[0]) and name.endswith(parts[1]):
            layer = name[len(parts[0]):len(name) - len(parts[1])]
            if layer.isdigit():
                return hf.replace("{i}", layer)
    if name.startswith("rope_freqs"):
        raise GGUFError(f"{path}: tensor {name!r} (llama3 RoPE scaling) is not converted")
    raise GGUFError(f"{path}: tensor {name!r} has no Hugging Face name in mcpo_jax.models.gguf._NAMES")


def hf_tensor_plan(path: str, config: dict | None = None) -> list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """(Hugging Face key, shape, producer of the fp32 array) per tensor; nothing is dequantized until called,
    so a conversion holds one tensor at a time (GGUF lists dimensions fastest first: the shape is reversed)."""
    import gguf

    reader = _reader(path)
    if config is None:
        config = hf_config({k: f.contents() for k, f in reader.fields.items()}, path)

    def produce(t, key):
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if ".q_proj." in key:
            w = _unpermute(w, config["num_attention_heads"])
        elif ".k_proj." in key:
            w = _unpermute(w, config["num_key_value_heads"])
        return w

    plan = []
    for t in reader.tensors:
        key = _hf_key(t.name, path)
        plan.append((key, tuple(int(d) for d in reversed(list(t.shape))), lambda t=t, key=key: produce(t, key)))
    return plan


def hf_tensors(path: str, config: dict | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face key, fp32 array) for every tensor of the file, dequantized, one at a time."""
    for key, _, produce in hf_tensor_plan(path, config):
        yield key, produce()


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


def build_tokenizer(meta: dict, path: str = "<gguf>"):
    """A ``tokenizers.Tokenizer`` from the GGUF vocabulary (byte-level BPE, llama.cpp model "gpt2")."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(meta, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2') is converted")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(f"{path}: tokenizer.ggml.pre={pre!r} is not converted (known: {sorted(_PRE_TOKENIZERS)})")
    tokens = list(_field(meta, "tokenizer.ggml.tokens", path))
    types = list(meta.get("tokenizer.ggml.token_type", [_TOKEN_NORMAL] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(meta, "tokenizer.ggml.merges", path)]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError(f"{path}: tokenizer.ggml.tokens has duplicate entries")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    split = [pre_tokenizers.Digits(individual_digits=True)] if _PRE_TOKENIZERS[pre] else []
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        split + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [AddedToken(t, special=ty == _TOKEN_CONTROL, normalized=False)
               for t, ty in zip(tokens, types) if ty in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)]
    tok.add_special_tokens([a for a in special if a.special])
    tok.add_tokens([a for a in special if not a.special])
    if tok.get_vocab_size() != len(tokens):
        raise GGUFError(f"{path}: built a tokenizer of {tok.get_vocab_size()} tokens, the file has {len(tokens)}")
    return tok


def tokenizer_config(meta: dict) -> dict:
    """``tokenizer_config.json``: special tokens by name, the chat template, no BOS added by ``encode``."""
    tokens = meta["tokenizer.ggml.tokens"]

    def name(key):
        i = meta.get(key)
        return tokens[i] if i is not None else None

    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{meta['general.architecture']}.context_length", 2048)),
    }
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return {k: v for k, v in cfg.items() if v is not None}


# ---------------------------------------------------------------------------------------------------------------
# GGUF -> Hugging Face folder
# ---------------------------------------------------------------------------------------------------------------


def convert_gguf(gguf_path: str, out_dir: str, *, generation: dict | None = None) -> str:
    """Write a Hugging Face folder (fp32 safetensors, tokenizer, chat template, generation config).

    ``generation`` overrides ``generation_config.json`` fields (default: greedy, EOS = the GGUF's EOS).
    The folder is written under a temporary name and renamed, so an interrupted conversion leaves nothing.
    """
    from .hf_io import SINGLE_FILE, write_safetensors

    meta = read_metadata(gguf_path)
    config = hf_config(meta, gguf_path)
    plan = hf_tensor_plan(gguf_path, config)
    config["tie_word_embeddings"] = "lm_head.weight" not in {key for key, _, _ in plan}
    tmp = out_dir.rstrip("/") + ".partial"
    if os.path.exists(tmp):
        import shutil

        shutil.rmtree(tmp)
    os.makedirs(tmp)
    # streamed: one dequantized tensor in memory at a time
    write_safetensors(os.path.join(tmp, SINGLE_FILE),
                      [(key, shape, np.dtype(np.float32), produce) for key, shape, produce in plan])
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    build_tokenizer(meta, gguf_path).save(os.path.join(tmp, "tokenizer.json"))
    tcfg = tokenizer_config(meta)
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=2)
    with open(os.path.join(tmp, "special_tokens_map.json"), "w") as f:
        json.dump({k: tcfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in tcfg}, f,
                  indent=2)
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
           "pad_token_id": config["pad_token_id"], "do_sample": False}
    gen.update(generation or {})
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({k: v for k, v in gen.items() if v is not None}, f, indent=2)
    if os.path.exists(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
