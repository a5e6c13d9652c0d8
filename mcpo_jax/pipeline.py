"""A run, phase by phase: `run(config, workdir) -> summary` (what `python -m mcpo_jax.train` calls).

    prepare      validate the config (every problem at once) and lock it; check the workdir's saved config
    warm start   optional SFT phase in workdir/sft; its Hugging Face export is where the policy starts
    train        offline preference training (training/loop.py), or online segments (online/onmcpo.py):
                 one optimizer trajectory either way
    export       workdir/hf, a Hugging Face folder; curves.png
    final eval   optional: the policy against its starting point (or final_eval.baseline_path), greedy answers to
                 held-out prompts judged by config.final_eval.judge; adjusted win rate (evaluate.py)

Ctrl-C / SIGTERM in any phase: the trainer saves, nothing else starts, and the run exits 0 with the command that
resumes it; a second one exits at once. A rerun in the same workdir resumes where the run stopped; a rerun
whose config changes what the run computes (data, model, batch, objective, ...) is refused with the differing
keys unless `resume_policy="restart"`, once a step of any phase has been checkpointed (before that nothing was
trained: the rerun starts with its own config and says so). A rerun of a finished run prints its result and
writes nothing (`final_eval.redo=True` evaluates the final policy again).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import sys
import time
from typing import Any

import jax
from etils import epath

from mcpo_jax import sharding as shd
from mcpo_jax.training import build, files
from mcpo_jax.training import config as cfg_lib
from mcpo_jax.training import loop
from mcpo_jax.training import metrics as metrics_lib
from mcpo_jax.training.config import ConfigError
from mcpo_jax.training.signals import StopFlag

log = logging.getLogger("mcpo_jax.train")


def run(config, workdir: str, *, stop: StopFlag | None = None, problems: tuple[str, ...] = ()) -> dict:
    """Every phase of the run described by `config`, in `workdir` (resumed if it holds one); its summary.
    `problems`: config problems found before (the CLI's overrides of unknown keys), reported with the rest."""
    config = cfg_lib.prepare(config, problems=problems)
    check_final_eval(config)
    run_dir = files.workdir_path(workdir)
    workdir = os.fspath(run_dir)
    primary = shd.is_primary()
    setup_logging(None, primary)  # the console; the run's train.log once the workdir is known to be writable
    check_workdir(config, run_dir, primary)
    summary = read_summary(run_dir)
    if is_finished(config, summary) and not (config.final_eval.redo and config.final_eval.judge):
        # printed, not logged: nothing is written to the workdir, its train.log included
        print(f"{workdir} holds a finished run: nothing to redo"
              + (" (--config.final_eval.redo=true evaluates the final policy again)" if config.final_eval.judge
                 else ""), flush=True)
        print("\n".join(result_lines(summary)), flush=True)
        return summary
    make_workdir(run_dir, primary)
    if primary:
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir))
    own_stop = stop is None
    stop = (stop or StopFlag()).install() if own_stop else stop
    try:
        summary.update(workdir=workdir, status="running")
        start = warm_start(config, workdir, stop)
        if isinstance(start, dict):  # the SFT phase did not complete
            summary.update(start)
            return summary
        if config.online.enabled:
            from mcpo_jax.online import onmcpo

            result = onmcpo.train_online(config, workdir, start_path=start, stop=stop)
        else:
            result = train_offline(config, workdir, start_path=start, stop=stop)
        summary.update({k: v for k, v in result.items() if v is not None})  # a rerun keeps what it did not redo
        from mcpo_jax.models.decoder import attention_fallbacks

        if attention_fallbacks():  # cuDNN attention could not be used on a GPU in half precision: say so here too
            summary["attention_fallbacks"] = attention_fallbacks()
        if result["status"] != "completed":
            return summary
        if primary:
            summary["plot"] = metrics_lib.plot_curves(workdir)
        # the final evaluation prints its own line, last
        announce_result({k: v for k, v in summary.items() if not (k == "final_eval" and config.final_eval.judge)})
        if config.final_eval.judge and not stop.should_stop():
            summary["final_eval"] = final_evaluation(config, summary, start_path=start)
            if primary:  # the curves again, with the final result in the title
                summary["plot"] = metrics_lib.plot_curves(workdir, title=_plot_title(workdir, summary))
    except loop.TrainingDiverged as e:
        summary.update(status="diverged", message=str(e))
        raise
    except Exception as e:
        summary.update(status="failed", message=f"{type(e).__name__}: {e}")
        log.error("the run failed: %s", summary["message"], extra={"result_line": True})  # train.log has it too
        raise
    finally:
        if summary.get("status") == "interrupted":
            summary["message"] = (f"{summary.get('signal', 'a signal')}: saved step {summary.get('step')}; resume "
                                  f"with: {resume_command(workdir)}")
            log.warning(summary["message"])
        if primary:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if own_stop:
            stop.restore()
        close_run_log(run_dir)  # a later run in this process (a notebook's next cell) logs to its own train.log
    return summary


