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


def test_final_eval_loads_the_baseline_as_the_policy(monkeypatch, tmp_path):
    """final_eval.baseline_path is loaded with the policy's dtype, mesh and rules (it was float32 on one device),
    and the evaluation gets the typed spec of the config's block."""
    import jax.numpy as jnp

    from mcpo_jax import evaluate, models
    from mcpo_jax import sharding as shd
    from mcpo_jax.training import build

    c = tiny_config(export_hf=True, **{"model.dtype": "bfloat16", "final_eval.judge": "oracle:sorting",
                                       "final_eval.prompts": "task:sorting", "final_eval.num_prompts": 3})
    mesh, rules = shd.mesh_and_rules(c)
    folder = str(tmp_path / "model")
    models.save_pretrained(build.build_model(c.model, mesh, rules), folder, tokenizer=build.build_tokenizer(c))
    c.final_eval.baseline_path = folder
    seen = {}
    monkeypatch.setattr(evaluate, "final_evaluation", lambda spec, policy, tok, **kw: seen.update(spec=spec,
                        policy=policy, **kw) or {})
    pipeline.final_evaluation(c, {"hf_export": folder, "workdir": str(tmp_path)}, start_path="")
    policy, baseline = seen["policy"], seen["baseline"]
    assert policy.dtype == baseline.dtype == jnp.bfloat16 and seen["baseline_name"] == folder
    assert baseline.layout.mesh == policy.layout.mesh and baseline.layout.rules == policy.layout.rules
    assert seen["spec"] == evaluate.FinalEvalSpec.from_block(c.final_eval) and seen["spec"].num_prompts == 3


