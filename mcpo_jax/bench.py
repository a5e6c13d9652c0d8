"""Step-time benchmark: DPO vs MC-PO train steps and the OnMC-PO sampler, on random weights.

    python -m mcpo_jax.bench --model llama-1b --prompts 8 --candidates 5 --negatives 1 \
        --prompt-len 256 --completion-len 768 --dtype bf16 --json bench.json

One process, one batch of `prompts` x (1 preferred + `candidates`) sequences of
`prompt_len + completion_len` tokens, and the trainer's own jitted step (`training.step`) for
each variant:

    dpo                  DPO on (y0, y1), reference forward inside the step
    dpo_precomputed_ref  DPO on (y0, y1), reference log-probs carried by the batch
    mcpo                 MC-PO over 1 + L candidates, M negatives, reference forward in the step
    mcpo_precomputed_ref MC-PO with reference log-probs carried by the batch

Each is compiled ahead of the loop (compile time reported apart), run `--warmup` times, then
timed `--steps` times with the host blocking on the new state after each step; the median is
reported. FLOPs follow the PyTorch anchor (`../shared/bench/torch_dpo_anchor.py`) exactly, so MFU
and tokens/s compare one to one: 6N + 12·l·d·s per trained token, 2N + 4·l·d·s per forward-only
token, N = the matmul parameters of the layers plus the LM head. The FLOPs counted are the work
the algorithm needs (the anchor's), not whatever a step happens to execute: a step that does
extra passes shows a lower MFU.

`--compare ANCHOR.json BENCH.json...` prints the side-by-side table against the anchor and exits.

Imports stay light on purpose: this module and what it imports must run on a GPU image that has
jax, flax, optax and transformers but not grain, ml_collections or datasets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcpo_jax.online.generate import generation_throughput

PEAK_TFLOPS_H200_BF16 = 989.0  # dense bf16, datasheet (the anchor's PEAK)
VARIANTS = ("dpo", "dpo_precomputed_ref", "mcpo", "mcpo_precomputed_ref")
# The issue's targets on one H200, bf16 (seconds per step), keyed by (model, variant).
TARGETS_S = {
    ("llama-1b", "mcpo"): 0.70,
    ("llama-1b", "dpo"): 0.33,
    ("llama-8b", "mcpo"): 0.90,
}


# ----------------------------------------------------------------------------------------------
# FLOP accounting (the anchor's)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The few numbers the FLOP count needs, read off a ModelConfig (or given by hand)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def of(cls, config) -> Shapes:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
        )


def matmul_params(s: Shapes) -> int:
    """N: the weights every token multiplies through (q, k, v, o, gate/up/down per layer, LM head).

    The LM head counts whether or not it is tied to the embedding (its matmul runs either way);
    the embedding lookup and the norms do not. Same as the anchor's `n_params` (which writes
    q and o as d x d: equal here whenever heads x head_dim = hidden_size, as for Llama/Mistral).
    """
    d, f = s.hidden_size, s.intermediate_size
    q = s.num_attention_heads * s.head_dim
    kv = s.num_key_value_heads * s.head_dim
    per_layer = 2 * d * q + 2 * d * kv + 3 * d * f
    return s.num_hidden_layers * per_layer + d * s.vocab_size


def flops_per_token(s: Shapes, seq: int, *, train: bool) -> float:
    """PaLM-style model FLOPs per token: 6N + 12·l·d·s with backward, 2N + 4·l·d·s forward only."""
    n = matmul_params(s)
    attn = 12 * s.num_hidden_layers * s.hidden_size * seq
    return float(6 * n + attn) if train else float(2 * n + attn / 3)


@dataclasses.dataclass(frozen=True)
class Work:
    """Tokens one step of a variant must push through the model, by kind of pass."""

    trained_tokens: int  # forward + backward
    forward_tokens: int  # forward only (policy and reference log-probs without gradient)
    seq: int

    def flops(self, s: Shapes) -> float:
        return self.trained_tokens * flops_per_token(s, self.seq, train=True) + self.forward_tokens * flops_per_token(
            s, self.seq, train=False
        )


def variant_work(variant: str, *, prompts: int, candidates: int, negatives: int, seq: int) -> Work:
    """The anchor's work for each variant on `prompts` prompts of 1 + `candidates` sequences.

    DPO: 2 sequences per prompt trained, their reference forward when it is in the step.
    MC-PO: policy (and reference, when in the step) forward without gradient over all 1 + L,
    then forward + backward on y0 and the M selected.
    """
    b, c, m = prompts, 1 + candidates, negatives
    if variant == "dpo":
        return Work(trained_tokens=2 * b * seq, forward_tokens=2 * b * seq, seq=seq)
    if variant == "dpo_precomputed_ref":
        return Work(trained_tokens=2 * b * seq, forward_tokens=0, seq=seq)
    if variant == "mcpo":
        return Work(trained_tokens=(1 + m) * b * seq, forward_tokens=2 * c * b * seq, seq=seq)
    if variant == "mcpo_precomputed_ref":
        return Work(trained_tokens=(1 + m) * b * seq, forward_tokens=c * b * seq, seq=seq)
    raise ValueError(f"unknown bench variant {variant!r}; known: {VARIANTS}")


# ----------------------------------------------------------------------------------------------
# Memory and timing


def device_memory() -> dict[str, float | None]:
    """bytes_in_use / peak_bytes_in_use of the first local device in GiB; None where the backend
    keeps no statistics (the CPU). The peak is the process's since start: JAX cannot reset it."""
    stats = jax.local_devices()[0].memory_stats() or {}
    gib = 2.0**30
    return {
        "bytes_in_use_gb": stats["bytes_in_use"] / gib if "bytes_in_use" in stats else None,
        "peak_bytes_in_use_gb": stats["peak_bytes_in_use"] / gib if "peak_bytes_in_use" in stats else None,
    }


