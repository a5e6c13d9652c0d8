"""The run config's one owner: the schema with every default, validation, and locking.

    config = base_config()          # every knob, paper defaults (Sec. 5.1, App. B.1 / B.2)
    ... configs/*.py and --config.a.b=value overrides set values ...
    config = prepare(config)        # validate (every problem listed at once) -> locked copy

Code downstream reads attributes (`config.data.max_length`), never `.get(key, default)`: a default lives here
only. A key that is not in the schema is an error naming the closest known key, so a misspelt
`--config.optimizer.learnig_rate=...` stops the run before anything is built. The free-form blocks
(`model.overrides`, `data.options`, `loss_hparams`, `sharding_rules`) take any key.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

import ml_collections

# Blocks whose keys are free: reader options, model-config overrides, objective hyper-parameters, axis rules.
FREE_FORM = ("model.overrides", "data.options", "loss_hparams", "sharding_rules")
# Keys that do not change what a run computes: a rerun in the same workdir may change them freely
# (anything else differing from the saved config.json is refused unless resume_policy says otherwise).
RERUN_FREE = ("name", "log_every", "eval_every", "eval_batches", "progress_bar", "tensorboard", "export_hf",
              "checkpoint", "debug", "final_eval", "mesh", "sharding_rules", "data.worker_count",
              "data.cache_dir", "reference_cache_dir", "resume_policy", "model.remat", "model.memory_budget_gb",
              "logprob_chunk_size", "share_prompt", "reuse_prompt_encoding", "compilation_cache_dir")
RESUME_POLICIES = ("refuse", "restart")
JUDGE_KINDS = ("oracle", "rule", "llm", "reward")
NEGATIVE_DRAWS = ("per_prompt", "per_step")
# App. B.1's learning-rate grid, the one copy (configs/nectar.py and experiments/protocol.py read it). The paper
# prints 7 values, "8e-7, 1e-6, 2e-6, 5e-6, 8e-7, 1e-5, 2e-5": 8e-7 twice, so 6 distinct rates.
PAPER_LR_GRID = (8e-7, 1e-6, 2e-6, 5e-6, 1e-5, 2e-5)


class ConfigError(ValueError):
    """The config cannot run; raised before any model is loaded or step compiled."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "mcpo"
    c.seed = 42

    # Model: a Hugging Face folder / hub id (`path`), or a random-init preset (`preset` + `overrides`).
    c.model = ml_collections.ConfigDict()
    c.model.path = ""
    c.model.preset = ""
    c.model.overrides = ml_collections.ConfigDict()
    c.model.seed = 0
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.param_dtype = "float32"  # storage of params and optimizer state
    # False / True / a policy name from models.REMAT_POLICIES / "auto": the first of "minimal", "minimal_offload"
    # (GPU / TPU), True whose compiled train step fits the device's memory (or memory_budget_gb)
    c.model.remat = ml_collections.FieldReference(False, field_type=object)  # a bool or a name (from the CLI too)
    c.model.memory_budget_gb = 0.0  # remat="auto": GB one program may use per device; 0 = the device's own limit
    c.tokenizer = ""  # "" = model.path; or a folder / hub id; "synthetic" = data.synthetic.make_tokenizer()

    # Data (Sec. 5.1): Nectar, rank 1 = y0, rank 2 dropped, 5 candidates.
    c.data = ml_collections.ConfigDict()
    c.data.source = ""  # a file, folder, hub dataset id, or "synthetic" / "synthetic_sft" (data.synthetic)
    c.data.format = "nectar"  # nectar | ultrafeedback | ultrafeedback_binarized | pairs | ranked
    c.data.split = "train"
    c.data.options = ml_collections.ConfigDict()  # reader options (drop_ranks, parse_turns, inject_noise, ...)
    c.data.min_candidates = ml_collections.FieldReference(None, field_type=int)
    c.data.on_bad_example = "skip"  # skip | error
    c.data.max_examples = 0  # 0 = all
    c.data.eval_source = ""
    c.data.eval_split = "test"
    c.data.eval_fraction = 0.0  # held out from `source` when there is no eval_source
    c.data.max_eval_examples = 0
    c.data.max_prompt_length = 512
    c.data.max_completion_length = 512
    c.data.max_length = 1024
    c.data.use_chat_template = True
    c.data.cache_dir = ""  # "" = workdir/cache
    c.data.worker_count = 0
    # Length-aware batches: each global batch is padded to the smallest of these token lengths that
    # holds its longest row: "pow2" = 64, 128, 256, ... below max_length, then max_length (one compiled step
    # per length seen); "none" = always max_length; or explicit lengths "128,384,768".
    c.data.bucket_lengths = "pow2"
    c.data.group_by_length = 0  # k > 0: sort rows by length within mega-batches of k global batches (seeded)
    c.data.synthetic_rows = 2000
    c.data.synthetic_candidates = 6

    # Objective and sampler (Sec. 3.1, Algorithm 1).
    c.objective = "mcpo"  # any registered name in mcpo_jax.losses
    # Your own objectives: a module (importable from the working directory, e.g. "my_losses", or a .py path)
    # that calls mcpo_jax.losses.register; imported before the config is checked, so `objective` may name them.
    c.objective_module = ""
    c.sampler = "mc"  # mc | max | min | random | fixed
    c.num_candidates = 5  # L
    c.num_negatives = 1  # M
    c.beta = 0.01  # App. B.2
    # Algorithm 1: the MC kernel samples z over w_0..w_L, y0 included (a drawn y0 is a zero-gradient step, which
    # down-weights examples the policy already ranks right). False: candidates only (the earlier default).
    # Only the "mc" sampler reads it: max / min / random pick among the candidates (Fig. 2, App. B.1).
    c.include_preferred = True
    # sampler="random" with M = 1 (DPO and the other baselines, RNCE): "per_prompt" draws each prompt's negative
    # once, when the data is built (App. B.1 "randomly select a dispreferred completion", TRL's preprocessing:
    # the same pair in every epoch); "per_step" redraws it at every step. M > 1 always redraws.
    c.negative_draw = "per_prompt"
    c.loss_hparams = ml_collections.ConfigDict()  # e.g. lam=0.1 (RPO/CPO), gamma=10 (SimPO)
    c.reference = "online"  # online | precomputed
    # pi_ref: "" = the initial policy (frozen copy); or a Hugging Face folder / hub id of the same architecture.
    c.reference_path = ""
    c.reference_cache_dir = ""
    c.logprob_chunk_size = 128
    # Encode each example's prompt once per pass, its rows' completions attending to its keys (the rows of an
    # example share the prompt): the same log-probs for fewer FLOPs. False: every row encoded whole.
    c.share_prompt = True
    # With share_prompt: the policy's prompt encoded once for both its no-gradient pass (the kernel's
    # log-probs) and its gradient pass: ~1.5 % fewer FLOPs, for a second parameter-sized gradient stack at the
    # end of the backward (audited: +2.1 GB at 1B, +14 GB at 8B). Worth it where memory is not binding.
    c.reuse_prompt_encoding = False

    # Optimization (App. B.1): effective batch 128, 2 epochs, AdamW, lr from the grid.
    c.batch_size = 128  # examples per optimizer step (global)
    c.micro_batch_size = 8  # examples per accumulation step (global); accumulation = batch / micro
    c.num_epochs = 2
    c.max_steps = -1  # > 0 caps the number of steps (online: the length of the whole run)
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-6
    c.optimizer.warmup_ratio = 0.1
    c.optimizer.decay = "linear"  # linear | cosine | constant
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.max_grad_norm = 1.0  # 0 = no clipping

    # Parallelism: mesh axes (one may be -1 = all remaining devices), logical-axis rule overrides.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.sharding_rules = ml_collections.ConfigDict()

    # Checkpoints, logging, evaluation, export.
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.save_every = 200
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    c.log_every = 10
    c.eval_every = 0  # 0 = never; > 0 = every N steps and at the end
    c.eval_batches = 0  # 0 = the whole eval split
    c.progress_bar = True
    c.tensorboard = True
    c.export_hf = True
    c.compilation_cache_dir = ""  # "" = no persistent XLA compilation cache; a folder reuses compiles across runs
    # A rerun in a workdir whose saved config.json differs in a key that changes the run (data, model, batch,
    # objective, ...): "refuse" (list the differing keys, touch nothing) or "restart" (move the old run's files
    # to workdir/previous/<time>/ and start anew).
    c.resume_policy = "refuse"

    # Phase 1, optional: an SFT warm start in workdir/sft whose export is the policy's start. Its value holds
    # only the keys it overrides (any key of this schema: objective, data.source, optimizer.learning_rate, ...).
    c.warm_start = ml_collections.FieldReference(None, field_type=ml_collections.ConfigDict)

    # Batched online training (OnMC-PO, Sec. 3.2 / App. B.1): ONE optimizer trajectory of `max_steps` steps (or
    # what the prompts give), cut into `num_segments` equal segments; at the start of each the current policy
    # samples K = len(temperatures) completions per prompt, the judge ranks them, and the segment trains on them.
    c.online = ml_collections.ConfigDict()
    c.online.enabled = False
    c.online.num_segments = 3  # App. B.1: the training steps are divided equally into three segments
    c.online.temperatures = (0.6, 0.6, 0.8, 0.8, 1.0, 1.0)  # App. B.1: two completions at each (K = 6)
    c.online.top_p = 1.0
    c.online.max_new_tokens = 512
    c.online.max_prompt_tokens = 0  # 0 = data.max_prompt_length
    c.online.generation_batch_size = 64  # rows (prompt x temperature) per generate call
    # The sampler gathers the FSDP-sharded policy once per call (each device holds it whole in compute dtype beside
    # the train state) instead of all-gathering every layer at every decoded token; False where the devices cannot
    # hold it (python -m mcpo_jax.train ... --compile-only --target T says whether the sampler fits).
    c.online.gather_weights = True
    c.online.ranking = "winner"  # App. B.1: iterative pairwise ranking (K - 1 comparisons); "full" = whole order
    c.online.drop_ranks = ()  # with ranking="full": ranks left out of the candidates (Nectar, Sec. 5.1: (2,))
    c.online.judge = "oracle:sorting"  # oracle:TASK | rule:TASK | llm:MODEL_DIR | reward:module:function
    c.online.judge_max_new_tokens = 512
    c.online.judge_batch_size = 8
    c.online.judge_dtype = "bfloat16"
    c.online.prompts = ""  # "task:NAME" | "synthetic" | a JSON/JSONL/text file | a hub dataset id
    c.online.prompt_split = "train"
    c.online.prompt_field = ""  # "" = auto: prompt, instruction, turns, messages
    c.online.num_prompts = 0  # 0 = all
    c.online.seed = 0
    # pi_ref of every segment: "initial" = the initial policy throughout (App. B.1 names the Instruct model as
    # pi_ref and as the kernel's proposal); "segment_start" = the policy each segment starts from.
    c.online.reference = "initial"

    # Last phase, optional: the trained policy against a baseline (default: the policy training started from),
    # greedy answers to held-out prompts, judged both ways; adjusted win rate (Sec. 5.1) with a bootstrap CI.
    c.final_eval = ml_collections.ConfigDict()
    c.final_eval.judge = ""  # "" = no final evaluation; oracle:TASK | rule:TASK | llm:MODEL_DIR | reward:...
    c.final_eval.prompts = ""  # "task:NAME" (held-out prompts of a registered task) or a prompts file
    c.final_eval.num_prompts = 256
    c.final_eval.seed = 1
    c.final_eval.max_new_tokens = 512
    c.final_eval.batch_size = 64
    c.final_eval.baseline_path = ""  # "" = the policy this run's preference training started from
    c.final_eval.use_chat_template = True
    c.final_eval.max_prompt_tokens = 0  # 0 = the prompts as they are
    c.final_eval.num_bootstrap = 1000  # resamples of the win rate's confidence interval
    c.final_eval.tie_margin = 0.0  # oracle / rule judges: answers whose scores differ by at most this tie
    c.final_eval.judge_max_new_tokens = 0  # llm judges: 0 = the judge's default
    c.final_eval.judge_batch_size = 0  # llm judges: 0 = the judge's default
    c.final_eval.redo = False  # a rerun of a finished run evaluates again (else it prints the result it has)

    c.debug = ml_collections.ConfigDict()
    c.debug.stop_after_steps = -1  # tests: stop (and save) after N steps, as if preempted
    c.debug.nan_at_step = -1  # tests: poison the params before step N
    return c


