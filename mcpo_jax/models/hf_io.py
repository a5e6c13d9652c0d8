"""Hugging Face checkpoints in and out: safetensors <-> the NNX `Transformer`.

The whole mapping is `HF_TABLE`: (Hugging Face key pattern, parameter path, named transform).
`{i}` in a pattern is the layer index; such a tensor is one slice of a parameter stacked on the
leading "layers" axis. Loading walks the checkpoint one tensor at a time: the bytes of that
tensor are read from disk, converted, and sent straight to the parameter's target sharding
(a stacked parameter is preallocated on its sharding and each layer is written into it with a
donated in-place update), so the host holds one tensor at a time, never the model.

Only safetensors are read (never pickle / `.bin`), and no remote code is ever run: the
architecture is ours and the config is parsed by `ModelConfig.from_hf`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from mcpo_jax.sharding import DEFAULT_RULES, logical_to_sharding, model_layout

from .config import ModelConfig, load_config
from .decoder import Transformer, logical_axes

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: missing / unexpected / misshaped / corrupt tensor."""


# ------------------------------------------------------------------------------------------
# Named transforms between a Hugging Face tensor and our parameter (one layer's slice).
# `load(hf_array, ours_shape)` -> ours; `save(ours_array)` -> HF layout; `hf_shape(ours_shape)`.
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transform:
    name: str
    load: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    save: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


TRANSFORMS = {
    t.name: t
    for t in (
        Transform("identity", lambda a, s: a, lambda a: a, lambda s: tuple(s)),
        # nn.Linear weight [out, in] <-> kernel [in, out]
        Transform("transpose", lambda a, s: a.T, lambda a: a.T, lambda s: (s[1], s[0])),
        # q/k/v projection [heads*hd, D] <-> [D, heads, hd]
        Transform(
            "to_heads_in",
            lambda a, s: a.T.reshape(s),
            lambda a: a.reshape(a.shape[0], -1).T,
            lambda s: (s[1] * s[2], s[0]),
        ),
        # o projection [D, heads*hd] <-> [heads, hd, D]
        Transform(
            "to_heads_out",
            lambda a, s: a.T.reshape(s),
            lambda a: a.reshape(-1, a.shape[-1]).T,
            lambda s: (s[2], s[0] * s[1]),
        ),
        # q/k/v bias [heads*hd] <-> [heads, hd]
        Transform("split_heads", lambda a, s: a.reshape(s), lambda a: a.reshape(-1), lambda s: (s[0] * s[1],)),
    )
}

# (Hugging Face key pattern, parameter path in nnx.state(model), transform name)
HF_TABLE: tuple[tuple[str, str, str], ...] = (
    ("model.embed_tokens.weight", "embed", "identity"),
    ("model.layers.{i}.input_layernorm.weight", "layers/attn_norm", "identity"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers/q_proj", "to_heads_in"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers/k_proj", "to_heads_in"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers/v_proj", "to_heads_in"),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers/q_bias", "split_heads"),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers/k_bias", "split_heads"),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers/v_bias", "split_heads"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers/o_proj", "to_heads_out"),
    ("model.layers.{i}.self_attn.o_proj.bias", "layers/o_bias", "identity"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers/mlp_norm", "identity"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers/gate_proj", "transpose"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers/up_proj", "transpose"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers/down_proj", "transpose"),
    ("model.layers.{i}.mlp.gate_proj.bias", "layers/gate_bias", "identity"),
    ("model.layers.{i}.mlp.up_proj.bias", "layers/up_bias", "identity"),
    ("model.layers.{i}.mlp.down_proj.bias", "layers/down_bias", "identity"),
    ("model.norm.weight", "final_norm", "identity"),
    ("lm_head.weight", "lm_head", "transpose"),
)

# Keys that some checkpoints carry and that hold nothing we need (non-persistent rope buffers).
_IGNORED = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)


def _compile_table():
    compiled = []
    for pattern, path, transform in HF_TABLE:
        regex = re.compile(re.escape(pattern).replace(r"\{i\}", r"(\d+)") + r"\Z")
        compiled.append((regex, pattern, tuple(path.split("/")), TRANSFORMS[transform], "{i}" in pattern))
    return compiled