def test_final_eval_of_a_task_it_does_not_know_is_refused_at_start(tmp_path):
    """The bug this guards: a user's own task (word reversal prompts) scored by the built-in sorting oracle."""
    from mcpo_jax.evaluate import EvalConfigError

    prompts = tmp_path / "reverse.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"reverse the word {w}"}) + "\n" for w in ("cat", "dog")))
    c = tiny_config(export_hf=True, **{"final_eval.judge": "oracle:sorting", "final_eval.prompts": str(prompts)})
    with pytest.raises(EvalConfigError, match="are not 'sorting' prompts"):
        pipeline.run(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")  # refused before any training
    c = tiny_config(export_hf=True, **{"final_eval.judge": "oracle:sorting", "final_eval.prompts": "task:nosuchtask"})
    with pytest.raises(EvalConfigError, match="nosuchtask"):
        pipeline.run(c, str(tmp_path / "run2"))


def test_objective_module_registers_a_custom_objective_before_validation(tmp_path):
    """--config.objective_module=my_losses (or a .py path) is imported before the config is checked, so
    --config.objective may name what it registers; a module that does not import is one config problem."""
    module = tmp_path / "my_losses_issue22.py"
    module.write_text(
        "import jax\nfrom mcpo_jax import losses\n\n"
        "def hinge_all(policy, ref, *, beta, lengths=None, valid=None):\n"
        "    r = beta * (policy - ref)\n"
        "    return jax.numpy.sum(jax.nn.relu(1.0 - (r[:, :1] - r[:, 1:])) * valid[:, 1:], axis=1)\n\n"
        "losses.register('hinge_all_issue22', hinge_all)\n")
    with pytest.raises(ConfigError, match="objective='hinge_all_issue22' is unknown"):
        pipeline.run(tiny_config(objective="hinge_all_issue22"), str(tmp_path / "no"))
    with pytest.raises(ConfigError, match="objective_module='no_such_module_x' could not be imported"):
        pipeline.run(tiny_config(objective_module="no_such_module_x"), str(tmp_path / "no"))
    out = pipeline.run(tiny_config(objective="hinge_all_issue22", objective_module=str(module),
                                   **{"debug.stop_after_steps": 1}), str(tmp_path / "run"))
    assert out["status"] == "stopped" and np.isfinite(out["final_metrics"]["loss"])
    sys.path.insert(0, str(tmp_path))
    try:  # by module name, as from the command line in the module's folder
        from mcpo_jax.training.config import validate

        validate(tiny_config(objective="hinge_all_issue22", objective_module="my_losses_issue22"))
    finally:
        sys.path.remove(str(tmp_path))


def test_own_config_trains_your_folder_on_your_rows(tmp_path, capsys):
    """configs/own.py with only model.path and data.source: a held-out split that is evaluated, a summary at the
    end naming where the model went."""
    import importlib.util

    from mcpo_jax import models
    from mcpo_jax.data import synthetic

    model_dir = str(tmp_path / "model")
    config = models.preset_config("tiny", **tiny_config().model.overrides.to_dict())
    models.save_pretrained(models.init_random(config, seed=0), model_dir, tokenizer=synthetic.make_tokenizer())
    rows = tmp_path / "rows.jsonl"
    rng = np.random.default_rng(0)
    with open(rows, "w") as f:
        for _ in range(80):  # 8 held out: one micro-batch
            digits = "".join(rng.choice(list("0123456789"), 4))
            f.write(json.dumps({"prompt": f"sort {digits}", "chosen": "".join(sorted(digits)),
                                "rejected": "".join(sorted(digits, reverse=True))}) + "\n")
    spec = importlib.util.spec_from_file_location("own_config", os.path.join(ROOT, "configs", "own.py"))
    own = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(own)
    c = own.get_config()
    c.model.path, c.data.source = model_dir, str(rows)
    c.max_steps, c.eval_every, c.progress_bar, c.tensorboard = 2, 2, False, False
    out = pipeline.run(c, str(tmp_path / "run"))
    assert out["status"] == "completed" and out["hf_export"] and "rewards/accuracies" in out["eval"]
    printed = capsys.readouterr().out
    assert "finished: 2 steps" in printed and "held-out (eval split)" in printed and out["hf_export"] in printed


def test_config_is_locked_after_validation():
    from mcpo_jax.training.config import prepare

    c = prepare(tiny_config(), device_count=1, process_count=1)
    with pytest.raises(AttributeError):
        c.optimizer.learnig_rate = 1.0
    assert c.optimizer.learning_rate == 3e-3


def test_help_exits_0():
    proc = _cli(["--help"])
    assert proc.returncode == 0 and "--workdir" in proc.stdout, proc.stderr[-2000:]


def test_a_workdir_that_is_a_file_or_cannot_be_written_is_one_message(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        pipeline.run(tiny_config(), str(file))
    with pytest.raises(ConfigError, match="cannot write there"):
        pipeline.run(tiny_config(), str(file / "run"))  # under a file
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:  # root writes anywhere: then a folder of the kernel's filesystem, which nobody can write into
        (readonly / "probe").write_text("")
        readonly = "/sys/kernel"
    except OSError:
        pass
    if not os.path.isdir(readonly):
        pytest.skip("no read-only folder to try")
    with pytest.raises(ConfigError, match="cannot write there"):
        pipeline.run(tiny_config(), str(readonly))


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


def test_a_run_that_failed_before_its_first_step_does_not_lock_its_workdir(tmp_path):
    """Nothing was trained: the corrected rerun starts (and says so); once a step is checkpointed the lock holds.
    The failure is in train.log too."""
    from mcpo_jax.data.example import DataError

    workdir = str(tmp_path / "run")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no rows"):
        pipeline.run(tiny_config(**{"data.source": str(empty)}), workdir)
    assert "no rows" in open(os.path.join(workdir, "train.log")).read()
    import logging  # the run's train.log is detached when it ends: a next run in this process does not write to it

    assert not [h for h in logging.getLogger("mcpo_jax").handlers if isinstance(h, pipeline._RunLogHandler)]
    out = pipeline.run(tiny_config(**{"debug.stop_after_steps": 1}), workdir)
    assert out["status"] == "stopped" and out["step"] == 1
    assert len(os.listdir(os.path.join(workdir, "previous"))) == 1  # the failed attempt's files, kept aside
    with pytest.raises(ConfigError, match="batch_size: 8 -> 16"):
        pipeline.run(tiny_config(batch_size=16, micro_batch_size=8), workdir)


def test_a_finished_run_reprints_its_final_result_and_redo_evaluates_again(tmp_path, capsys):
    workdir = str(tmp_path)
    fe = {"final_eval.judge": "oracle:sorting", "final_eval.prompts": "task:sorting", "final_eval.num_prompts": 8,
          "final_eval.max_new_tokens": 8, "final_eval.batch_size": 8}
    c = dict(max_steps=2, eval_every=0, export_hf=True, **fe)
    first = pipeline.run(tiny_config(**c), workdir)
    line = first["final_eval"]["message"]
    assert "win rate" in line
    written = os.stat(os.path.join(workdir, "final_eval.json")).st_mtime_ns
    capsys.readouterr()
    again = pipeline.run(tiny_config(**c), workdir)
    assert line in capsys.readouterr().out and again["final_eval"]["message"] == line
    assert os.stat(os.path.join(workdir, "final_eval.json")).st_mtime_ns == written
    redo = pipeline.run(tiny_config(**c, **{"final_eval.redo": True}), workdir)
    assert redo["status"] == "completed" and redo["final_eval"]["message"] == line  # greedy: the same answers
    assert os.stat(os.path.join(workdir, "final_eval.json")).st_mtime_ns != written


def test_each_step_logged_once_after_a_crash_and_summary_kept_on_rerun(tmp_path, capsys):
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
    # a rerun of the finished run prints its result and writes nothing
    files = ("summary.json", "config.json", "curves.png", "metrics.jsonl", "train.log")
    before = {f: os.stat(os.path.join(clean, f)).st_mtime_ns for f in files}
    capsys.readouterr()
    again = pipeline.run(tiny_config(log_every=1), clean)
    assert again["status"] == "completed" and again["step"] == 7
    assert {f: os.stat(os.path.join(clean, f)).st_mtime_ns for f in files} == before
    printed = capsys.readouterr().out
    assert "finished: 7 steps" in printed and "reward accuracy" in printed
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
    assert "SIGINT: saved step" in out and "resume with: " in out
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["phase"] == "warm_start"
    saved = [int(s) for s in os.listdir(workdir / "sft" / "checkpoints") if s.isdigit()]
    assert saved == [summary["step"]]
    assert not (workdir / "hf").exists()  # nothing after the interrupted phase ran
    # the printed command resumes (it ran with the README's `--workdir DIR` form); one more step, then stop
    import shlex

    command = shlex.split(out.split("resume with: ")[-1].splitlines()[0])
    assert command[:3] == [sys.executable, "-m", "mcpo_jax.train"] and command.count("--workdir") == 1
    again = subprocess.run(command + [f"--config.debug.stop_after_steps={summary['step'] + 1}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {summary['step']}" in again.stderr  # resumed from the saved step


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
