"""The trainer: one optimizer trajectory over one or more datasets. It only trains.

    trainer = Trainer(config, workdir, model_path=..., total_steps=N, stop=stop)   # model, optimizer, state,
                                                                                  # resume from workdir/checkpoints
    trainer.precompute_reference({"train": ds, "eval": eval_ds}, cache_dir)        # reference="precomputed"
    result = trainer.train(ds, eval_ds, start_step=0, end_step=N)                  # steps [start, end) of the run
    trainer.export(hf_dir, tokenizer)

The learning-rate schedule spans `total_steps`: online training (online/onmcpo.py) calls `train` once per
segment with that segment's data, and AdamW state, step and schedule carry on. The phases around the trainer
(warm start, data, export, final evaluation) are run by mcpo_jax/pipeline.py.

The step's metrics are read one step late: step k+1 is dispatched before the host reads step k's metrics,
so the device never waits for the host. A step's time (`step_time`, and `tokens_per_sec` from it) is measured
completion to completion: from the moment the host saw step k-1 done (or step k's dispatch, when nothing was
running) to the moment it sees step k done; the times of a run add up to its wall time, never more. A save (and the end of a data phase) reads them first, so a NaN is
caught before a checkpoint could keep it. Nothing else syncs the host in the loop: in a multi-process run a
stop request (SIGTERM on any process) travels through the step and comes back with those metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcpo_jax import models
from mcpo_jax import batch as batch_lib
from mcpo_jax import sharding as shd
from mcpo_jax.training import build, refcache
from mcpo_jax.training import checkpoint as ckpt_lib
from mcpo_jax.training import files
from mcpo_jax.training import metrics as metrics_lib
from mcpo_jax.training import state as state_lib
from mcpo_jax.training import step as step_lib
from mcpo_jax.training.config import ConfigError
from mcpo_jax.training.program import TrainProgram
from mcpo_jax.training.signals import StopFlag, run_interruptible

log = logging.getLogger("mcpo_jax.train")

class TrainingDiverged(FloatingPointError):
    """A non-finite loss or gradient; the last good checkpoint is kept."""


def planned_steps(config, num_examples: int) -> int:
    """Optimizer steps of `num_examples` x num_epochs in batches of batch_size (capped by max_steps)."""
    from mcpo_jax import data as data_lib

    steps = data_lib.num_batches(num_examples, batch_size=int(config.batch_size) // jax.process_count(),
                                 num_epochs=int(config.num_epochs), process_count=jax.process_count())
    return min(steps, int(config.max_steps)) if int(config.max_steps) > 0 else steps


def to_global(local: dict, mesh, accum: int | None):
    """This process's batch (numpy) -> global jax.Arrays, [accum, b, ...] when accumulating."""
    out = batch_lib.step_arrays(local)
    if accum is not None:
        out = {k: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]) for k, x in out.items()}
    return shd.global_batch(out, mesh, batch_axis=0 if accum is None else 1)


