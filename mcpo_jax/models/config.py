"""Model configuration read from (and written back to) a Hugging Face `config.json`.

Field names follow Hugging Face so that a config round-trips without a translation table.
Both rotary-embedding styles are understood:

* older transformers: top-level ``rope_theta`` plus an optional ``rope_scaling`` dict
  (``{"rope_type"|"type": ..., "factor": ...}``);
* transformers v5: one ``rope_parameters`` dict holding ``rope_theta`` and ``rope_type`` and the
  scaling parameters.

Internally the theta lives in ``rope_theta`` and the scaling (``None`` for plain RoPE) in
``rope_scaling``, a hashable mapping that always carries ``rope_type``. Anything this port does
not implement raises ``UnsupportedConfigError`` naming the offending key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from flax.core import FrozenDict

DTYPES = ("float32", "bfloat16", "float16")  # the dtype names configs and command lines take


def dtype_of(name: str):
    """The JAX dtype of a dtype name (one of `DTYPES`)."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: use one of {', '.join(DTYPES)}")
    import jax.numpy as jnp

    return getattr(jnp, name)


SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# Parameters each rope_type needs (besides rope_type / rope_theta) and the optional ones we accept.
_ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_ROPE_OPTIONAL = {"original_max_position_embeddings", "partial_rotary_factor", "type"}


class UnsupportedConfigError(ValueError):
    """A Hugging Face config asks for something this port does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Llama / Mistral decoder hyper-parameters (Hugging Face field names)."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None  # FrozenDict incl. "rope_type", or None (plain RoPE)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"model_type={self.model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}"
            )
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, FrozenDict):
            object.__setattr__(self, "rope_scaling", FrozenDict(self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    def num_params(self) -> int:
        d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        h, kv = self.num_attention_heads, self.num_key_value_heads
        attn = d * hd * (h + 2 * kv) + h * hd * d
        if self.attention_bias:
            attn += hd * (h + 2 * kv) + d
        mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
        layer = attn + mlp + 2 * d
        return self.num_hidden_layers * layer + v * d * (1 if self.tie_word_embeddings else 2) + d

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Parse a Hugging Face config dict (either rope style); unsupported options raise."""
        hf = dict(hf)
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"config key 'model_type'={model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}"
            )
        for arch in hf.get("architectures") or ():
            if arch not in SUPPORTED_ARCHITECTURES:
                raise UnsupportedConfigError(
                    f"config key 'architectures' names {arch!r}; supported: {list(SUPPORTED_ARCHITECTURES)}"
                )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedConfigError(f"config key 'hidden_act'={act!r} is not supported; only 'silu'")
        for key in ("attention_dropout", "mlp_dropout", "resid_pdrop"):
            if hf.get(key):
                raise UnsupportedConfigError(f"config key {key!r}={hf[key]!r}: dropout is not supported (use 0.0)")
        if hf.get("layer_types") and len(set(hf["layer_types"])) > 1:
            raise UnsupportedConfigError(
                f"config key 'layer_types' mixes {sorted(set(hf['layer_types']))}; per-layer attention types "
                "are not supported"
            )
        if hf.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedConfigError(
                f"config key 'partial_rotary_factor'={hf['partial_rotary_factor']!r} is not supported (only 1.0)"
            )
        if model_type == "mistral" and hf.get("attention_bias"):
            raise UnsupportedConfigError("config key 'attention_bias'=true is not supported for model_type 'mistral'")

        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if hf.get(key) is None:
                raise UnsupportedConfigError(f"config key {key!r} is missing")
        heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or int(hf["hidden_size"]) // heads
        rope_theta, rope_scaling = _parse_rope(hf)
        eos = hf.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = tuple(int(e) for e in eos)
        sliding = hf.get("sliding_window") if model_type == "mistral" else None
        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=None if sliding is None else int(sliding),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf(self, *, rope_style: str = "v5") -> dict[str, Any]:
        """A `config.json` dict that transformers loads into Llama/MistralForCausalLM.

        rope_style="v5" writes `rope_parameters` (what transformers >= 5 writes);
        "legacy" writes `rope_theta` + `rope_scaling` (transformers 4.x).
        """
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[self.model_type]
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = self.mlp_bias
        else:
            out["sliding_window"] = self.sliding_window
        scaling = dict(self.rope_scaling) if self.rope_scaling is not None else {"rope_type": "default"}
        if rope_style == "v5":
            out["rope_parameters"] = {"rope_theta": self.rope_theta, **scaling}
        elif rope_style == "legacy":
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = None if self.rope_scaling is None else scaling
        else:
            raise ValueError(f"rope_style must be 'v5' or 'legacy', got {rope_style!r}")
        return out

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _parse_rope(hf: Mapping[str, Any]) -> tuple[float, FrozenDict | None]:
    """(rope_theta, rope_scaling) from either config style."""
    params = hf.get("rope_parameters")
    if params is not None:
        where = "rope_parameters"
        if not isinstance(params, Mapping):
            raise UnsupportedConfigError(f"config key 'rope_parameters' must be a dict, got {type(params).__name__}")
        if any(isinstance(v, Mapping) for v in params.values()):
            raise UnsupportedConfigError(
                "config key 'rope_parameters' is nested per layer type; per-layer RoPE is not supported"
            )
        params = dict(params)
        theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    else:
        where = "rope_scaling"
        params = dict(hf.get("rope_scaling") or {})
        theta = hf.get("rope_theta", 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"config key '{where}.rope_type'={rope_type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedConfigError(
            f"config key '{where}.partial_rotary_factor'={params['partial_rotary_factor']!r} is not supported"
        )
    params.pop("partial_rotary_factor", None)
    if rope_type == "llama3" and "original_max_position_embeddings" not in params:
        params["original_max_position_embeddings"] = hf.get("max_position_embeddings", 2048)
    for key in _ROPE_REQUIRED[rope_type]:
        if key not in params:
            raise UnsupportedConfigError(f"config key '{where}.{key}' is required for rope_type {rope_type!r}")
    allowed = set(_ROPE_REQUIRED[rope_type]) | _ROPE_OPTIONAL
    for key in params:
        if key not in allowed:
            raise UnsupportedConfigError(
                f"config key '{where}.{key}' is not supported for rope_type {rope_type!r}"
            )
    if rope_type == "default":
        return float(theta), None
    clean = {"rope_type": rope_type}
    for k, v in sorted(params.items()):
        clean[k] = int(v) if k == "original_max_position_embeddings" else float(v)
    return float(theta), FrozenDict(clean)


def load_config(path: str | os.PathLike) -> ModelConfig:
    """ModelConfig from a Hugging Face folder (or a path to its config.json)."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no config.json at {file}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    return ModelConfig.from_hf(hf)
