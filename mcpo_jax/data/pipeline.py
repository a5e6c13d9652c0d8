"""Batches of a `TokenizedDataset` through grain: shuffled by seed, over epochs, sharded by JAX process.

The examples form one stream: epoch e is a permutation of all N examples drawn from (seed, e), and epochs
follow one another (a global batch may span an epoch boundary; only the stream's last partial global batch is
dropped). Global batch k holds stream positions [k·B, (k+1)·B) with B = batch_size · process_count, and process
p gets the slice [k·B + p·b, k·B + (p+1)·b) of it (b = batch_size). So the processes' batches are disjoint,
together cover every example once per epoch, all processes have the same number of batches (no host waits at
the end of an epoch), and the global batch does not depend on the number of processes.

The iterator is a grain `DatasetIterator`: `get_state()` / `set_state()` (a small dict) restore the position
exactly, and `grain.checkpoint.CheckpointHandler` (with `CheckpointSave` / `CheckpointRestore`) saves it with
orbax alongside the model (one file per process). The state is a position only: restore it into an iterator
made with the same dataset and arguments. `worker_count > 0` builds batches in that many worker processes
(grain `mp_prefetch`); the batches are the same as with `worker_count = 0`. Workers receive the dataset by
pickling: a memory-mapped (cached) `TokenizedDataset` travels as its path, an in-memory one as a copy.

Length-aware batches (`buckets`): each global batch is padded to the smallest bucket length that holds its
longest row instead of the dataset's max_length, so a step costs what its data needs and the jitted step
sees only a handful of shapes (one compile each). `bucket_lengths(max_length, "pow2")` gives 64, 128, 256, ...
below max_length, then max_length. The bucket depends on the whole global batch, yet every process computes
it alone: the global batch's example rows are a function of (seed, epoch, position) that every process
evaluates the same way, so process p looks up the lengths of all processes' rows, and the processes agree
without communicating. `group_by_length=k` sorts the examples of each mega-batch of k global batches by
length (longest first) and shuffles the order of its full batches (seeded), so a batch holds rows of similar
length (less padding; a few batches of long rows instead of every batch having one). Grouping changes the
epoch's permutation only: every example is still seen once per epoch, and a mega-batch boundary is aligned
with global batches when N is a multiple of the global batch size. Both are functions of the batch number,
so `get_state()` / `set_state()` resume exactly, across bucket changes too. `padding_report` computes the
padded vs real tokens of a length distribution under each scheme.

Why not grain's `IndexSampler` + `ShardByJaxProcess`: it gives each process a fixed contiguous slice of the
records and shuffles only within it, so a process sees the same subset every epoch and the global batch
depends on the process count; slicing global batches of one global permutation avoids both.
"""

from __future__ import annotations

import sys

import grain
import numpy as np

from mcpo_jax.data.tokenize import TokenizedDataset


def _process_defaults(process_index, process_count):
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    return process_index, process_count


BUCKET_SPECS = ("pow2", "none")
SMALLEST_BUCKET = 64


def bucket_lengths(max_length: int, spec="pow2") -> tuple[int, ...]:
    """Token lengths a batch may be padded to, ascending, the last = max_length.

    spec: "pow2" (64, 128, 256, ... below max_length), "none" / "" / None (max_length only: fixed shapes), or
    explicit lengths as a sequence of ints or a comma-separated string ("128,384,768"; those >= max_length
    are dropped, max_length is always added).
    """
    max_length = int(max_length)
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        return (max_length,)
    if isinstance(spec, str) and spec.strip().lower() == "pow2":
        out, b = [], SMALLEST_BUCKET
        while b < max_length:
            out.append(b)
            b *= 2
        return (*out, max_length)
    try:
        values = [int(v) for v in (spec.split(",") if isinstance(spec, str) else spec) if str(v).strip()]
    except (TypeError, ValueError):
        raise ValueError(f"bucket lengths {spec!r}: use 'pow2', 'none' or a list of token lengths such as "
                         f"'128,256,512'") from None
    if any(v < 1 for v in values):
        raise ValueError(f"bucket lengths must be positive, got {spec!r}")
    return (*sorted({v for v in values if v < max_length}), max_length)


def bucket_for(length: int, buckets) -> int:
    """The smallest bucket >= `length`."""
    for b in buckets:
        if length <= b:
            return int(b)
    raise ValueError(f"a row of {length} tokens is longer than the largest bucket {buckets[-1]}")


