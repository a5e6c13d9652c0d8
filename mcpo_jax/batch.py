"""The preference batch, defined once: every key the train step reads, its per-example shape and dtype.

    input_ids, attention_mask, loss_mask   [..., C, T] int32   C = 1 + L rows per example, row 0 = y0
    valid, ranks                           [..., C]    bool / int32 (dataset rank of each row, -1 = none)
    fixed_index                            [...]       int32 (the dataset's own rejected: the `fixed` sampler)
    ref_logps (reference="precomputed")    [..., C]    float32

The data pipeline yields these (plus `example_id`, host bookkeeping) per process; `step_arrays` keeps the
step's keys; `abstract_shapes` describes one for compiling from shapes (the bench's audit).
"""

from __future__ import annotations

import numpy as np

# key -> (dimensions after the example axis, dtype)
STEP_FIELDS: dict[str, tuple[tuple[str, ...], type]] = {
    "input_ids": (("C", "T"), np.int32),
    "attention_mask": (("C", "T"), np.int32),
    "loss_mask": (("C", "T"), np.int32),
    "valid": (("C",), np.bool_),
    "ranks": (("C",), np.int32),
    "fixed_index": ((), np.int32),
    "ref_logps": (("C",), np.float32),  # only with reference="precomputed"
}
STEP_KEYS = tuple(STEP_FIELDS)
HOST_KEYS = STEP_KEYS[:-1] + ("example_id",)  # what a tokenized dataset's `take` returns (+ ref_logps if set)


def step_arrays(batch: dict) -> dict[str, np.ndarray]:
    """The step's keys of a host batch (numpy), int64 narrowed to int32 (JAX's default int)."""
    out = {}
    for k in STEP_KEYS:
        if k in batch:
            x = np.asarray(batch[k])
            out[k] = x.astype(np.int32) if x.dtype == np.int64 else x
    return out


def abstract_shapes(lead: tuple[int, ...], *, columns: int, length: int, precomputed_ref: bool = False):
    """{key: (shape, dtype)} of a batch whose example axes are `lead` (e.g. (A, b)) for the step's keys."""
    sizes = {"C": columns, "T": length}
    return {k: (tuple(lead) + tuple(sizes[d] for d in dims), dtype) for k, (dims, dtype) in STEP_FIELDS.items()
            if k != "ref_logps" or precomputed_ref}
