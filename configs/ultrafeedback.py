"""The paper's instruct setup: Llama-3.1-8B-Instruct on UltraFeedback prompts (Sec. 5.1, App. B.1).

    python -m mcpo_jax.train --config configs/ultrafeedback.py --workdir runs/uf-mcpo
    python -m mcpo_jax.train --config configs/ultrafeedback.py:regenerated --workdir runs/uf-mcpo \
        --config.data.source=/data/uf_llama31_6samples.jsonl

The paper regenerates the completions: 6 per prompt from Llama-3.1-8B-Instruct (2 each at temperatures 0.6,
0.8, 1.0), ranked by iterative pairwise comparison with Llama-3.1-70B-Instruct as judge; the best is y0 and
the other 5 are the candidates (L = 5). `:regenerated` reads such rows from a `ranked` JSONL
({prompt, completions, ranks}; mcpo_jax.online writes them). The default reads openbmb/UltraFeedback as a
stand-in (its 4 GPT-4-scored completions: y0 + L = 3 candidates).

Variants: `regenerated`, every baseline and kernel variant of configs/nectar.py (`dpo`, `rnce`, `max`, `m2`,
...), `precomputed`.
"""

import ml_collections

from mcpo_jax.training.config import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("_nectar", os.path.join(os.path.dirname(__file__), "nectar.py"))
    nectar = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nectar)

    c = nectar.get_config()  # the base setup's training recipe (App. B.1: same batch, epochs, lr grid)
    c.name = "uf-mcpo"
    c.model.path = "meta-llama/Llama-3.1-8B-Instruct"  # Sec. 5.1 instruct setup
    c.data.source = "openbmb/UltraFeedback"
    c.data.format = "ultrafeedback"
    c.data.options = ml_collections.ConfigDict({"score_field": "fine-grained_score"})
    c.num_candidates = 3  # UltraFeedback's 4 completions: y0 + 3
    for variant in (arg or "").split(","):
        v = variant.strip()
        if not v:
            continue
        if v == "regenerated":  # App. B.1: 6 self-generated completions ranked by a 70B judge
            c.data.format = "ranked"
            c.data.source = ""  # set --config.data.source=<ranked JSONL>
            c.data.options = ml_collections.ConfigDict()
            c.num_candidates = 5
        else:
            nectar._apply_variant(c, v)
            c.name = c.name.replace("nectar", "uf")
    return c