_TABLE = _compile_table()


def _match(key: str):
    """(param path, layer index or None, transform) for a Hugging Face key, or None."""
    for regex, _, path, transform, layered in _TABLE:
        m = regex.match(key)
        if m:
            return path, (int(m.group(1)) if layered else None), transform
    return None


# ------------------------------------------------------------------------------------------
# Safetensors, one tensor at a time
# ------------------------------------------------------------------------------------------

_ST_TO_NP = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}


class SafetensorsReader:
    """Reads single tensors from a .safetensors file (header validated on open).

    Own reader rather than `safe_open(framework="numpy")`, which cannot return bfloat16; the
    header is still checked by the safetensors library first.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            from safetensors import safe_open

            with safe_open(path, framework="numpy"):
                pass
        except FileNotFoundError:
            raise
        except Exception as e:  # SafetensorError: bad header, truncated data, overlapping offsets
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        self._start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for key, e in header.items():
            if e["dtype"] not in _ST_TO_NP:
                raise CheckpointError(f"tensor {key!r} in {path}: unsupported dtype {e['dtype']}")
            dtype, shape = _ST_TO_NP[e["dtype"]], tuple(e["shape"])
            begin, end = e["data_offsets"]
            if end - begin != math.prod(shape) * dtype.itemsize or self._start + end > size:
                raise CheckpointError(f"tensor {key!r} in {path}: data offsets {begin}..{end} do not fit")
            self.entries[key] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return sorted(self.entries, key=lambda k: self.entries[k][2])  # file order: sequential reads

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def read(self, key: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[key]
        out = np.empty(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(self._start + begin)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != end - begin:
            raise CheckpointError(f"tensor {key!r} in {self.path}: file truncated ({got} of {end - begin} bytes)")
        return out


def write_safetensors(path: str, tensors: Sequence[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]):
    """Stream tensors to `path`; each is produced by its callable only when written."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape, dtype, _ in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[key] = {"dtype": _NP_TO_ST[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for key, shape, dtype, produce in tensors:
            arr = np.ascontiguousarray(produce(), dtype=dtype)
            if arr.shape != tuple(shape):
                raise AssertionError(f"{key}: produced {arr.shape}, declared {shape}")
            f.write(arr.reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------
# Locating a checkpoint
# ------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | os.PathLike, *, config_key: str = "model.path") -> str:
    """A local folder for `path`: the folder itself, or a hub snapshot (weights + configs only).

    A missing path or an unreachable hub raises `mcpo_jax.hub.MissingPath` / `HubUnreachable` at once (no
    download retries), naming `config_key` and the flag to pass a local folder.
    """
    from mcpo_jax import hub

    kind, where = hub.resolve(path, key=config_key, what="folder")
    if kind == "local":
        if not os.path.isdir(where):
            raise NotADirectoryError(f"{config_key}={os.fspath(path)!r} is a file; pass the Hugging Face folder "
                                     "that holds config.json")
        return where
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            where, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"],
            local_files_only=kind == "cached",
        )
    except Exception as e:
        raise hub.LocationError(
            f"{config_key}={where!r}: could not fetch it from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e)[:200]}). If the id is wrong or the repo is gated, download it elsewhere and pass the local "
            f"folder (config.json + *.safetensors): {hub.FIXES.get(config_key, '--config.model.path=/path')}"
        ) from None


