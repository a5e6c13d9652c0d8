"""A sharded computation run by every process of a multi-process test (no trainer needed).

Three SGD steps of a two-layer MLP whose weights are sharded over ("fsdp", "tensor") and whose
batch is sharded over ("data", "fsdp"); each process builds only its own rows of the batch, as a
data pipeline sharded by process does. Process 0 writes the losses, the final weights and the
topology to the JSON path given as argv[1].

Test hooks (environment):
  MCPO_TEST_DIE=<process>:<step>[:raise]  that process SIGKILLs itself (or raises) before that step,
                                          leaving its peers blocked in the step's collectives.
  MCPO_HEARTBEAT_TIMEOUT=<seconds>        jax.distributed heartbeat timeout, read by
                                          `sharding.initialize_distributed` (JAX's default is 100 s).
"""

import json
import os
import signal
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mcpo_jax import sharding


def main(out_path: str) -> None:
    started = sharding.initialize_distributed()
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=1)

    rng = np.random.default_rng(0)
    x_ND = rng.standard_normal((16, 8), dtype=np.float32)
    y_N = rng.standard_normal((16,), dtype=np.float32)
    w1_DH = rng.standard_normal((8, 32), dtype=np.float32) / 3
    w2_H = rng.standard_normal((32,), dtype=np.float32) / 6

    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    w_shardings = (NamedSharding(mesh, P("fsdp", "tensor")), NamedSharding(mesh, P("tensor")))
    replicated = NamedSharding(mesh, P())

    # This process's rows: the union of the row blocks its devices hold.
    index_map = batch_sharding.addressable_devices_indices_map(x_ND.shape)
    rows = np.concatenate(sorted((np.arange(x_ND.shape[0])[idx[0]] for idx in index_map.values()),
                                 key=lambda r: r[0]))
    x = jax.make_array_from_process_local_data(batch_sharding, x_ND[rows], x_ND.shape)
    y = jax.make_array_from_process_local_data(batch_sharding, y_N[rows], y_N.shape)
    params = tuple(jax.make_array_from_callback(w.shape, s, lambda i, w=w: w[i])
                   for w, s in zip((w1_DH, w2_H), w_shardings))

    def loss_fn(params, x_ND, y_N):
        w1_DH, w2_H = params
        return jnp.mean((jnp.tanh(x_ND @ w1_DH) @ w2_H - y_N) ** 2)

    def step(params, x_ND, y_N):
        loss, grads = jax.value_and_grad(loss_fn)(params, x_ND, y_N)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), loss

    step = jax.jit(step, in_shardings=(w_shardings, batch_sharding, batch_sharding),
                   out_shardings=(w_shardings, replicated), donate_argnums=0)

    die_process, die_step, *how = os.environ.get("MCPO_TEST_DIE", "-1:-1").split(":")
    losses = []
    for i in range(3):
        if i == int(die_step) and jax.process_index() == int(die_process):
            print(f"process {jax.process_index()} dying ({''.join(how) or 'kill'}) before step {i}", flush=True)
            if how == ["raise"]:
                raise RuntimeError(f"deliberate failure of process {die_process} before step {i}")
            os.kill(os.getpid(), signal.SIGKILL)
        params, loss = step(params, x, y)
        losses.append(float(loss))  # replicated: every process holds the value

    gather = jax.jit(lambda t: t, out_shardings=replicated)
    w1, w2 = (np.asarray(gather(p)) for p in params)
    if sharding.is_primary():
        with open(out_path, "w") as f:
            json.dump({
                "distributed": started,
                "process_count": jax.process_count(),
                "device_count": jax.device_count(),
                "local_device_count": jax.local_device_count(),
                "rows_of_process_0": rows.tolist(),
                "losses": losses,
                "w1": w1.tolist(),
                "w2": w2.tolist(),
            }, f)
    print(f"process {jax.process_index()}/{jax.process_count()} done: losses {losses}", flush=True)


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except BaseException:
        # Fail fast: a normal exit would run jax.distributed.shutdown at exit, whose barrier waits
        # (up to shutdown_timeout, 300 s) for peers that are themselves blocked in a collective
        # waiting for this process. os._exit stops the heartbeats instead, so the coordination
        # service declares this task dead and every peer aborts within the heartbeat timeout.
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
