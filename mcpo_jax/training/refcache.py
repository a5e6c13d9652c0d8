"""Precomputed reference log-probs (`reference: "precomputed"`).

One pass of the reference model over every (prompt, candidate) row of a dataset gives `ref_logps [N, C]`;
the result is stored under a key made of the dataset fingerprint (its token arrays), the reference
checkpoint's identity and the tokenization/log-prob settings, and reused by later epochs and runs. The
trainer then drops the reference parameters: the step reads the `ref_logps` column of the batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from mcpo_jax import sharding as shd
from mcpo_jax.training import step as step_lib

log = logging.getLogger(__name__)


def dataset_fingerprint(dataset) -> str:
    """The tokenizer's content hash when the dataset has one, else a hash of its arrays."""
    if getattr(dataset, "fingerprint", None):
        return str(dataset.fingerprint)
    h = hashlib.sha256()
    for key in ("input_ids", "prompt_lengths", "completion_lengths", "valid"):
        a = np.ascontiguousarray(getattr(dataset, key))
        h.update(f"{key}{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def checkpoint_fingerprint(model_cfg, path: str) -> str:
    """Identity of the reference weights: a local folder's files (names, sizes, mtimes) and config, a hub id, or
    (no `path`) the random-init preset of `model_cfg` with its seed; plus the compute dtype."""
    h = hashlib.sha256()
    if path and os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if os.path.isfile(full) and (name.endswith(".safetensors") or name.endswith(".json")):
                st = os.stat(full)
                h.update(f"{name}:{st.st_size}:{int(st.st_mtime_ns)}".encode())
                if name == "config.json":
                    with open(full, "rb") as f:
                        h.update(f.read())
        h.update(os.path.abspath(path).encode())
    elif path:
        h.update(f"hub:{path}".encode())
    else:
        h.update(json.dumps({"preset": model_cfg.preset, "overrides": model_cfg.overrides.to_dict(),
                             "seed": int(model_cfg.seed)}, sort_keys=True).encode())
    h.update(f"dtype={model_cfg.dtype}".encode())
    return h.hexdigest()


def cache_key(dataset, model_cfg, settings: dict, *, path: str) -> str:
    """The cache key of a dataset's reference log-probs: data, reference weights (`path`, else the preset of
    `model_cfg`), tokenization and log-prob settings."""
    h = hashlib.sha256()
    h.update(dataset_fingerprint(dataset).encode())
    h.update(checkpoint_fingerprint(model_cfg, path).encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def make_logps_fn(graphdef, rest, mesh, chunk_size: int, *, window: int | None = None,
                  prompt_window: int | None = None):
    """jit: (params, ids, mask, loss_mask) [b, C, T] -> log-probs [b, C], replicated (every process reads it).
    `window` / `prompt_window`: the step's LM-head window and shared prompt (`StepConfig`), the same values."""

    def fn(params, ids_BCT, mask_BCT, loss_mask_BCT):
        return step_lib._rows_logps(graphdef, params, rest, ids_BCT, mask_BCT, loss_mask_BCT, chunk_size, window,
                                    prompt_window)

    return jax.jit(fn, out_shardings=shd.replicated(mesh))


def compute_ref_logps(logps_fn, ref_params, dataset, mesh, *, rows_per_batch: int):
    """Reference log-probs [N, C] of every row, in batches of `rows_per_batch` examples (the last padded)."""
    n, c, t = dataset.input_ids.shape
    dp = shd.data_parallel_size(mesh)
    rows = max(dp, (rows_per_batch // dp) * dp)

    out = np.zeros((n, c), np.float32)
    sharding = shd.batch_sharding(mesh, 3, 0)
    for start in range(0, n, rows):
        idx = np.arange(start, start + rows)
        idx = np.where(idx < n, idx, 0)  # pad the last batch with row 0; dropped below
        batch = dataset.take(idx)
        arrays = [np.ascontiguousarray(batch[k], np.int32) for k in ("input_ids", "attention_mask", "loss_mask")]
        glob = [jax.make_array_from_callback(a.shape, sharding, lambda i, a=a: a[i]) for a in arrays]
        logps = np.asarray(jax.device_get(logps_fn(ref_params, *glob)))
        keep = min(rows, n - start)
        out[start:start + keep] = logps[:keep]
    return out


def load_or_compute(cache_dir: str, key: str, compute):
    """`compute()` once per key; the result lives in cache_dir/ref_logps-<key>.npy.

    Multi-process: hit or miss is decided together (one all-gather of "I have it"), because `compute` is a
    collective: a process that read its copy while another computed would leave that one waiting forever (a
    cache under workdir/cache is per host when the workdir is a URL). Every process that lacked the file
    writes its own copy (a temporary name, then a rename: copies on a shared filesystem do not clash).
    """
    path = os.path.join(cache_dir, f"ref_logps-{key}.npy")
    have = os.path.exists(path)
    everyone = have
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        everyone = bool(np.all(multihost_utils.process_allgather(np.asarray(have))))
    if everyone:
        log.info("reference log-probs read from cache %s", path)
        return np.load(path), True
    values = compute()
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, values)
        os.replace(tmp, path)
        log.info("reference log-probs cached at %s", path)
    return values, False
