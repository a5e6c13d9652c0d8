"""Peak host memory (RSS) while `from_pretrained` loads a random ~300M-parameter checkpoint.

    python scripts/measure_load_rss.py [--dir /tmp/rss_ckpt] [--layers 16] [--mesh-devices 4]

The checkpoint is written tensor by tensor (never whole in memory), then a fresh child process
imports JAX, records its RSS, loads the checkpoint and records the peak RSS (ru_maxrss and a
10 ms /proc sampler). On CPU the "device" buffers are host memory too, so the loaded parameters
themselves appear in RSS; the number that matters is the transient overhead above them:

    overhead = peak - baseline - parameter bytes      (ideal: about one tensor)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def write_checkpoint(folder: str, layers: int) -> dict:
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from mcpo_jax.models import ModelConfig, Transformer
    from mcpo_jax.models.hf_io import _TABLE, write_safetensors

    config = ModelConfig(
        model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=64, tie_word_embeddings=False,
    )
    abstract = nnx.eval_shape(lambda: Transformer(config))
    shapes = {tuple(str(k) for k in p): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    rng = np.random.default_rng(0)
    tensors = []
    for _, pattern, path, transform, layered in _TABLE:
        if path not in shapes:
            continue
        shape = shapes[path][1:] if layered else shapes[path]
        hf_shape = transform.hf_shape(shape)
        for i in range(layers) if layered else [None]:
            key = pattern.replace("{i}", str(i))
            tensors.append((key, hf_shape, np.dtype(np.float32),
                            lambda s=hf_shape: (0.02 * rng.standard_normal(s, dtype=np.float32))))
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config.to_hf(), f)
    largest = max(math.prod(t[1]) * 4 for t in tensors)
    return {"params": config.num_params(), "largest_tensor_bytes": largest}


def child(folder: str, mesh_devices: int) -> None:
    if mesh_devices > 1:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={mesh_devices}"
    import jax
    import jax.numpy as jnp

    from mcpo_jax.models import from_pretrained
    from mcpo_jax.sharding import make_mesh

    jnp.zeros(1).block_until_ready()
    mesh = make_mesh(1, mesh_devices, 1) if mesh_devices > 1 else None
    baseline = rss_bytes()
    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.time()
    model = from_pretrained(folder, mesh=mesh)
    jax.block_until_ready(jax.tree.leaves(jax.tree.map(lambda x: x, __import__("flax").nnx.state(model))))
    seconds = time.time() - t0
    done.set()
    thread.join()
    after = rss_bytes()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(__import__("flax").nnx.state(model)))
    print(json.dumps({
        "baseline_rss": baseline, "peak_rss_sampled": max(peak[0], after), "ru_maxrss": maxrss,
        "after_rss": after, "param_bytes": param_bytes, "load_seconds": seconds, "devices": mesh_devices,
    }))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/mcpo_rss_ckpt")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--mesh-devices", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.dir, args.mesh_devices)
    info = write_checkpoint(args.dir, args.layers)
    ckpt_bytes = os.path.getsize(os.path.join(args.dir, "model.safetensors"))
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--dir", args.dir, "--mesh-devices", str(args.mesh_devices)],
        capture_output=True, text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 1 / 2**20
    peak = max(r["peak_rss_sampled"], r["ru_maxrss"])
    overhead = peak - r["baseline_rss"] - r["param_bytes"]
    print(f"parameters            {info['params'] / 1e6:.0f}M  (float32)")
    print(f"checkpoint file       {ckpt_bytes * mib:8.0f} MiB")
    print(f"largest tensor        {info['largest_tensor_bytes'] * mib:8.0f} MiB")
    print(f"devices               {r['devices']}")
    print(f"RSS before load       {r['baseline_rss'] * mib:8.0f} MiB")
    print(f"peak RSS during load  {peak * mib:8.0f} MiB")
    print(f"RSS after load        {r['after_rss'] * mib:8.0f} MiB")
    print(f"loaded params (CPU 'device' memory, part of RSS) {r['param_bytes'] * mib:.0f} MiB")
    print(f"transient overhead = peak - before - params = {overhead * mib:.0f} MiB "
          f"({overhead / ckpt_bytes:.2f} x checkpoint, {overhead / info['largest_tensor_bytes']:.1f} x largest tensor)")
    print(f"load time             {r['load_seconds']:.1f} s")


if __name__ == "__main__":
    main()
