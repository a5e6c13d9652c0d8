"""The trainer with length-aware batches: one compiled step per batch shape, the same losses as fixed-shape
batches of the same rows (padding is masked), exact resume across a bucket change."""

import jax
import numpy as np
import pytest

from mcpo_jax import pipeline
from mcpo_jax.training import metrics as metrics_lib

from _train_fixtures import tiny_config


pytestmark = pytest.mark.usefixtures("module_compilation_cache")


def _losses(workdir):
    return {r["step"]: r["loss"] for r in metrics_lib.read_jsonl(f"{workdir}/metrics.jsonl")}


def _config(buckets, **kw):
    # group_by_length=7: the epoch's 7 global batches sorted by length, so the bucket changes within the run
    # (the synthetic rows have 16..22 tokens).
    return tiny_config(**{"data.bucket_lengths": buckets, "data.group_by_length": 7, "eval_every": 0,
                          "reference": "online", **kw})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, buckets in (("fixed", "none"), ("bucketed", "16,18,20")):
        workdir = str(tmp_path_factory.mktemp(name))
        out[name] = (workdir, pipeline.run(_config(buckets), workdir))
    return out


def test_step_compiles_once_per_bucket_and_matches_fixed_shapes(runs):
    (fixed_dir, fixed), (bucket_dir, bucketed) = runs["fixed"], runs["bucketed"]
    assert fixed["compiled_shapes"] == [(2, 4, 6, 24)]
    lengths = {shape[-1] for shape in bucketed["compiled_shapes"]}
    assert len(lengths) >= 3 and lengths <= {16, 18, 20, 24}
    assert all(shape[:3] == (2, 4, 6) for shape in bucketed["compiled_shapes"])
    a, b = _losses(fixed_dir), _losses(bucket_dir)
    assert sorted(a) == sorted(b) == list(range(1, 8))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=2e-4, atol=1e-5)


def test_resume_across_a_bucket_change_is_exact(runs, tmp_path):
    bucket_dir, _ = runs["bucketed"]
    workdir = str(tmp_path / "resumed")
    first = pipeline.run(_config("16,18,20", **{"debug.stop_after_steps": 3}), workdir)
    assert first["status"] == "stopped"
    second = pipeline.run(_config("16,18,20"), workdir)
    assert second["status"] == "completed" and second["start_step"] == 3
    assert {s[-1] for s in first["compiled_shapes"]} != {s[-1] for s in second["compiled_shapes"]}
    got, want = _losses(workdir), _losses(bucket_dir)
    np.testing.assert_allclose([got[s] for s in range(1, 8)], [want[s] for s in range(1, 8)], rtol=1e-5)
