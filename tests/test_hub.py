"""Local path vs hub id, offline fail-fast, tokenizer folders: every loader gives one message naming the key and
the flag, in about no time (no network in these tests: HF_HUB_OFFLINE or a patched probe)."""

import os
import time

import pytest

from mcpo_jax import hub
from mcpo_jax.data import DataError, load_examples, load_tokenizer

from _data_fixtures import train_tokenizer


@pytest.fixture
def no_network(monkeypatch):
    """The hub is unreachable but offline mode is not requested: the probe says so (and is not retried)."""
    calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_probe_result", {})
    monkeypatch.setattr(hub, "_probe", lambda endpoint, timeout: calls.append(endpoint) or False)
    return calls


def test_existing_folder_is_local_and_paths_are_never_hub_ids(tmp_path):
    assert hub.resolve(str(tmp_path)) == ("local", str(tmp_path))
    for name in ("./my-model", "../x", "~/models/none-here", "/abs/none", "org/name/sub", "models\\llama"):
        with pytest.raises(hub.MissingPath, match=r"model.path=.*: no such folder: "):
            hub.resolve(name)


def test_offline_hub_id_fails_fast_with_the_local_folder_flag(monkeypatch, no_network):
    t0 = time.perf_counter()
    with pytest.raises(hub.HubUnreachable) as info:
        hub.resolve("org/name")
    assert str(info.value) == ("model.path='org/name': cannot reach the Hugging Face hub for 'org/name' "
                               "(no connection); pass a local folder (--config.model.path=/path/to/folder)")
    with pytest.raises(hub.HubUnreachable, match=r"--config\.tokenizer=/path/to/folder"):
        hub.resolve("org/name", key="tokenizer")
    assert no_network == ["https://huggingface.co"]  # probed once per process, never retried
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubUnreachable, match=r"HF_HUB_OFFLINE is set"):
        hub.resolve("gpt2")
    assert time.perf_counter() - t0 < 2.0


def test_probe_has_a_timeout_and_no_retry():
    t0 = time.perf_counter()
    assert hub._probe("http://127.0.0.1:9", 1.0) is False  # nothing listens on the discard port
    assert time.perf_counter() - t0 < 1.5


def test_model_loader_uses_it(no_network):
    from mcpo_jax import models

    with pytest.raises(hub.HubUnreachable, match=r"pass a local folder \(--config\.model\.path="):
        models.from_pretrained("no-such-org/no-such-model")
    with pytest.raises(hub.MissingPath, match="no such folder"):
        models.from_pretrained("./relative/missing")


def test_load_tokenizer(tmp_path, no_network):
    assert load_tokenizer("synthetic").eos_token_id is not None
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "config.json").write_text("{}")
    with pytest.raises(hub.NoTokenizer) as info:
        load_tokenizer(str(only_config))
    assert str(info.value).startswith(f"{only_config} has no tokenizer (tokenizer.json / tokenizer_config.json")
    with pytest.raises(hub.HubUnreachable, match=r"tokenizer='org/tok'.*--config\.tokenizer=/path/to/folder"):
        load_tokenizer("org/tok")
    with pytest.raises(hub.MissingPath, match=r"model.path='\./nope': no such folder"):
        load_tokenizer("./nope", config_key="model.path")
    tok = train_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.pad_token_id == loaded.eos_token_id and loaded.chat_template == tok.chat_template


def test_hub_dataset_offline_is_a_data_error(monkeypatch, no_network):
    with pytest.raises(DataError, match=r"cannot reach the Hugging Face hub for 'org/data'.*--config\.data\.source="):
        load_examples("org/data", format="nectar")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"HF_HUB_OFFLINE is set\) and it is not in the datasets cache"):
        load_examples("no-such-org/no-such-data", format="nectar")


@pytest.mark.parametrize("offline", ["1", "true"])
def test_config_validation_and_the_loaders_agree_on_path_or_hub_id(monkeypatch, no_network, offline):
    """One decision (`hub.looks_like_path`): a bare `gpt2` is a hub id to the config's validation as to the
    loader (it used to be "no such folder" there), and any true HF_HUB_OFFLINE makes an uncached id an error."""
    from mcpo_jax.training.config import ConfigError, validate

    from _train_fixtures import tiny_config

    monkeypatch.setattr(hub, "hub_cached", lambda repo, filename="config.json": False)
    validate(tiny_config(**{"model.path": "gpt2"}), device_count=1, process_count=1)  # the loader decides
    with pytest.raises(ConfigError, match=r"model.path='\./none-here': no such folder$"):
        validate(tiny_config(**{"model.path": "./none-here"}), device_count=1, process_count=1)
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    for name in ("gpt2", "org/name"):
        with pytest.raises(ConfigError, match=rf"model.path='{name}': no such folder and the hub is offline"):
            validate(tiny_config(**{"model.path": name}), device_count=1, process_count=1)
    assert hub.looks_like_path("./none-here") and not hub.looks_like_path("gpt2")
