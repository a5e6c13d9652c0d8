"""The trainer end to end on a tiny model: exact resume, precomputed == online reference, NaN stop, SIGTERM,
config errors before compiling."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mcpo_jax import pipeline
from mcpo_jax.training import build, loop
from mcpo_jax.training.config import ConfigError, validate
from mcpo_jax.training import metrics as metrics_lib

from _train_fixtures import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("module_compilation_cache")


def _train_rows(workdir):
    rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return {r["step"]: r for r in rows}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    summary = pipeline.run(tiny_config(), workdir)
    return workdir, summary


def test_full_run_logs_everything(full_run):
    workdir, summary = full_run
    assert summary["status"] == "completed" and summary["total_steps"] == 7  # 63 train rows // 8
    rows = _train_rows(workdir)
    assert sorted(rows) == list(range(1, 8))
    r = rows[7]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "kernel/entropy", "kernel/rank_hist", "grad_norm", "lr", "tokens_per_sec", "step_time"):
        assert key in r, key
    assert sum(r["kernel/rank_hist"]) == 8 * 2  # B x M negatives, by dataset rank
    # rank 2 is dropped from the data; bin 1 is y0, drawn by Algorithm 1's kernel (selected_is_y0 of 16 picks)
    assert r["kernel/rank_hist"][2] == 0
    assert r["kernel/rank_hist"][1] == pytest.approx(16 * r["kernel/selected_is_y0"])
    assert rows[7]["loss"] < rows[1]["loss"]
    evals = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"), split="eval")
    assert [e["step"] for e in evals] == [3, 6, 7] and "rewards/accuracies" in evals[0]
    assert os.path.exists(os.path.join(workdir, "curves.png"))
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert summary["compile"]["compile_seconds"] > 0
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()) == [2, 4, 6, 7]


def test_resume_is_exact(full_run, tmp_path):
    workdir, _ = full_run
    part = pipeline.run(tiny_config(**{"debug.stop_after_steps": 3}), str(tmp_path))
    assert part["status"] == "stopped" and part["step"] == 3
    resumed = pipeline.run(tiny_config(), str(tmp_path))
    assert resumed["start_step"] == 3 and resumed["status"] == "completed"
    assert part["reference_cache"] == {"train": "computed", "eval": "computed"}
    assert resumed["reference_cache"] == {"train": "hit", "eval": "hit"}  # keyed cache reused across runs
    want, got = _train_rows(workdir), _train_rows(str(tmp_path))
    for step in range(1, 8):
        for key in ("loss", "grad_norm", "rewards/margins", "kernel/entropy", "lr"):
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-6, atol=1e-7,
                                       err_msg=f"step {step} {key}")
        assert got[step]["kernel/rank_hist"] == want[step]["kernel/rank_hist"]


def test_precomputed_reference_equals_online(full_run, tmp_path):
    workdir, _ = full_run
    online = pipeline.run(tiny_config(reference="online", **{"debug.stop_after_steps": 2}), str(tmp_path))
    assert online["status"] == "stopped"
    want, got = _train_rows(workdir), _train_rows(str(tmp_path))
    for step in (1, 2):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/margins"):
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=2e-5, atol=1e-6, err_msg=f"{step} {key}")
    cache = os.path.join(workdir, "cache", "reference")
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 2  # train + eval


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(loop.TrainingDiverged, match=r"non-finite loss.*step 4.*last good checkpoint \(step 2\)"):
        pipeline.run(tiny_config(**{"debug.nan_at_step": 3}), str(tmp_path))
    steps = sorted(int(s) for s in os.listdir(os.path.join(tmp_path, "checkpoints")) if s.isdigit())
    assert steps == [2]
    assert max(_train_rows(str(tmp_path))) == 3


def test_sigterm_saves_and_exits_zero(tmp_path):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cmd = [sys.executable, "-c",
           "import sys; sys.path.insert(0, 'tests'); from _train_fixtures import tiny_config; "
           "from mcpo_jax import pipeline; import time, jax; "
           "c = tiny_config(**{'num_epochs': 200, 'eval_every': 0, 'checkpoint.save_every': 0}); "
           "s = pipeline.run(c, sys.argv[1]); print('STATUS', s['status'], s['step']); print(s['message'])",
           str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(tmp_path, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(_train_rows(str(tmp_path))) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    line = [l for l in out.splitlines() if l.startswith("STATUS")][0]
    _, status, step = line.split()
    assert status == "interrupted" and "SIGTERM: saved step" in out
    steps = sorted(int(s) for s in os.listdir(os.path.join(tmp_path, "checkpoints")) if s.isdigit())
    assert steps == [int(step)] and int(step) == max(_train_rows(str(tmp_path)))
    assert int(step) < 200 * 7


@pytest.mark.parametrize("overrides, message", [
    ({"num_negatives": 7}, "num_negatives (M) = 7 must be between 1 and num_candidates (L) = 5 + 1 (y0 included)"),
    ({"objective": "dpx"}, "objective='dpx' is unknown"),
    ({"sampler": "greedy"}, "sampler='greedy' is unknown"),
    ({"objective": "dpo"}, "pairwise: it needs num_negatives=1"),
    ({"batch_size": 10}, "must be a positive multiple of micro_batch_size=4"),
    ({"model.preset": "", "model.path": "/nonexistent/model"}, "model.path='/nonexistent/model': no such folder"),
    ({"data.max_length": 12}, "data.max_length=12 must exceed data.max_prompt_length=16"),  # before data is read
    ({"export_hf": True, "final_eval.judge": "oracle:sorting", "final_eval.prompts": "task:sorting",
      "final_eval.tie_margin": -1.0}, "final_eval.tie_margin must be >= 0"),
])
def test_config_errors_before_anything_compiles(overrides, message, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("built a model for an invalid config")

    monkeypatch.setattr(build, "build_model", boom)
    with pytest.raises(ConfigError) as e:
        pipeline.run(tiny_config(**overrides), str(tmp_path))
    assert message in str(e.value)


def test_batch_not_divisible_by_data_parallel_size():
    with pytest.raises(ConfigError, match="not divisible by the data-parallel size 8"):
        validate(tiny_config(), device_count=8, process_count=1)


def test_cli_reports_config_error_with_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mcpo_jax.train", "--config", "configs/demo.py:smoke",
                           "--workdir", str(tmp_path), "--config.num_negatives=7", "--config.sampler=best"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "num_negatives (M) = 7" in proc.stderr and "sampler='best' is unknown" in proc.stderr
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_reference_path_is_the_reference(full_run, tmp_path):
    """reference_path loads pi_ref from a Hugging Face folder: the initial policy's own weights reproduce the
    default run; other weights change the rewards but not the policy's log-probs."""
    from mcpo_jax import models

    workdir, _ = full_run
    cfg = tiny_config()
    overrides = cfg.model.overrides.to_dict()
    results = {}
    for seed in (0, 1):
        folder = str(tmp_path / f"ref{seed}")
        models.save_pretrained(models.init_random(models.preset_config("tiny", **overrides), seed=seed), folder)
        out = pipeline.run(tiny_config(reference_path=folder, **{"debug.stop_after_steps": 1}), str(tmp_path / f"run{seed}"))
        assert out["reference_cache"]["train"] == "computed"
        results[seed] = _train_rows(str(tmp_path / f"run{seed}"))[1]
    want = _train_rows(workdir)[1]
    for key in ("loss", "grad_norm", "rewards/chosen", "rewards/margins"):
        np.testing.assert_allclose(results[0][key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert abs(results[1]["rewards/chosen"] - want["rewards/chosen"]) > 1e-3


def test_step_time_is_measured_completion_to_completion(tmp_path, monkeypatch):
    """The step's metrics are read one step late; a step's time runs from the previous step's completion (or
    its own dispatch, when nothing ran before it) to its own, so the logged times of a run are disjoint pieces
    of the span from the first dispatch to the last completion and sum to no more than it. (Timed from its
    dispatch, each step also covered the previous one's execution: twice the real time.)"""
    from mcpo_jax.training import step as step_lib

    make = step_lib.make_train_step

    def slow_step(*args, **kwargs):  # every step also runs ~0.1 s of matmuls: the device, not the host, sets the pace
        step = make(*args, **kwargs)

        def run(state, ref_params, batch):
            state, metrics = step(state, ref_params, batch)
            work = jax.lax.fori_loop(0, 24, lambda i, a: jax.numpy.tanh(a @ a),
                                     jax.numpy.full((600, 600), 1e-3) + 0 * metrics["loss"])
            return state, dict(metrics, busy=work[0, 0])

        return run

    monkeypatch.setattr(step_lib, "make_train_step", slow_step)
    first_dispatch, last_read = [], []
    compile_step, drain = loop.Trainer._compile, loop.Trainer._drain

    def timed_compile(self, batch):
        compiled = compile_step(self, batch)

        def dispatch(*args):
            first_dispatch.append(time.perf_counter())
            return compiled(*args)

        return dispatch

    def timed_drain(self, *args):
        out = drain(self, *args)
        last_read.append(time.perf_counter())
        return out

    monkeypatch.setattr(loop.Trainer, "_compile", timed_compile)
    monkeypatch.setattr(loop.Trainer, "_drain", timed_drain)
    c = tiny_config(log_every=1, eval_every=0, tensorboard=False, **{"checkpoint.save_every": 0})
    out = pipeline.run(c, str(tmp_path))
    assert out["status"] == "completed"
    rows = _train_rows(str(tmp_path))
    assert sorted(rows) == list(range(1, 8))
    logged, span = sum(r["step_time"] for r in rows.values()), last_read[-1] - first_dispatch[0]
    assert 0 < logged <= span, (logged, span, [round(r["step_time"], 3) for r in rows.values()])
    for r in rows.values():
        np.testing.assert_allclose(r["tokens_per_sec"] * r["step_time"], r["tokens"], rtol=1e-6)


def test_callers_use_only_the_trainers_surface():
    """The Trainer's public surface is what its callers use: no caller reads its state, step config, reference
    weights or compile bookkeeping (those come back in `TrainResult`)."""
    import re

    from mcpo_jax.training import loop

    surface = {"step", "total_steps", "mesh", "needs_reference", "set_reference", "precompute_reference", "train",
               "policy", "export", "close"}
    assert all(hasattr(loop.Trainer, name) for name in surface - {"step", "total_steps", "mesh"})
    for path in ("mcpo_jax/pipeline.py", "mcpo_jax/online/onmcpo.py"):
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            used = set(re.findall(r"\btrainer\.(\w+)", f.read()))
        assert used and used <= surface, (path, sorted(used - surface))
    fields = {f.name for f in dataclasses.fields(loop.TrainResult)}
    assert {"status", "step", "final_metrics", "compile", "compiled_shapes"} <= fields