def compiled_memory(compiled) -> dict[str, float] | None:
    """XLA's own accounting of one compiled executable (arguments + outputs + temporaries -
    donated aliases), in GiB: what that step needs on the device, on any backend."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if ma is None:
        return None
    gib = 2.0**30
    total = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes
    return {
        "arguments_gb": ma.argument_size_in_bytes / gib,
        "outputs_gb": ma.output_size_in_bytes / gib,
        "temp_gb": ma.temp_size_in_bytes / gib,
        "aliased_gb": ma.alias_size_in_bytes / gib,
        "total_gb": total / gib,
    }


def hlo_census(compiled) -> dict[str, int] | None:
    """What the optimized program is made of: fused-attention and GEMM library calls, Triton
    fusions, while loops (a length-1 accumulation loop that survived shows here)."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001
        return None
    return {
        "cudnn_fmha_calls": text.count('custom_call_target="__cudnn$fmha'),
        "cublas_gemm_calls": text.count('custom_call_target="__cublas$'),
        "triton_fusions": text.count('"kind":"__triton'),
        "while_loops": sum(1 for line in text.splitlines() if " while(" in line),
    }


def time_loop(step: Callable[[Any], Any], carry: Any, *, warmup: int, steps: int) -> tuple[Any, list[float]]:
    """Run `carry = step(carry)` warmup + steps times; wall time of each timed step in seconds.

    The host waits for the whole returned carry after every step, so each time is one step's
    device time plus its dispatch, as in the anchor (torch.cuda.synchronize after each step).
    """
    for _ in range(warmup):
        carry = jax.block_until_ready(step(carry))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        carry = jax.block_until_ready(step(carry))
        times.append(time.perf_counter() - t0)
    return carry, times


# ----------------------------------------------------------------------------------------------
# Inputs


