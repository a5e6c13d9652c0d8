"""The trainer's config schema: every knob with its default (configs/*.py start from `base_config()`).

Defaults are the paper's base setup where it has one (Sec. 5.1, Appendix B.1 / B.2).
"""

from __future__ import annotations

import ml_collections


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
    c.model.remat = False  # False / True / a policy name from models.REMAT_POLICIES
    c.tokenizer = ""  # "" = model.path; or a folder / hub id; "synthetic" = data.synthetic.make_tokenizer()

    # Data (Sec. 5.1): Nectar, rank 1 = y0, rank 2 dropped, 5 candidates.
    c.data = ml_collections.ConfigDict()
    c.data.source = ""
    c.data.format = "nectar"
    c.data.split = "train"
    c.data.options = ml_collections.ConfigDict()
    c.data.min_candidates = ml_collections.FieldReference(None, field_type=int)
    c.data.on_bad_example = "skip"
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
    # issue 15: length-aware batches. Each global batch is padded to the smallest of these token lengths that
    # holds its longest row: "pow2" = 64, 128, 256, ... below max_length, then max_length (one compiled step
    # per length seen); "none" = always max_length; or explicit lengths "128,384,768".
    c.data.bucket_lengths = "pow2"
    c.data.group_by_length = 0  # k > 0: sort rows by length within mega-batches of k global batches (seeded)
    c.data.synthetic_rows = 2000
    c.data.synthetic_candidates = 6

    # Objective and sampler (Sec. 3.1, Algorithm 1).
    c.objective = "mcpo"  # any name in mcpo_jax.losses.NAMES
    c.sampler = "mc"  # mc | max | min | random | fixed
    c.num_candidates = 5  # L
    c.num_negatives = 1  # M
    c.beta = 0.01  # App. B.2
    c.include_preferred = False  # kernel may draw y0 (Algorithm 1 literally; zero gradient for M = 1)
    c.loss_hparams = ml_collections.ConfigDict()  # e.g. lam=0.1 (RPO/CPO), gamma=10 (SimPO)
    c.reference = "online"  # online | precomputed
    # pi_ref: "" = the initial policy (frozen copy); or a Hugging Face folder / hub id of the same architecture
    # (e.g. the Instruct model across OnMC-PO segments, App. B.1).
    c.reference_path = ""
    c.reference_cache_dir = ""
    c.logprob_chunk_size = 128

    # Optimization (App. B.1): effective batch 128, 2 epochs, AdamW, lr from the grid.
    c.batch_size = 128  # examples per optimizer step (global)
    c.micro_batch_size = 8  # examples per accumulation step (global); accumulation = batch / micro
    c.num_epochs = 2
    c.max_steps = -1  # > 0 caps the number of steps
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-6
    c.optimizer.warmup_ratio = 0.1
    c.optimizer.decay = "linear"  # linear | cosine | constant
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.max_grad_norm = 1.0

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
    c.eval_every = 0  # 0 = only... never; > 0 = every N steps and at the end
    c.eval_batches = 0  # 0 = the whole eval split
    c.progress_bar = True
    c.tensorboard = True
    c.export_hf = True
    c.warm_start = ml_collections.FieldReference(None, field_type=ml_collections.ConfigDict)
    c.final_eval = ml_collections.FieldReference(None, field_type=ml_collections.ConfigDict)
    c.debug = ml_collections.ConfigDict()
    c.debug.stop_after_steps = -1  # tests: stop (and save) after N steps, as if preempted
    c.debug.nan_at_step = -1  # tests: poison the params before step N
    return c
