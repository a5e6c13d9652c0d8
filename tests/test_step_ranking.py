"""The eval step reports the sampler-independent held-out metrics of mcpo_jax.ranking_metrics."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mcpo_jax import logprobs, ranking_metrics
from mcpo_jax.training import state as st
from mcpo_jax.training import step as S

from _train_fixtures import ToyLM, toy_batch


def _host_logps(model_params, graphdef, rest, ids, mask, loss_mask):
    model = nnx.merge(graphdef, model_params, rest)
    b, k, t = ids.shape
    logits = model(ids.reshape(b * k, t), mask.reshape(b * k, t))
    return logprobs.naive_sequence_logps(logits, ids.reshape(b * k, t), loss_mask.reshape(b * k, t)).reshape(b, k)


def test_eval_step_metrics_are_the_same_for_every_sampler_and_match_the_host():
    graphdef, params, rest = st.split_model(ToyLM())
    ref = jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)), params)
    mb = toy_batch(b=4, c=4, vocab=23)
    mb["ranks"] = np.array([[1, 3, 4, 5], [1, 5, 4, 3], [1, 4, 3, 5], [1, 3, -1, 4]], np.int32)
    beta = 0.5
    policy = np.asarray(_host_logps(params, graphdef, rest, mb["input_ids"], mb["attention_mask"], mb["loss_mask"]))
    ref_lp = np.asarray(_host_logps(ref, graphdef, rest, mb["input_ids"], mb["attention_mask"], mb["loss_mask"]))
    expected = ranking_metrics.sums(policy, ref_lp, beta, mb["valid"], mb["ranks"])
    seen = {}
    for sampler in ("mc", "max", "min", "random"):
        cfg = S.StepConfig(objective="mcpo", sampler=sampler, num_negatives=1, beta=beta)
        sums = jax.jit(S.make_eval_step(cfg, graphdef, rest))(params, ref, jax.random.key(0), mb)
        for name, (total, count) in expected.items():
            np.testing.assert_allclose(float(sums[name][0]), float(total), rtol=1e-4, atol=1e-5, err_msg=name)
            assert float(sums[name][1]) == float(count) == 4.0, name
        seen[sampler] = {k: float(sums[k][0]) for k in expected}
        # the training step's metrics are unchanged (no held-out keys there)
        plan = S.micro_batch_plan(cfg, graphdef, params, rest, mb)
        train_sums = S.micro_batch_grads_and_metrics(cfg, plan, graphdef, rest, params, ref, mb, jax.random.key(0)).sums
        assert not any(k.startswith("heldout/") for k in train_sums)
    assert seen["max"] == seen["min"] == seen["mc"] == seen["random"]