def make_batch(
    *, prompts: int, candidates: int, prompt_len: int, completion_len: int, vocab_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """A batch in the data pipeline's layout: [B, C, T] ids, full attention, completion loss mask.

    Random token ids (never zeros: constant inputs can run faster than real data), every
    sequence exactly `prompt_len + completion_len` long like the anchor's. Token t of a
    completion is predicted from position t - 1, so loss_mask is 1 from position prompt_len on.
    """
    rng = np.random.default_rng(seed)
    b, c, t = prompts, 1 + candidates, prompt_len + completion_len
    input_ids = rng.integers(0, vocab_size, size=(b, c, t), dtype=np.int32)
    loss_mask = np.zeros((b, c, t), np.int32)
    loss_mask[:, :, prompt_len:] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": np.ones((b, c, t), np.int32),
        "loss_mask": loss_mask,
        "valid": np.ones((b, c), bool),
        "ranks": np.broadcast_to(np.arange(c, dtype=np.int32), (b, c)).copy(),
        "fixed_index": np.ones((b,), np.int32),
        "example_id": np.arange(b, dtype=np.int64),
    }


def pair_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The DPO batch on the same prompts: y0 and the first candidate."""
    out = {}
    for k, v in batch.items():
        if v.ndim >= 2 and v.shape[1] == batch["valid"].shape[1]:
            out[k] = v[:, :2]
        else:
            out[k] = v
    out["fixed_index"] = np.ones_like(batch["fixed_index"])
    return out


def model_config(name_or_path: str):
    """A preset's config ("tiny", "llama-1b", ...) or the config.json of a local folder."""
    from mcpo_jax import models

    if os.path.isdir(name_or_path) or name_or_path.endswith(".json"):
        return models.load_config(name_or_path)
    return models.preset_config(name_or_path)


DTYPES = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "f32": jnp.float32, "float32": jnp.float32}


# ----------------------------------------------------------------------------------------------
# The steps under test: the trainer's own (mcpo_jax.training.step)


def step_config(variant: str, *, negatives: int, beta: float):
    """The trainer's StepConfig for a bench variant.

    DPO runs on the (y0, y1) pairs with the `fixed` sampler (y1 is the designated rejected), as
    TRL's DPO does; MC-PO samples `negatives` of the L candidates with the MC kernel.
    """
    from mcpo_jax.training import step as step_lib

    reference = "precomputed" if variant.endswith("precomputed_ref") else "online"
    if variant.startswith("dpo"):
        return step_lib.StepConfig(objective="dpo", sampler="fixed", num_negatives=1, beta=beta, reference=reference)
    return step_lib.StepConfig(objective="mcpo", sampler="mc", num_negatives=negatives, beta=beta,
                               reference=reference)


def init_model(config, *, dtype, param_dtype, remat, seed: int, mesh=None):
    """Random weights of the config's shapes (no download), created on the mesh like the trainer's."""
    from mcpo_jax import models

    return models.init_random(config, dtype=dtype, param_dtype=param_dtype, seed=seed, mesh=mesh, remat=remat)


