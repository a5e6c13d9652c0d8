"""The preference batch, defined once: every key the train step reads, its per-example shape and dtype.

    input_ids, attention_mask, loss_mask   [..., C, T] int32   C = 1 + L rows per example, row 0 = y0
    valid, ranks                           [..., C]    bool / int32 (dataset rank of each row, -1 = none)
    fixed_index                            [...]       int32 (the dataset's own rejected: the `fixed` sampler)
    ref_logps (reference="precomputed")    [..., C]    float32
    stop_request (multi-process runs)      [...]       int32 (this process was asked to stop)

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
    # multi-process runs: 1 on every row of a process that was asked to stop (a signal); the step returns the
    # maximum over all processes as the metric `stop_request`, read with the metrics one step late, so that
    # every process stops after the same step without a host-side collective per step
    "stop_request": ((), np.int32),
}
STEP_KEYS = tuple(STEP_FIELDS)
OPTIONAL_KEYS = ("ref_logps", "stop_request")
HOST_KEYS = tuple(k for k in STEP_KEYS if k not in OPTIONAL_KEYS) + ("example_id",)  # a dataset's `take`


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
            if k not in OPTIONAL_KEYS or (k == "ref_logps" and precomputed_ref)}
