"""Logits parity with transformers' PyTorch Llama / Mistral on tiny random checkpoints."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mcpo_jax.models import ModelConfig, Transformer, from_pretrained, save_pretrained

from _models_fixtures import HF_CONFIGS, batch, logits, random_model, record, torch_logits, valid_rel_err

FP32_TOL = 1e-5
# bf16 compute against the fp32 PyTorch reference: bf16 has an 8-bit mantissa (rel. rounding 2^-9 ~ 2e-3
# per op); through 2-3 layers the logits' relative L2 error measures ~5e-3 to 1e-2. 3e-2 leaves
# headroom while still failing on any layout / masking bug (those give errors of order 1).
BF16_TOL = 3e-2


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def case(request, tmp_path_factory):
    """(name, folder written by our save_pretrained, our model, ids, mask, PyTorch logits)."""
    name = request.param
    config = ModelConfig.from_hf(HF_CONFIGS[name])
    model = random_model(config, seed=7)
    folder = str(tmp_path_factory.mktemp(name))
    save_pretrained(model, folder)
    ids, mask = batch(config.vocab_size)
    return name, folder, model, ids, mask, torch_logits(folder, ids, mask)


def test_fp32_parity_padded_batch(case):
    name, folder, model, ids, mask, ref = case
    err = valid_rel_err(logits(model, ids, mask), ref, mask)
    record(f"fp32 {name} padded", err)
    assert err <= FP32_TOL, f"{name}: relative L2 error {err:.2e} > {FP32_TOL}"


def test_loaded_params_are_bit_identical(case):
    """from_pretrained(save_pretrained(model)) holds exactly the model's numbers."""
    _, folder, model, _, _, _ = case
    loaded = from_pretrained(folder)
    assert loaded.config == model.config
    for (pa, a), (pb, b) in zip(flat_params(loaded), flat_params(model)):
        assert pa == pb and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b, err_msg=str(pa))


def test_fp32_parity_without_mask(case):
    name, folder, model, ids, mask, _ = case
    if name not in ("mistral_sliding", "llama_untied_headdim_bias"):
        pytest.skip("mask=None path checked on two cases (CPU time budget)")
    full = np.ones_like(mask)
    err = valid_rel_err(logits(model, ids), torch_logits(folder, ids, full), full)
    record(f"fp32 {name} unpadded", err)
    assert err <= FP32_TOL


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_bf16_compute_parity(case, param_dtype):
    name, folder, _, ids, mask, ref = case  # every case, both parameter dtypes (a 2-3 layer forward each)
    model = from_pretrained(folder, dtype=jnp.bfloat16, param_dtype=param_dtype)
    assert model.layers.q_proj[...].dtype == param_dtype
    assert jax.eval_shape(model.hidden_states, ids, mask).dtype == jnp.bfloat16
    assert jax.eval_shape(model, ids, mask).dtype == jnp.float32
    err = valid_rel_err(logits(model, ids, mask), ref, mask)
    record(f"bf16 {name} params={jnp.dtype(param_dtype).name}", err)
    assert err <= BF16_TOL, f"{name}: bf16 relative L2 error {err:.2e} > {BF16_TOL}"