def train_offline(config, workdir: str, *, start_path: str, stop: StopFlag) -> dict:
    """Preference (or SFT) training on config.data from `start_path` ("" = model.path / the preset)."""
    run_dir = files.workdir_path(workdir)
    tokenizer = build.build_tokenizer(config, model_path=start_path)
    cache_dir = config.data.cache_dir or files.local_cache_dir(workdir)
    train_ds, eval_ds = build.build_datasets(config, tokenizer, cache_dir)
    from mcpo_jax.data.pipeline import bucket_lengths

    longest = int(train_ds.row_lengths.max())
    buckets = [b for b in bucket_lengths(train_ds.max_length, config.data.bucket_lengths) if b >= longest]
    log.info("data: %d train / %d eval examples, C=%d columns, T<=%d (the longest row has %d tokens; batches "
             "padded to their bucket of %s, data.max_length=%d)", len(train_ds),
             0 if eval_ds is None else len(eval_ds), train_ds.num_columns, buckets[0], longest,
             config.data.bucket_lengths, train_ds.max_length)
    trainer = loop.Trainer(config, workdir, total_steps=loop.planned_steps(config, len(train_ds)), stop=stop,
                           model_path=start_path or None)
    try:
        out: dict[str, Any] = {"total_steps": trainer.total_steps, "start_step": trainer.step}
        out["reference_cache"] = trainer.precompute_reference({"train": train_ds, "eval": eval_ds}, cache_dir)
        out.update(trainer.train(train_ds, eval_ds).as_dict())
        hf_dir = run_dir / "hf"
        if out["status"] == "completed" and config.export_hf:
            if out["start_step"] < trainer.total_steps or not (hf_dir / "config.json").exists():
                trainer.export(os.fspath(hf_dir), tokenizer)
                log.info("Hugging Face export: %s", hf_dir)
            out["hf_export"] = os.fspath(hf_dir)
    finally:
        trainer.close()
    return out


