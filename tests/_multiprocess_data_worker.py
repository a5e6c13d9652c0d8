"""Every process of a multi-process test iterates the data pipeline with JAX's process defaults and
writes the example ids of each of its batches to argv[1]/process_<index>.json."""

import json
import os
import sys

from mcpo_jax import sharding

sharding.initialize_distributed()

import jax  # noqa: E402

from mcpo_jax import data  # noqa: E402
from mcpo_jax.data import synthetic  # noqa: E402

examples = data.load_examples(synthetic.generate_rows(40, seed=0, num_candidates=6), format="nectar", num_candidates=5)
dataset = data.tokenize_examples(examples, synthetic.make_tokenizer(), num_candidates=5,
                                 **{k: v for k, v in synthetic.TOKEN_LIMITS.items()})
per_process = 4
it = data.make_batch_iterator(dataset, batch_size=per_process, seed=7, num_epochs=2)  # process_* from JAX
batches = [batch["example_id"].tolist() for batch in it]
with open(os.path.join(sys.argv[1], f"process_{jax.process_index()}.json"), "w") as f:
    json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
               "num_examples": len(dataset), "all_ids": dataset.example_id.tolist(), "batches": batches}, f)