def checkpoint_files(folder: str) -> list[str]:
    """The safetensors files of a folder (single file, or the shards named by the index)."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.exists(os.path.join(folder, name)):
                tensors = sorted(k for k, v in weight_map.items() if v == name)
                raise CheckpointError(
                    f"{index} names {name} (tensors {tensors[:3]}...) but {os.path.join(folder, name)} does not exist"
                )
        return [os.path.join(folder, n) for n in files]
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.exists(single):
        return [single]
    pickles = [n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle checkpoints ({pickles[:3]}); they are never loaded (arbitrary code "
            "execution). Convert them to safetensors first."
        )
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} and no {INDEX_FILE}")


# ------------------------------------------------------------------------------------------
# from_pretrained
# ------------------------------------------------------------------------------------------


def _target_sharding(axes, shape, mesh, rules):
    if mesh is None:
        return SingleDeviceSharding(jax.local_devices()[0])
    return logical_to_sharding(axes, shape, mesh, rules)


def _drop_leading(sharding):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


@functools.lru_cache(maxsize=None)
def _zeros_fn(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _write_layer_fn(sharding):
    """stacked[i] = x, in place (the stacked buffer is donated), result on `sharding`."""
    return jax.jit(
        lambda stacked, x, i: jax.lax.dynamic_update_index_in_dim(stacked, x.astype(stacked.dtype), i, axis=0),
        out_shardings=sharding,
        donate_argnums=0,
    )


def _place(host: np.ndarray, sharding) -> jax.Array:
    """Host array -> device array on `sharding`; each device receives only its own slice."""
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    mesh=None,
    rules=None,
    remat: bool | str = False,
    attention_impl: str | None = None,
    config_key: str = "model.path",
) -> Transformer:
    """Load a Hugging Face Llama / Mistral checkpoint (local folder or hub id) into a Transformer.

    `config_key` names the config field in errors (a missing folder, an unreachable hub).

    dtype: compute dtype; param_dtype: storage dtype (None: same as dtype). With a `mesh`, every
    parameter is created directly on the sharding its logical axes map to under `rules`
    (default `mcpo_jax.sharding.DEFAULT_RULES`); without, on the first local device.
    """
    folder = resolve_checkpoint(path, config_key=config_key)
    config = load_config(folder)
    param_dtype = dtype if param_dtype is None else param_dtype
    rules = DEFAULT_RULES if rules is None else rules
    files = checkpoint_files(folder)

    abstract = nnx.eval_shape(
        lambda: Transformer(config, dtype=dtype, param_dtype=param_dtype, remat=remat, attention_impl=attention_impl,
                            layout=model_layout(mesh, rules))
    )
    graphdef, abstract_state = nnx.split(abstract)
    flat_axes = dict(nnx.to_flat_state(logical_axes(abstract)))
    flat_abstract = {p: v for p, v in nnx.to_flat_state(abstract_state)}
    targets = {}
    for p, var in flat_abstract.items():
        axes = flat_axes[p]
        axes = axes.get_value() if isinstance(axes, nnx.Variable) else axes
        targets[tuple(str(k) for k in p)] = (var.shape, _target_sharding(tuple(axes), var.shape, mesh, rules))

    L = config.num_hidden_layers
    expected = {}  # (path, layer) -> HF key, for the missing-tensor report
    for _, pattern, ppath, _, layered in _TABLE:
        if ppath in targets:
            for i in range(L) if layered else [None]:
                expected[(ppath, i)] = pattern.replace("{i}", str(i))

    values: dict[tuple[str, ...], jax.Array] = {}
    seen: dict[tuple, str] = {}
    np_dtype = np.dtype(param_dtype)
    for file in files:
        reader = SafetensorsReader(file)
        for key in reader.keys():
            if any(r.match(key) for r in _IGNORED):
                continue
            hit = _match(key)
            if hit is None or hit[0] not in targets or (hit[1] is not None and hit[1] >= L):
                if hit is not None and hit[0] == ("lm_head",) and config.tie_word_embeddings:
                    log.info("%s: ignoring %s (tie_word_embeddings=true)", file, key)
                    continue
                why = "no such parameter in this model" if hit is None else (
                    f"layer {hit[1]} >= num_hidden_layers={L}" if hit[0] in targets else
                    f"the config has no {'/'.join(hit[0])} (attention_bias / mlp_bias / tie_word_embeddings?)"
                )
                raise CheckpointError(f"unexpected tensor {key!r} in {file}: {why}")
            ppath, layer, transform = hit
            if (ppath, layer) in seen:
                raise CheckpointError(f"tensor {key!r} appears twice: in {seen[(ppath, layer)]} and {file}")
            full_shape, sharding = targets[ppath]
            ours_shape = full_shape[1:] if layer is not None else full_shape
            want = transform.hf_shape(ours_shape)
            if reader.shape(key) != want:
                raise CheckpointError(
                    f"tensor {key!r} in {file} has shape {list(reader.shape(key))}, the config implies {list(want)}"
                )
            host = transform.load(reader.read(key), ours_shape).astype(np_dtype, copy=False)
            if layer is None:
                values[ppath] = _place(host, sharding)
            else:
                if ppath not in values:
                    values[ppath] = _zeros_fn(tuple(full_shape), np_dtype, sharding)()
                values[ppath] = _write_layer_fn(sharding)(
                    values[ppath], _place(host, _drop_leading(sharding)), np.int32(layer)
                )
            del host
            seen[(ppath, layer)] = file

    missing = [k for pl, k in expected.items() if pl not in seen]
    if missing:
        raise CheckpointError(
            f"{len(missing)} tensor(s) missing from {folder} (files {[os.path.basename(f) for f in files]}): "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )
    state = abstract_state
    for p, var in nnx.to_flat_state(state):
        var.set_value(values[tuple(str(k) for k in p)])
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------
# save_pretrained
# ------------------------------------------------------------------------------------------


def _to_host(x: jax.Array) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@jax.jit
def _take_layer(stacked, i):
    """stacked[i] with a traced index: one compile per parameter shape, not per layer."""
    return jax.lax.dynamic_index_in_dim(stacked, i, axis=0, keepdims=False)


def _hf_tensors(model: Transformer, dtype) -> list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]:
    flat = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    L = model.config.num_hidden_layers
    out = []
    for _, pattern, ppath, transform, layered in _TABLE:
        if ppath not in flat:
            continue
        var = flat[ppath]
        np_dtype = np.dtype(dtype or var.get_value().dtype)
        shape = var.get_value().shape
        if layered:
            for i in range(L):
                out.append((
                    pattern.replace("{i}", str(i)),
                    transform.hf_shape(shape[1:]),
                    np_dtype,
                    lambda v=var, i=i, t=transform: t.save(_to_host(_take_layer(v.get_value(), np.int32(i)))),
                ))
        else:
            out.append((pattern, transform.hf_shape(shape), np_dtype, lambda v=var, t=transform: t.save(_to_host(v.get_value()))))
    return out


def save_pretrained(
    model: Transformer,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    dtype=None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    rope_style: str = "v5",
) -> str:
    """Write a Hugging Face folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    config.json + model.safetensors, or model-0000k-of-0000n.safetensors + index when the weights
    exceed `max_shard_bytes`. `tokenizer`: a tokenizer object (its save_pretrained is called) or a
    folder whose tokenizer files are copied. `dtype`: storage dtype (default: the params' dtype).
    Tensors stream to disk one at a time. In a multi-process run only process 0 writes.
    """
    out_dir = os.fspath(out_dir)
    tensors = _hf_tensors(model, dtype)
    if jax.process_index() != 0:
        for _, _, _, produce in tensors:  # every process takes part in the gathers
            produce()
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    hf = model.config.to_hf(rope_style=rope_style)
    hf["dtype"] = str(np.dtype(dtype or model.param_dtype))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)

    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        nbytes = math.prod(t[1]) * t[2].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    for stale in os.listdir(out_dir):
        if stale.endswith(".safetensors") or stale == INDEX_FILE:
            os.remove(os.path.join(out_dir, stale))
    if len(shards) == 1:
        write_safetensors(os.path.join(out_dir, SINGLE_FILE), shards[0])
    else:
        weight_map = {}
        total = 0
        for k, shard in enumerate(shards):
            name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(out_dir, name), shard)
            for key, shape, dt, _ in shard:
                weight_map[key] = name
                total += math.prod(shape) * dt.itemsize
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            _copy_tokenizer_files(os.fspath(tokenizer), out_dir)
        else:
            tokenizer.save_pretrained(out_dir)
    return out_dir


def _copy_tokenizer_files(src: str, out_dir: str, names: Iterable[str] = TOKENIZER_FILES):
    copied = [n for n in names if os.path.exists(os.path.join(src, n))]
    if not copied:
        raise FileNotFoundError(f"no tokenizer files ({list(names)[:4]} ...) in {src}")
    for n in copied:
        shutil.copyfile(os.path.join(src, n), os.path.join(out_dir, n))