def test_hidden_states_and_lm_head_make_logits(case):
    name, _, model, ids, mask, _ = case
    if name != "llama_gqa_llama3_tied":
        pytest.skip("checked on the tied case (CPU time budget)")
    hidden = nnx.jit(lambda m: m.hidden_states(ids, mask))(model)
    kernel = model.lm_head_kernel()
    assert hidden.shape == (*ids.shape, model.config.hidden_size)
    assert kernel.shape == (model.config.hidden_size, model.config.vocab_size)
    np.testing.assert_allclose(np.asarray(hidden @ kernel), logits(model, ids, mask), rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_valid_logits(case):
    """Row b of the padded batch equals the same tokens run alone without padding."""
    name, _, model, ids, mask, _ = case
    if name not in ("mistral_sliding", "llama_untied_headdim_bias"):
        pytest.skip("dynamic NTK rope depends on the longest sequence of the call; two cases suffice")
    padded = logits(model, ids, mask)
    n = int(mask[2].sum())
    alone = logits(model, ids[2:3, :n])
    np.testing.assert_allclose(padded[2, :n], alone[0], rtol=1e-5, atol=1e-5)


def test_transformers_checkpoint_loads_with_identical_logits(tmp_path):
    """The other direction: a checkpoint written by transformers itself (its naming, its config.json)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = dict(HF_CONFIGS["llama_untied_headdim_bias"])
    torch.manual_seed(0)
    ref_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf)).eval()
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))  # HF initialises these to 0 / 1
    ref_model.save_pretrained(tmp_path)
    assert "rope_parameters" in json.load(open(tmp_path / "config.json"))
    ids, mask = batch(hf["vocab_size"], seed=3)
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    err = valid_rel_err(logits(from_pretrained(str(tmp_path)), ids, mask), ref, mask)
    record("fp32 transformers-written checkpoint", err)
    assert err <= FP32_TOL


def test_saved_layout_matches_torch_state_dict(tmp_path):
    """Our save -> transformers load holds exactly our numbers (no cast, right layout)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = ModelConfig.from_hf(HF_CONFIGS["llama_untied_headdim_bias"])
    model = random_model(config, seed=1)
    save_pretrained(model, tmp_path)
    sd = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    L = model.layers
    q = np.asarray(L.q_proj[...][1])  # [D, H, hd]
    np.testing.assert_array_equal(sd["model.layers.1.self_attn.q_proj.weight"].numpy(), q.reshape(q.shape[0], -1).T)
    o = np.asarray(L.o_proj[...][2])  # [H, hd, D]
    np.testing.assert_array_equal(sd["model.layers.2.self_attn.o_proj.weight"].numpy(), o.reshape(-1, o.shape[-1]).T)
    np.testing.assert_array_equal(sd["model.layers.0.self_attn.k_proj.bias"].numpy(), np.asarray(L.k_bias[...][0]).reshape(-1))
    np.testing.assert_array_equal(sd["model.layers.0.mlp.down_proj.weight"].numpy(), np.asarray(L.down_proj[...][0]).T)
    np.testing.assert_array_equal(sd["lm_head.weight"].numpy(), np.asarray(model.lm_head[...]).T)


def flat_params(model):
    return [(p, np.asarray(v.get_value())) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def test_sharded_checkpoint_with_index(tmp_path):
    config = ModelConfig.from_hf(HF_CONFIGS["mistral_sliding"])
    model = random_model(config, seed=2)
    save_pretrained(model, tmp_path, max_shard_bytes=20_000)
    shards = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == set(shards)
    assert not (tmp_path / "model.safetensors").exists()
    ids, mask = batch(config.vocab_size)
    ref = torch_logits(str(tmp_path), ids, mask)  # transformers reads the sharded folder too
    loaded = from_pretrained(tmp_path)
    assert valid_rel_err(logits(loaded, ids, mask), ref, mask) <= FP32_TOL
    np.testing.assert_array_equal(logits(loaded, ids, mask), logits(model, ids, mask))


def test_legacy_rope_scaling_config_style(tmp_path):
    """rope_theta + rope_scaling (transformers 4.x) written, read back by us and by transformers."""
    config = ModelConfig.from_hf(HF_CONFIGS["llama_gqa_llama3_tied"])
    model = random_model(config, seed=4)
    save_pretrained(model, tmp_path, rope_style="legacy")
    written = json.load(open(tmp_path / "config.json"))
    assert "rope_parameters" not in written and written["rope_scaling"]["rope_type"] == "llama3"
    assert written["rope_theta"] == 500000.0
    loaded = from_pretrained(tmp_path)
    assert loaded.config == config
    ids, mask = batch(config.vocab_size)
    assert valid_rel_err(logits(loaded, ids, mask), torch_logits(str(tmp_path), ids, mask), mask) <= FP32_TOL


def test_rope_scaling_and_window_actually_matter():
    """Guards the parity tests against vacuity: dropping llama3 scaling or the window changes logits."""
    for name, change in (("llama_gqa_llama3_tied", dict(rope_scaling=None)), ("mistral_sliding", dict(sliding_window=None))):
        config = ModelConfig.from_hf(HF_CONFIGS[name])
        ids, mask = batch(config.vocab_size)
        a = logits(random_model(config, seed=5), ids, mask)
        b = logits(random_model(config.replace(**change), seed=5), ids, mask)
        assert valid_rel_err(b, a, mask) > 1e-2, name


def test_tokenizer_files_are_copied(tmp_path):
    from mcpo_jax.models import preset_config

    src = tmp_path / "tok"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text("{}")
    model = random_model(preset_config("tiny", num_hidden_layers=1))
    out = tmp_path / "out"
    save_pretrained(model, out, tokenizer=str(src))
    assert (out / "tokenizer.json").read_text() == "{}" and (out / "tokenizer_config.json").exists()
