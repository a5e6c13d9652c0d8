"""The pipeline around the trainer: config errors at start (CLI, exit 2), workdir integrity on reruns, one
metrics record per step after interruptions, Ctrl-C in the warm start phase, and online training as one
optimizer trajectory (lr schedule, AdamW state, resume mid-segment)."""

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
from mcpo_jax.training import metrics as metrics_lib
from mcpo_jax.training import step as step_lib
from mcpo_jax.training.config import ConfigError

from _train_fixtures import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("module_compilation_cache")


def _rows(workdir, split="train"):
    return metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"), split=split)


def _cli(args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "mcpo_jax.train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **(env or {})))


# ------------------------------------------------------------------------------------------- config errors


def test_cli_lists_every_config_problem_and_exits_2(tmp_path):
    workdir = tmp_path / "run"
    proc = _cli(["--config", "configs/demo.py:smoke", "--workdir", str(workdir),
                 "--config.optimizer.learnig_rate=1e-3", "--config.objective=dpox", "--config.sampler=best",
                 "--config.mesh.data=3", "--config.online.enabled=true",
                 "--config.online.temperatures=(0.7,-1.0)"],
                env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "Traceback" not in err
    assert "unknown key 'optimizer.learnig_rate'; did you mean 'optimizer.learning_rate'?" in err
    assert "objective='dpox' is unknown" in err and "sampler='best' is unknown" in err
    assert "mesh: 8 devices are not divisible by the fixed axes" in err
    assert "every temperature must be a number >= 0" in err and "K - 1 = 1 candidates" in err
    assert not workdir.exists()  # refused before anything was written


def test_mesh_must_give_every_process_whole_batch_shards():
    from mcpo_jax.training.config import validate

    c = tiny_config(**{"mesh.fsdp": 1, "mesh.tensor": -1})
    with pytest.raises(ConfigError, match="data x fsdp = 1 is not a multiple of the 2 processes"):
        validate(c, device_count=4, process_count=2)
    validate(tiny_config(), device_count=4, process_count=2)  # fsdp = 4 over 2 processes: fine


def test_final_eval_of_a_task_it_does_not_know_is_refused_at_start(tmp_path):
    """The bug this guards: a user's own task (word reversal prompts) scored by the built-in sorting oracle."""
    from mcpo_jax.evaluate import EvalConfigError

    prompts = tmp_path / "reverse.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"reverse the word {w}"}) + "\n" for w in ("cat", "dog")))
    c = tiny_config(**{"final_eval.judge": "oracle:sorting", "final_eval.prompts": str(prompts)})
    with pytest.raises(EvalConfigError, match="are not 'sorting' prompts"):
        pipeline.run(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")  # refused before any training
    c = tiny_config(**{"final_eval.judge": "oracle:sorting", "final_eval.prompts": "task:nosuchtask"})
    with pytest.raises(EvalConfigError, match="nosuchtask"):
        pipeline.run(c, str(tmp_path / "run2"))


def test_config_is_locked_after_validation():
    from mcpo_jax.training.config import prepare

    c = prepare(tiny_config(), device_count=1, process_count=1)
    with pytest.raises(AttributeError):
        c.optimizer.learnig_rate = 1.0
    assert c.optimizer.learning_rate == 3e-3


def test_helpconfig_lists_every_key():
    proc = _cli(["--config", "configs/demo.py", "--helpconfig"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for key in ("learning_rate:", "max_length:", "num_negatives:", "resume_policy:", "temperatures:"):
        assert key in proc.stdout, key


# ------------------------------------------------------------------------------------------- reruns


def test_rerun_with_a_changed_config_is_refused_and_restart_moves_the_old_run(tmp_path):
    workdir = str(tmp_path)
    pipeline.run(tiny_config(**{"debug.stop_after_steps": 2}), workdir)
    saved = open(os.path.join(workdir, "config.json")).read()
    with pytest.raises(ConfigError) as e:
        pipeline.run(tiny_config(batch_size=16, micro_batch_size=8), workdir)
    assert "batch_size: 8 -> 16" in str(e.value) and "resume_policy=restart" in str(e.value)
    assert "log_every" not in str(e.value)
    assert open(os.path.join(workdir, "config.json")).read() == saved  # a refused run writes nothing
    # keys that do not change the run (logging, checkpoint cadence) resume without a word
    out = pipeline.run(tiny_config(log_every=1, **{"checkpoint.save_every": 3}), workdir)
    assert out["status"] == "completed" and out["start_step"] == 2
    fresh = pipeline.run(tiny_config(batch_size=16, micro_batch_size=8, resume_policy="restart"), workdir)
    assert fresh["start_step"] == 0 and fresh["status"] == "completed"
    previous = os.listdir(os.path.join(workdir, "previous"))
    assert len(previous) == 1 and "checkpoints" in os.listdir(os.path.join(workdir, "previous", previous[0]))


def test_each_step_logged_once_after_a_crash_and_summary_kept_on_rerun(tmp_path):
    import shutil

    crashed, clean = str(tmp_path / "crashed"), str(tmp_path / "clean")
    want = {r["step"]: r for r in _rows(clean)} if False else None
    pipeline.run(tiny_config(**{"debug.stop_after_steps": 5}), crashed)
    # the process died after logging step 5 but before its checkpoint landed
    shutil.rmtree(os.path.join(crashed, "checkpoints", "5"))
    resumed = pipeline.run(tiny_config(), crashed)
    assert resumed["start_step"] == 4 and resumed["status"] == "completed"
    steps = [r["step"] for r in _rows(crashed)]
    assert steps == sorted(set(steps)) == list(range(1, 8))
    pipeline.run(tiny_config(), clean)
    want = {r["step"]: r for r in _rows(clean)}
    for r in _rows(crashed):
        np.testing.assert_allclose(r["loss"], want[r["step"]]["loss"], rtol=1e-6, err_msg=str(r["step"]))
    # a rerun of the finished run does nothing and keeps every section of the summary
    before = json.load(open(os.path.join(clean, "summary.json")))
    again = pipeline.run(tiny_config(), clean)
    after = json.load(open(os.path.join(clean, "summary.json")))
    assert again["status"] == "completed"
    for key in ("eval", "compile", "final_metrics", "total_steps"):
        assert after[key] == before[key], key
    assert [r["step"] for r in _rows(clean)] == list(range(1, 8))


# ------------------------------------------------------------------------------------------- signals


def _wait_for(path, predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and predicate():
            return True
        time.sleep(0.2)
    return False


def test_ctrl_c_in_the_warm_start_saves_exits_0_and_resumes(tmp_path):
    workdir = tmp_path / "demo"
    args = ["--config", "configs/demo.py:smoke", "--workdir", str(workdir), "--config.final_eval.judge=",
            "--config.warm_start.num_epochs=400", "--config.checkpoint.save_every=0"]
    proc = subprocess.Popen([sys.executable, "-m", "mcpo_jax.train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    sft_metrics = workdir / "sft" / "metrics.jsonl"
    assert _wait_for(sft_metrics, lambda: len(_rows(str(workdir / "sft"))) >= 2, proc), proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGINT: saved step" in out and "resume with: python -m mcpo_jax.train" in out
    assert "--workdir" in out.split("resume with:")[-1]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["phase"] == "warm_start"
    saved = [int(s) for s in os.listdir(workdir / "sft" / "checkpoints") if s.isdigit()]
    assert saved == [summary["step"]]
    assert not (workdir / "hf").exists()  # nothing after the interrupted phase ran


def test_second_ctrl_c_during_compile_exits_at_once(tmp_path):
    """The first Ctrl-C arrives while XLA compiles the step (a worker thread: the handler runs at once), the
    second exits the process with status 130 before the compiler is done: no wait, no traceback, no crash."""
    import threading

    workdir = tmp_path / "run"
    code = ("import sys; sys.path.insert(0, 'tests'); from _train_fixtures import tiny_config; "
            "from mcpo_jax import pipeline; "
            "pipeline.run(tiny_config(**{'num_epochs': 400, 'eval_every': 0, 'checkpoint.save_every': 0}), "
            "sys.argv[1])")
    proc = subprocess.Popen([sys.executable, "-c", code, str(workdir)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()

    def wait_line(text, timeout=240):
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if any(text in line for line in lines):
                return True
            time.sleep(0.05)
        return False

    assert wait_line("reference log-probs (eval)"), "".join(lines)[-3000:]
    proc.send_signal(signal.SIGINT)
    assert wait_line("SIGINT received"), "".join(lines)[-3000:]
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    reader.join(10)
    out = "".join(lines)
    assert proc.returncode == 130, out[-3000:]
    assert "again: exiting now without saving" in out and "Traceback" not in out
    assert "compiled train step" not in out  # it left while the compiler was still at work


# ------------------------------------------------------------------------------------------- user errors (CLI)


def _smoke_cli(tmp_path, *overrides, env=None):
    # the demo's smoke run without its warm start and final evaluation (tests/_multiprocess_config.py)
    return _cli(["--config", "tests/_multiprocess_config.py", "--workdir", str(tmp_path / "run"), *overrides], env=env)


def test_cli_data_where_every_row_fails_the_schema(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": "x"}) + "\n" for i in range(50)))
    proc = _smoke_cli(tmp_path, f"--config.data.source={rows}", "--config.tokenizer=synthetic")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "50 of 50 rows" in proc.stderr and f"{rows}:1" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any model was built


def test_cli_missing_model_folder_and_offline_hub_id(tmp_path):
    proc = _smoke_cli(tmp_path, "--config.model.preset=", "--config.model.path=./no/such/model")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.path='./no/such/model': no such folder" in proc.stderr
    t0 = time.time()
    proc = _smoke_cli(tmp_path, "--config.model.preset=", "--config.model.path=someorg/somemodel",
                      env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "pass a local folder (--config.model.path=" in proc.stderr
    assert time.time() - t0 < 60  # no retries against an unreachable hub


def test_cli_changed_batch_size_on_an_existing_workdir(tmp_path):
    workdir = tmp_path / "run"
    pipeline.run(tiny_config(**{"debug.stop_after_steps": 1}), str(workdir))
    saved = (workdir / "config.json").read_text()
    # the CLI path: a config file whose batch differs from the saved run's
    cfg = tmp_path / "cfg.py"
    cfg.write_text("import sys\nsys.path.insert(0, 'tests')\nfrom _train_fixtures import tiny_config\n"
                   "def get_config(arg=None):\n    return tiny_config(batch_size=16, micro_batch_size=8)\n")
    proc = _cli(["--config", str(cfg), "--workdir", str(workdir)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "batch_size: 8 -> 16" in proc.stderr and "--config.resume_policy=restart" in proc.stderr
    assert (workdir / "config.json").read_text() == saved
