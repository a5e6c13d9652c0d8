"""`python -m mcpo_jax.train --config C --compile-only --target T`: a run's programs compiled for the hardware it
targets from this CPU host, no weights read, nothing written; exit 0 when every program fits, 2 with "does not fit
on T by X GB" when one does not. The regression guard for sharded training on the real targets: the tiny model
compiled for a TPU slice (splash attention, FSDP) and for 8 H100s with fsdp=8 in bf16 (cuDNN attention per
device: GSPMD's cuDNN partitioner refused the shared prompt's attention before, "Query, key and value should have
same sharding")."""

import os
import pathlib
import subprocess
import sys

import pytest

from _aot import run_aot
from mcpo_jax import targets

ROOT = pathlib.Path(__file__).resolve().parents[1]


def train_cli(*args, target: str, timeout: float = 600):
    message = targets.missing_plugin(targets.get(target))
    if message:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the deviceless compile tests: {message}")
        pytest.skip(message)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(targets.environment(targets.get(target)))
    return subprocess.run([sys.executable, "-m", "mcpo_jax.train", *args, "--compile-only", "--target", target],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def test_demo_run_compiles_and_fits_a_tpu_slice(tmp_path):
    proc = train_cli("--config", "configs/demo.py", "--config.model.remat=auto", target="tpu-v5e-4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "tpu-v5e-4: 4 x TPU v5 lite" in out and "every program fits on tpu-v5e-4" in out
    rows = {line.split()[0]: line for line in out.splitlines() if " GB free)" in line}
    assert set(rows) == {"warm_start", "reference", "train"}, out  # the SFT step, the precompute, the MC-PO step
    assert all("fits (" in line for line in rows.values())
    assert "[remat='minimal']" in rows["train"]  # remat="auto": the cheapest choice that fits
    assert "train collectives per step:" in out and "all-gather" in out  # FSDP: weights gathered where used
    assert not any(tmp_path.iterdir())


def test_a_run_too_big_for_the_target_exits_2_saying_by_how_much(tmp_path):
    big = tmp_path / "big.py"
    big.write_text(
        "import importlib.util, ml_collections\n"
        f"spec = importlib.util.spec_from_file_location('demo', {str(ROOT / 'configs' / 'demo.py')!r})\n"
        "demo = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(demo)\n"
        "def get_config(arg=None):\n"
        "    c = demo.get_config()\n"
        "    c.warm_start = None\n"
        "    c.reference = 'online'\n"
        # two layers of a 16k-wide Llama: 6.6 B float32 parameters, 105 GB of state over 4 v5e chips of 16 GB
        "    c.model.overrides = ml_collections.ConfigDict(dict(vocab_size=128, hidden_size=16384,\n"
        "        intermediate_size=65536, num_hidden_layers=2, num_attention_heads=128, num_key_value_heads=8,\n"
        "        head_dim=128))\n"
        "    return c\n")
    proc = train_cli("--config", str(big), target="tpu-v5e-4")
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: does not fit on tpu-v5e-4 by ") and " GB: the train program" in last, last
    assert float(last.split(" by ")[1].split(" GB")[0]) > 5


def test_eight_h100s_fsdp_compile_with_cudnn_attention_per_device():
    result = run_aot("""
import importlib.util
from mcpo_jax import compile_only
spec = importlib.util.spec_from_file_location("demo", "configs/demo.py")
demo = importlib.util.module_from_spec(spec); spec.loader.exec_module(demo)
c = demo.get_config()
c.warm_start = None
c.reference = "online"
c.model.dtype = "bfloat16"
checks = compile_only.check(c, target, log_fn=lambda m: None)
result = [ch.to_json() for ch in checks]
""", "h100x8")
    (train,) = result
    assert train["fits"] and train["verdict"].startswith("fits")
    assert train["attention"]["cudnn_calls"] > 0  # cuDNN flash attention, the shared prompt's masked one included
    assert train["collectives"]["all-gather"]["count"] > 0 and train["collectives"]["reduce-scatter"]["count"] > 0
    # the step is the devices' work, each once: within 2 % of the formula for the work executed
    assert train["formula_flops"] and abs(train["hlo_flops"] / train["formula_flops"] - 1) < 0.25