def num_batches(num_examples: int, *, batch_size: int, num_epochs: int, process_count: int = 1) -> int:
    """Batches each process gets for `num_epochs` epochs (the number of training steps)."""
    return num_examples * num_epochs // (batch_size * process_count)


def _absl_flags_ready() -> None:
    """grain's worker processes read absl flags; outside `absl.app.run` mark them parsed (defaults)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class _BatchFn:
    """Global batch number -> this process's batch dict (a picklable callable for grain workers)."""

    def __init__(self, dataset, *, batch_size, seed, shuffle, process_index, process_count, micro_batches=1,
                 buckets=None, group_by_length=0):
        self.dataset = dataset
        self.batch_size = batch_size
        self.micro_batches = micro_batches
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = process_index
        self.process_count = process_count
        self.buckets = None if buckets is None else tuple(int(b) for b in buckets)
        self.group_by_length = int(group_by_length)
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            n = len(self.dataset)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            if self.group_by_length > 0:
                perm = self._grouped(perm, epoch)
            self._perms = {epoch: perm, **{k: v for k, v in self._perms.items() if k == epoch - 1}}
        return perm

    def _grouped(self, perm: np.ndarray, epoch: int) -> np.ndarray:
        """Within each mega-batch of `group_by_length` global batches: longest rows first, then the full
        batches in a seeded random order (a trailing partial batch stays last)."""
        lengths = self.dataset.row_lengths
        global_batch = self.batch_size * self.process_count
        size = self.group_by_length * global_batch
        rng = np.random.default_rng([self.seed, epoch, 0x6C656E])
        out = np.empty_like(perm)
        for start in range(0, len(perm), size):
            chunk = perm[start:start + size]
            chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
            full = len(chunk) // global_batch
            order = np.concatenate([rng.permutation(full), np.arange(full, -(-len(chunk) // global_batch))])
            out[start:start + len(chunk)] = np.concatenate(
                [chunk[i * global_batch:(i + 1) * global_batch] for i in order])
        return out

    def _rows_at(self, positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(positions, len(self.dataset))
        if not self.shuffle and self.group_by_length <= 0:
            return offsets
        rows = np.empty_like(offsets)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            rows[sel] = self._permutation(int(epoch))[offsets[sel]]
        return rows

    def indices(self, k: int, process_index: int | None = None) -> np.ndarray:
        """Example rows of process `process_index`'s (default: this process's) batch k: its slice of each
        of the global batch's micro-batches."""
        p = self.process_index if process_index is None else process_index
        b, m, count = self.batch_size, self.micro_batches, self.process_count
        per = b // m
        positions_MP = (k * b * count + np.arange(m, dtype=np.int64)[:, None] * per * count
                        + p * per + np.arange(per, dtype=np.int64)[None, :])
        return self._rows_at(positions_MP.reshape(-1))

    def global_indices(self, k: int) -> np.ndarray:
        """Example rows of global batch k (all processes); the same on every process."""
        b = self.batch_size * self.process_count
        return self._rows_at(k * b + np.arange(b, dtype=np.int64))

    def length(self, k: int) -> int | None:
        """The token length global batch k is padded to (None: the dataset's max_length)."""
        if self.buckets is None:
            return None
        return bucket_for(int(self.dataset.row_lengths[self.global_indices(k)].max()), self.buckets)

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        k = int(k)
        return self.dataset.take(self.indices(k), length=self.length(k))

    def __getstate__(self):
        return {**self.__dict__, "_perms": {}}


def make_batch_iterator(
    dataset: TokenizedDataset,
    *,
    batch_size: int,
    seed: int,
    num_epochs: int | None,
    shuffle: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    prefetch: int = 4,
    micro_batches: int = 1,
    buckets=None,
    group_by_length: int = 0,
) -> grain.DatasetIterator:
    """A checkpointable grain iterator over this process's batches (dicts of numpy arrays, leading dim b).

    Keys: input_ids / attention_mask / loss_mask [b, C, T], valid / ranks [b, C], fixed_index / example_id [b],
    and ref_logps [b, C] when the dataset has them. `batch_size` is the per-process batch size;
    `num_epochs=None` repeats forever. `process_index` / `process_count` default to JAX's.

    `micro_batches` = m > 1 (gradient accumulation) splits each global batch into m global micro-batches of
    consecutive stream positions, and this process's batch is its slice of each, in order: reshaped to
    [m, b // m, ...], row m holds its part of global micro-batch m, which then does not depend on the
    number of processes (the same examples, hence the same kernel draws, in each micro-batch).

    `buckets` (a `bucket_lengths` spec: "pow2", "none", or lengths) pads each global batch to the smallest
    bucket holding its longest row (token axis T varies by batch; None / "none" = always max_length).
    `group_by_length` = k > 0 sorts rows by length within mega-batches of k global batches (see the module
    docstring). All processes must pass the same values (they decide the bucket each alone).
    """
    process_index, process_count = _process_defaults(process_index, process_count)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if micro_batches < 1 or batch_size % micro_batches:
        raise ValueError(f"batch_size={batch_size} is not a multiple of micro_batches={micro_batches}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    if num_epochs is None:
        total = sys.maxsize // 2
    else:
        total = num_batches(len(dataset), batch_size=batch_size, num_epochs=num_epochs, process_count=process_count)
        if total == 0:
            raise ValueError(
                f"{len(dataset)} examples x {num_epochs} epochs make no global batch of "
                f"{batch_size} x {process_count} processes"
            )
    if group_by_length < 0:
        raise ValueError(f"group_by_length must be >= 0 (0 = off), got {group_by_length}")
    fn = _BatchFn(
        dataset,
        buckets=None if buckets is None else bucket_lengths(dataset.max_length, buckets),
        group_by_length=group_by_length,
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        process_index=process_index,
        process_count=process_count,
        micro_batches=micro_batches,
    )
    ds = grain.MapDataset.range(total).map(fn)
    read = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
    it_ds = ds.to_iter_dataset(read)
    if worker_count > 0:
        _absl_flags_ready()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it_ds)


# ------------------------------------------------------------------------------------------- padding report


class _Lengths:
    """Just the lengths of a dataset: what `_BatchFn` needs to pick rows and buckets."""

    def __init__(self, sequence_lengths: np.ndarray):
        self.sequence_lengths = sequence_lengths
        self.row_lengths = sequence_lengths.max(axis=1)

    def __len__(self) -> int:
        return len(self.row_lengths)


def padding_report(lengths, *, batch_size: int, max_length: int, buckets="pow2", group_by_length: int = 0,
                   seed: int = 0, num_epochs: int = 1) -> dict:
    """Tokens computed vs real for a length distribution, batched exactly as `make_batch_iterator` would.

    `lengths`: [N] or [N, C] prompt + completion token counts (a `TokenizedDataset`'s `sequence_lengths`,
    or a simulated distribution); lengths above max_length are cut to it (truncation). `batch_size` is the
    global batch. Returns real tokens, and for "fixed" (every batch padded to max_length), "bucketed" (this
    config) and "longest" (each batch padded to its own longest row, TRL's choice, unbounded shapes): the
    padded tokens, the fraction of computed tokens that are padding, and the number of distinct shapes.
    """
    seq = np.minimum(np.asarray(lengths, np.int64).reshape(len(lengths), -1), int(max_length))
    n, c = seq.shape
    ds = _Lengths(seq)
    fn = _BatchFn(ds, batch_size=batch_size, seed=seed, shuffle=True, process_index=0, process_count=1,
                  buckets=bucket_lengths(max_length, buckets), group_by_length=group_by_length)
    total = num_batches(n, batch_size=batch_size, num_epochs=num_epochs)
    real = 0
    padded_to = {"fixed": [], "bucketed": [], "longest": []}
    for k in range(total):
        rows = fn.global_indices(k)
        real += int(seq[rows].sum())
        longest = int(ds.row_lengths[rows].max())
        padded_to["fixed"].append(int(max_length))
        padded_to["bucketed"].append(fn.length(k))
        padded_to["longest"].append(longest)
    out = {"examples": n, "columns": c, "batches": total, "batch_size": batch_size, "max_length": int(max_length),
           "buckets": list(fn.buckets), "group_by_length": group_by_length, "real_tokens": real}
    for scheme, ts in padded_to.items():
        computed = batch_size * c * int(np.sum(ts))
        out[scheme] = {"computed_tokens": computed, "padding_fraction": 1.0 - real / max(computed, 1),
                       "shapes": len(set(ts))}
    return out