# ------------------------------------------------------------------------------------------------ schema


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": value} for every leaf; free-form blocks are one leaf (their dict)."""
    out = {}
    items = d.items() if hasattr(d, "items") else ()
    for k, v in items:
        key = f"{prefix}{k}"
        if key in FREE_FORM or not hasattr(v, "items"):
            out[key] = v.to_dict() if hasattr(v, "to_dict") else v
        else:
            out.update(_flat(v, key + "."))
    return out


_SCHEMA_KEYS: frozenset[str] | None = None


def _schema_keys() -> frozenset[str]:
    global _SCHEMA_KEYS
    if _SCHEMA_KEYS is None:
        flat = _flat(base_config())
        blocks = {k.rsplit(".", i)[0] for k in flat for i in range(1, k.count(".") + 1)}
        _SCHEMA_KEYS = frozenset(flat) | frozenset(blocks)
    return _SCHEMA_KEYS


def _unknown_keys(d, prefix: str = "") -> list[str]:
    """Problems for keys of `d` that the schema does not have (with the closest known key)."""
    known = _schema_keys()
    problems = []
    for k, v in (d.items() if hasattr(d, "items") else ()):
        key = f"{prefix}{k}"
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            problems.append(f"unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        elif key not in FREE_FORM and key != "warm_start" and hasattr(v, "items"):
            problems.extend(_unknown_keys(v, key + "."))
    return problems


def unknown_key_problem(dotted: str) -> str | None:
    """The problem with a `--config.KEY=value` override whose KEY the schema lacks (None when it is known)."""
    key = dotted[len("warm_start."):] if dotted.startswith("warm_start.") else dotted
    known = _schema_keys()
    if key in known or any(key.startswith(free + ".") for free in FREE_FORM):
        return None
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"unknown key {dotted!r}" + (f"; did you mean {close[0]!r}?" if close else "")


def _get(d, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def num_columns(config) -> int:
    """C = 1 + L (+1 for Table 2's injected noise candidate, which comes on top of the L)."""
    return 1 + int(config.num_candidates) + (1 if config.data.options.get("inject_noise", False) else 0)


def kernel_includes_preferred(config) -> bool:
    """Whether the negatives may include y0: `include_preferred` for the MC kernel, never for the others."""
    return config.sampler == "mc" and bool(config.include_preferred)


def negative_fixed_per_prompt(config) -> bool:
    """Whether the run's random negative is drawn once per prompt when the data is built (`negative_draw`)."""
    return (config.sampler == "random" and config.negative_draw == "per_prompt" and int(config.num_negatives) == 1
            and config.objective != "sft")


def _check_model_path(field: str, value: str, errors: list[str]) -> None:
    """A folder, or a hub id (`hub.looks_like_path` decides which, as the loaders do); with the hub declared
    offline (`hub.offline_env`), a hub id must be in the local cache. A reachable hub is checked when loading."""
    from mcpo_jax import hub

    if not value or os.path.isdir(os.path.expanduser(value)):
        return
    if hub.looks_like_path(value):
        errors.append(f"{field}={value!r}: no such folder")
    elif hub.offline_env() and not hub.hub_cached(value):
        errors.append(f"{field}={value!r}: no such folder and the hub is offline (HF_HUB_OFFLINE is set); "
                      f"pass a local folder (--config.{field}=/path/to/folder)")


def _check_judge(field: str, spec: str, errors: list[str]) -> None:
    kind = spec.split(":", 1)[0]
    if kind not in JUDGE_KINDS or ":" not in spec or not spec.split(":", 1)[1]:
        errors.append(f"{field}={spec!r}: expected one of {', '.join(k + ':...' for k in JUDGE_KINDS)} "
                      "(e.g. oracle:sorting, rule:instructions, llm:/models/judge)")


def validate(config, *, device_count: int | None = None, process_count: int | None = None,
             problems: tuple[str, ...] = ()) -> None:
    """Every check that needs no model or data; raises one ConfigError listing every problem (`problems`:
    ones found before, e.g. command-line overrides of unknown keys)."""
    from mcpo_jax import kernel, losses, models, sharding

    errors = list(problems) + _unknown_keys(config)
    present = _flat(config)
    missing = sorted(k for k in _flat(base_config()) if k not in present and k != "warm_start")
    if missing:  # every check below reads keys by name
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors + [
            f"missing keys {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}: build configs from "
            "mcpo_jax.training.config.base_config()"]))
    if config.warm_start is not None:
        errors.extend(p.replace("unknown key '", "unknown key 'warm_start.") for p in _unknown_keys(config.warm_start))

    objective, sampler = config.objective, config.sampler
    if config.objective_module:
        problem = import_objective_module(config.objective_module)
        if problem:
            errors.append(problem)
    known_objectives = losses.names()
    if objective not in known_objectives:
        errors.append(f"objective={objective!r} is unknown; known: {', '.join(known_objectives)} (or register "
                      "one with mcpo_jax.losses.register in a module named by --config.objective_module)")
    if sampler not in kernel.SAMPLERS:
        errors.append(f"sampler={sampler!r} is unknown; known: {', '.join(kernel.SAMPLERS)}")
    L, M = int(config.num_candidates), int(config.num_negatives)
    if L < 1:
        errors.append(f"num_candidates (L) must be >= 1, got {L}")
    if objective != "sft" and objective in known_objectives:
        columns = num_columns(config) - 1
        y0 = kernel_includes_preferred(config)
        eligible = columns + (1 if y0 else 0)
        if M < 1 or M > eligible:
            errors.append(f"num_negatives (M) = {M} must be between 1 and num_candidates (L) = {columns}"
                          f"{' + 1 (y0 included)' if y0 else ''}")
        if losses.is_pairwise(objective) and M != 1:
            errors.append(f"objective={objective!r} is pairwise: it needs num_negatives=1, got {M}")
        if sampler == "fixed" and M != 1:
            errors.append(f"sampler='fixed' (the dataset's own rejected) gives one negative; num_negatives={M}")
    if config.negative_draw not in NEGATIVE_DRAWS:
        errors.append(f"negative_draw={config.negative_draw!r}: {' or '.join(NEGATIVE_DRAWS)}")
    if config.reference not in ("online", "precomputed"):
        errors.append(f"reference={config.reference!r}: use 'online' or 'precomputed'")
    if float(config.beta) <= 0:
        errors.append(f"beta must be > 0, got {config.beta}")
    batch, micro = int(config.batch_size), int(config.micro_batch_size)
    if batch < 1 or micro < 1 or batch % micro:
        errors.append(f"batch_size={batch} must be a positive multiple of micro_batch_size={micro} "
                      "(gradient accumulation = batch_size / micro_batch_size)")
    if device_count is None or process_count is None:
        import jax

        device_count = jax.device_count() if device_count is None else device_count
        process_count = jax.process_count() if process_count is None else process_count
    try:
        data, fsdp, _ = sharding.resolve_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, device_count)
        dp = data * fsdp
        if micro >= 1 and micro % dp:
            errors.append(f"micro_batch_size={micro} is not divisible by the data-parallel size {dp} "
                          f"(mesh data={data} x fsdp={fsdp})")
        if dp % process_count:
            errors.append(f"mesh data x fsdp = {dp} is not a multiple of the {process_count} processes: each "
                          "process must hold whole batch shards (use more data/fsdp ways, fewer tensor ways)")
        if micro >= 1 and micro % process_count:
            errors.append(f"micro_batch_size={micro} is not divisible by the {process_count} processes")
    except ValueError as e:
        errors.append(str(e))
    if not config.model.path and not config.model.preset and config.warm_start is None:
        errors.append("model: set model.path (a Hugging Face folder or hub id) or model.preset")
    _check_model_path("model.path", config.model.path, errors)
    _check_model_path("reference_path", config.reference_path, errors)
    if config.model.preset and config.model.preset not in models.PRESETS:
        errors.append(f"model.preset={config.model.preset!r} is unknown; known: {sorted(models.PRESETS)}")
    remat = config.model.remat
    if not (remat is False or remat is True or remat == "auto" or remat in models.REMAT_POLICIES):
        errors.append(f"model.remat={remat!r}: use false, true, 'auto' or one of {sorted(models.REMAT_POLICIES)}")
    if float(config.model.memory_budget_gb) < 0:
        errors.append(f"model.memory_budget_gb must be >= 0 (0 = the device's own limit), got "
                      f"{config.model.memory_budget_gb}")
    for key in ("dtype", "param_dtype"):
        if config.model[key] not in models.DTYPES:
            errors.append(f"model.{key}={config.model[key]!r}: use one of {', '.join(models.DTYPES)}")
    if config.optimizer.decay not in ("linear", "cosine", "constant"):
        errors.append(f"optimizer.decay={config.optimizer.decay!r}: linear, cosine or constant")
    if float(config.optimizer.learning_rate) <= 0:
        errors.append(f"optimizer.learning_rate must be > 0, got {config.optimizer.learning_rate}")
    if not 0 <= float(config.optimizer.warmup_ratio) < 1:
        errors.append(f"optimizer.warmup_ratio must be in [0, 1), got {config.optimizer.warmup_ratio}")
    if config.resume_policy not in RESUME_POLICIES:
        errors.append(f"resume_policy={config.resume_policy!r}: {' or '.join(RESUME_POLICIES)}")
    if config.data.on_bad_example not in ("skip", "error"):
        errors.append(f"data.on_bad_example={config.data.on_bad_example!r}: 'skip' or 'error'")
    try:
        from mcpo_jax.data.pipeline import bucket_lengths

        bucket_lengths(int(config.data.max_length), config.data.bucket_lengths)
    except (TypeError, ValueError) as e:
        errors.append(f"data.bucket_lengths={config.data.bucket_lengths!r}: {e} ('pow2', 'none' or "
                      "comma-separated token lengths such as '128,384,768')")
    d = config.data
    if not 1 <= int(d.max_prompt_length) < int(d.max_length) or int(d.max_completion_length) < 1:
        errors.append(f"data.max_length={d.max_length} must exceed data.max_prompt_length={d.max_prompt_length} "
                      f"(a row is prompt + completion) and data.max_completion_length={d.max_completion_length} "
                      "must be >= 1: lower them together, e.g. --config.data.max_prompt_length=32 "
                      "--config.data.max_completion_length=32 --config.data.max_length=64")
    if not config.data.source and not config.online.enabled:
        errors.append("data.source is empty (a file, folder, hub dataset id or 'synthetic')")
    if int(config.num_epochs) < 1 and int(config.max_steps) < 1:
        errors.append("num_epochs must be >= 1 (or set max_steps)")
    if config.online.enabled:
        _validate_online(config, errors)
    if config.final_eval.judge:
        _check_judge("final_eval.judge", config.final_eval.judge, errors)
        if not config.final_eval.prompts:
            errors.append("final_eval.prompts is empty: 'task:NAME' or a prompts file "
                          f"(final_eval.judge={config.final_eval.judge!r} is set)")
        if int(config.final_eval.num_prompts) < 1:
            errors.append(f"final_eval.num_prompts must be >= 1, got {config.final_eval.num_prompts}")
        _check_model_path("final_eval.baseline_path", config.final_eval.baseline_path, errors)
        fe = config.final_eval
        if int(fe.num_bootstrap) < 1:
            errors.append(f"final_eval.num_bootstrap must be >= 1, got {fe.num_bootstrap}")
        for key in ("max_prompt_tokens", "judge_max_new_tokens", "judge_batch_size", "tie_margin"):
            if float(fe[key]) < 0:
                errors.append(f"final_eval.{key} must be >= 0 (0 = the default), got {fe[key]}")
        if not config.export_hf:
            errors.append("final_eval evaluates the trained policy's Hugging Face export: keep export_hf=true "
                          "(or set final_eval.judge='')")
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def import_objective_module(name: str) -> str | None:
    """Imports `objective_module` (a module name, or a path to a .py file) so its `losses.register` calls run;
    the problem, or None."""
    import importlib
    import importlib.util
    import sys

    try:
        if name.endswith(".py"):
            path = os.path.abspath(os.path.expanduser(name))
            module = os.path.splitext(os.path.basename(path))[0]
            if sys.modules.get(module) is not None and getattr(sys.modules[module], "__file__", None) == path:
                return None
            spec = importlib.util.spec_from_file_location(module, path)
            if spec is None or not os.path.isfile(path):
                return f"objective_module={name!r}: no such file"
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[module] = loaded
            spec.loader.exec_module(loaded)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:  # `python -m` puts it there; a script may not
                sys.path.append(os.getcwd())
            importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - the user's module: whatever it raises is the message
        return f"objective_module={name!r} could not be imported: {type(e).__name__}: {e}"
    return None


