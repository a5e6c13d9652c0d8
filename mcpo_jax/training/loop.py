"""The trainer: `train(config, workdir) -> summary`.

    validate config (before anything compiles) -> mesh -> model (from_pretrained / init_random)
    -> tokenizer -> data (load, split, tokenize) -> reference (frozen copy; or precomputed column, cached)
    -> optimizer, sharded train state -> resume from workdir/checkpoints if present
    -> compile the step once -> loop (metrics, eval, async checkpoints, SIGTERM/SIGINT, NaN guard)
    -> final checkpoint -> Hugging Face export (workdir/hf) -> curves PNG -> optional final evaluation

A config with `warm_start` first runs that SFT phase in workdir/sft and starts from its export.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from mcpo_jax import kernel, losses, models
from mcpo_jax import sharding as shd
from mcpo_jax.training import checkpoint as ckpt_lib
from mcpo_jax.training import files
from mcpo_jax.training import metrics as metrics_lib
from mcpo_jax.training import refcache
from mcpo_jax.training import state as state_lib
from mcpo_jax.training import step as step_lib

log = logging.getLogger("mcpo_jax.train")

BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask", "valid", "ranks", "fixed_index")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """The config cannot run; raised before any model is loaded or step compiled."""


class TrainingDiverged(FloatingPointError):
    """A non-finite loss or gradient; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------ config


def _get(cfg, dotted: str, default=None):
    node = cfg
    for part in dotted.split("."):
        if node is None or part not in node:
            return default
        node = node[part]
    return node


def num_columns(config) -> int:
    """C = 1 + L (+1 for Table 2's injected noise candidate, which comes on top of the L)."""
    noise = bool(_get(config, "data.options.inject_noise", False))
    return 1 + int(config.num_candidates) + (1 if noise else 0)


