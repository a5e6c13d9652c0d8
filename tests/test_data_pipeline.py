"""Batch iterator: shapes, deterministic shuffle, epochs, exact resume (state dict and orbax), process sharding."""

import numpy as np
import pytest

from mcpo_jax.data import TokenizedDataset, make_batch_iterator, num_batches


def _dataset(n=24, c=3, t=5, ref=False):
    rng = np.random.default_rng(0)
    ids = np.arange(n, dtype=np.int32)[:, None, None] * 1000 + np.arange(c * t, dtype=np.int32).reshape(1, c, t)
    prompt = rng.integers(1, 3, (n, c))
    completion = rng.integers(1, 3, (n, c))
    pos = np.arange(t)
    ds = TokenizedDataset.from_masks(
        input_ids=ids,
        attention_mask=(pos < (prompt + completion)[..., None]).astype(np.int32),
        loss_mask=((pos >= prompt[..., None]) & (pos < (prompt + completion)[..., None])).astype(np.int32),
        valid=np.ones((n, c), bool),
        ranks=np.tile(np.arange(1, c + 1, dtype=np.int32), (n, 1)),
        fixed_index=np.ones((n,), np.int32),
        example_id=np.arange(n, dtype=np.int64) + 100,
    )
    if ref:
        ds.set_ref_logps(-np.arange(n * c, dtype=np.float32).reshape(n, c))
    return ds


def _rows(batches):
    return [b["example_id"].tolist() for b in batches]


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_batch_shapes_dtypes_and_ref_logps():
    ds = _dataset(ref=True)
    it = make_batch_iterator(ds, batch_size=4, seed=0, num_epochs=1, process_index=0, process_count=1)
    b = next(it)
    assert set(b) == {"input_ids", "attention_mask", "loss_mask", "valid", "ranks", "fixed_index", "example_id",
                      "ref_logps"}
    assert b["input_ids"].shape == (4, 3, 5) and b["input_ids"].dtype == np.int32
    assert b["valid"].shape == (4, 3) and b["valid"].dtype == bool
    assert b["fixed_index"].shape == (4,) and b["ref_logps"].dtype == np.float32
    rows = b["example_id"] - 100
    np.testing.assert_array_equal(b["input_ids"], ds.input_ids[rows])  # rows travel together
    np.testing.assert_array_equal(b["attention_mask"], ds.attention_mask[rows])
    np.testing.assert_array_equal(b["loss_mask"], ds.loss_mask[rows])
    assert b["loss_mask"].dtype == np.int32 and b["loss_mask"].sum() > 0
    np.testing.assert_array_equal(b["ref_logps"], ds.ref_logps[rows])


def test_epochs_cover_every_example_once_in_a_seeded_order():
    ds = _dataset(n=24)
    rows = _rows(make_batch_iterator(ds, batch_size=4, seed=7, num_epochs=2, process_index=0, process_count=1))
    assert len(rows) == num_batches(24, batch_size=4, num_epochs=2) == 12
    epoch1, epoch2 = sum(rows[:6], []), sum(rows[6:], [])
    assert sorted(epoch1) == sorted(epoch2) == list(range(100, 124))
    assert epoch1 != epoch2  # reshuffled per epoch
    assert rows == _rows(make_batch_iterator(ds, batch_size=4, seed=7, num_epochs=2, process_index=0,
                                             process_count=1))
    assert rows != _rows(make_batch_iterator(ds, batch_size=4, seed=8, num_epochs=2, process_index=0,
                                             process_count=1))
    ordered = _rows(make_batch_iterator(ds, batch_size=4, seed=7, num_epochs=1, shuffle=False, process_index=0,
                                        process_count=1))
    assert sum(ordered, []) == list(range(100, 124))


def test_stream_spans_epoch_boundaries_and_drops_only_the_tail():
    ds = _dataset(n=10)
    rows = _rows(make_batch_iterator(ds, batch_size=4, seed=0, num_epochs=3, process_index=0, process_count=1))
    assert len(rows) == 7  # 30 // 4; the last 2 positions are dropped
    flat = sum(rows, [])
    assert sorted(flat[:10]) == sorted(flat[10:20]) == list(range(100, 110))
    infinite = make_batch_iterator(ds, batch_size=4, seed=0, num_epochs=None, process_index=0, process_count=1)
    assert _rows(_take(infinite, 8))[:7] == rows
    with pytest.raises(ValueError, match="no global batch"):
        make_batch_iterator(ds, batch_size=8, seed=0, num_epochs=1, process_index=0, process_count=2)


def test_exact_resume_from_state_mid_epoch():
    ds = _dataset(n=24)
    kwargs = dict(batch_size=4, seed=3, num_epochs=3, process_index=0, process_count=1)
    uninterrupted = _rows(make_batch_iterator(ds, **kwargs))
    it = make_batch_iterator(ds, **kwargs)
    _take(it, 8)  # 1 1/3 epochs in
    state = it.get_state()
    _take(it, 2)  # advance the old iterator further: the saved state must not move
    resumed = make_batch_iterator(ds, **kwargs)
    resumed.set_state(state)
    assert _rows(resumed) == uninterrupted[8:]