def run_steps(args, config, shapes: Shapes, variants: Sequence[str], log=print,
              on_row: Callable[[list], None] = lambda rows: None) -> list[dict[str, Any]]:
    """Build the model, optimizer and state once; compile and time each variant's train step.
    `on_row(rows)` runs after each variant (the CLI saves its JSON there, so a run cut short by a
    time limit keeps what it measured)."""
    from mcpo_jax import models, sharding
    from mcpo_jax.training import refcache
    from mcpo_jax.training import state as state_lib
    from mcpo_jax.training import step as step_lib

    dtype, param_dtype = DTYPES[args.dtype], DTYPES[args.param_dtype or args.dtype]
    t0 = time.perf_counter()
    mesh = sharding.make_mesh(1, -1, 1)
    model = init_model(config, dtype=dtype, param_dtype=param_dtype, remat=args.remat, seed=args.seed, mesh=mesh)
    graphdef, params, rest = state_lib.split_model(model)
    param_sh = sharding.param_shardings(models.logical_axes(model), params, mesh)
    params = jax.device_put(params, param_sh)
    # The reference: a frozen copy of the initial policy, as the trainer keeps it.
    ref_params = jax.tree.map(jnp.copy, params)
    tx, schedule = step_lib.make_optimizer(learning_rate=args.lr, total_steps=1_000_000, warmup_ratio=0.0,
                                           decay="constant")
    state_sh = state_lib.state_shardings(tx, params, param_sh, mesh)
    state = state_lib.init_state(params, tx, args.seed, shardings=state_sh)
    del params, model
    jax.block_until_ready((state, ref_params))
    init_s = time.perf_counter() - t0
    log(f"# model {args.model}: {state_lib.count_params(state['params']) / 1e9:.3f} B parameters "
        f"({args.param_dtype or args.dtype} weights, {args.dtype} compute), built in {init_s:.1f}s")

    np_batch = make_batch(prompts=args.prompts, candidates=args.candidates, prompt_len=args.prompt_len,
                          completion_len=args.completion_len, vocab_size=config.vocab_size, seed=args.seed)

    def device_batch(b: dict[str, np.ndarray]):
        """[A=1, b, ...]: one micro-batch, the trainer's keys, placed as the trainer places them."""
        keys = ("input_ids", "attention_mask", "loss_mask", "valid", "ranks", "fixed_index", "ref_logps")
        return sharding.global_batch({k: v[None] for k, v in b.items() if k in keys}, mesh, batch_axis=1)

    if any(v.endswith("precomputed_ref") for v in variants):
        # Reference log-probs of every candidate, once and outside the timed steps, with the
        # trainer's own precompute function (training.refcache), as `reference: precomputed` does.
        logps_fn = refcache.make_logps_fn(graphdef, rest, mesh, args.chunk_size)
        np_batch["ref_logps"] = np.asarray(
            logps_fn(ref_params, np_batch["input_ids"], np_batch["attention_mask"], np_batch["loss_mask"]))
    if all(v.endswith("precomputed_ref") for v in variants):
        ref_params = None  # as the trainer does: the reference weights are freed once their log-probs exist

    rows = []
    for variant in variants:
        cfg = dataclasses.replace(step_config(variant, negatives=args.negatives, beta=args.beta),
                                  logprob_chunk_size=args.chunk_size)
        host = pair_batch(np_batch) if variant.startswith("dpo") else dict(np_batch)
        if cfg.reference != "precomputed":
            host.pop("ref_logps", None)
        batch = device_batch(host)
        ref = ref_params if cfg.reference == "online" else None
        try:
            fn = step_lib.make_train_step(cfg, graphdef, rest, tx, schedule)
            compiled, info = step_lib.compile_train_step(
                fn, state, ref, batch, state_shardings=state_sh, ref_shardings=param_sh if ref is not None else None,
                batch_shardings=jax.tree.map(lambda x: x.sharding, batch),
                metric_shardings=sharding.replicated(mesh))

            def one_step(carry, compiled=compiled, ref=ref, batch=batch):
                return compiled(carry[0], ref, batch)

            (state, metrics), times = time_loop(one_step, (state, None), warmup=args.warmup, steps=args.steps)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: report it and go on if the state survived
            rows.append({"model": args.model, "step": variant, "error": f"{type(e).__name__}: {e}"[:1000],
                         "peak_mem_gb": device_memory()["peak_bytes_in_use_gb"]})
            log(f"{args.model:11s} {variant:21s} ERROR {rows[-1]['error'][:300]}")
            on_row(rows)
            if any(x.is_deleted() for x in jax.tree.leaves(state)):
                log("# the donated train state is gone with the failed step: remaining variants skipped")
                break
            continue
        work = variant_work(variant, prompts=args.prompts, candidates=args.candidates,
                            negatives=1 if variant.startswith("dpo") else args.negatives,
                            seq=args.prompt_len + args.completion_len)
        row = result_row(model=args.model, variant=variant, shapes=shapes, work=work, times=times,
                         compile_s=info["compile_seconds"], peak_tflops=args.peak_tflops, memory=device_memory(),
                         compiled_mem=compiled_memory(compiled))
        row["hlo"] = hlo_census(compiled)
        row["loss"] = float(metrics["loss"])
        row["finite"] = bool(metrics["finite"])
        rows.append(row)
        log(format_table([row]).splitlines()[-1])
        on_row(rows)
        del compiled
    return rows