def validate_config(config, *, device_count: int | None = None) -> None:
    """Every check that needs no model or data: raises ConfigError naming the field."""
    errors = []
    objective = config.get("objective")
    if objective not in losses.NAMES:
        errors.append(f"objective={objective!r} is unknown; known: {', '.join(losses.NAMES)}")
    sampler = config.get("sampler", "mc")
    if sampler not in step_lib.SAMPLERS:
        errors.append(f"sampler={sampler!r} is unknown; known: {', '.join(step_lib.SAMPLERS)}")
    L = int(config.get("num_candidates", 0))
    M = int(config.get("num_negatives", 1))
    columns = num_columns(config) - 1
    include_preferred = bool(config.get("include_preferred", False))
    if L < 1:
        errors.append(f"num_candidates (L) must be >= 1, got {L}")
    if objective != "sft":
        eligible = columns + (1 if include_preferred else 0)
        if M < 1 or M > eligible:
            errors.append(f"num_negatives (M) = {M} must be between 1 and num_candidates (L) = {columns}"
                          f"{' + 1 (y0 included)' if include_preferred else ''}")
        if objective in losses.PAIRWISE and M != 1:
            errors.append(f"objective={objective!r} is pairwise: it needs num_negatives=1, got {M}")
        if sampler == "fixed" and M != 1:
            errors.append(f"sampler='fixed' (the dataset's own rejected) gives one negative; num_negatives={M}")
    reference = config.get("reference", "online")
    if reference not in ("online", "precomputed"):
        errors.append(f"reference={reference!r}: use 'online' or 'precomputed'")
    if float(config.get("beta", 0.01)) <= 0:
        errors.append(f"beta must be > 0, got {config.beta}")
    batch, micro = int(config.batch_size), int(config.micro_batch_size)
    if batch < 1 or micro < 1 or batch % micro:
        errors.append(f"batch_size={batch} must be a positive multiple of micro_batch_size={micro} "
                      "(gradient accumulation = batch_size / micro_batch_size)")
    try:
        sizes = _mesh_sizes(config.mesh, device_count or jax.device_count())
        dp = sizes[0] * sizes[1]
        if micro % dp:
            errors.append(f"micro_batch_size={micro} is not divisible by the data-parallel size "
                          f"{dp} (mesh data={sizes[0]} x fsdp={sizes[1]})")
        if micro % jax.process_count():
            errors.append(f"micro_batch_size={micro} is not divisible by the {jax.process_count()} processes")
    except ValueError as e:
        errors.append(str(e))
    path, preset = _get(config, "model.path"), _get(config, "model.preset")
    warm = config.get("warm_start")
    if not path and not preset and not warm:
        errors.append("model: set model.path (a Hugging Face folder or hub id) or model.preset")
    for field, value in (("model.path", path), ("reference_path", config.get("reference_path", ""))):
        if value and not os.path.isdir(value):
            looks_like_hub = value.count("/") == 1 and not value.startswith((".", "/", "~"))
            if not looks_like_hub or os.environ.get("HF_HUB_OFFLINE") == "1" and not _hub_cached(value):
                errors.append(f"{field}={value!r}: no such folder"
                              + ("" if not looks_like_hub else " and the hub is offline (HF_HUB_OFFLINE=1)"))
    if preset and preset not in models.PRESETS:
        errors.append(f"model.preset={preset!r} is unknown; known: {sorted(models.PRESETS)}")
    for key in ("dtype", "param_dtype"):
        value = _get(config, f"model.{key}", "float32")
        if value not in DTYPES:
            errors.append(f"model.{key}={value!r}: use one of {sorted(DTYPES)}")
    if not _get(config, "data.source"):
        errors.append("data.source is empty (a file, folder, hub dataset id or 'synthetic')")
    if int(config.get("num_epochs", 1)) < 1 and int(config.get("max_steps", -1)) < 1:
        errors.append("num_epochs must be >= 1 (or set max_steps)")
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def _hub_cached(repo: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except Exception:
        return False


def _mesh_sizes(mesh_cfg, n: int) -> tuple[int, int, int]:
    sizes = [int(mesh_cfg.get(k, d)) for k, d in (("data", 1), ("fsdp", -1), ("tensor", 1))]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh: {n} devices are not divisible by {sizes}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {n} devices")
    return tuple(sizes)


# ------------------------------------------------------------------------------------------ pieces


def build_model(model_cfg, mesh, rules):
    dtype = DTYPES[model_cfg.get("dtype", "float32")]
    param_dtype = DTYPES[model_cfg.get("param_dtype", "float32")]
    remat = model_cfg.get("remat", False)
    if model_cfg.get("path"):
        return models.from_pretrained(model_cfg.path, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                                      rules=rules, remat=remat)
    overrides = model_cfg.get("overrides", {}) or {}
    overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
    config = models.preset_config(model_cfg.preset, **overrides)
    return models.init_random(config, dtype=dtype, param_dtype=param_dtype, seed=int(model_cfg.get("seed", 0)),
                              mesh=mesh, rules=rules, remat=remat)


def build_tokenizer(config):
    name = config.get("tokenizer") or _get(config, "model.path")
    if name == "synthetic":
        from mcpo_jax.data import synthetic

        return synthetic.make_tokenizer()
    if not name:
        raise ConfigError("tokenizer: set config.tokenizer (a folder / hub id / 'synthetic') or model.path")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _rows(source, data_cfg, split_seed):
    """A source string -> what load_examples reads (generated rows for the synthetic task)."""
    if source in ("synthetic", "synthetic_sft"):
        from mcpo_jax.data import synthetic

        n = int(data_cfg.get("synthetic_rows", 2000))
        if source == "synthetic":
            return synthetic.generate_rows(n, seed=split_seed, num_candidates=int(data_cfg.get("synthetic_candidates", 6)))
        return synthetic.sft_rows(n, seed=split_seed)
    return source


def build_datasets(config, tokenizer, cache_dir):
    from mcpo_jax import data as data_lib

    d = config.data
    L = int(config.num_candidates)
    options = d.get("options", {}) or {}
    options = options.to_dict() if hasattr(options, "to_dict") else dict(options)
    fmt = d.get("format", "nectar")
    load = lambda source, split, seed: data_lib.load_examples(
        _rows(source, d, seed), format=fmt, num_candidates=L,
        min_candidates=d.get("min_candidates", None), on_bad_example=d.get("on_bad_example", "skip"),
        split=split, **options)
    examples = list(load(d.source, d.get("split", "train"), int(config.seed)))
    if d.get("max_examples"):
        examples = examples[: int(d.max_examples)]
    eval_examples = []
    if d.get("eval_source"):
        eval_examples = list(load(d.eval_source, d.get("eval_split", "test"), int(config.seed) + 1))
    elif float(d.get("eval_fraction", 0.0)) > 0 and len(examples) > 1:
        order = list(range(len(examples)))
        random.Random(int(config.seed)).shuffle(order)
        n_eval = max(1, int(round(len(examples) * float(d.eval_fraction))))
        held = set(order[:n_eval])
        eval_examples = [examples[i] for i in order[:n_eval]]
        examples = [e for i, e in enumerate(examples) if i not in held]
    if d.get("max_eval_examples") and eval_examples:
        eval_examples = eval_examples[: int(d.max_eval_examples)]
    tok_args = dict(
        num_candidates=num_columns(config) - 1,
        max_prompt_length=int(d.max_prompt_length),
        max_completion_length=int(d.max_completion_length),
        max_length=int(d.max_length),
        use_chat_template=bool(d.get("use_chat_template", True)),
        cache_dir=cache_dir,
    )
    train_ds = data_lib.tokenize_examples(examples, tokenizer, **tok_args)
    eval_ds = data_lib.tokenize_examples(eval_examples, tokenizer, **tok_args) if eval_examples else None
    if config.objective != "sft":
        kernel.check_enough_candidates(train_ds.valid, int(config.num_negatives),
                                       include_preferred=bool(config.get("include_preferred", False)))
    return train_ds, eval_ds, tok_args


def _local_to_global(local: dict, mesh, accum: int | None):
    out = {}
    for k in BATCH_KEYS + ("ref_logps",):
        if k not in local:
            continue
        x = np.asarray(local[k])
        if x.dtype == np.int64:
            x = x.astype(np.int32)
        if accum is not None:
            x = x.reshape((accum, x.shape[0] // accum) + x.shape[1:])
        out[k] = x
    return shd.global_batch(out, mesh, batch_axis=0 if accum is None else 1)


class _StopFlag:
    """SIGTERM / SIGINT set a flag; the loop finishes the step, saves and exits 0."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = signal.Signals(signum).name
        log.warning("%s received: finishing the current step, then saving and exiting", self.signal)

    def should_stop(self) -> bool:
        """Whether every process stops after this step: a signal may reach one process of a multi-process
        job only (preemption notices arrive host by host), and a process that saves (a collective) while
        the others run the next step hangs the job. One tiny all-gather per step; none in one process."""
        stop_now = self.signal is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            stop_now = bool(multihost_utils.process_allgather(np.asarray(stop_now)).any())
        return stop_now

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _RunLogHandler(logging.StreamHandler):
    """workdir/train.log (also under a URL)."""

    def __init__(self, path):
        super().__init__(files.AppendFile(path))
        self.baseFilename = os.fspath(path)

    def close(self):
        self.stream.close()
        super().close()


def _setup_logging(run_dir, primary: bool):
    root = logging.getLogger("mcpo_jax")
    root.setLevel(logging.INFO)
    # orbax and grain log every save / read at INFO through absl; keep the console for the trainer.
    for name in ("absl", "orbax", "grain"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not logging.getLogger().handlers and not any(
            isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(h)
    path = os.fspath(run_dir / "train.log")
    if primary and not any(getattr(h, "baseFilename", None) == path for h in root.handlers):
        fh = _RunLogHandler(path)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)


# ------------------------------------------------------------------------------------------ train


def _run_warm_start(config, workdir) -> str:
    """The SFT phase of a warm start: trains in workdir/sft and returns its Hugging Face export."""
    sft = ml_collections.ConfigDict(config.to_dict())
    sft.warm_start = None
    sft.final_eval = None
    overrides = config.warm_start.to_dict()
    data_overrides = overrides.pop("data", {})
    for k, v in overrides.items():
        sft[k] = v
    with sft.unlocked():
        for k, v in data_overrides.items():
            sft.data[k] = v
    sft_dir = os.fspath(files.workdir_path(workdir) / "sft")
    hf_dir = os.fspath(files.workdir_path(sft_dir) / "hf")
    if (epath.Path(hf_dir) / "config.json").exists() and (epath.Path(sft_dir) / "summary.json").exists():
        log.info("warm start: reusing the SFT model in %s", hf_dir)
        return hf_dir
    log.info("warm start: SFT phase in %s", sft_dir)
    summary = train(sft, sft_dir)
    if summary.get("status") != "completed":
        raise RuntimeError(f"warm start SFT phase ended with status {summary.get('status')!r}")
    return hf_dir


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train per `config` in `workdir` (resuming from its checkpoints); returns a summary dict."""
    config = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
    validate_config(config)
    run_dir = files.workdir_path(workdir)  # a local folder or a URL (gs://...), never resolved
    workdir = os.fspath(run_dir)
    primary = shd.is_primary()
    run_dir.mkdir(parents=True, exist_ok=True)
    _setup_logging(run_dir, primary)

    if config.get("warm_start"):
        with config.unlocked():
            config.model.path = _run_warm_start(config, workdir)
            if config.get("tokenizer") in (None, ""):
                config.tokenizer = config.model.path
        config.warm_start = None
    if primary:
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))

    rules = shd.rules_from_config(config.get("sharding_rules", None) and dict(config.sharding_rules))
    mesh = shd.mesh_from_config(config.mesh)
    dp = shd.data_parallel_size(mesh)
    log.info("mesh %s (%d devices, %d processes)", dict(mesh.shape), mesh.size, jax.process_count())

    tokenizer = build_tokenizer(config)
    cache_dir = config.data.get("cache_dir") or files.local_cache_dir(workdir)
    train_ds, eval_ds, tok_args = build_datasets(config, tokenizer, cache_dir)
    log.info("data: %d train / %d eval examples, C=%d columns, T=%d", len(train_ds),
             0 if eval_ds is None else len(eval_ds), train_ds.num_columns, train_ds.max_length)

    model = build_model(config.model, mesh, rules)
    graphdef, params, rest = state_lib.split_model(model)
    del model
    axes = _param_axes(graphdef, params, rest)
    param_shardings = shd.param_shardings(axes, params, mesh, rules)
    log.info("model: %.2fM parameters", state_lib.count_params(params) / 1e6)

    step_cfg = step_lib.step_config_from(config)
    ref_params = None
    reference_cache: dict[str, str] = {}
    ref_model_cfg = config.model
    if step_cfg.needs_reference and config.get("reference_path"):
        ref_model_cfg = ml_collections.ConfigDict(dict(config.model.to_dict(), path=config.reference_path))
        ref_graphdef, ref_params, _ = state_lib.split_model(build_model(ref_model_cfg, mesh, rules))
        if jax.tree.structure(ref_params) != jax.tree.structure(params) or any(
                a.shape != b.shape for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params))):
            raise ConfigError(f"reference_path={config.reference_path!r} is not the policy's architecture")
        log.info("reference: %s", config.reference_path)
    elif step_cfg.needs_reference:
        # The reference is the initial policy, frozen (a copy: the policy's buffers are donated).
        ref_params = jax.tree.map(jnp.copy, params)
    if step_cfg.reference == "precomputed":
        settings = dict(tok_args, chunk=step_cfg.logprob_chunk_size, cache_dir=None)
        logps_fn = refcache.make_logps_fn(graphdef, rest, mesh, step_cfg.logprob_chunk_size)
        for name, ds in (("train", train_ds), ("eval", eval_ds)):
            if ds is None:
                continue
            key = refcache.cache_key(ds, ref_model_cfg, settings)
            t0 = time.perf_counter()
            values, hit = refcache.load_or_compute(
                config.get("reference_cache_dir") or os.path.join(cache_dir, "reference"), key,
                lambda ds=ds: refcache.compute_ref_logps(logps_fn, ref_params, ds, mesh,
                                                         rows_per_batch=int(config.micro_batch_size)))
            ds.set_ref_logps(values)
            reference_cache[name] = "hit" if hit else "computed"
            log.info("reference log-probs (%s): %s in %.1fs", name, "cache hit" if hit else "computed",
                     time.perf_counter() - t0)
        ref_params = None  # freed: the step reads the batch's ref_logps column

    per_process_batch = int(config.batch_size) // jax.process_count()
    accum = int(config.batch_size) // int(config.micro_batch_size)
    from mcpo_jax import data as data_lib

    steps_in_data = data_lib.num_batches(len(train_ds), batch_size=per_process_batch,
                                         num_epochs=int(config.num_epochs), process_count=jax.process_count())
    max_steps = int(config.get("max_steps", -1) or -1)
    total_steps = min(steps_in_data, max_steps) if max_steps > 0 else steps_in_data
    if total_steps < 1:
        raise ConfigError(f"{len(train_ds)} training examples x {config.num_epochs} epochs make no batch of "
                          f"{config.batch_size}; lower batch_size or add data")
    opt = config.optimizer
    tx, schedule = step_lib.make_optimizer(
        learning_rate=float(opt.learning_rate), total_steps=total_steps, warmup_ratio=float(opt.warmup_ratio),
        decay=opt.get("decay", "linear"), weight_decay=float(opt.get("weight_decay", 0.0)),
        b1=float(opt.get("b1", 0.9)), b2=float(opt.get("b2", 0.999)), eps=float(opt.get("eps", 1e-8)),
        max_grad_norm=opt.get("max_grad_norm", 1.0))
    shardings = state_lib.state_shardings(tx, params, param_shardings, mesh)
    state = state_lib.init_state(params, tx, int(config.seed), shardings=shardings)
    del params

    checkpointer = ckpt_lib.Checkpointer(workdir, keep=int(config.checkpoint.get("keep", 3)),
                                         async_save=bool(config.checkpoint.get("async_save", True)))
    iterator = data_lib.make_batch_iterator(train_ds, batch_size=per_process_batch, seed=int(config.seed),
                                            num_epochs=int(config.num_epochs), shuffle=True,
                                            worker_count=int(config.data.get("worker_count", 0)),
                                            micro_batches=accum,
                                            # issue 15: length-aware batches (T varies by global batch)
                                            buckets=config.data.get("bucket_lengths", "none"),
                                            group_by_length=int(config.data.get("group_by_length", 0)))
    start_step = 0
    latest = checkpointer.latest_step()
    if latest is not None:
        state, it_state = checkpointer.restore(latest, state_lib.abstract_state(state, shardings))
        if it_state is not None:
            iterator.set_state(it_state)
        start_step = int(jax.device_get(state["step"]))
        log.info("resumed from %s at step %d", checkpointer.directory, start_step)

    repl = shd.replicated(mesh)
    ref_shardings = param_shardings if ref_params is not None else None
    step_fn = step_lib.make_train_step(step_cfg, graphdef, rest, tx, schedule)
    writer = metrics_lib.MetricsWriter(workdir, enabled=primary, tensorboard=bool(config.get("tensorboard", True)))
    stop = _StopFlag().install()
    summary: dict[str, Any] = {"workdir": workdir, "total_steps": total_steps, "start_step": start_step,
                               "status": "running", "reference_cache": reference_cache}
    last_saved = latest
    compile_info = {}
    bar = None
    try:
        if start_step >= total_steps:
            log.info("nothing to do: the checkpoint is at step %d of %d", start_step, total_steps)
            compiled = None
        else:
            first = _local_to_global(next(iterator), mesh, accum)
            compiled, compile_info = step_lib.compile_train_step(
                step_fn, state, ref_params, first, state_shardings=shardings, ref_shardings=ref_shardings,
                batch_shardings=jax.tree.map(lambda x: x.sharding, first), metric_shardings=repl)
            summary["compile"] = compile_info
            # issue 15: length-aware batches have a few token lengths (data.bucket_lengths); the compiled
            # step is cached by batch shape and a new shape compiles once more (in the loop below).
            compiled_by_shape = {first["input_ids"].shape: compiled}
            if primary:
                log.info("step compiled in %.1fs; memory_analysis: %s", compile_info["compile_seconds"],
                         {k: v for k, v in compile_info.items() if k != "compile_seconds"})
        eval_fn = None
        if eval_ds is not None and len(eval_ds) < int(config.micro_batch_size):
            log.warning("eval split has %d examples, fewer than one micro-batch (%d): eval disabled",
                        len(eval_ds), int(config.micro_batch_size))
        elif eval_ds is not None and int(config.get("eval_every", 0)) > 0:
            eval_fn = _make_evaluator(config, step_cfg, graphdef, rest, eval_ds, mesh)
        if primary and bool(config.get("progress_bar", True)) and compiled is not None:
            from tqdm import tqdm

            bar = tqdm(total=total_steps, initial=start_step, desc=config.get("name", "train"),
                       dynamic_ncols=True, smoothing=0.1)
        batch = first if compiled is not None else None
        nan_at = int(_get(config, "debug.nan_at_step", -1) or -1)
        stop_after = int(_get(config, "debug.stop_after_steps", -1) or -1)
        last = None
        for step in range(start_step, total_steps):
            if batch is None:
                batch = _local_to_global(next(iterator), mesh, accum)
            if batch["input_ids"].shape not in compiled_by_shape:  # issue 15: a new bucket length
                compiled_by_shape[batch["input_ids"].shape], _ = step_lib.compile_train_step(
                    step_fn, state, ref_params, batch, state_shardings=shardings, ref_shardings=ref_shardings,
                    batch_shardings=jax.tree.map(lambda x: x.sharding, batch), metric_shardings=repl)
            compiled = compiled_by_shape[batch["input_ids"].shape]
            summary["compiled_shapes"] = sorted(tuple(k) for k in compiled_by_shape)
            if step == nan_at:
                state = dict(state, params=jax.tree.map(lambda x: x * jnp.nan, state["params"]))
            t0 = time.perf_counter()
            state, metrics = compiled(state, ref_params, batch)
            metrics = jax.device_get(metrics)
            dt = time.perf_counter() - t0
            batch = None
            if not bool(metrics["finite"]):
                msg = (f"non-finite loss/gradient at step {step + 1} (loss={float(metrics['loss'])}, "
                       f"grad_norm={float(metrics['grad_norm'])}); stopping. The last good checkpoint "
                       f"(step {last_saved}) is kept in {checkpointer.directory}")
                log.error(msg)
                summary.update(status="diverged", message=msg, step=step + 1, final_metrics=last)
                if primary:
                    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
                raise TrainingDiverged(msg)
            record = {k: v for k, v in metrics_lib.to_python(metrics).items() if k not in ("selected", "finite")}
            record.update(step_time=dt, tokens_per_sec=float(metrics["tokens"]) / max(dt, 1e-9),
                          examples_per_sec=float(metrics["examples"]) / max(dt, 1e-9))
            done = step + 1
            writer.write(done, record)
            last = record
            if bar is not None:
                bar.update(1)
                if step_cfg.is_sft:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                else:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record.get('rewards/accuracies', 0):.2f}",
                                    margin=f"{record.get('rewards/margins', 0):.3f}", refresh=False)
            elif primary and (done % int(config.get("log_every", 10)) == 0 or done == total_steps):
                log.info("step %d/%d loss %.4f grad_norm %.3f %.2fs/step", done, total_steps, record["loss"],
                         record["grad_norm"], dt)
            if eval_fn is not None and (done % int(config.eval_every) == 0 or done == total_steps):
                ev = eval_fn(state["params"], ref_params, state["rng"])
                writer.write(done, ev, split="eval")
                summary["eval"] = ev
                log.info("eval at step %d: %s", done, {k: round(v, 4) for k, v in ev.items()
                                                        if k in ("loss", "rewards/accuracies", "rewards/margins")})
            save_every = int(config.checkpoint.get("save_every", 0))
            stop_now = stop.should_stop()
            if (save_every and done % save_every == 0) or stop_now or done == stop_after:
                checkpointer.save(done, state, iterator.get_state())
                last_saved = done
            if stop_now:
                received = stop.signal or "a signal on another process"
                summary.update(status="interrupted", signal=received, step=done,
                               message=f"{received}: saved step {done} to {checkpointer.directory}; "
                                       f"rerun with the same --workdir to resume")
                log.warning(summary["message"])
                break
            if done == stop_after:
                summary.update(status="stopped", step=done)
                break
        else:
            if compiled is not None and last_saved != total_steps:
                checkpointer.save(total_steps, state, iterator.get_state())
                last_saved = total_steps
            summary.update(status="completed", step=total_steps)
        summary["final_metrics"] = last
    finally:
        if bar is not None:
            bar.close()
        stop.restore()
        writer.close()
        checkpointer.close()

    if summary["status"] == "completed":
        policy = state_lib.merge_model(graphdef, state["params"], rest)
        if bool(config.get("export_hf", True)):
            hf_dir = os.fspath(run_dir / "hf")
            _export_hf(policy, hf_dir, tokenizer)
            summary["hf_export"] = hf_dir
            log.info("Hugging Face export: %s", hf_dir)
        if primary:
            summary["plot"] = metrics_lib.plot_curves(workdir)
        if config.get("final_eval"):
            from mcpo_jax.training import final_eval

            summary["final_eval"] = final_eval.run(config, policy, tokenizer, mesh, rules)
    if primary:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _export_hf(policy, hf_dir: str, tokenizer) -> None:
    """save_pretrained writes local files: under a URL workdir, export to a local folder and copy it up."""
    if not files.is_url(hf_dir):
        models.save_pretrained(policy, hf_dir, tokenizer=tokenizer)
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mcpo_hf_") as local:
        models.save_pretrained(policy, local, tokenizer=tokenizer)
        if shd.is_primary():
            dest = epath.Path(hf_dir)
            for path in sorted(epath.Path(local).rglob("*")):
                if path.is_file():
                    target = dest / os.path.relpath(path, local)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    path.copy(target, overwrite=True)