def test_orbax_checkpoint_of_the_iterator(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    ds = _dataset(n=24)
    kwargs = dict(batch_size=4, seed=3, num_epochs=2, process_index=0, process_count=1)
    uninterrupted = _rows(make_batch_iterator(ds, **kwargs))
    it = make_batch_iterator(ds, **kwargs)
    _take(it, 5)
    checkpointer = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
    checkpointer.save(tmp_path / "data", args=grain.checkpoint.CheckpointSave(it))
    fresh = make_batch_iterator(ds, **kwargs)
    restored = checkpointer.restore(tmp_path / "data", args=grain.checkpoint.CheckpointRestore(fresh))
    assert _rows(restored) == uninterrupted[5:]


@pytest.mark.parametrize("n", [24, 26])
def test_two_processes_disjoint_covering_and_same_global_batch(n):
    ds = _dataset(n=n)
    kwargs = dict(batch_size=3, seed=11, num_epochs=2)
    per_process = [_rows(make_batch_iterator(ds, **kwargs, process_index=p, process_count=2)) for p in range(2)]
    assert len(per_process[0]) == len(per_process[1]) == num_batches(n, batch_size=3, num_epochs=2, process_count=2)
    single = _rows(make_batch_iterator(ds, batch_size=6, seed=11, num_epochs=2, process_index=0, process_count=1))
    # the global batch (process 0's slice then process 1's) is the single-process batch of 2 x 3
    assert [a + b for a, b in zip(*per_process)] == single
    steps_per_epoch = n // 6
    for epoch in range(2):
        first = sum(per_process[0][epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch], [])
        second = sum(per_process[1][epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch], [])
        if n % 6 == 0:  # an epoch is whole global batches: disjoint and covering
            assert not set(first) & set(second)
            assert sorted(first + second) == list(range(100, 100 + n))
    # whatever n: the interleaved stream of global batches holds each row once per n consecutive positions
    stream = [x for pair in zip(*per_process) for x in pair[0] + pair[1]]
    for start in range(0, len(stream) - n + 1, n):
        assert len(set(stream[start:start + n])) == n


@pytest.mark.parametrize("count", [2, 4])
def test_micro_batches_hold_the_same_examples_whatever_the_process_count(count):
    """Gradient accumulation: global micro-batch m of step k is the same set of rows with 1 or `count`
    processes (each process's [m, b // m] reshaped batch holds its slice of every micro-batch)."""
    ds = _dataset(n=26)
    m, global_batch = 2, 8
    kwargs = dict(seed=3, num_epochs=3, micro_batches=m)
    single = _rows(make_batch_iterator(ds, batch_size=global_batch, process_index=0, process_count=1, **kwargs))
    per_process = [_rows(make_batch_iterator(ds, batch_size=global_batch // count, process_index=p,
                                             process_count=count, **kwargs)) for p in range(count)]
    assert len(single) == len(per_process[0]) == num_batches(26, batch_size=8, num_epochs=3)
    per = global_batch // count // m
    for k, rows in enumerate(single):
        for micro in range(m):
            # process p's rows of micro-batch `micro`, concatenated in process order
            joined = sum((per_process[p][k][micro * per:(micro + 1) * per] for p in range(count)), [])
            assert joined == rows[micro * 4:(micro + 1) * 4], (k, micro)
    # with one micro-batch the split is today's contiguous slice
    one = _rows(make_batch_iterator(ds, batch_size=8, seed=3, num_epochs=3, process_index=0, process_count=1))
    assert one == single
    with pytest.raises(ValueError, match="micro_batches=3"):
        make_batch_iterator(ds, batch_size=8, seed=3, num_epochs=1, micro_batches=3, process_index=0,
                            process_count=1)


def test_worker_processes_give_the_same_batches_and_resume():
    ds = _dataset(n=24)
    kwargs = dict(batch_size=4, seed=5, num_epochs=2, process_index=0, process_count=1)
    expected = _rows(make_batch_iterator(ds, **kwargs))
    it = make_batch_iterator(ds, **kwargs, worker_count=1)
    head = _rows(_take(it, 7))
    state = it.get_state()
    assert head == expected[:7]
    resumed = make_batch_iterator(ds, **kwargs, worker_count=1)
    resumed.set_state(state)
    assert _rows(resumed) == expected[7:]


def test_process_defaults_come_from_jax():
    it = make_batch_iterator(_dataset(), batch_size=4, seed=0, num_epochs=1)
    assert len(_rows(it)) == 6
    with pytest.raises(ValueError, match="process_index=2"):
        make_batch_iterator(_dataset(), batch_size=4, seed=0, num_epochs=1, process_index=2, process_count=2)
