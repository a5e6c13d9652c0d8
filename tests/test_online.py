"""Batched online training end to end on the synthetic task (CPU): sample -> oracle ranking -> train, 2 segments,
then resume without regenerating; plus the segment helpers."""

import json
import os
import shutil

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


def test_online_steps_are_one_pass_over_the_data():
    """App. B.1: total steps = data / effective batch (128); num_epochs (2 offline) does not multiply them."""
    from mcpo_jax.training.config import base_config

    c = base_config()
    assert (int(c.num_epochs), int(c.batch_size)) == (2, 128)
    assert onmcpo.segment_steps(c, 19200) == 150  # 57 600 prompts / 128 = 450 steps in 3 segments of 150
    assert onmcpo.segment_steps(c, 200) == 1


def test_smollm2_keeps_every_self_generated_sample(monkeypatch, tmp_path):
    """The online / instruct setup takes the winner as y0 and the other 5 samples as candidates: no rank 2 drop."""
    from mcpo_jax.experiments.protocol import load_config

    monkeypatch.setenv("MCPO_SMOLLM2_DIR", str(tmp_path))
    for variant in ("", "online", "dpo"):
        c = load_config(f"configs/smollm2.py:{variant}" if variant else "configs/smollm2.py")
        assert int(c.num_candidates) == len(c.online.temperatures) - 1 == 5 and tuple(c.online.drop_ranks) == ()


def test_training_row_drops_copies_of_y0_and_empty_candidates():
    row, why = onmcpo.training_row("p", ["b", "a", " a ", "", "c"], {"winner": 1, "order": None})
    assert why is None and row == {"prompt": "p", "chosen": "a", "rejected": ["b", "c"]}
    row, why = onmcpo.training_row("p", ["x", "x "], {"winner": 0, "order": None})
    assert row is None and why == "no_distinct_candidates"
    row, _ = onmcpo.training_row("p", ["b", "a", "c"], {"winner": 1, "order": [1, 2, 0]})
    assert row == {"prompt": "p", "completions": ["a", "c", "b"], "ranks": [1, 2, 3]}  # full ranking: kept
    row, _ = onmcpo.training_row("p", ["b", "a", "c", "d"], {"winner": 1, "order": [1, 2, 3, 0]}, drop_ranks=(2,))
    assert row == {"prompt": "p", "completions": ["a", "d", "b"], "ranks": [1, 3, 4]}


def test_a_fully_ranked_segment_keeps_its_ranks(tmp_path):
    """online.ranking="full": the judge's places reach the batch's `ranks` (the kernel's rank histogram)."""
    from mcpo_jax import data

    row, _ = onmcpo.training_row("sort 31", ["13", "31", "11", "33"], {"winner": 0, "order": [0, 2, 3, 1]})
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(row) + "\n")
    c = onmcpo.segment_config(_config(**{"online.ranking": "full"}), str(path))
    assert c.data.format == "ranked"
    ex = data.load_examples(str(path), format=c.data.format)[0]
    assert ex.preferred == "13" and ex.candidates == ["11", "33", "31"] and ex.candidate_ranks == [2, 3, 4]


