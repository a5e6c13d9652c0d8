"""Local folder or Hugging Face hub id? One decision for every loader (model, tokenizer, hub datasets), made
before anything slow: a missing folder or an unreachable hub fails in about two seconds with a message that
names the config key and the fix, instead of a minute of retries and a transformers traceback.

    resolve(name, key="model.path")  -> ("local", folder) | ("hub", repo_id) | ("cached", repo_id)

- an existing folder (or file) -> local;
- something that is a path rather than a hub id (starts with . / ~, has more than one '/', an OS path
  separator, a drive letter) and does not exist -> `MissingPath` ("no such folder: PATH");
- a hub id ("org/name" or "name") while the hub is unreachable (HF_HUB_OFFLINE=1, or a TCP probe of the hub
  that fails within `PROBE_TIMEOUT_S`, no retries) -> "cached" when the hub cache has it (load it with
  `local_files_only=True`), else `HubUnreachable` ("cannot reach the Hugging Face hub for 'org/name'; pass a
  local folder (--config.model.path=/path/to/folder)").

`require_tokenizer(folder)` raises `NoTokenizer` for a folder without tokenizer files.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 2.0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
# The CLI fix for each config key: what to pass instead.
FIXES = {
    "model.path": "--config.model.path=/path/to/folder",
    "tokenizer": "--config.tokenizer=/path/to/folder",
    "reference_path": "--config.reference_path=/path/to/folder",
    "data.source": "--config.data.source=/path/to/file.jsonl",
    "data.eval_source": "--config.data.eval_source=/path/to/file.jsonl",
}


class LocationError(OSError):
    """A model / tokenizer / data location that cannot be used; the message names the key and the fix."""


class MissingPath(LocationError, FileNotFoundError):
    """A path (not a hub id) that does not exist."""


class HubUnreachable(LocationError, ConnectionError):
    """A hub id while the Hugging Face hub cannot be reached (offline, no network)."""


class NoTokenizer(LocationError, FileNotFoundError):
    """A folder without tokenizer files."""


def _fix(key: str) -> str:
    return FIXES.get(key, f"--config.{key}=/path/to/folder")


def offline_env() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set to a true value."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


_probe_result: dict[str, bool] = {}
_probe_lock = threading.Lock()


def _probe(endpoint: str, timeout: float) -> bool:
    """One TCP connection to the hub's host (DNS included) within `timeout` seconds; no retries."""
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    ok = [False]

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok[0] = True
        except OSError:
            pass

    t = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout)
    return ok[0]


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """False when offline is requested or the probe fails; the probe runs once per process."""
    if offline_env():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    with _probe_lock:
        if endpoint not in _probe_result:
            _probe_result[endpoint] = _probe(endpoint, timeout)
        return _probe_result[endpoint]


def looks_like_path(name: str) -> bool:
    """Whether `name` can only be a filesystem path, not a hub id ("org/name" or "name")."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
            or bool(re.match(r"^[A-Za-z]:[\\/]", name)) or "\\" in name)


def hub_cached(repo: str, filename: str = "config.json") -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, filename), str)
    except Exception:  # noqa: BLE001 (an odd id: not cached)
        return False


def resolve(name, *, key: str = "model.path", what: str = "folder", cached_file: str = "config.json"):
    """("local", path) | ("hub", repo_id) | ("cached", repo_id); raises MissingPath / HubUnreachable."""
    name = os.fspath(name)
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded):
        return "local", expanded
    if looks_like_path(name):
        raise MissingPath(f"{key}={name!r}: no such {what}: {expanded}")
    if not hub_reachable():
        if cached_file and hub_cached(name, cached_file):
            return "cached", name
        why = "HF_HUB_OFFLINE is set" if offline_env() else "no connection"
        raise HubUnreachable(
            f"{key}={name!r}: cannot reach the Hugging Face hub for {name!r} ({why}); pass a local {what} "
            f"({_fix(key)})")
    return "hub", name


def require_tokenizer(folder: str, *, key: str = "tokenizer") -> None:
    """NoTokenizer unless `folder` holds tokenizer files."""
    if os.path.isdir(folder) and not any(os.path.exists(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        raise NoTokenizer(
            f"{folder} has no tokenizer ({' / '.join(TOKENIZER_FILES[:3])} ...): copy the tokenizer files "
            f"into it, or point to a folder that has them ({_fix(key)})")
