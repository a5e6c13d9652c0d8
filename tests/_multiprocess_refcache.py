"""Run by every process of tests/test_multiprocess.py's reference-cache test: a per-host cache directory
(argv[1]/p<process>) that only process 0 holds already; `refcache.load_or_compute` must make every process
compute together (the computation is a collective), and leave every process with its copy."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mcpo_jax import sharding
from mcpo_jax.training import refcache


def main(root: str) -> None:
    sharding.initialize_distributed()
    pid = jax.process_index()
    cache = os.path.join(root, f"p{pid}")
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)
    calls = []

    def compute():  # a collective: a sum over every device of every process
        calls.append(1)
        x = jax.make_array_from_callback((jax.device_count(),), sharding.batch_sharding(mesh, 1),
                                         lambda i: np.ones((1,), np.float32))
        total = jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh))(x)
        return np.full((3, 2), float(total), np.float32)

    values, hit = refcache.load_or_compute(cache, "k", compute)
    again, hit2 = refcache.load_or_compute(cache, "k", compute)
    with open(os.path.join(root, f"result{pid}.json"), "w") as f:
        json.dump({"hit": hit, "hit2": hit2, "calls": len(calls), "value": float(values[0, 0]),
                   "again": float(again[0, 0])}, f)


if __name__ == "__main__":
    main(sys.argv[1])
