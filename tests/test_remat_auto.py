"""remat="auto": each batch shape compiles with the first remat choice whose program fits the devices' memory
budget (no recomputation, then every layer recomputed; the host offload between them only on GPU / TPU)."""

import jax.numpy as jnp
import pytest
from flax import nnx

from mcpo_jax import audit
from mcpo_jax import batch as batch_lib
from mcpo_jax import models
from mcpo_jax import sharding as shd
from mcpo_jax.training import program as program_lib
from mcpo_jax.training import step as step_lib

pytestmark = pytest.mark.usefixtures("module_compilation_cache")  # the same programs recompiled: cache hits

CONFIG = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                            rms_norm_eps=1e-5)
SHAPES = batch_lib.abstract_shapes((1, 4), columns=3, length=48)


def program(remat, *, auto=False, budget=None):
    model = nnx.eval_shape(lambda: models.Transformer(CONFIG, remat=remat, rngs=nnx.Rngs(0)))
    tx, schedule = step_lib.make_optimizer(learning_rate=1e-3, total_steps=10)
    cfg = step_lib.StepConfig(objective="mcpo", num_negatives=1, beta=0.1, completion_window=32, prompt_window=16)
    return program_lib.TrainProgram(model, cfg, tx, schedule, mesh=shd.make_mesh(1, 1, 1),
                                     remat="auto" if auto else None, memory_budget=budget)


def needed(prog):
    batch = prog.abstract_batch(SHAPES)
    prog.compiled(batch)
    info = next(iter(prog.compile_info.values()))
    return audit.program_bytes(info), info.get("remat")


def test_auto_takes_the_first_choice_that_fits():
    auto = program("minimal", auto=True)
    assert auto.remat_choices == ("minimal", True)  # no host offload on a CPU
    minimal, chosen = needed(auto)
    assert chosen == "minimal"  # a CPU has no limit: the cheapest
    full, _ = needed(program(True))
    assert full < minimal  # recomputing every layer saves memory (the choice exists for this)
    assert needed(program("minimal", auto=True, budget=(minimal + full) // 2)) == (full, True)
    with pytest.raises(program_lib.DoesNotFit, match="does not fit"):
        needed(program("minimal", auto=True, budget=full - 1))


def test_config_accepts_auto_and_refuses_a_bad_remat():
    from mcpo_jax.training import config as config_lib

    c = config_lib.base_config()
    c.model.preset, c.data.source = "tiny", "synthetic"
    c.model.remat = "auto"
    config_lib.validate(c, device_count=1, process_count=1)
    c.model.remat, c.model.memory_budget_gb = "sometimes", -1.0
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c, device_count=1, process_count=1)
    assert "model.remat='sometimes'" in str(e.value) and "memory_budget_gb" in str(e.value)
