"""Length-aware batches: each global batch padded to its bucket, processes agree alone, exact resume across
bucket changes, length grouping, and the padded-token report."""

import numpy as np
import pytest

from mcpo_jax.data import TokenizedDataset, bucket_for, bucket_lengths, make_batch_iterator, padding_report
from mcpo_jax.data.pipeline import _BatchFn


def _dataset(n=64, c=3, t=32, seed=0):
    """Rows of very different lengths (2..t tokens per sequence); ids encode (row, column, position)."""
    rng = np.random.default_rng(seed)
    total = rng.integers(2, t + 1, (n, c))
    total[:, 0] = np.maximum(total[:, 0], 2)
    prompt = np.maximum(1, total // 3)
    ids = (np.arange(n)[:, None, None] * 10000 + np.arange(c)[None, :, None] * 100
           + np.arange(t)[None, None, :]).astype(np.int32)
    return TokenizedDataset(
        input_ids=ids, prompt_lengths=prompt.astype(np.int32), completion_lengths=(total - prompt).astype(np.int32),
        valid=np.ones((n, c), bool), ranks=np.tile(np.arange(1, c + 1, dtype=np.int32), (n, 1)),
        fixed_index=np.ones((n,), np.int32), example_id=np.arange(n, dtype=np.int64))


def _short_and_long(n=64, t=64):
    """Half the rows are short (<= 10 tokens), half long (40..64): bucket changes between batches."""
    ds = _dataset(n=n, t=t)
    long_rows = np.arange(n) % 2 == 1
    total = np.where(long_rows[:, None], np.random.default_rng(1).integers(40, t + 1, (n, 3)),
                     np.random.default_rng(2).integers(2, 11, (n, 3)))
    prompt = np.maximum(1, total // 3)
    return TokenizedDataset(input_ids=ds.input_ids, prompt_lengths=prompt.astype(np.int32),
                            completion_lengths=(total - prompt).astype(np.int32), valid=ds.valid, ranks=ds.ranks,
                            fixed_index=ds.fixed_index, example_id=ds.example_id)


def test_bucket_lengths_specs():
    assert bucket_lengths(1024, "pow2") == (64, 128, 256, 512, 1024)
    assert bucket_lengths(600, "pow2") == (64, 128, 256, 512, 600)
    assert bucket_lengths(24, "pow2") == (24,)  # short data: one shape, as before
    assert bucket_lengths(1024, "none") == bucket_lengths(1024, None) == bucket_lengths(1024, "") == (1024,)
    assert bucket_lengths(1024, "384, 128,2048") == bucket_lengths(1024, [128, 384]) == (128, 384, 1024)
    assert [bucket_for(x, (8, 16, 32)) for x in (1, 8, 9, 32)] == [8, 8, 16, 32]
    with pytest.raises(ValueError, match="pow2"):
        bucket_lengths(1024, "short")
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        bucket_for(33, (8, 16, 32))


def test_each_batch_is_padded_to_its_bucket_and_keeps_its_content():
    ds = _short_and_long()
    buckets = (8, 16, 64)
    it = make_batch_iterator(ds, batch_size=2, seed=3, num_epochs=2, process_index=0, process_count=1,
                             buckets="8,16")
    shapes = set()
    for batch in it:
        rows = batch["example_id"]
        want_t = bucket_for(int(ds.row_lengths[rows].max()), buckets)
        assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["loss_mask"].shape == (2, 3, want_t)
        full = ds.take(rows)  # the fixed-shape batch: the bucketed one is its first want_t positions
        for key in ("input_ids", "attention_mask", "loss_mask"):
            np.testing.assert_array_equal(batch[key], full[key][..., :want_t])
            assert full[key][..., want_t:].sum() == 0 or key == "input_ids"  # only padding was cut
        np.testing.assert_array_equal(batch["attention_mask"].sum(-1), ds.sequence_lengths[rows])
        shapes.add(want_t)
    assert shapes == {8, 16, 64}  # a handful of shapes, each seen (short rows have 2..10 tokens)
    assert ds.take([0, 2], length=32)["input_ids"].shape == (2, 3, 32)
    with pytest.raises(ValueError, match="longest sequence"):
        ds.take(np.arange(8), length=2)


def test_exact_resume_across_a_bucket_change():
    ds = _short_and_long()
    kw = dict(batch_size=2, seed=5, num_epochs=2, process_index=0, process_count=1, buckets="16,32")
    reference = list(make_batch_iterator(ds, **kw))
    lengths = [b["input_ids"].shape[-1] for b in reference]
    assert set(lengths) == {16, 64}
    change = next(k for k in range(1, len(lengths)) if lengths[k] != lengths[k - 1])
    it = make_batch_iterator(ds, **kw)
    for _ in range(change):
        next(it)
    state = it.get_state()
    resumed = make_batch_iterator(ds, **kw)
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == len(reference) - change
    assert rest[0]["input_ids"].shape[-1] != reference[change - 1]["input_ids"].shape[-1]
    for got, want in zip(rest, reference[change:]):
        assert got.keys() == want.keys()
        for key in got:
            np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_processes_agree_on_the_bucket_without_communicating(micro_batches):
    """Two process slices of each global batch (computed in-process) get the same T, the one a single process
    holding the whole global batch gets, although each sees only its own rows."""
    ds = _short_and_long()
    kw = dict(seed=9, num_epochs=2, buckets="pow2", micro_batches=micro_batches)
    procs = [list(make_batch_iterator(ds, batch_size=4, process_index=p, process_count=2, **kw)) for p in (0, 1)]
    whole = list(make_batch_iterator(ds, batch_size=8, process_index=0, process_count=1, **kw))
    assert len(procs[0]) == len(procs[1]) == len(whole)
    disagreements_if_local = 0
    for a, b, w in zip(*procs, whole):
        assert a["input_ids"].shape == b["input_ids"].shape == (4, 3, w["input_ids"].shape[-1])
        assert sorted(a["example_id"].tolist() + b["example_id"].tolist()) == sorted(w["example_id"].tolist())
        local = [bucket_for(int(ds.row_lengths[x["example_id"]].max()), bucket_lengths(64, "16,32")) for x in (a, b)]
        disagreements_if_local += local[0] != local[1]
    # The test data would make processes deciding from their own rows disagree.
    assert disagreements_if_local > 0


def test_group_by_length_covers_each_epoch_and_cuts_padding():
    ds = _short_and_long(n=96)
    kw = dict(batch_size=4, seed=2, num_epochs=2, process_index=0, process_count=1, buckets="8,16,32")
    plain = list(make_batch_iterator(ds, **kw))
    grouped = list(make_batch_iterator(ds, group_by_length=8, **kw))
    again = list(make_batch_iterator(ds, group_by_length=8, **kw))
    per_epoch = 96 // 4
    for e in range(2):
        rows = sorted(sum((b["example_id"].tolist() for b in grouped[e * per_epoch:(e + 1) * per_epoch]), []))
        assert rows == list(range(96))
    assert [b["example_id"].tolist() for b in grouped] == [b["example_id"].tolist() for b in again]
    assert [b["example_id"].tolist() for b in grouped] != [b["example_id"].tolist() for b in plain]
    computed = lambda batches: sum(b["input_ids"].size for b in batches)
    assert computed(grouped) < 0.8 * computed(plain)
    with pytest.raises(ValueError, match="group_by_length"):
        make_batch_iterator(ds, group_by_length=-1, **kw)


def test_padding_report_counts():
    # 8 rows, one column; batches of 4 in a seeded order: count by hand from the same permutation.
    lengths = np.array([3, 5, 9, 17, 4, 6, 30, 2])
    rep = padding_report(lengths, batch_size=4, max_length=32, buckets="8,16", seed=0)
    perm = np.random.default_rng([0, 0]).permutation(8)
    batches = [lengths[perm[:4]], lengths[perm[4:]]]
    assert rep["real_tokens"] == lengths.sum() == 76
    assert rep["fixed"]["computed_tokens"] == 2 * 4 * 32
    assert rep["longest"]["computed_tokens"] == sum(4 * int(b.max()) for b in batches)
    assert rep["bucketed"]["computed_tokens"] == sum(4 * bucket_for(int(b.max()), (8, 16, 32)) for b in batches)
    assert rep["fixed"]["padding_fraction"] == pytest.approx(1 - 76 / 256)
    assert rep["fixed"]["shapes"] == 1 and rep["batches"] == 2
    # [N, C] lengths: every column's tokens are real, the row's longest sets the padding.
    rep2 = padding_report(np.stack([lengths, lengths // 2], 1), batch_size=4, max_length=32, buckets="none")
    assert rep2["real_tokens"] == 76 + (lengths // 2).sum()
    assert rep2["bucketed"]["computed_tokens"] == rep2["fixed"]["computed_tokens"] == 2 * 4 * 2 * 32
    # Truncation: a row above max_length counts as max_length real tokens.
    assert padding_report([100, 1], batch_size=2, max_length=32)["real_tokens"] == 33