def _config(**overrides):
    import importlib.util

    from _train_fixtures import set_keys, tiny_config

    spec = importlib.util.spec_from_file_location("demo_config", os.path.join(os.path.dirname(__file__), "..",
                                                                              "configs", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    c = demo.get_config("smoke,online")
    c.warm_start = None  # start from the random tiny preset: the test is about the online plumbing
    c.model.overrides = tiny_config().model.overrides
    c.reference = "online"
    c.online.reference = "initial"
    c.online.num_segments = 3
    c.online.num_prompts = 72  # 24 per segment: 3 steps of 8 each, 9 steps in all
    c.online.temperatures = (0.6, 0.8, 1.0)  # K = 3: y0 + 2 candidates
    c.online.generation_batch_size = 72
    c.final_eval.judge = ""
    c.num_candidates = 2
    c.batch_size = 8
    c.micro_batch_size = 8
    c.optimizer.warmup_ratio = 0.3
    c.optimizer.decay = "linear"
    c.checkpoint.save_every = 0
    c.checkpoint.async_save = False
    c.tensorboard = False
    c.progress_bar = False
    return set_keys(c, overrides)


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """Runs of the same programs (uninterrupted, interrupted, resumed) reuse the compiled step and sampler."""
    import jax
    from jax._src import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    cc.reset_cache()
    jax.config.update(names[0], str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update(names[1], 0.0)
    jax.config.update(names[2], 0)
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()


def _rows(workdir):
    from mcpo_jax.training import metrics as metrics_lib

    return {r["step"]: r for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


@pytest.fixture(scope="module")
def online_run(tmp_path_factory, compilation_cache):
    from mcpo_jax import pipeline

    workdir = str(tmp_path_factory.mktemp("online"))
    return workdir, pipeline.run(_config(), workdir)


def test_online_run_is_one_optimizer_trajectory(online_run):
    """3 segments, each sampled from the current policy and ranked by the oracle; one lr schedule over the 9 steps
    (no warm-up per segment), AdamW moments and step counter carried across segments."""
    import jax
    import numpy as np

    from mcpo_jax.data import synthetic
    from mcpo_jax.training import step as step_lib

    workdir, result = online_run
    assert result["status"] == "completed" and result["total_steps"] == 9
    assert [s["steps"] for s in result["segments"]] == [[0, 3], [3, 6], [6, 9]]
    for s in range(3):
        sdir = onmcpo.segment_dir(workdir, s)
        samples = onmcpo.read_jsonl(os.path.join(sdir, "samples.jsonl"))
        data = onmcpo.read_jsonl(os.path.join(sdir, "data.jsonl"))
        stats = json.load(open(os.path.join(sdir, "stats.json")))
        assert len(samples) == 24 and stats["rows"] == len(data) == 24 - sum(stats["skipped"].values())
        for smp, row in zip([x for x in samples if x["skipped"] is None], data):
            scores = [synthetic.oracle_score(smp["prompt"], c) for c in smp["completions"]]
            assert row["chosen"] == smp["completions"][smp["winner"]] and scores[smp["winner"]] == max(scores)
    rows = _rows(workdir)
    assert sorted(rows) == list(range(1, 10))
    # the winner-only ranking leaves the candidates unranked: counted as such, never as rank 0 of the histogram
    assert all(rows[k]["kernel/rank_unknown"] == 1.0 and sum(rows[k]["kernel/rank_hist"]) == 0 for k in rows)
    _, schedule = step_lib.make_optimizer(learning_rate=1e-3, total_steps=9, warmup_ratio=0.3, decay="linear")
    np.testing.assert_allclose([rows[k]["lr"] for k in range(1, 10)], [float(schedule(k)) for k in range(9)],
                               rtol=1e-6)
    lrs = [rows[k]["lr"] for k in range(1, 10)]  # one warm-up (3 steps), then one decay: no restart per segment
    assert lrs[:4] == sorted(lrs[:4]) and lrs[3:] == sorted(lrs[3:], reverse=True) and lrs[3] == max(lrs)
    # AdamW's step count in the last checkpoint: 9 updates in one optimizer state, not 3 restarts of 3
    from mcpo_jax.training.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir, async_save=False)
    assert ckpt.latest_step() == 9
    restored = ckpt.manager.restore(9)
    counts = [int(np.asarray(x)) for x in jax.tree.leaves(restored["state"]["opt_state"]) if np.ndim(x) == 0]
    ckpt.close()
    assert counts and all(c == 9 for c in counts), counts
    assert os.path.exists(os.path.join(workdir, "hf", "config.json"))


def test_online_run_killed_mid_segment_resumes_exactly(online_run, tmp_path):
    from mcpo_jax import pipeline

    workdir, _ = online_run
    part = pipeline.run(_config(**{"debug.stop_after_steps": 4}), str(tmp_path))  # inside segment 1: [3, 6)
    assert part["status"] == "stopped" and part["step"] == 4
    data1 = os.path.join(onmcpo.segment_dir(str(tmp_path), 1), "data.jsonl")
    mtime = os.path.getmtime(data1)
    assert not os.path.exists(onmcpo.segment_dir(str(tmp_path), 2))
    resumed = pipeline.run(_config(), str(tmp_path))
    assert resumed["status"] == "completed" and resumed["start_step"] == 4
    assert os.path.getmtime(data1) == mtime  # segment 1's data reused, not regenerated
    want, got = _rows(workdir), _rows(str(tmp_path))
    assert sorted(got) == list(range(1, 10))
    import numpy as np

    for step in range(1, 10):
        for key in ("loss", "grad_norm", "rewards/margins", "lr"):
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {step} {key}")
    for s in (1, 2):  # the data sampled after the interruption equals the uninterrupted run's
        assert open(os.path.join(onmcpo.segment_dir(workdir, s), "data.jsonl")).read() == \
            open(os.path.join(onmcpo.segment_dir(str(tmp_path), s), "data.jsonl")).read()


def test_segment_start_reference_is_saved_per_segment(tmp_path, compilation_cache):
    from mcpo_jax import pipeline

    out = pipeline.run(_config(**{"online.reference": "segment_start", "online.num_segments": 2, "optimizer.warmup_ratio": 0.0,
                                  "online.num_prompts": 32}), str(tmp_path))
    assert out["status"] == "completed" and out["total_steps"] == 4
    for s in range(2):
        assert os.path.exists(os.path.join(onmcpo.segment_dir(str(tmp_path), s), "reference", "config.json"))
    rows = _rows(str(tmp_path))
    # at a segment's first step pi_ref is the policy itself: every log-ratio, hence every reward, is 0
    assert abs(rows[1]["rewards/chosen"]) < 1e-5 and abs(rows[3]["rewards/chosen"]) < 1e-5  # float noise only
    assert abs(rows[2]["rewards/chosen"]) > 1e-3


def test_online_initial_model_uses_the_runs_sharding_rules(monkeypatch, tmp_path):
    """An online run from a random preset saves its initial model laid out by the run's `sharding_rules` (the
    default rules were used there before, whatever the config said)."""
    from mcpo_jax import sharding as shd
    from mcpo_jax.online import onmcpo
    from mcpo_jax.training import build

    seen = []

    class Built(Exception):
        pass

    def build_model(model_cfg, mesh, rules, **kw):
        seen.append(dict(rules))
        raise Built

    monkeypatch.setattr(build, "build_model", build_model)
    c = _config(**{"sharding_rules.mlp": None})
    with pytest.raises(Built):
        onmcpo.train_online(c, str(tmp_path), start_path="", stop=None)
    assert seen == [dict(shd.mesh_and_rules(c)[1])] and seen[0]["mlp"] is None
    assert dict(shd.DEFAULT_RULES)["mlp"] is not None  # the override is what made the difference


def test_online_run_in_a_url_workdir_trains_as_in_a_local_one(online_run, fake_gcs, compilation_cache, tmp_path,
                                                                monkeypatch):
    """gs://... workdir (etils' mock backend): the run trains the same steps as in a local folder; its segment
    files and model folders are under the URL, from where another machine's rerun fetches them, and a stale
    local copy that the URL's record lacks is not taken for this run's."""
    from mcpo_jax import pipeline
    from mcpo_jax.training import checkpoint, files

    # orbax writes its checkpoints under a URL through tensorstore's own GCS driver, which etils' mock does not
    # reach: here they go to the mock bucket's local folder (what is tested is the online run's own files)
    real_init = checkpoint.Checkpointer.__init__
    monkeypatch.setattr(checkpoint.Checkpointer, "__init__", lambda self, workdir, **kw: real_init(
        self, str(fake_gcs / os.fspath(workdir)[len("gs://"):]), **kw))
    local_dir, local_summary = online_run
    url = f"gs://bucket/{tmp_path.name}"
    staged = files.Staged(url, "online")
    stale = staged.path("segment_0", "data.jsonl")
    os.makedirs(os.path.dirname(stale), exist_ok=True)
    with open(stale, "w") as f:
        f.write('{"prompt": "stale", "chosen": "x", "rejected": ["y"]}\n')
    summary = pipeline.run(_config(), url)
    assert summary["status"] == local_summary["status"] == "completed"
    local_rows, url_rows = _rows(local_dir), _rows(url)
    assert sorted(url_rows) == sorted(local_rows) and len(url_rows) == 9
    for step in local_rows:
        assert url_rows[step]["loss"] == pytest.approx(local_rows[step]["loss"], rel=1e-6), step
    remote = fake_gcs / "bucket" / tmp_path.name / "online"
    for s in range(3):
        with open(os.path.join(onmcpo.segment_dir(local_dir, s), "data.jsonl")) as f:
            assert (remote / f"segment_{s}" / "data.jsonl").read_text() == f.read()
        assert (remote / f"segment_{s}" / "stats.json").exists()
    assert (remote / "initial" / "config.json").exists()
    shutil.rmtree(staged.local)  # another machine: nothing local
    assert files.Staged(url, "online").fetch("segment_1", "data.jsonl")
    with open(os.path.join(onmcpo.segment_dir(local_dir, 1), "data.jsonl")) as f:
        assert open(staged.path("segment_1", "data.jsonl")).read() == f.read()
    assert not files.Staged(url, "online").fetch("segment_7", "data.jsonl")
    shutil.rmtree(staged.local)
