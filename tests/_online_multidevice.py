"""Run in a subprocess with 4 host CPU devices (tests/test_generate.py): generation with params sharded over a
(data=1, fsdp=2, tensor=2) mesh, the model's activations and KV cache placed by its layout, gives the same greedy
and sampled tokens as on one device. Prints OK."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mcpo_jax import sharding as S  # noqa: E402
from mcpo_jax.models import logical_axes  # noqa: E402
from mcpo_jax.online import generate  # noqa: E402
from tests._online_fixtures import tiny_model  # noqa: E402

assert jax.device_count() == 4, jax.devices()
model = tiny_model()
ids = np.array([[5, 6, 7, 8], [9, 10, 0, 0], [3, 4, 5, 0], [7, 0, 0, 0]], np.int32)
mask = (ids > 0).astype(np.int32)
mesh = S.make_mesh(1, 2, 2)
state = nnx.state(model, nnx.Param)
placed = jax.device_put(state, S.param_shardings(logical_axes(model), state, mesh))
sharded = nnx.merge(nnx.graphdef(model), placed)
sharded.layout = S.model_layout(mesh)  # activations (and the KV cache) constrained to the mesh, as the trainer's
assert any(len(x.sharding.device_set) == 4 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(placed))
# one batch: a greedy row (temperature 0) and sampled rows with top-p
kw = dict(temperature=np.array([1.0, 0.7, 1.0, 0.0]), top_p=0.9, key=jax.random.key(3), max_new_tokens=8)
one = np.asarray(generate(model, ids, mask, **kw))
out = generate(sharded, ids, mask, **kw)
assert len(out.sharding.device_set) == 4, out.sharding
np.testing.assert_array_equal(np.asarray(out), one)
greedy = np.asarray(model(ids[3:, :1]))[0, -1].argmax()
assert out[3, 0] == greedy

# The sampler's program: with gather_weights (the default) the policy is gathered once per call, so the decode
# loop moves no weight; without, every decoded token all-gathers every layer's weights again.
from mcpo_jax import audit  # noqa: E402
from mcpo_jax.online.generate import lower_generate  # noqa: E402


def gathers_in_decode_loop(gather: bool) -> int:
    text = lower_generate(nnx.graphdef(sharded), jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), nnx.state(sharded)), mesh,
        batch_size=4, prompt_len=4, max_new_tokens=8, gather_weights=gather).compile().as_text()
    comps, entry = audit.parse_hlo(text)
    loop_bodies = {callee for instrs in comps.values() for ins in instrs if ins.opcode == "while"
                   for kind, callee in audit._CALLEE.findall(ins.rest) if kind == "body"}
    outer = {name for name, instrs in comps.items() if name in loop_bodies
             and any(ins.opcode == "while" for ins in instrs)}  # the decode loop holds the layer scan
    reach, todo = set(), list(outer)
    while todo:
        name = todo.pop()
        if name in reach:
            continue
        reach.add(name)
        todo += [callee for ins in comps.get(name, ()) for _, callee in audit._CALLEE.findall(ins.rest)]
    # a weight-sized all-gather (the sampler's argmax over a tensor-split vocabulary gathers [B, 2] pairs)
    return sum(ins.opcode.removesuffix("-start") == "all-gather"
               and max(int(np.prod(d)) for _, d in audit._shapes(ins.result)) >= 64
               for name in reach for ins in comps[name])


assert gathers_in_decode_loop(True) == 0, "the decode loop all-gathers weights though they were gathered once"
assert gathers_in_decode_loop(False) > 0
print("OK")