def _validate_online(config, errors: list[str]) -> None:
    o = config.online
    temps = list(o.temperatures)
    if len(temps) < 2:
        errors.append(f"online.temperatures={tuple(temps)}: need at least 2 (K completions per prompt)")
    bad = [t for t in temps if not isinstance(t, (int, float)) or t < 0 or t != t]
    if bad:
        errors.append(f"online.temperatures={tuple(temps)}: every temperature must be a number >= 0 "
                      f"(0 = greedy), got {bad}")
    if temps and int(config.num_candidates) > len(temps) - 1:
        errors.append(f"num_candidates={config.num_candidates} but online.temperatures gives K - 1 = "
                      f"{len(temps) - 1} candidates per prompt")
    if int(o.num_segments) < 1:
        errors.append(f"online.num_segments must be >= 1, got {o.num_segments}")
    if o.ranking not in ("winner", "full"):
        errors.append(f"online.ranking={o.ranking!r}: 'winner' (iterative pairwise) or 'full'")
    if tuple(o.drop_ranks) and o.ranking != "full":
        errors.append(f"online.drop_ranks={tuple(o.drop_ranks)} needs online.ranking='full' (a whole order)")
    if o.reference not in ("initial", "segment_start"):
        errors.append(f"online.reference={o.reference!r}: 'initial' or 'segment_start'")
    if not 0 < float(o.top_p) <= 1:
        errors.append(f"online.top_p must be in (0, 1], got {o.top_p}")
    if int(o.max_new_tokens) < 1:
        errors.append(f"online.max_new_tokens must be >= 1, got {o.max_new_tokens}")
    if not o.prompts:
        errors.append("online.prompts is empty: 'task:NAME', 'synthetic', a prompts file or a hub dataset id")
    _check_judge("online.judge", o.judge, errors)
    from mcpo_jax.models.config import DTYPES

    if o.judge_dtype not in DTYPES:
        errors.append(f"online.judge_dtype={o.judge_dtype!r}: use one of {', '.join(DTYPES)}")


