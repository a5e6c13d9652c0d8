"""The final evaluation of configs/smollm2.py, by hand, until the pipeline's final_eval runs it.

    python scripts/smollm2_final_eval.py WORKDIR [VARIANT]

Greedy answers of the final policy and of the initial policy (WORKDIR/online/summary.json) to the held-out
instruction prompts of `online.final_eval` (topics disjoint from training), adjusted win rate of final vs initial
by the rule judge, with wins / ties / losses, mean rule scores and the per-instruction pass rates. Writes
WORKDIR/final_eval.json.
"""

import importlib.util
import json
import os
import sys
import time

import jax.numpy as jnp
import transformers

from mcpo_jax import models
from mcpo_jax.data import instructions
from mcpo_jax.evaluate import generate_outputs, win_rate


def main(workdir: str, variant: str | None = None) -> dict:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "smollm2.py")
    spec = importlib.util.spec_from_file_location("smollm2_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fe = module.get_config(variant).online.final_eval
    with open(os.path.join(workdir, "online", "summary.json")) as f:
        summary = json.load(f)
    t0 = time.time()
    prompts = instructions.prompts(int(fe.num_prompts), seed=int(fe.seed), split=fe.split)
    tok = transformers.AutoTokenizer.from_pretrained(summary["initial_policy"])
    outs = {}
    for name in ("final_policy", "initial_policy"):
        model = models.from_pretrained(summary[name], dtype=jnp.float32)
        outs[name] = generate_outputs(model, tok, prompts, max_new_tokens=int(fe.max_new_tokens), batch_size=16)
        del model
    final, initial = outs["final_policy"], outs["initial_policy"]
    result = win_rate(instructions.InstructionJudge(), prompts, final, initial)
    out = {**result.summary(), "eval_seconds": time.time() - t0,
           "mean_score_final": sum(map(instructions.instruction_score, prompts, final)) / len(prompts),
           "mean_score_initial": sum(map(instructions.instruction_score, prompts, initial)) / len(prompts),
           "per_kind_final": instructions.score_table(prompts, final),
           "per_kind_initial": instructions.score_table(prompts, initial),
           "examples": [{"prompt": p, "final": a, "initial": b} for p, a, b in list(zip(prompts, final, initial))[:4]]}
    print(f"rule-judge adjusted win rate, final vs initial policy, {len(prompts)} held-out prompts: "
          f"{out['win_rate']:.3f} [{out['ci_low']:.3f}, {out['ci_high']:.3f}]  "
          f"wins {out['n_cand']} / ties {out['n_tie']} / losses {out['n_base']}")
    with open(os.path.join(workdir, "final_eval.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
