"""Your own model and preference data: the config to start from.

    python -m mcpo_jax.train --config configs/own.py --workdir runs/mine \
        --config.model.path=/path/to/hf-folder --config.data.source=/path/to/rows.jsonl

`model.path` is a Hugging Face folder (config.json + safetensors, with its tokenizer) or a hub id; `data.source`
a JSONL / JSON / parquet file or folder of rows in the `pairs` format: {"prompt", "chosen", "rejected"}, where
`rejected` is one answer or a list (then raise `--config.num_candidates` to its length; rows with fewer are kept,
their missing columns masked). Other formats: `--config.data.format=ranked|nectar|ultrafeedback` (docs/data.md).

The defaults are for a few hundred to a few thousand rows and a small model (up to ~1B parameters): 10 % of the
rows held out and evaluated every 20 steps (the eval curve of curves.png), an lr that moves a small model in a
few hundred steps, beta 0.1, the reference's log-probs computed once (`reference="precomputed"`), batches padded
to their own length bucket. At the end the run prints its steps, the last train and held-out loss / reward
accuracy / margin, and where the trained model is (workdir/hf, a Hugging Face folder).

Compute in bf16 (master weights and AdamW in fp32), no remat: on the project's CPU (a Xeon with AVX512-BF16 /
AMX) a random 3.3M-parameter Llama stepped 1.6-1.8x faster in bf16 than in fp32, remat within the noise
(scripts/cpu_precision_bench.py; README, "Your own model and data"). A CPU without bf16 instructions emulates
it: run the script there, and pass `--config.model.dtype=float32` if fp32 wins.

Variants: `:gpu` (remat chosen to fit the device, batch 64 in micro-batches of 16), `:dpo` (DPO instead of
MC-PO on the same data), `:ranked` (rows {"prompt", "completions", "ranks"}, 3 candidates).
"""

import ml_collections

from mcpo_jax.training.config import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.name = "own"
    c.seed = 0
    c.model.path = ""  # required: --config.model.path=/path/to/hf-folder (or a hub id)
    c.model.dtype = "bfloat16"  # compute; see the docstring for CPUs
    c.model.param_dtype = "float32"
    c.model.remat = False

    c.data.source = ""  # required: --config.data.source=/path/to/rows.jsonl
    c.data.format = "pairs"
    c.data.min_candidates = 1  # rows with fewer rejected answers than num_candidates are kept (columns masked)
    c.data.eval_fraction = 0.1  # held out from data.source (or give data.eval_source)
    c.data.max_prompt_length = 512
    c.data.max_completion_length = 512
    c.data.max_length = 1024  # batches are padded to their own bucket (64, 128, ...), not to this

    c.objective = "mcpo"
    c.sampler = "mc"
    c.num_candidates = 1  # L: the rejected answers per row (raise it for lists)
    c.num_negatives = 1  # M
    # Larger than the paper's 0.01 (App. B.2, thousands of steps on 8B models): over a few hundred steps a small
    # beta leaves the kernel's weights exp(beta * r) flat and the rewards barely move.
    c.beta = 0.1
    c.reference = "precomputed"

    c.batch_size = 16
    c.micro_batch_size = 8
    c.num_epochs = 2  # App. B.1
    c.optimizer.learning_rate = 2e-5  # 1e-6 (the paper's, for 8B) leaves a small model where it started
    c.optimizer.warmup_ratio = 0.1
    c.optimizer.decay = "linear"
    c.checkpoint.save_every = 50
    c.checkpoint.keep = 2
    c.eval_every = 20
    c.log_every = 10

    for variant in (arg or "").split(","):
        variant = variant.strip()
        if not variant:
            continue
        if variant == "gpu":
            c.model.remat = "auto"
            c.batch_size, c.micro_batch_size = 64, 16
        elif variant == "dpo":
            c.objective, c.sampler = "dpo", "random"
        elif variant == "ranked":
            c.data.format = "ranked"
            c.num_candidates = 3
        else:
            raise ValueError(f"configs/own.py: unknown variant {variant!r} (gpu, dpo, ranked)")
    return c