# ----------------------------------------------------------------------------------------------
# Results, tables, the comparison with the anchor

ANCHOR_STEP = {"dpo": "dpo", "dpo_precomputed_ref": "dpo_precomputed_ref", "mcpo": "mcpo_naive"}


def result_row(*, model: str, variant: str, shapes: Shapes, work: Work, times: Sequence[float],
               compile_s: float | None, peak_tflops: float, memory: dict,
               compiled_mem: dict | None) -> dict[str, Any]:
    med = statistics.median(times)
    flops = work.flops(shapes)
    return {
        "model": model,
        "step": variant,
        "seq": work.seq,
        "median_s": med,
        "times": list(times),
        "compile_s": compile_s,
        "trained_tokens": work.trained_tokens,
        "forward_tokens": work.forward_tokens,
        "model_flops": flops,
        "trained_tok_per_s": work.trained_tokens / med,
        "model_tflops": flops / med / 1e12,
        "mfu": flops / med / (peak_tflops * 1e12),
        "peak_mem_gb": memory.get("peak_bytes_in_use_gb"),
        "compiled_mem": compiled_mem,
        "target_s": TARGETS_S.get((model, variant)),
    }


def ratios(runs: Sequence[dict]) -> dict[str, float]:
    """MC-PO / DPO step-time ratios on the same prompts (the issue's 2.28 → ≤ 1.8 row)."""
    by = {r["step"]: r["median_s"] for r in runs if "median_s" in r}
    out = {}
    if "mcpo" in by and "dpo" in by:
        out["mcpo_over_dpo_reference_in_step"] = by["mcpo"] / by["dpo"]
    if "mcpo_precomputed_ref" in by and "dpo_precomputed_ref" in by:
        out["mcpo_over_dpo_precomputed_ref"] = by["mcpo_precomputed_ref"] / by["dpo_precomputed_ref"]
    return out


def _gb(x) -> str:
    return f"{x:8.1f}" if isinstance(x, (int, float)) else f"{'n/a':>8s}"


def format_table(runs: Sequence[dict]) -> str:
    lines = ["model       step                   s/step  compile s  trained tok/s  TFLOP/s    MFU  peak GB  step GB"]
    for r in runs:
        if "error" in r:
            lines.append(f"{r['model']:11s} {r['step']:21s} ERROR {r['error'][:200]}")
            continue
        step_gb = (r.get("compiled_mem") or {}).get("total_gb")
        comp = r.get("compile_s")
        lines.append(
            f"{r['model']:11s} {r['step']:21s} {r['median_s']:7.3f} {comp if comp is not None else float('nan'):10.1f} "
            f"{r['trained_tok_per_s']:14.0f} {r['model_tflops']:8.1f} {r['mfu']:6.3f} {_gb(r.get('peak_mem_gb'))} "
            f"{_gb(step_gb)}"
        )
    return "\n".join(lines)


def _num(x, fmt: str, width: int) -> str:
    return f"{x:{width}{fmt}}" if isinstance(x, (int, float)) else f"{'-':>{width}s}"