def warm_start(config, workdir: str, stop: StopFlag):
    """The optional SFT phase: the path the policy starts from ("" = none), or its summary if it stopped."""
    if config.warm_start is None:
        return config.model.path
    sft = cfg_lib.with_overrides(config, config.warm_start)
    with sft.unlocked():
        sft.warm_start = None
        sft.online.enabled = False
        sft.final_eval.judge = ""
    sft = cfg_lib.prepare(sft)
    sft_dir = files.workdir_path(workdir) / "sft"
    hf_dir = sft_dir / "hf"
    done = read_summary(sft_dir)
    if done.get("status") == "completed" and (hf_dir / "config.json").exists():
        log.info("warm start: reusing the SFT model in %s", hf_dir)
        return os.fspath(hf_dir)
    log.info("warm start: SFT phase in %s", sft_dir)
    sft_dir.mkdir(parents=True, exist_ok=True)
    result = train_offline(sft, os.fspath(sft_dir), start_path=config.model.path, stop=stop)
    (sft_dir / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    if result["status"] != "completed":
        return {**result, "phase": "warm_start"}
    return result["hf_export"]


def final_evaluation(config, summary: dict, *, start_path: str) -> dict:
    """The final policy vs the baseline (final_eval.baseline_path, else the policy training started from), both
    loaded the same way: the policy's dtype, the run's mesh and rules."""
    from mcpo_jax import evaluate, models

    fe = config.final_eval
    policy_path = summary.get("hf_export")
    if not policy_path:
        raise ConfigError("final_eval needs the trained policy's export: keep --config.export_hf=true")
    spec = evaluate.FinalEvalSpec.from_block(fe)
    mesh, rules = shd.mesh_and_rules(config)
    load = functools.partial(models.from_pretrained, dtype=models.dtype_of(config.model.dtype), mesh=mesh,
                             rules=rules)
    tokenizer = build.build_tokenizer(config, model_path=start_path)
    policy = load(policy_path)
    start = fe.baseline_path or summary.get("initial_policy") or start_path
    baseline = load(start) if start else build.build_model(config.model, mesh, rules)
    name = start or f"the initial {config.model.preset} model"
    return evaluate.final_evaluation(spec, policy, tokenizer, baseline=baseline, baseline_name=name,
                                     workdir=summary["workdir"])


def check_final_eval(config) -> None:
    """The final evaluation's prompts and judge, checked at start (not after hours of training)."""
    if not config.final_eval.judge:
        return
    from mcpo_jax import evaluate

    fe = config.final_eval
    evaluate.eval_prompts(fe.prompts, num_prompts=int(fe.num_prompts), seed=int(fe.seed), judge_spec=fe.judge)


# ------------------------------------------------------------------------------------------------ workdir


def read_summary(run_dir) -> dict:
    path = epath.Path(run_dir) / "summary.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):  # not a folder, unreadable, or a half-written file: no summary to go on
        return {}


def has_checkpoint(run_dir) -> bool:
    """Whether a phase of the run in `run_dir` (the warm start's or the main one) saved a step."""
    for folder in (run_dir / "checkpoints", run_dir / "sft" / "checkpoints"):
        if folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir()):
            return True
    return False


def is_finished(config, summary: dict) -> bool:
    """The summary of a completed run that holds everything `config` asks for (its final evaluation too)."""
    return summary.get("status") == "completed" and (not config.final_eval.judge or "final_eval" in summary)


def check_workdir(config, run_dir, primary: bool) -> None:
    """A workdir with a saved config.json: a rerun resumes; a rerun that changes the run is refused (nothing
    written) or, with resume_policy="restart", the old run's files move to workdir/previous/<time>/. Before any
    phase has checkpointed a step the saved config binds nothing: the rerun starts with its own (and says so)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--workdir {os.fspath(run_dir)} is a file, not a folder: pass a folder (it is created "
                          "if missing)")
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        return
    diffs = cfg_lib.run_defining_diff(json.loads(saved_path.read_text()), config.to_dict())
    if not diffs:
        return
    trained = has_checkpoint(run_dir)
    if trained and config.resume_policy == "refuse":
        raise ConfigError(
            f"{os.fspath(run_dir)} holds a run whose config differs in keys that change what it computes:\n    "
            + "\n    ".join(diffs) + "\n  resume with the saved config, use another --workdir, or pass "
            "--config.resume_policy=restart to move the old run to workdir/previous/ and start anew")
    if primary:
        dest = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
        dest.mkdir(parents=True, exist_ok=True)
        for child in list(run_dir.iterdir()):
            if child.name != "previous":
                child.rename(dest / child.name)
        if trained:
            log.warning("resume_policy=restart: the previous run moved to %s", dest)
        else:
            log.warning("%s holds an earlier attempt that checkpointed no step, with another config (%s): starting "
                        "with this one; its files moved to %s", os.fspath(run_dir), "; ".join(diffs), dest)


def make_workdir(run_dir, primary: bool) -> None:
    """The workdir, created if missing, and train.log in it: a folder that cannot be written is a ConfigError."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(run_dir, primary)
    except OSError as e:
        raise ConfigError(f"--workdir {os.fspath(run_dir)}: cannot write there ({e.strerror or e}); pass a "
                          "folder you can write to") from None