def prepare(config, **kwargs) -> ml_collections.ConfigDict:
    """A validated, locked deep copy of `config` (see `validate`)."""
    config = ml_collections.ConfigDict(config.to_dict())
    validate(config, **kwargs)
    config.lock()
    return config


def set_keys(config, overrides) -> ml_collections.ConfigDict:
    """`config` with keys set in place, the one way code changes a config: `overrides` is a nested mapping
    (a warm start's block), a mapping of dotted keys or (dotted key, value) pairs (the experiments'
    overrides). Returns `config`."""
    items = _flat(overrides).items() if hasattr(overrides, "items") else overrides
    for key, value in items:
        parent, _, leaf = key.rpartition(".")
        node = _get(config, parent) if parent else config
        with node.unlocked():
            node[leaf] = value
    return config


def with_overrides(config, overrides) -> ml_collections.ConfigDict:
    """A copy of `config` (references resolved) with `overrides` set (`set_keys`): the warm start's SFT phase,
    an online segment's data."""
    return set_keys(ml_collections.ConfigDict(config.to_dict()), overrides)


def run_defining_diff(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ between two config dicts and change what the run computes."""
    a, b = _flat(saved), _flat(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == free or key.startswith(free + ".") for free in RERUN_FREE):
            continue
        va, vb = _normalize(a.get(key, "<absent>")), _normalize(b.get(key, "<absent>"))
        if va != vb:
            diffs.append(f"{key}: {va!r} -> {vb!r}")
    return diffs


def _normalize(v):
    if isinstance(v, (list, tuple)):
        return [_normalize(x) for x in v]
    if isinstance(v, dict):
        return {k: _normalize(x) for k, x in sorted(v.items())}
    return v