def format_comparison(anchor: dict, benches: Sequence[dict]) -> str:
    """Side by side with the PyTorch anchor: same model shapes, same step, same FLOP accounting."""
    arows = {(r["model"], r["step"]): r for r in anchor.get("runs", []) if "step" in r}
    lines = []
    for bench in benches:
        env = bench.get("environment", {})
        lines.append(f"# {bench.get('config', {}).get('model', '?')}: {env.get('device_kind', '?')}, "
                     f"jax {env.get('jax_version', '?')}")
    lines.append(f"{'model':10s} {'step':21s} {'torch s':>8s} {'jax s':>8s} {'speedup':>8s} {'torch MFU':>9s} "
                 f"{'jax MFU':>8s} {'torch GB':>8s} {'jax GB':>8s} {'target s':>8s}  met")
    for bench in benches:
        cfg = bench.get("config", {})
        tags = (["remat"] if cfg.get("remat") else []) + (["f32w"] if cfg.get("param_dtype") in ("f32", "float32") else [])
        for r in bench.get("runs", []):
            name = "+".join([r["model"], *tags])
            if "error" in r:
                lines.append(f"{name:10s} {r['step']:21s} jax ERROR {r['error'][:160]}")
                continue
            a = arows.get((r["model"], ANCHOR_STEP.get(r["step"], r["step"]))) or {}
            target = r.get("target_s")
            speedup = a["median_s"] / r["median_s"] if "median_s" in a else None
            lines.append(
                f"{name:10s} {r['step']:21s} {_num(a.get('median_s'), '.3f', 8)} {r['median_s']:8.3f} "
                f"{_num(speedup, '.2f', 8)} {_num(a.get('mfu'), '.3f', 9)} {r['mfu']:8.3f} "
                f"{_num(a.get('peak_mem_gb'), '.1f', 8)} {_num(r.get('peak_mem_gb'), '.1f', 8)} "
                f"{_num(target, '.2f', 8)}  " + ("-" if not target else "yes" if r["median_s"] <= target else "NO")
            )
        for k, v in bench.get("ratios", {}).items():
            lines.append(f"{'+'.join([cfg.get('model', '?'), *tags]):10s} jax {k}: {v:.2f}")
    amodels = {r["model"] for r in anchor.get("runs", []) if "step" in r}
    for m in sorted(amodels):
        by = {r["step"]: r["median_s"] for r in anchor["runs"] if r.get("model") == m and "step" in r}
        if "mcpo_naive" in by and "dpo" in by:
            lines.append(f"{m:10s} torch mcpo/dpo (reference in step): {by['mcpo_naive'] / by['dpo']:.2f}")
    peak = anchor.get("peak", {})
    if peak:
        lines.append("matmul peak: " + ", ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in peak.items() if "tflops" in k or "version" in k))
    if anchor.get("partial"):
        lines.append("(the anchor run was cut short: its rows come from its log)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mcpo_jax.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="preset (tiny, llama-1b, llama-8b, mistral-7b) or a folder/"
                   "config.json (shapes only: the weights are random)")
    p.add_argument("--prompts", type=int, default=8, help="B: prompts per step (DPO: B pairs)")
    p.add_argument("--candidates", type=int, default=5, help="L: candidates per prompt besides y0")
    p.add_argument("--negatives", type=int, default=1, help="M: negatives the MC kernel selects")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--completion-len", type=int, default=768)
    p.add_argument("--reference", choices=("online", "precomputed", "both"), default="both",
                   help="which variants: reference forward in the step, precomputed, or both (default)")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="compute dtype")
    p.add_argument("--param-dtype", default=None, choices=sorted(DTYPES),
                   help="weight and optimizer-state dtype (default: --dtype, as the anchor's pure-bf16 AdamW)")
    p.add_argument("--remat", default=False, type=lambda s: {"false": False, "true": True}.get(s.lower(), s),
                   help="false, true or a policy name of models.REMAT_POLICIES")
    p.add_argument("--chunk-size", type=int, default=None, help="log-prob chunk over the sequence")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS_H200_BF16,
                   help="the MFU denominator (default: H200 dense bf16, 989)")
    p.add_argument("--generation", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the sampler (prefill + decode tokens/s)")
    p.add_argument("--gen-batch", type=int, default=None, help="default: prompts x (1 + candidates)")
    p.add_argument("--gen-new-tokens", type=int, default=None, help="default: min(completion-len, 128)")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--compare", nargs="+", metavar=("ANCHOR_JSON", "BENCH_JSON"), default=None,
                   help="only print the side-by-side table of the anchor's JSON and bench JSONs, then exit")
    args = p.parse_args(argv)
    if args.compare is None:
        for name in ("prompts", "candidates", "negatives", "prompt_len", "completion_len", "steps"):
            if getattr(args, name) < 1:
                p.error(f"--{name.replace('_', '-')} must be >= 1")
        if args.negatives > args.candidates:
            p.error(f"--negatives ({args.negatives}) cannot exceed --candidates ({args.candidates})")
        if args.steps < 5:
            print(f"# note: median of {args.steps} steps (the issue asks for >= 5)", file=sys.stderr)
    return args