@dataclasses.dataclass
class TrainResult:
    """What `Trainer.train` did: `status` completed | interrupted | stopped, the step it ended at, the last
    logged train metrics and eval metrics, the signal that interrupted it, and the step programs compiled so
    far (their XLA memory figures, the batch shapes)."""

    status: str
    step: int
    final_metrics: dict | None = None
    eval: dict | None = None
    signal: str | None = None
    compile: dict | None = None
    compiled_shapes: list | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields that are set (a run's summary keeps what a resumed part did not redo)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class Evaluator:
    """Held-out loss / reward accuracy of a dataset as exact (sum, count) means over whole micro-batches
    (`config.eval_batches` of them at most; 0 = all)."""

    def __init__(self, trainer: Trainer, eval_ds):
        self.eval_ds, self.mesh, self.stop = eval_ds, trainer.mesh, trainer.stop
        self.fn = jax.jit(step_lib.make_eval_step(trainer.step_cfg, trainer.graphdef, trainer.rest))
        self.rows = int(trainer.config.micro_batch_size) // jax.process_count()
        self.limit = int(trainer.config.eval_batches)

    def __call__(self, params, ref_params, rng) -> dict[str, float]:
        from mcpo_jax import data as data_lib

        eval_key = jax.random.fold_in(rng, 0x7FFFFFFF)
        it = data_lib.make_batch_iterator(self.eval_ds, batch_size=self.rows, seed=0, num_epochs=1, shuffle=False)
        totals: dict[str, list[float]] = {}
        for i, local in enumerate(it):
            if (self.limit and i >= self.limit) or (jax.process_count() == 1 and self.stop.requested):
                break
            sums = jax.device_get(self.fn(params, ref_params, jax.random.fold_in(eval_key, i),
                                          to_global(local, self.mesh, None)))
            for k, (s, n) in sums.items():
                acc = totals.setdefault(k, [0.0, 0.0])
                acc[0] += float(s)
                acc[1] += float(n)
        return {k: s / max(n, 1.0) for k, (s, n) in totals.items()}


class Trainer:
    """One optimizer trajectory in a workdir: the policy, its optimizer state and checkpoints, the reference.
    Its surface: `step`, `total_steps`, `mesh`, `needs_reference`; `set_reference`, `precompute_reference`,
    `train` (a `TrainResult`), `policy`, `export`, `close`. Nothing outside reads its other attributes."""

    def __init__(self, config, workdir: str, *, total_steps: int, stop: StopFlag | None = None,
                 model_path: str | None = None):
        if total_steps < 1:
            raise ConfigError(f"the data make no optimizer step of batch_size={config.batch_size}: lower "
                              "--config.batch_size or add data")
        self.config, self.total_steps = config, int(total_steps)
        self.stop = stop or StopFlag()
        self.run_dir = files.workdir_path(workdir)
        self.workdir = os.fspath(self.run_dir)
        self.primary = shd.is_primary()
        self.mesh, self.rules = shd.mesh_and_rules(config)
        log.info("mesh %s (%d devices, %d processes)", dict(self.mesh.shape), self.mesh.size, jax.process_count())
        self.model_path = config.model.path if model_path is None else model_path
        model = build.build_model(config.model, self.mesh, self.rules, path=self.model_path)
        _, params, _ = state_lib.split_model(model)
        log.info("model: %.2fM parameters", state_lib.count_params(params) / 1e6)
        self.step_cfg = step_lib.step_config_from(config)
        opt = config.optimizer
        tx, schedule = step_lib.make_optimizer(
            learning_rate=float(opt.learning_rate), total_steps=self.total_steps,
            warmup_ratio=float(opt.warmup_ratio), decay=opt.decay, weight_decay=float(opt.weight_decay),
            b1=float(opt.b1), b2=float(opt.b2), eps=float(opt.eps), max_grad_norm=float(opt.max_grad_norm))
        # model -> shardings -> state -> compiled step (one per batch shape), built in one place
        budget = float(config.model.memory_budget_gb)
        self.program = TrainProgram(model, self.step_cfg, tx, schedule, mesh=self.mesh, rules=self.rules,
                                    remat="auto" if config.model.remat == "auto" else None,
                                    memory_budget=int(budget * 1e9) if budget > 0 else None)
        self.graphdef, self.rest, self.param_shardings = (self.program.graphdef, self.program.rest,
                                                          self.program.param_shardings)
        del model
        self.reference_path = self.model_path  # "" = the random-init preset
        self.ref_params = None
        if self.step_cfg.needs_reference:
            if config.reference_path:
                self.set_reference(config.reference_path, like=params)
            else:  # the initial policy, frozen (a copy: the policy's buffers are donated)
                self.ref_params = jax.tree.map(jnp.copy, params)
        self.shardings = self.program.state_shardings
        self.state = self.program.init_state(params, int(config.seed))
        del params
        self.checkpointer = ckpt_lib.Checkpointer(workdir, keep=int(config.checkpoint.keep),
                                                  async_save=bool(config.checkpoint.async_save))
        self.step, self.last_saved, self._iterator_state = 0, None, None
        latest = self.checkpointer.latest_step()
        if latest is not None:
            self.state, self._iterator_state = self.checkpointer.restore(
                latest, state_lib.abstract_state(self.state, self.shardings))
            self.step = self.last_saved = int(jax.device_get(self.state["step"]))
            log.info("resumed from %s at step %d", self.checkpointer.directory, self.step)
        if self.primary:  # steps past the checkpoint were logged by an interrupted run: they are redone
            metrics_lib.drop_after(self.run_dir / "metrics.jsonl", self.step)
        self.writer = metrics_lib.MetricsWriter(self.workdir, enabled=self.primary,
                                                tensorboard=bool(config.tensorboard))
        self._last_done = 0.0  # when the host last saw a step complete (perf_counter)
        self.compiled_shapes: list[tuple[int, ...]] = []
        self.compile_info: dict[str, Any] = {}

    # -------------------------------------------------------------------------------------- reference
    @property
    def needs_reference(self) -> bool:
        """Whether the objective reads pi_ref (reference-free objectives do not)."""
        return self.step_cfg.needs_reference

    def set_reference(self, path: str, *, like=None) -> None:
        """pi_ref = the model in `path` (same architecture as the policy)."""
        like = self.state["params"] if like is None else like
        _, ref, _ = state_lib.split_model(build.build_model(self.config.model, self.mesh, self.rules, path=path))
        if jax.tree.structure(ref) != jax.tree.structure(like) or any(
                a.shape != b.shape for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(like))):
            raise ConfigError(f"reference {path!r} is not the policy's architecture")
        self.ref_params, self.reference_path = ref, path
        log.info("reference: %s", path)

    def precompute_reference(self, datasets: dict, cache_dir: str, *, keep_reference: bool = False
                             ) -> dict[str, str]:
        """reference="precomputed": the reference's log-probs of every row, once per dataset (cached); the
        reference's weights are then freed (the step reads the batch's ref_logps column) unless
        `keep_reference` (an online run precomputes again for each segment's data)."""
        if self.step_cfg.reference != "precomputed":
            return {}
        report = {}
        cfg = self.step_cfg
        fn = refcache.make_logps_fn(self.graphdef, self.rest, self.mesh, cfg.logprob_chunk_size,
                                    window=cfg.completion_window, prompt_window=cfg.prompt_window)
        settings = dict(build.tokenize_args(self.config, None), chunk=cfg.logprob_chunk_size,
                        window=cfg.completion_window, prompt_window=cfg.prompt_window)
        for name, ds in datasets.items():
            if ds is None:
                continue
            key = refcache.cache_key(ds, self.config.model, settings, path=self.reference_path)
            t0 = time.perf_counter()
            values, hit = refcache.load_or_compute(
                self.config.reference_cache_dir or os.path.join(cache_dir, "reference"), key,
                lambda ds=ds: refcache.compute_ref_logps(fn, self.ref_params, ds, self.mesh,
                                                         rows_per_batch=int(self.config.micro_batch_size)))
            ds.set_ref_logps(values)
            report[name] = "hit" if hit else "computed"
            log.info("reference log-probs (%s): %s in %.1fs", name, report[name], time.perf_counter() - t0)
        if not keep_reference:
            self.ref_params = None
        return report

    # -------------------------------------------------------------------------------------- training
    def _compile(self, batch):
        """The compiled step for this batch's shape (compiled in a worker thread: signals stay responsive)."""
        known = len(self.program.compile_info)
        compiled = run_interruptible(self.program.compiled, batch)
        if len(self.program.compile_info) > known:  # length-aware batches: one compile per bucket length seen
            self.compiled_shapes.append(tuple(batch["input_ids"].shape))
            self.compile_info = list(self.program.compile_info.values())[-1]
        return compiled

    def train(self, train_ds, eval_ds=None, *, start_step: int = 0, end_step: int | None = None) -> TrainResult:
        """Steps [max(self.step, start_step), end_step) on `train_ds` (which begins at run step `start_step`),
        evaluated on `eval_ds` every `eval_every` steps."""
        from mcpo_jax import data as data_lib

        c = self.config
        end_step = self.total_steps if end_step is None else int(end_step)
        result = TrainResult("completed", self.step, compile=self.compile_info or None,
                             compiled_shapes=sorted(self.compiled_shapes) or None)
        if self.step >= end_step:
            return result
        accum = int(c.batch_size) // int(c.micro_batch_size)
        per_process = int(c.batch_size) // jax.process_count()
        need = (end_step - start_step) * per_process * jax.process_count()
        epochs = max(int(c.num_epochs), math.ceil(need / max(len(train_ds), 1)))
        iterator = data_lib.make_batch_iterator(train_ds, batch_size=per_process, seed=int(c.seed) + start_step,
                                                num_epochs=epochs, shuffle=True,
                                                worker_count=int(c.data.worker_count), micro_batches=accum,
                                                buckets=c.data.bucket_lengths,
                                                group_by_length=int(c.data.group_by_length))
        if self._iterator_state is not None and self.step > start_step:
            iterator.set_state(self._iterator_state)
        self._iterator_state = None
        evaluate = None
        if eval_ds is not None and int(c.eval_every) > 0:
            if len(eval_ds) < int(c.micro_batch_size):
                log.warning("eval split has %d examples, fewer than one micro-batch (%d): eval disabled",
                            len(eval_ds), int(c.micro_batch_size))
            else:
                evaluate = Evaluator(self, eval_ds)
        bar = None
        if self.primary and bool(c.progress_bar):
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=c.name, dynamic_ncols=True, smoothing=0.1)
        pending = None  # (step number, metrics on device, start time or None) of the last dispatched step
        last = None
        # One process: a signal stops the loop at once. Several: each sends its stop request through the step
        # (batch key `stop_request`) and all stop once a step's metrics, read one step late, say any asked: the
        # same step everywhere, with no host-side collective per step.
        multi = jax.process_count() > 1
        self._stop_agreed = False
        try:
            while self.step < end_step:
                if self._stop_agreed if multi else self.stop.requested:
                    last = self._drain(pending, bar) or last
                    pending = None
                    self._save(iterator)
                    result.status, result.signal = "interrupted", self.stop.signal or "a signal on another process"
                    break
                local = next(iterator)
                if multi:
                    local = dict(local, stop_request=np.full((len(local["input_ids"]),), self.stop.requested,
                                                             np.int32))
                batch = to_global(local, self.mesh, accum)
                if pending is not None and not self.program.is_compiled(batch):  # a new bucket length: the
                    last = self._drain(pending, bar) or last  # compile must not count in the previous step's time
                    pending = None
                compiled = self._compile(batch)
                if self.step == int(c.debug.nan_at_step):
                    self.state = dict(self.state, params=jax.tree.map(lambda x: x * jnp.nan, self.state["params"]))
                # with a step in flight this one starts when that one completes (seen at its drain, below)
                start = time.perf_counter() if pending is None else None
                self.state, metrics = compiled(
                    self.state, None if self.program.ref_shardings is None else self.ref_params, batch)
                self.step += 1
                last = self._drain(pending, bar) or last  # the previous step's metrics, while this one runs
                pending = (self.step, metrics, start)
                done = self.step
                save_every = int(c.checkpoint.save_every)
                at_eval = evaluate is not None and (done % int(c.eval_every) == 0 or done == end_step)
                at_save = (save_every and done % save_every == 0) or done == int(c.debug.stop_after_steps)
                if at_eval or at_save or done == end_step:
                    last = self._drain(pending, bar) or last
                    pending = None
                if at_eval and not self.stop.should_stop():
                    ev = evaluate(self.state["params"], self.ref_params, self.state["rng"])
                    self.writer.write(done, ev, split="eval")
                    result.eval = ev
                    log.info("eval at step %d: %s", done, {k: round(v, 4) for k, v in ev.items()
                                                            if k in ("loss", "rewards/accuracies", "rewards/margins")})
                if at_save:
                    self._save(iterator)
                if done == int(c.debug.stop_after_steps):
                    result.status = "stopped"
                    break
            else:
                self._save(iterator)
        finally:
            if bar is not None:
                bar.close()
        result.step, result.final_metrics = self.step, last
        result.compile, result.compiled_shapes = self.compile_info or None, sorted(self.compiled_shapes) or None
        return result

    def _drain(self, pending, bar):
        """Read a dispatched step's metrics (host sync), log them, stop on a non-finite loss."""
        if pending is None:
            return None
        done, metrics, start = pending
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        dt = now - (self._last_done if start is None else start)  # completion to completion
        self._last_done = now
        if not bool(metrics["finite"]):
            msg = (f"non-finite loss/gradient at step {done} (loss={float(metrics['loss'])}, "
                   f"grad_norm={float(metrics['grad_norm'])}); stopping. The last good checkpoint "
                   f"(step {self.last_saved}) is kept in {self.checkpointer.directory}")
            log.error(msg)
            raise TrainingDiverged(msg)
        if float(metrics.get("stop_request", 0.0)) > 0:
            self._stop_agreed = True
        if float(metrics.get("logprobs/prompt_mismatch", 0.0)) > 0:
            from mcpo_jax.data.example import DataError

            msg = (f"step {done}: {float(metrics['logprobs/prompt_mismatch']):.0%} of the examples have rows whose "
                   f"prompts differ, or a prompt longer than data.max_prompt_length "
                   f"({int(self.config.data.max_prompt_length)}): the shared-prompt encoding (share_prompt=True) "
                   f"needs every row of an example to start with the same prompt. Fix the data or set "
                   f"share_prompt=False. The last good checkpoint (step {self.last_saved}) is kept.")
            log.error(msg)
            raise DataError(msg)
        record = {k: v for k, v in metrics_lib.to_python(metrics).items()
                  if k not in ("selected", "finite", "stop_request")}
        record.update(step_time=dt, tokens_per_sec=float(metrics["tokens"]) / max(dt, 1e-9),
                      examples_per_sec=float(metrics["examples"]) / max(dt, 1e-9))
        self.writer.write(done, record)
        if bar is not None:
            post = {"loss": f"{record['loss']:.4f}"}
            if not self.step_cfg.is_sft:
                post.update(acc=f"{record.get('rewards/accuracies', 0):.2f}",
                            margin=f"{record.get('rewards/margins', 0):.3f}")
            bar.update(done - bar.n)
            bar.set_postfix(post, refresh=False)
        elif self.primary and (done % int(self.config.log_every) == 0 or done == self.total_steps):
            log.info("step %d/%d loss %.4f grad_norm %.3f %.2fs/step", done, self.total_steps, record["loss"],
                     record["grad_norm"], dt)
        return record

    def _save(self, iterator) -> None:
        if self.last_saved == self.step:
            return
        self.checkpointer.save(self.step, self.state, iterator.get_state())
        self.last_saved = self.step

    # -------------------------------------------------------------------------------------- outputs
    def policy(self):
        return state_lib.merge_model(self.graphdef, self.state["params"], self.rest)

    def export(self, hf_dir: str, tokenizer) -> str:
        """The policy as a Hugging Face folder (save_pretrained writes local files: a URL gets a copy)."""
        policy = self.policy()
        if not files.is_url(hf_dir):
            models.save_pretrained(policy, hf_dir, tokenizer=tokenizer)
            return hf_dir
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mcpo_hf_") as local:
            models.save_pretrained(policy, local, tokenizer=tokenizer)
            if self.primary:
                files.copy_tree(local, hf_dir, last="config.json")
        return hf_dir

    def close(self) -> None:
        self.writer.close()
        self.checkpointer.close()
