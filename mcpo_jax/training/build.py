"""What a run is built from, read off a validated config: the model, the tokenizer, the datasets.

Every function takes the locked config (training/config.py) and reads attributes; none has a default of its own.
"""

from __future__ import annotations

import logging
import random

from mcpo_jax import kernel, models
from mcpo_jax.data.example import DataError
from mcpo_jax.training.config import ConfigError, kernel_includes_preferred, negative_fixed_per_prompt, num_columns

log = logging.getLogger("mcpo_jax.train")


def model_remat(model_cfg):
    """The model's remat setting; under "auto" the train program chooses (`TrainProgram(remat="auto")`), and every
    other program (generation, reference log-probs) runs no backward."""
    return "minimal" if model_cfg.remat == "auto" else model_cfg.remat


def build_model(model_cfg, mesh, rules, *, path: str | None = None):
    """The policy: `path` (or model.path) loaded from a Hugging Face folder / hub id, else the preset, random."""
    dtype, param_dtype = models.dtype_of(model_cfg.dtype), models.dtype_of(model_cfg.param_dtype)
    path = model_cfg.path if path is None else path
    if path:
        return models.from_pretrained(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules,
                                      remat=model_remat(model_cfg))
    config = models.preset_config(model_cfg.preset, **model_cfg.overrides.to_dict())
    return models.init_random(config, dtype=dtype, param_dtype=param_dtype, seed=int(model_cfg.seed), mesh=mesh,
                              rules=rules, remat=model_remat(model_cfg))


def build_tokenizer(config, *, model_path: str = ""):
    """config.tokenizer, else the model's folder (`model_path` when the run starts from another folder)."""
    from mcpo_jax.data.tokenize import load_tokenizer

    name = config.tokenizer or model_path or config.model.path
    if not name:
        raise ConfigError("tokenizer: set --config.tokenizer (a folder, a hub id or 'synthetic') or "
                          "--config.model.path")
    return load_tokenizer(name, config_key="tokenizer" if config.tokenizer else "model.path")


def _rows(source: str, data_cfg, seed: int):
    """A source string -> what load_examples reads (generated rows for the synthetic task)."""
    if source in ("synthetic", "synthetic_sft"):
        from mcpo_jax.data import synthetic

        n = int(data_cfg.synthetic_rows)
        if source == "synthetic":
            return synthetic.generate_rows(n, seed=seed, num_candidates=int(data_cfg.synthetic_candidates))
        return synthetic.sft_rows(n, seed=seed)
    return source


def tokenize_args(config, cache_dir: str) -> dict:
    d = config.data
    return dict(num_candidates=num_columns(config) - 1, max_prompt_length=int(d.max_prompt_length),
                max_completion_length=int(d.max_completion_length), max_length=int(d.max_length),
                use_chat_template=bool(d.use_chat_template), cache_dir=cache_dir)


def load_examples(config, source: str, split: str, seed: int, *, data_format: str | None = None):
    from mcpo_jax import data as data_lib

    d = config.data
    return list(data_lib.load_examples(
        _rows(source, d, seed), format=data_format or d.format, num_candidates=int(config.num_candidates),
        min_candidates=d.min_candidates, on_bad_example=d.on_bad_example, split=split, **d.options.to_dict()))


def split_examples(config, examples):
    """(train, eval) examples: data.eval_source, else a seeded data.eval_fraction of `examples`."""
    d = config.data
    if d.max_examples:
        examples = examples[: int(d.max_examples)]
    eval_examples = []
    if d.eval_source:
        eval_examples = load_examples(config, d.eval_source, d.eval_split, int(config.seed) + 1)
    elif float(d.eval_fraction) > 0 and len(examples) > 1:
        order = list(range(len(examples)))
        random.Random(int(config.seed)).shuffle(order)
        n_eval = max(1, int(round(len(examples) * float(d.eval_fraction))))
        held = set(order[:n_eval])
        eval_examples = [examples[i] for i in order[:n_eval]]
        examples = [e for i, e in enumerate(examples) if i not in held]
    if d.max_eval_examples and eval_examples:
        eval_examples = eval_examples[: int(d.max_eval_examples)]
    return examples, eval_examples


def tokenize(config, tokenizer, examples, cache_dir: str, *, split: str):
    """A tokenized dataset; checks every row has the M negatives the kernel draws (train and eval alike)."""
    from mcpo_jax import data as data_lib

    if not examples:
        return None
    ds = data_lib.tokenize_examples(examples, tokenizer, **tokenize_args(config, cache_dir))
    if config.objective != "sft":
        try:
            kernel.check_enough_candidates(ds.valid, int(config.num_negatives),
                                           include_preferred=kernel_includes_preferred(config))
        except ValueError as e:
            raise DataError(f"{split} split: {e} (--config.num_negatives)") from None
    if negative_fixed_per_prompt(config):
        ds.fixed_index = random_negative_per_prompt(ds.valid, ds.example_id, seed=int(config.seed))
    return ds


def random_negative_per_prompt(valid_NC, example_id_N, *, seed: int):
    """[N] int32: one uniformly drawn valid candidate column (1..L) per example, fixed for the run (App. B.1's
    random dispreferred, drawn once as TRL's preprocessing does); a function of (seed, example id) only, so the
    same prompt gets the same negative whatever the batching, epochs or dropped rows."""
    import numpy as np

    valid_NL = np.asarray(valid_NC, bool)[:, 1:]
    u_N = np.asarray([np.random.default_rng([seed, 0xD1A, int(i)]).random() for i in example_id_N])
    counts_N = valid_NL.sum(axis=1)
    pick_N = np.minimum((u_N * counts_N).astype(np.int64), np.maximum(counts_N - 1, 0))
    # the pick-th valid column: 1 + position of the (pick + 1)-th True
    cum_NL = np.cumsum(valid_NL, axis=1)
    return (1 + np.argmax(cum_NL > pick_N[:, None], axis=1)).astype(np.int32)


def build_datasets(config, tokenizer, cache_dir: str):
    """(train, eval or None) tokenized datasets of config.data."""
    examples = load_examples(config, config.data.source, config.data.split, int(config.seed))
    train_examples, eval_examples = split_examples(config, examples)
    if not train_examples:
        raise DataError(f"data.source={config.data.source!r}: no training examples")
    train = tokenize(config, tokenizer, train_examples, cache_dir, split="train")
    longest = int(train.row_lengths.max())
    if longest * 4 <= int(config.data.max_length):
        log.warning("the longest training row has %d tokens but data.max_length is %d: batches are padded to "
                    "their own length (data.bucket_lengths=%r), but a smaller --config.data.max_length (and "
                    "max_prompt_length / max_completion_length) also bounds the buckets and the memory planned",
                    longest, int(config.data.max_length), config.data.bucket_lengths)
    return train, tokenize(config, tokenizer, eval_examples, cache_dir, split="eval")