def announce_result(summary: dict) -> None:
    """What the run did, in a few lines on stdout (and train.log): steps, the last train and eval metrics, where
    the model is, and the final evaluation's result when the summary holds one."""
    for line in result_lines(summary):
        log.info(line, extra={"result_line": True})
        print(line, flush=True)


def result_lines(summary: dict) -> list[str]:
    def metrics(m: dict) -> str:
        names = (("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "margin"))
        return ", ".join(f"{label} {float(m[k]):.4g}" for k, label in names if isinstance(m.get(k), (int, float)))

    lines = [f"finished: {summary.get('step', '?')} steps in {summary.get('workdir', '?')}"]
    if summary.get("final_metrics"):
        lines.append(f"  last train step: {metrics(summary['final_metrics'])}")
    if summary.get("eval"):
        lines.append(f"  held-out (eval split): {metrics(summary['eval'])}")
    if summary.get("hf_export"):
        lines.append(f"  model (Hugging Face folder): {summary['hf_export']}")
    if summary.get("plot"):
        lines.append(f"  curves: {summary['plot']}")
    if (summary.get("final_eval") or {}).get("message"):
        lines.append(summary["final_eval"]["message"])
    return lines


def _plot_title(workdir: str, summary: dict) -> str:
    fe = summary.get("final_eval") or {}
    title = metrics_lib.run_name(workdir)
    if "win_rate" in fe:
        title += f" | final: {100 * float(fe['win_rate']):.1f}% {str(fe.get('judge', '')).partition(':')[0]} win rate"
    return title


def resume_command(workdir: str) -> str:
    """The command line that resumes this run: this one's arguments with its --workdir (either form) replaced."""
    argv, args = [], iter(sys.argv[1:])
    for a in args:
        if a == "--workdir":
            next(args, None)  # and its value
        elif not a.startswith("--workdir="):
            argv.append(a)
    if not (sys.argv and sys.argv[0].endswith(("train.py", "mcpo-train"))):
        return f"rerun with the same workdir ({workdir})"
    return " ".join([shlex.quote(sys.executable), "-m", "mcpo_jax.train", *map(shlex.quote, argv), "--workdir",
                     shlex.quote(workdir)])


class _RunLogHandler(logging.StreamHandler):
    """workdir/train.log (also under a URL)."""

    def __init__(self, path):
        super().__init__(files.AppendFile(path))
        self.baseFilename = os.fspath(path)

    def close(self):
        self.stream.close()
        super().close()


def close_run_log(run_dir) -> None:
    """Detach and close the run's train.log handler (under a URL: its last upload)."""
    root = logging.getLogger("mcpo_jax")
    path = os.fspath(run_dir / "train.log")
    for h in [h for h in root.handlers if isinstance(h, _RunLogHandler) and h.baseFilename == path]:
        root.removeHandler(h)
        h.close()


def setup_logging(run_dir, primary: bool) -> None:
    """The console handler (once), and with `run_dir` the run's train.log (primary process)."""
    root = logging.getLogger("mcpo_jax")
    root.setLevel(logging.INFO)
    root.propagate = False  # one console line per record (absl's root handler would print it again)
    # orbax and grain log every save / read at INFO through absl; keep the console for the trainer.
    for name in ("absl", "orbax", "grain"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "Unable to initialize backend 'tpu'"
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if not any(type(h) is logging.StreamHandler for h in root.handlers):
        h = logging.StreamHandler()
        h.setFormatter(fmt)
        h.addFilter(lambda record: not getattr(record, "result_line", False))  # printed to stdout already
        root.addHandler(h)
    if run_dir is None:
        return
    path = os.fspath(run_dir / "train.log")
    if primary and not any(getattr(h, "baseFilename", None) == path for h in root.handlers):
        fh = _RunLogHandler(path)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
