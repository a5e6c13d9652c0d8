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

    def __init__(self, dataset, *, batch_size, seed, shuffle, process_index, process_count, micro_batches=1):
        self.dataset = dataset
        self.batch_size = batch_size
        self.micro_batches = micro_batches
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = process_index
        self.process_count = process_count
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
            self._perms = {epoch: perm, **{k: v for k, v in self._perms.items() if k == epoch - 1}}
        return perm

    def indices(self, k: int) -> np.ndarray:
        """Example rows of this process's batch k: its slice of each of the global batch's micro-batches."""
        n = len(self.dataset)
        b, m, count = self.batch_size, self.micro_batches, self.process_count
        per = b // m
        positions_MP = (k * b * count + np.arange(m, dtype=np.int64)[:, None] * per * count
                        + self.process_index * per + np.arange(per, dtype=np.int64)[None, :])
        positions = positions_MP.reshape(-1)
        epochs, offsets = np.divmod(positions, n)
        if not self.shuffle:
            return offsets
        rows = np.empty_like(offsets)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            rows[sel] = self._permutation(int(epoch))[offsets[sel]]
        return rows

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        return self.dataset.take(self.indices(int(k)))

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
) -> grain.DatasetIterator:
    """A checkpointable grain iterator over this process's batches (dicts of numpy arrays, leading dim b).

    Keys: input_ids / attention_mask / loss_mask [b, C, T], valid / ranks [b, C], fixed_index / example_id [b],
    and ref_logps [b, C] when the dataset has them. `batch_size` is the per-process batch size;
    `num_epochs=None` repeats forever. `process_index` / `process_count` default to JAX's.

    `micro_batches` = m > 1 (gradient accumulation) splits each global batch into m global micro-batches of
    consecutive stream positions, and this process's batch is its slice of each, in order: reshaped to
    [m, b // m, ...], row m holds its part of global micro-batch m, which then does not depend on the
    number of processes (the same examples, hence the same kernel draws, in each micro-batch).
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
    fn = _BatchFn(
        dataset,
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