def _param_axes(graphdef, params, rest):
    return models.logical_axes(state_lib.merge_model(graphdef, params, rest))


def _make_evaluator(config, step_cfg, graphdef, rest, eval_ds, mesh):
    """Held-out loss / reward accuracy as exact (sum, count) means over whole micro-batches."""
    from mcpo_jax import data as data_lib

    fn = jax.jit(step_lib.make_eval_step(step_cfg, graphdef, rest))
    rows = int(config.micro_batch_size) // jax.process_count()
    limit = int(config.get("eval_batches", 0) or 0)

    def evaluate(params, ref_params, rng):
        eval_key = jax.random.fold_in(rng, 0x7FFFFFFF)
        it = data_lib.make_batch_iterator(eval_ds, batch_size=rows, seed=0, num_epochs=1, shuffle=False,
                                          process_index=jax.process_index(), process_count=jax.process_count())
        totals: dict[str, list[float]] = {}
        for i, local in enumerate(it):
            if limit and i >= limit:
                break
            sums = jax.device_get(fn(params, ref_params, jax.random.fold_in(eval_key, i),
                                     _local_to_global(local, mesh, None)))
            for k, (s, c) in sums.items():
                acc = totals.setdefault(k, [0.0, 0.0])
                acc[0] += float(s)
                acc[1] += float(c)
        return {k: s / max(c, 1.0) for k, (s, c) in totals.items()}

    return evaluate
