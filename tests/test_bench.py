"""mcpo_jax.bench: the anchor's FLOP arithmetic, the CLI end to end on the tiny model, the table
against the anchor, and the import graph the GPU image needs (no grain / ml_collections / datasets)."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from mcpo_jax import bench
from mcpo_jax.models import preset_config

# The anchor's measured rows (scripts/anchor/torch_anchor_h200.json): model_tflops * median_s is the
# FLOP count the anchor script assigned to each step; ours must be the same number.
ANCHOR_ROWS = [
    # model, step, median_s, model_tflops, pairs
    ("llama-1b", "dpo", 0.4224848850000029, 404.19883823526334, 8),
    ("llama-1b", "dpo_precomputed_ref", 0.31518916299999944, 406.3462193550107, 8),
    ("llama-1b", "mcpo", 0.9624393490000074, 399.22284422325407, 8),
    ("llama-8b", "dpo", 0.5531922929999951, 460.43436205642564, 2),
    ("llama-8b", "dpo_precomputed_ref", 0.4206685899999911, 454.1141409951526, 2),
    ("llama-8b", "mcpo", 1.1906507190000042, 481.32895485570356, 2),
]


def test_matmul_params_by_hand():
    # Llama-3.2-1B: 16 x (q 2048x2048 + o 2048x2048 + k,v 2048x512 + gate/up/down 2048x8192) + head 2048x128256
    assert bench.matmul_params(bench.Shapes.of(preset_config("llama-1b"))) == (
        16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192) + 2048 * 128256
    ) == 1_235_746_816
    # Llama-3.1-8B: 32 x (2 x 4096² + 2 x 4096x1024 + 3 x 4096x14336) + 4096x128256 (untied head)
    assert bench.matmul_params(bench.Shapes.of(preset_config("llama-8b"))) == 7_504_658_432


@pytest.mark.parametrize("model,step,median_s,tflops,pairs", ANCHOR_ROWS)
def test_flops_reproduce_the_anchor(model, step, median_s, tflops, pairs):
    shapes = bench.Shapes.of(preset_config(model))
    work = bench.variant_work(step, prompts=pairs, candidates=5, negatives=1, seq=1024)
    assert work.flops(shapes) == pytest.approx(tflops * 1e12 * median_s, rel=1e-9)


def tiny_flops_by_hand(trained, forward, head_positions=32):
    # tiny: d=64, f=128, 2 layers, 4 heads x 16, 2 kv heads, V=512 (tied); seq 32. The LM head (64 x 512)
    # runs on `head_positions` of the 32 positions of each row.
    n = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 64 * 512
    assert n == 106_496
    per_trained = 6 * n + 12 * 2 * 64 * 32  # 688,128
    per_forward = 2 * n + 4 * 2 * 64 * 32  # 229,376
    skipped = (32 - head_positions) / 32 * 64 * 512
    return trained * per_trained + forward * per_forward - skipped * (6 * trained + 2 * forward)


# The step's XLA compilation dominates a CPU run (4 steps + the sampler); the CPU backend's cheaper
# code generation halves it without changing what runs.
FAST_CPU_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def tiny_shared_flops_by_hand(trained_completion, trained_prompt, forward_completion, forward_prompt):
    # the shared prompt (8 tokens, attending over 8 keys, no LM head) and completions (24 tokens attending over
    # the 8 + 24 keys, LM head on each)
    n = 106_496
    n_layers = n - 64 * 512
    completion = (6 * n + 12 * 2 * 64 * 32, 2 * n + 4 * 2 * 64 * 32)
    prompt = (6 * n_layers + 12 * 2 * 64 * 8, 2 * n_layers + 4 * 2 * 64 * 8)
    return (trained_completion * completion[0] + forward_completion * completion[1]
            + trained_prompt * prompt[0] + forward_prompt * prompt[1])


def test_tiny_cli_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "mcpo_jax.bench", "--model", "tiny", "--prompts", "2", "--candidates", "3",
           "--negatives", "2", "--prompt-len", "8", "--completion-len", "24", "--dtype", "f32", "--steps", "2",
           "--warmup", "0", "--gen-new-tokens", "3", "--json", str(out)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_CPU_COMPILE)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout
    res = json.loads(out.read_text())
    runs = {r["step"]: r for r in res["runs"]}
    assert list(runs) == list(bench.VARIANTS)
    assert res["flop_model"]["matmul_params"] == 106_496
    assert "106.8 K parameters" in printed
    # B = 2 prompts, C = 1 + 3, M = 2, seq 32. The anchor's work: DPO trains 2 rows and runs their
    # reference; MC-PO runs policy and reference over all C rows, trains 1 + M.
    anchor = {
        "dpo": (2 * 2 * 32, 2 * 2 * 32),
        "dpo_precomputed_ref": (2 * 2 * 32, 0),
        "mcpo": (3 * 2 * 32, 2 * 4 * 2 * 32),
        "mcpo_precomputed_ref": (3 * 2 * 32, 4 * 2 * 32),
    }
    # What the step executes (prune_passes, the shared prompt): DPO's fixed negative needs no policy pass;
    # MC-PO's policy pass covers all C rows (Algorithm 1's kernel weighs y0 too); so does the reference. Per
    # pass: 24 completion tokens per row, the 8 prompt tokens once per example.
    executed = {  # (trained completion, trained prompt, forward completion, forward prompt) tokens
        "dpo": (2 * 2 * 24, 2 * 8, 2 * 2 * 24, 2 * 8),
        "dpo_precomputed_ref": (2 * 2 * 24, 2 * 8, 0, 0),
        "mcpo": (3 * 2 * 24, 2 * 8, (4 + 4) * 2 * 24, 2 * 2 * 8),
        "mcpo_precomputed_ref": (3 * 2 * 24, 2 * 8, 4 * 2 * 24, 2 * 8),
    }
    for name, (tc, tp, fc, fp) in executed.items():
        r = runs[name]
        trained, forward = tc + tp, fc + fp
        assert (r["trained_tokens"], r["forward_tokens"]) == (trained, forward)
        assert r["head_positions"] == 24
        assert r["model_flops"] == tiny_shared_flops_by_hand(tc, tp, fc, fp)
        assert r["anchor_flops"] == tiny_flops_by_hand(*anchor[name])
        assert len(r["times"]) == 2 and r["median_s"] == pytest.approx(sum(r["times"]) / 2)
        assert r["trained_tok_per_s"] == pytest.approx(trained / r["median_s"])
        assert r["mfu"] == pytest.approx(r["model_flops"] / r["median_s"] / 989e12)
        assert r["anchor_equivalent_mfu"] == pytest.approx(r["anchor_flops"] / r["median_s"] / 989e12)
        assert printed.count(f" {name} ") == 1, printed  # each row printed once
        assert r["compile_s"] > 0 and r["compiled_mem"]["total_gb"] > 0
        assert r["peak_mem_gb"] is None  # the CPU keeps no allocator statistics
        assert r["finite"]
        assert name in printed
    # At lr 1e-7 the policy stays at its reference, so every implicit reward is ~0: DPO's loss is
    # log 2 and MC-PO's log(1 + M), with the reference in the step or precomputed.
    assert runs["dpo"]["loss"] == pytest.approx(math.log(2), abs=2e-3)
    assert runs["dpo_precomputed_ref"]["loss"] == pytest.approx(math.log(2), abs=2e-3)
    assert runs["mcpo"]["loss"] == pytest.approx(math.log(3), abs=2e-3)
    assert runs["mcpo_precomputed_ref"]["loss"] == pytest.approx(math.log(3), abs=2e-3)
    assert res["ratios"]["mcpo_over_dpo_reference_in_step"] == pytest.approx(
        runs["mcpo"]["median_s"] / runs["dpo"]["median_s"])
    gen = res["generation"]
    assert "skipped" in gen or gen["prefill_tok_per_s"] > 0, gen


def test_comparison_table_against_the_anchor():
    anchor = {"runs": [{"model": "llama-1b", "step": "mcpo_naive", "median_s": 0.962, "mfu": 0.40, "peak_mem_gb": 59.5},
                       {"model": "llama-1b", "step": "dpo", "median_s": 0.422, "mfu": 0.41, "peak_mem_gb": 59.5}]}
    ours = {"config": {"model": "llama-1b"}, "ratios": {"mcpo_over_dpo_reference_in_step": 1.5},
            "runs": [{"model": "llama-1b", "step": "mcpo", "median_s": 0.481, "mfu": 0.7, "anchor_equivalent_mfu": 0.8,
                      "peak_mem_gb": 40.0, "target_s": 0.70},
                     {"model": "llama-1b", "step": "dpo", "median_s": 0.422, "mfu": 0.41, "peak_mem_gb": None,
                      "target_s": 0.33}]}
    table = bench.format_comparison(anchor, [ours]).splitlines()
    mcpo = next(line for line in table if " mcpo " in line)
    assert mcpo.split()[2:8] == ["0.962", "0.481", "2.00", "0.400", "0.700", "0.800"] and mcpo.endswith("yes")
    dpo = next(line for line in table if " dpo " in line)
    assert dpo.split()[4] == "1.00" and dpo.endswith("NO")
    assert any("torch mcpo/dpo (reference in step): 2.28" in line for line in table)


def test_import_graph_runs_without_grain_ml_collections_datasets():
    """The GPU image lacks grain, ml_collections and datasets: the bench must not need them."""
    code = textwrap.dedent("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in {"grain", "ml_collections", "datasets"}:
                    raise ImportError("not on the GPU image: " + name)
        sys.meta_path.insert(0, Block())
        import mcpo_jax.bench
        import mcpo_jax.models, mcpo_jax.sharding, mcpo_jax.training.state, mcpo_jax.training.step
        import mcpo_jax.training.refcache
        import mcpo_jax.online.generate
        print("ok")
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_tiny_defaults_are_small():
    args = bench.parse_args(["--model", "tiny"])
    assert (args.prompts, args.prompt_len, args.completion_len, args.dtype) == (2, 16, 48, "f32")
    args = bench.parse_args(["--model", "llama-1b"])
    assert (args.prompts, args.prompt_len, args.completion_len, args.dtype) == (8, 256, 768, "bf16")
    assert bench.format_count(106_496) == "106.5 K" and bench.format_count(1_235_814_400) == "1.236 B"


def test_compile_only_audit_on_a_small_preset(tmp_path):
    """`bench --compile-only` end to end: the audit's HLO FLOPs agree with the formula for the work the step
    executes, the passes over the layers are those the step runs, and memory and saved activations are read."""
    out = tmp_path / "audit.json"
    cmd = [sys.executable, "-m", "mcpo_jax.bench", "--model", "tiny", "--compile-only", "--prompts", "2",
           "--candidates", "3", "--negatives", "1", "--prompt-len", "8", "--completion-len", "24", "--dtype", "bf16",
           "--variants", "mcpo,dpo_precomputed_ref", "--json", str(out)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert "while-loop-invariant-code-motion" in res["environment"]["xla_flags"]
    runs = {r["step"]: r for r in res["runs"]}
    # 2 layers; the shared prompt: each pass one scan of the prompt and the completions (2 attention calls per
    # layer). MC-PO: the policy without gradient, the reference, the trained rows forward and backward; DPO with
    # a precomputed reference: the trained rows forward and backward.
    for name, passes, fwd_attn, bwd_attn in (("mcpo", 4, 3 * 4, 4), ("dpo_precomputed_ref", 2, 4, 4)):
        r = runs[name]
        assert r["layer_passes"] == passes, r["while_loops"]
        assert (r["attention"]["forward_calls"], r["attention"]["backward_calls"]) == (fwd_attn, bwd_attn)
        assert r["hlo_over_formula"] == pytest.approx(1.0, abs=0.005), r
        assert r["compiled_mem"]["total_gb"] > 0 and r["saved_bytes_per_token_per_layer"] > 0
        assert r["vocab_buffers"] and r["vocab_buffers"][0]["shape"][-1] == 512
    assert runs["mcpo"]["formula_flops"] < runs["mcpo"]["anchor_flops"]  # y0 out of the policy pass
