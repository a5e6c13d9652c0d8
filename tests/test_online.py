"""Batched online training end to end on the synthetic task (CPU): sample -> oracle ranking -> train, 2 segments,
then resume without regenerating; plus the segment helpers."""

import json
import os

import ml_collections
import pytest

from mcpo_jax.online import onmcpo


def test_segment_bounds_and_prompt_split():
    assert onmcpo.segment_bounds(450, 3) == [(0, 150), (150, 300), (300, 450)]  # App. B.1's example
    assert onmcpo.segment_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError):
        onmcpo.segment_bounds(2, 3)
    parts = onmcpo.segment_prompts(list(range(10)), 3, seed=0)
    assert [len(p) for p in parts] == [4, 3, 3] and sorted(sum(parts, [])) == list(range(10))
    assert parts == onmcpo.segment_prompts(list(range(10)), 3, seed=0)


def test_training_row_drops_copies_of_y0_and_empty_candidates():
    row, why = onmcpo.training_row("p", ["b", "a", " a ", "", "c"], {"winner": 1, "order": None})
    assert why is None and row == {"prompt": "p", "chosen": "a", "rejected": ["b", "c"]}
    row, why = onmcpo.training_row("p", ["x", "x "], {"winner": 0, "order": None})
    assert row is None and why == "no_distinct_candidates"
    row, _ = onmcpo.training_row("p", ["b", "a", "c"], {"winner": 1, "order": [1, 2, 0]})
    assert row["rejected"] == ["c", "b"]  # full ranking: candidates best first


def _config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_config", os.path.join(os.path.dirname(__file__), "..",
                                                                              "configs", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    c = onmcpo.demo_online(demo.get_config("smoke"))
    c.warm_start = None  # start from the random tiny preset: the test is about the online plumbing
    c.reference = "online"
    c.online.reference = "initial"  # exercises the trainer's reference_path (the demo itself uses segment_start)
    c.online.num_segments = 2
    c.online.num_prompts = 48
    c.online.temperatures = (0.6, 0.8, 1.0)  # K = 3: y0 + 2 candidates
    c.online.generation_batch_size = 72
    c.online.final_eval = ml_collections.ConfigDict({"num_prompts": 16, "seed": 1, "max_new_tokens": 8})
    c.num_candidates = 2
    c.batch_size = 8
    c.micro_batch_size = 8
    c.checkpoint.save_every = 0
    c.checkpoint.async_save = False
    c.tensorboard = False
    return c


@pytest.fixture
def compilation_cache(tmp_path):
    """A persistent XLA cache for this test only: segment 1 compiles the very same train step as segment 0,
    and the trainer compiles ahead of time (no in-memory jit cache across its runs)."""
    import jax
    from jax._src import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    cc.reset_cache()
    jax.config.update(names[0], str(tmp_path / "xla_cache"))
    jax.config.update(names[1], 0.0)
    jax.config.update(names[2], 0)
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()


def test_two_online_segments_end_to_end_and_resume(tmp_path, compilation_cache):
    from mcpo_jax.data import synthetic

    workdir = str(tmp_path / "run")
    result = onmcpo.train_online(_config(), workdir)
    assert result["status"] == "completed"
    for s in range(2):
        sdir = onmcpo.segment_dir(workdir, s)
        samples = onmcpo.read_jsonl(os.path.join(sdir, "samples.jsonl"))
        data = onmcpo.read_jsonl(os.path.join(sdir, "data.jsonl"))
        stats = json.load(open(os.path.join(sdir, "stats.json")))
        assert len(samples) == 24 and stats["prompts"] == 24 and stats["rows"] == len(data)
        assert len(data) + sum(stats["skipped"].values()) == 24
        assert all(s_["temperatures"] == [0.6, 0.8, 1.0] and len(s_["completions"]) == 3 for s_ in samples)
        kept = [s_ for s_ in samples if s_["skipped"] is None]
        for smp, row in zip(kept, data):
            # y0 is the oracle's best of the K samples (iterative pairwise ranking: L - 1 = 2 comparisons)
            scores = [synthetic.oracle_score(smp["prompt"], c) for c in smp["completions"]]
            assert row["chosen"] == smp["completions"][smp["winner"]]
            assert scores[smp["winner"]] == max(scores) and len(smp["judgments"]) == 2
        summary = json.load(open(os.path.join(sdir, "train", "summary.json")))
        assert summary["status"] == "completed" and summary["total_steps"] == len(data) // 8
    # segment 1 sampled from (and trained) the policy exported by segment 0
    seg1 = json.load(open(os.path.join(onmcpo.segment_dir(workdir, 1), "train", "config.json")))
    assert seg1["model"]["path"] == os.path.join(onmcpo.segment_dir(workdir, 0), "train", "hf")
    assert seg1["data"]["format"] == "pairs" and seg1["objective"] == "mcpo"
    # pi_ref stays the initial policy across segments (online.reference = "initial", App. B.1)
    assert seg1["reference_path"] == result["initial_policy"] == os.path.join(workdir, "online", "initial")
    fe = result["final_eval"]
    assert fe["n_cand"] + fe["n_base"] + fe["n_tie"] + fe["n_invalid"] == 16 and 0.0 <= fe["win_rate"] <= 1.0

    # Resume mid-run: segment 1's training "crashed" after its last checkpoint (no summary, no export).
    seg1_dir = onmcpo.segment_dir(workdir, 1)
    data_mtime = os.path.getmtime(os.path.join(seg1_dir, "data.jsonl"))
    samples_mtime = os.path.getmtime(os.path.join(seg1_dir, "samples.jsonl"))
    os.remove(os.path.join(seg1_dir, "train", "summary.json"))
    again = onmcpo.train_online(_config(), workdir)
    assert again["status"] == "completed"
    assert again["segments"][0]["resumed"] == "done"
    assert os.path.getmtime(os.path.join(seg1_dir, "data.jsonl")) == data_mtime  # not regenerated
    assert os.path.getmtime(os.path.join(seg1_dir, "samples.jsonl")) == samples_mtime
    assert again["segments"][1]["train"]["status"] == "completed"


def test_unknown_reference_mode_is_refused(tmp_path):
    from mcpo_jax.training import loop

    c = _config()
    c.online.reference = "bogus"
    with pytest.raises(loop.ConfigError, match="segment_start"):
        onmcpo.train_online(c, str(tmp_path))
