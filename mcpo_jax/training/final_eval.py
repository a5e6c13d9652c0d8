"""End-of-run evaluation: a thin call into `mcpo_jax.evaluate.final_evaluation` (the one evaluation path).

Kept only until the pipeline calls `evaluate.final_evaluation` itself (issue 12); the block's fields are
`evaluate.FINAL_EVAL_FIELDS`. The legacy `kind="synthetic_win_rate"` block (demo configs) is read as
judge "oracle:sorting" on prompts "task:sorting", and only for a run that trains on the synthetic task.
"""

from __future__ import annotations

from mcpo_jax import evaluate, models

_LEGACY = {"judge": "oracle:sorting", "prompts": "task:sorting", "num_prompts": 200, "seed": 0,
           "max_new_tokens": 8, "batch_size": 64, "baseline_path": "", "use_chat_template": True}


def _block(config) -> dict:
    fe = dict(config.final_eval.to_dict())
    kind = fe.pop("kind", None)
    if kind is None:
        return fe
    if kind != "synthetic_win_rate":
        raise evaluate.EvalConfigError(f"final_eval.kind={kind!r} is unknown (known: synthetic_win_rate)")
    source = str(config.data.source)
    if not source.startswith("synthetic"):
        raise evaluate.EvalConfigError(
            f"final_eval.kind='synthetic_win_rate' scores the built-in sorting task, but this run trains on "
            f"{source!r}: set final_eval.judge (e.g. 'llm:MODEL_DIR') and final_eval.prompts (your prompt file), "
            "or --config.final_eval=None")
    return {**_LEGACY, **fe}


def run(config, policy, tokenizer, mesh=None, rules=None) -> dict:
    fe = _block(config)
    baseline = None if fe.get("baseline_path") else models.from_pretrained(config.model.path)
    return evaluate.final_evaluation(fe, policy, tokenizer, baseline=baseline, baseline_name=config.model.path)