def selected_variants(args) -> list[str]:
    if args.variants:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown --variants {unknown}; known: {list(VARIANTS)}")
        return names
    if args.reference == "online":
        return ["dpo", "mcpo"]
    if args.reference == "precomputed":
        return ["dpo_precomputed_ref", "mcpo_precomputed_ref"]
    return list(VARIANTS)


def environment() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "host": platform.node(),
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
        # compile_s is a cache load when this cache already holds the step (a rerun on a warm machine)
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.compare:
        anchor = json.load(open(args.compare[0]))
        benches = [json.load(open(p)) for p in args.compare[1:]]
        print(format_comparison(anchor, benches))
        return None
    if args.chunk_size is None:
        from mcpo_jax import logprobs

        args.chunk_size = logprobs.DEFAULT_CHUNK_SIZE
    config = model_config(args.model)
    args.model_source = args.model
    if os.path.exists(args.model):  # a folder or config.json: name the rows after it
        args.model = os.path.basename(os.path.normpath(args.model).removesuffix("/config.json")).removesuffix(".json")
    shapes = Shapes.of(config)
    variants = selected_variants(args)
    env = environment()
    seq = args.prompt_len + args.completion_len
    print(f"# {env['device_kind']} ({env['backend']}, jax {env['jax_version']}); {args.model}: "
          f"{args.prompts} prompts x (1 + {args.candidates}) x {seq} tokens, M = {args.negatives}, {args.dtype}")
    if env["backend"] == "cpu":
        print(f"# CPU run: MFU is against {args.peak_tflops:g} TFLOP/s and means nothing here; "
              "peak GB is n/a (the CPU keeps no allocator statistics), step GB is XLA's memory_analysis")
    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "compare"},
        "environment": env,
        "flop_model": {
            "matmul_params": matmul_params(shapes),
            "train_flops_per_token": flops_per_token(shapes, seq, train=True),
            "forward_flops_per_token": flops_per_token(shapes, seq, train=False),
            "peak_tflops": args.peak_tflops,
        },
        "runs": [],
        "ratios": {},
    }

    def save():
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1, default=str)

    def on_row(rows):
        result["runs"], result["ratios"] = list(rows), ratios(rows)
        save()

    rows = run_steps(args, config, shapes, variants, on_row=on_row)
    on_row(rows)
    if args.generation:
        gen_batch = args.gen_batch or args.prompts * (1 + args.candidates)
        new_tokens = args.gen_new_tokens or min(args.completion_len, 128)
        try:
            model = init_model(config, dtype=DTYPES[args.dtype], param_dtype=DTYPES[args.param_dtype or args.dtype],
                               remat=False, seed=args.seed)
            result["generation"] = generation_throughput(
                model, batch_size=gen_batch, prompt_len=args.prompt_len, new_tokens=new_tokens,
                vocab_size=config.vocab_size, warmup=1, steps=3, seed=args.seed)
        except Exception as e:  # noqa: BLE001 - the step numbers above stand on their own
            result["generation"] = {"error": repr(e)[:500]}
        save()
    print()
    print(format_table(rows))
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.2f}")
    gen = result.get("generation")
    if gen:
        if "prefill_tok_per_s" in gen:
            print(f"generation ({gen['batch_size']} x {gen['prompt_len']} prompt + {gen['new_tokens']} new): "
                  f"prefill {gen['prefill_tok_per_s']:.0f} tok/s, decode "
                  + (f"{gen['decode_tok_per_s']:.0f} tok/s" if gen["decode_tok_per_s"] else "n/a (too few tokens)"))
        else:
            print(f"generation: {gen}")
    if args.json:
        save()
        print(f"# wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
