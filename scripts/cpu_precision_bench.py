"""configs/own.py on this machine: seconds per step in fp32 / bf16 compute, with and without remat.

    .venv/bin/python scripts/cpu_precision_bench.py [--steps 8] [--out /tmp/own-precision]

Builds a random ~3.3M-parameter Llama (4 layers, 256 wide, the synthetic character tokenizer) and 160 `pairs` rows
of ~60-token prompts and ~75-token completions (one 256-token bucket), then trains configs/own.py on them once
per setting and prints the median logged step time (completion to completion, the first two steps left out)
and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"fp32, no remat": {"model.dtype": "float32", "model.remat": False},
            "fp32, remat": {"model.dtype": "float32", "model.remat": True},
            "bf16 compute, no remat": {"model.dtype": "bfloat16", "model.remat": False},
            "bf16 compute, remat": {"model.dtype": "bfloat16", "model.remat": True}}


def make_inputs(out: str) -> tuple[str, str]:
    from mcpo_jax import models
    from mcpo_jax.data import synthetic

    model_dir, rows = os.path.join(out, "model"), os.path.join(out, "rows.jsonl")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        config = models.preset_config("tiny", vocab_size=128, hidden_size=256, intermediate_size=704,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                      head_dim=64, max_position_embeddings=1024)
        models.save_pretrained(models.init_random(config, seed=0), model_dir, tokenizer=synthetic.make_tokenizer())
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "quiet", "north", "seven"]

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))

    with open(rows, "w") as f:
        for _ in range(160):
            f.write(json.dumps({"prompt": text(10), "chosen": text(12), "rejected": text(12)}) + "\n")
    return model_dir, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="/tmp/own-precision")
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import own

    from mcpo_jax import pipeline
    from mcpo_jax.training import metrics as metrics_lib

    model_dir, rows = make_inputs(args.out)
    results = {}
    for name, keys in SETTINGS.items():
        c = own.get_config()
        c.model.path, c.data.source, c.tokenizer = model_dir, rows, model_dir
        c.max_steps, c.eval_every, c.progress_bar, c.log_every = args.steps, 0, False, 1
        c.checkpoint.save_every = 0
        for key, value in keys.items():
            block, leaf = key.split(".")
            c[block][leaf] = value
        workdir = os.path.join(args.out, name.replace(",", "").replace(" ", "_"))
        pipeline.run(c, workdir)
        timed = [r for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))][2:]  # warm steps
        results[name] = (statistics.median(r["step_time"] for r in timed),
                         statistics.median(r["tokens_per_sec"] for r in timed), len(timed))
    for name, (step, tokens, n) in results.items():
        print(f"{name:22s} {step:.3f} s/step  {tokens:,.0f} tokens/s  (median of {n} steps)")


if __name__ == "__main__":
    main()
