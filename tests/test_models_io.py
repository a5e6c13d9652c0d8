"""Checkpoint loading: error paths, hub ids, meshes."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mcpo_jax.models import CheckpointError, ModelConfig, from_pretrained, save_pretrained
from mcpo_jax.models.config import UnsupportedConfigError
from mcpo_jax.sharding import make_mesh

from _models_fixtures import HF_CONFIGS, batch, logits, random_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    config = ModelConfig.from_hf(HF_CONFIGS["llama_gqa_llama3_tied"])
    model = random_model(config, seed=11)
    folder = tmp_path_factory.mktemp("ckpt")
    save_pretrained(model, folder)
    return folder, model


def copy_with(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        file = os.path.join(dst, "model.safetensors")
        tensors = load_file(file)
        edit_tensors(tensors)
        save_file(tensors, file, metadata={"format": "pt"})
    if edit_config:
        cfg = json.load(open(os.path.join(dst, "config.json")))
        edit_config(cfg)
        json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return dst


def test_missing_tensor_is_named(saved, tmp_path):
    folder = copy_with(saved[0], tmp_path / "c", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight") as e:
        from_pretrained(folder)
    assert "model.safetensors" in str(e.value)


def test_unexpected_tensor_is_named_with_file(saved, tmp_path):
    folder = copy_with(saved[0], tmp_path / "c", lambda t: t.__setitem__("model.layers.0.self_attn.foo.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.foo\.weight' in .*model\.safetensors"):
        from_pretrained(folder)


def test_bias_without_attention_bias_in_config_is_unexpected(saved, tmp_path):
    folder = copy_with(saved[0], tmp_path / "c", lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", np.zeros(32, np.float32)))
    with pytest.raises(CheckpointError, match=r"q_proj\.bias.*attention_bias"):
        from_pretrained(folder)


def test_layer_beyond_num_hidden_layers_is_unexpected(saved, tmp_path):
    def extra_layer(t):
        t["model.layers.2.input_layernorm.weight"] = np.ones(32, np.float32)

    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.input_layernorm\.weight.*num_hidden_layers=2"):
        from_pretrained(copy_with(saved[0], tmp_path / "c", extra_layer))


def test_shape_mismatch_names_tensor_file_and_shapes(saved, tmp_path):
    folder = copy_with(saved[0], tmp_path / "c", edit_config=lambda c: c.update(intermediate_size=64))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight' in .*model\.safetensors has shape \[56, 32\].*\[64, 32\]"):
        from_pretrained(folder)


def test_truncated_file_is_reported_as_corrupt(saved, tmp_path):
    folder = copy_with(saved[0], tmp_path / "c")
    file = os.path.join(folder, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*not a valid safetensors"):
        from_pretrained(folder)


def test_garbage_file_is_reported_as_corrupt(saved, tmp_path):
    folder = copy_with(saved[0], tmp_path / "c")
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        from_pretrained(folder)


def test_index_naming_a_missing_shard(saved, tmp_path):
    folder = tmp_path / "c"
    save_pretrained(saved[1], folder, max_shard_bytes=20_000)
    shard = sorted(p for p in os.listdir(folder) if p.startswith("model-"))[1]
    os.remove(folder / shard)
    with pytest.raises(CheckpointError, match=shard):
        from_pretrained(folder)


def test_tensor_in_two_shards_is_rejected(saved, tmp_path):
    folder = tmp_path / "c"
    save_pretrained(saved[1], folder, max_shard_bytes=20_000)
    shards = sorted(p for p in os.listdir(folder) if p.startswith("model-"))
    first = load_file(str(folder / shards[0]))
    last = load_file(str(folder / shards[-1]))
    key = next(iter(first))
    last[key] = first[key]
    save_file(last, str(folder / shards[-1]), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{key}' appears twice"):
        from_pretrained(folder)


def test_pickle_checkpoints_are_never_loaded(saved, tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    shutil.copy(os.path.join(saved[0], "config.json"), folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pickle.*pytorch_model\.bin"):
        from_pretrained(folder)


def test_hub_id_offline_says_pass_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"no-such-org/no-such-model.*local folder"):
        from_pretrained("no-such-org/no-such-model")


def test_missing_local_folder():
    with pytest.raises(FileNotFoundError, match="no such folder"):
        from_pretrained("/nonexistent/path/to/model")


def test_unsupported_architecture_in_config_json(saved, tmp_path):
    folder = copy_with(saved[0], tmp_path / "c", edit_config=lambda c: c.update(model_type="gemma"))
    with pytest.raises(UnsupportedConfigError, match="model_type"):
        from_pretrained(folder)


def test_load_onto_one_device_mesh(saved):
    folder, model = saved
    mesh = make_mesh(1, 1, 1)
    loaded = from_pretrained(folder, mesh=mesh)
    q = loaded.layers.q_proj[...]
    assert q.sharding.mesh.shape == mesh.shape
    ids, mask = batch(model.config.vocab_size)
    np.testing.assert_array_equal(logits(loaded, ids, mask), logits(model, ids, mask))


def test_load_onto_fsdp2_tensor2_mesh_in_subprocess(saved):
    """4 simulated CPU devices: parameters land sharded (fsdp x tensor) and logits are unchanged."""
    folder, model = saved
    ids, mask = batch(model.config.vocab_size)
    expected = logits(model, ids, mask)
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        os.environ["JAX_PLATFORMS"] = "cpu"
        sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
        import jax, numpy as np
        from jax.sharding import PartitionSpec as P
        from mcpo_jax.models import from_pretrained
        from mcpo_jax.sharding import make_mesh
        from _models_fixtures import batch, logits
        assert len(jax.devices()) == 4
        mesh = make_mesh(1, 2, 2)
        m = from_pretrained({str(folder)!r}, mesh=mesh)
        assert m.layers.q_proj[...].sharding.spec == P(None, "fsdp", "tensor", None), m.layers.q_proj[...].sharding
        assert m.layers.down_proj[...].sharding.spec == P(None, "tensor", "fsdp"), m.layers.down_proj[...].sharding
        assert m.embed[...].sharding.spec == P(None, "fsdp"), m.embed[...].sharding  # vocab 131 is not divisible by 2: replicated
        assert len(m.layers.q_proj[...].addressable_shards) == 4
        assert m.layers.q_proj[...].addressable_shards[0].data.shape == (2, 16, 2, 8)
        ids, mask = batch({model.config.vocab_size})
        np.save(sys.argv[1], logits(m, ids, mask))
    """)
    out = os.path.join(str(folder), "..", "mesh_logits.npy")
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", script, out], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-5, atol=1e-5)


def test_tied_checkpoint_carrying_lm_head_is_accepted(saved, tmp_path):
    """Some exports keep lm_head.weight although tie_word_embeddings=true; transformers ties it, so do we."""
    folder, model = saved
    edited = copy_with(folder, tmp_path / "c", lambda t: t.__setitem__("lm_head.weight", np.zeros((131, 32), np.float32)))
    loaded = from_pretrained(edited)
    assert not hasattr(loaded, "lm_head")
    np.testing.assert_array_equal(np.asarray(loaded.lm_head_kernel()), np.asarray(model.embed[...]).T)
