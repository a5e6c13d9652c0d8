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
reported. FLOPs follow the PyTorch anchor's formula (`scripts/anchor/torch_dpo_anchor.py`): 6N + 12·l·d·s
per trained token, 2N + 4·l·d·s per forward-only token, N = the matmul parameters of the layers plus the LM
head. `mfu` credits the work the step executes (`audit.executed_work`: the passes its StepConfig runs,
the LM head on completion positions only), so it never counts work that was skipped;
`anchor_equivalent_mfu` credits the anchor's work for the same variant over the same time (the figure to
set beside the anchor's own MFU: a step that skips work shows a higher anchor-equivalent MFU).

`--compile-only` compiles each variant from abstract shapes (no weights; on a CPU at the real shapes) and
prints the program audit (`mcpo_jax.audit`): HLO FLOPs with loop trip counts, the formula FLOPs of the work
executed and of the anchor's, compiled memory, saved activations per token per layer, passes over the
layers, the largest vocab-sized buffers, attention calls (cuDNN on a GPU).

`--compare ANCHOR.json BENCH.json...` prints the side-by-side table against the anchor and exits.

Imports stay light on purpose: this module and what it imports must run on a GPU image that has
jax, flax, optax and transformers but not grain, ml_collections or datasets.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
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

from mcpo_jax import audit
from mcpo_jax import batch as batch_lib
from mcpo_jax.models.config import DTYPES
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


# Shapes, matmul_params, flops_per_token, Work: the anchor's accounting, in mcpo_jax.audit (one home).
Shapes, matmul_params, flops_per_token, Work = audit.Shapes, audit.matmul_params, audit.flops_per_token, audit.Work


def variant_work(variant: str, *, prompts: int, candidates: int, negatives: int, seq: int) -> Work:
    """The anchor's work for a variant (what the PyTorch anchor credits; `audit.anchor_work`)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown bench variant {variant!r}; known: {VARIANTS}")
    return audit.anchor_work(variant, prompts=prompts, candidates=candidates, negatives=negatives, seq=seq)


def executed_work(variant: str, cfg, *, prompts: int, candidates: int, prompt_len: int, completion_len: int) -> Work:
    """The work the step executes for a variant under its StepConfig (pruned passes, LM head window)."""
    columns = 2 if variant.startswith("dpo") else 1 + candidates
    return audit.executed_work(cfg, prompts=prompts, columns=columns, prompt_len=prompt_len,
                               completion_len=completion_len)


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

    Random token ids (never zeros: constant inputs can run faster than real data), the same prompt in every
    row of an example (as the tokenizer lays them out), every sequence exactly `prompt_len + completion_len`
    long like the anchor's. Token t of a
    completion is predicted from position t - 1, so loss_mask is 1 from position prompt_len on.
    """
    rng = np.random.default_rng(seed)
    b, c, t = prompts, 1 + candidates, prompt_len + completion_len
    input_ids = rng.integers(1, vocab_size, size=(b, c, t), dtype=np.int32)
    input_ids[:, 1:, :prompt_len] = input_ids[:, :1, :prompt_len]  # the rows of an example share its prompt
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


FAST_CPU_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
DTYPE_ALIASES = {"bf16": "bfloat16", "f32": "float32"}  # besides the config's names (models.DTYPES)


def _dtypes(args) -> tuple[Any, Any]:
    """(compute dtype, parameter dtype) of the command line."""
    from mcpo_jax.models import dtype_of

    return (dtype_of(DTYPE_ALIASES.get(args.dtype, args.dtype)),
            dtype_of(DTYPE_ALIASES.get(args.param_dtype or args.dtype, args.param_dtype or args.dtype)))


# ----------------------------------------------------------------------------------------------
# The steps under test: the trainer's own (mcpo_jax.training.step)


def step_config(variant: str, *, negatives: int, beta: float, chunk_size: int | None = None,
                completion_len: int | None = None, prompt_len: int | None = None, reuse_prompt: bool = False):
    """The trainer's StepConfig for a bench variant.

    DPO runs on the (y0, y1) pairs with the `fixed` sampler (y1 is the designated rejected), as
    TRL's DPO does; MC-PO samples `negatives` of the L candidates with the MC kernel. `completion_len` sets
    the LM-head window (`StepConfig.completion_window`) as the trainer does from `max_completion_length`,
    `prompt_len` the shared prompt (`StepConfig.prompt_window`) as it does from `max_prompt_length`.
    """
    from mcpo_jax.training import step as step_lib

    reference = "precomputed" if variant.endswith("precomputed_ref") else "online"
    extra = {} if chunk_size is None else {"logprob_chunk_size": chunk_size}
    if completion_len is not None:  # every completion is `completion_len` long: the LM head runs on those only
        extra["completion_window"] = completion_len
    if prompt_len is not None:  # the prompt encoded once per example (`StepConfig.prompt_window`)
        extra["prompt_window"] = prompt_len
    extra["reuse_prompt_encoding"] = reuse_prompt
    if variant.startswith("dpo"):
        return step_lib.StepConfig(objective="dpo", sampler="fixed", num_negatives=1, beta=beta, reference=reference,
                                   **extra)
    return step_lib.StepConfig(objective="mcpo", sampler="mc", num_negatives=negatives, beta=beta,
                               reference=reference, **extra)


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
    from mcpo_jax.training import program as program_lib
    from mcpo_jax.training import refcache
    from mcpo_jax.training import state as state_lib
    from mcpo_jax.training import step as step_lib

    dtype, param_dtype = _dtypes(args)
    t0 = time.perf_counter()
    mesh = sharding.make_mesh(1, -1, 1)
    model = init_model(config, dtype=dtype, param_dtype=param_dtype, remat=model_remat(args), seed=args.seed,
                       mesh=mesh)
    tx, schedule = step_lib.make_optimizer(learning_rate=args.lr, total_steps=1_000_000, warmup_ratio=0.0,
                                           decay="constant")

    def program(variant):
        cfg = step_config(variant, negatives=args.negatives, beta=args.beta, chunk_size=args.chunk_size,
                          completion_len=args.completion_len,
                          prompt_len=args.prompt_len if args.share_prompt else None,
                          reuse_prompt=args.reuse_prompt)
        return program_lib.TrainProgram(model, cfg, tx, schedule, mesh=mesh, **auto_remat(args))

    first = program(variants[0])
    graphdef, params, rest = state_lib.split_model(model)
    params = jax.device_put(params, first.param_shardings)
    # The reference: a frozen copy of the initial policy, as the trainer keeps it.
    ref_params = jax.tree.map(jnp.copy, params)
    state = first.init_state(params, args.seed)
    del params
    jax.block_until_ready((state, ref_params))
    init_s = time.perf_counter() - t0
    log(f"# model {args.model}: {format_count(state_lib.count_params(state['params']))} parameters "
        f"({args.param_dtype or args.dtype} weights, {args.dtype} compute), built in {init_s:.1f}s")

    np_batch = make_batch(prompts=args.prompts, candidates=args.candidates, prompt_len=args.prompt_len,
                          completion_len=args.completion_len, vocab_size=config.vocab_size, seed=args.seed)

    def device_batch(b: dict[str, np.ndarray]):
        """[A=1, b, ...]: one micro-batch, the trainer's keys, placed as the trainer places them."""
        return sharding.global_batch({k: v[None] for k, v in batch_lib.step_arrays(b).items()}, mesh, batch_axis=1)

    if any(v.endswith("precomputed_ref") for v in variants):
        # Reference log-probs of every candidate, once and outside the timed steps, with the
        # trainer's own precompute function (training.refcache), as `reference: precomputed` does.
        logps_fn = refcache.make_logps_fn(graphdef, rest, mesh, args.chunk_size)
        np_batch["ref_logps"] = np.asarray(
            logps_fn(ref_params, np_batch["input_ids"], np_batch["attention_mask"], np_batch["loss_mask"]))
    if all(v.endswith("precomputed_ref") for v in variants):
        ref_params = None  # as the trainer does: the reference weights are freed once their log-probs exist

    rows = []
    log(format_table([]))
    for variant in variants:
        prog = program(variant)
        cfg = prog.cfg
        host = pair_batch(np_batch) if variant.startswith("dpo") else dict(np_batch)
        if cfg.reference != "precomputed":
            host.pop("ref_logps", None)
        batch = device_batch(host)
        ref = ref_params if cfg.reference == "online" else None
        try:
            compiled = prog.compiled(batch)
            info = next(iter(prog.compile_info.values()))

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
        work = executed_work(variant, cfg, prompts=args.prompts, candidates=args.candidates,
                             prompt_len=args.prompt_len, completion_len=args.completion_len)
        anchor = variant_work(variant, prompts=args.prompts, candidates=args.candidates,
                              negatives=1 if variant.startswith("dpo") else args.negatives,
                              seq=args.prompt_len + args.completion_len)
        row = result_row(model=args.model, variant=variant, shapes=shapes, work=work, times=times,
                         compile_s=info["compile_seconds"], peak_tflops=args.peak_tflops, memory=device_memory(),
                         compiled_mem=audit.memory_report(compiled, unit=2.0**30), anchor=anchor)
        row["head_positions"] = getattr(cfg, "completion_window", None) or work.seq
        row["hlo"] = hlo_census(compiled)
        fallbacks = models.decoder.attention_fallbacks()
        if fallbacks:  # some attention (e.g. the shared prompt's masked one) ran through XLA instead of cuDNN
            row["attention_fallbacks"] = fallbacks
        if (jax.default_backend() == "gpu" and args.dtype in ("bf16", "bfloat16")
                and (fallbacks or not (row["hlo"] or {}).get("cudnn_fmha_calls"))):
            row["error"] = ("attention fell back to XLA: " + "; ".join(f["reason"] for f in fallbacks)
                            if fallbacks else "no cuDNN attention call in the GPU program: attention fell back to XLA")
            log(f"# {variant}: {row['error']}")
        row["loss"] = float(metrics["loss"])
        row["finite"] = bool(metrics["finite"])
        rows.append(row)
        log(format_table([row]).splitlines()[-1])
        on_row(rows)
        del compiled
    return rows


# ----------------------------------------------------------------------------------------------
# The compile-only audit (no parameter allocated; runs on the CPU at the real shapes)


def batch_shapes(variant: str, *, prompts: int, candidates: int, seq: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{key: (shape, dtype)} of the step's one-micro-batch batch for a variant ([A=1, b, ...])."""
    c = 2 if variant.startswith("dpo") else 1 + candidates
    return batch_lib.abstract_shapes((1, prompts), columns=c, length=seq,
                                     precomputed_ref=variant.endswith("precomputed_ref"))


def abstract_model(config, args, platform: str = "cpu"):
    """The model as shapes only; for a CPU target attention is the audit's opaque stand-in (cuDNN's residuals,
    FLOPs by formula), for a GPU or TPU target the real kernel the model picks there (cuDNN, Pallas splash)."""
    from flax import nnx

    from mcpo_jax import models

    impl = audit.opaque_attention if platform == "cpu" else None
    dtype, param_dtype = _dtypes(args)
    return nnx.eval_shape(lambda: models.Transformer(config, dtype=dtype, param_dtype=param_dtype,
                                                     remat=model_remat(args),
                                                     attention_impl=impl, rngs=nnx.Rngs(0)))


def model_remat(args):
    """--remat for the model: under "auto" the train program chooses per batch shape (`TrainProgram`)."""
    return "minimal" if args.remat == "auto" else args.remat


def auto_remat(args, budget: int | None = None) -> dict:
    """TrainProgram's remat="auto" arguments for --remat auto (budget: --memory-budget-gb, else `budget`, else the
    devices' own limit)."""
    if args.remat != "auto":
        return {}
    chosen = int(args.memory_budget_gb * 1e9) if args.memory_budget_gb else budget
    return {"remat": "auto", "memory_budget": chosen}


def compile_only(args, config, shapes: Shapes, variants: Sequence[str], log=print) -> list[dict[str, Any]]:
    """Compile each variant's train step from abstract shapes and read the program (`mcpo_jax.audit`)."""
    from mcpo_jax import sharding, targets
    from mcpo_jax.training import program as program_lib
    from mcpo_jax.training import step as step_lib

    target = targets.get(args.target)
    devices = targets.devices(target)
    model = abstract_model(config, args, target.platform)
    saved = audit.saved_bytes_per_token_per_layer(model)
    mesh = sharding.make_mesh(1, -1, 1, devices=devices)
    if target.platform != "cpu":
        log(f"# target {target.name}: {len(devices)} x {target.device_kind}, mesh fsdp={len(devices)}; "
            f"{target.usable_bytes / 1e9:.1f} GB usable per device")
    tx, schedule = step_lib.make_optimizer(learning_rate=args.lr, total_steps=1_000_000, warmup_ratio=0.0,
                                           decay="constant")
    seq = args.prompt_len + args.completion_len
    rows = []
    log(f"# saved activations of one layer's backward: {saved['bytes_per_token'] / 1e3:.1f} kB per token "
        f"(remat={args.remat})")
    for variant in variants:
        cfg = step_config(variant, negatives=args.negatives, beta=args.beta, chunk_size=args.chunk_size,
                          completion_len=args.completion_len,
                          prompt_len=args.prompt_len if args.share_prompt else None,
                          reuse_prompt=args.reuse_prompt)
        program = program_lib.TrainProgram(model, cfg, tx, schedule, mesh=mesh,
                                           **auto_remat(args, target.usable_bytes))
        t0 = time.perf_counter()
        try:
            compiled = program.compiled(program.abstract_batch(
                batch_shapes(variant, prompts=args.prompts, candidates=args.candidates, seq=seq)))
        except Exception as e:  # noqa: BLE001 - a TPU compiler refusing the program for its size: a row that says so
            if not (program_lib.is_out_of_memory(e) or isinstance(e, program_lib.DoesNotFit)):
                raise
            rows.append({"model": args.model, "step": variant, "target": target.name, "devices": len(devices),
                         "hbm_gb": target.hbm_bytes / 1e9, "usable_gb": target.usable_bytes / 1e9, "fits": False,
                         "error": program_lib.first_line(e)})
            log(f"{args.model:11s} {variant:21s} does not fit on {target.name}: {rows[-1]['error']}")
            continue
        compile_s = time.perf_counter() - t0
        report = audit.hlo_report(compiled.as_text(), num_layers=shapes.num_hidden_layers,
                                  vocab_size=shapes.vocab_size)
        # the SPMD program is one device's: the step's FLOPs are every device's (replicated work shows as excess)
        report["hlo_flops_per_device"] = report["hlo_flops"]
        report["hlo_flops"] *= len(devices)
        negatives = 1 if variant.startswith("dpo") else args.negatives
        work = executed_work(variant, cfg, prompts=args.prompts, candidates=args.candidates,
                             prompt_len=args.prompt_len, completion_len=args.completion_len)
        anchor = variant_work(variant, prompts=args.prompts, candidates=args.candidates, negatives=negatives, seq=seq)
        row = audit.summarize(report, formula_flops=work.flops(shapes), anchor_flops=anchor.flops(shapes))
        memory = audit.memory_report(compiled)
        info = next(iter(program.compile_info.values()))
        if "remat" in info:  # remat="auto": the choice, and what the device keeps on the host
            row.update(remat=info["remat"], host_temp_gb=info.get("host_temp_size_in_bytes", 0) / 1e9)
        row.update(model=args.model, step=variant, compile_s=compile_s, compiled_mem=memory,
                   saved_bytes_per_token_per_layer=saved["bytes_per_token"], executed_work=dataclasses.asdict(work),
                   target=target.name, devices=len(devices))
        if memory is not None:
            row["per_device"] = {k: memory[k] for k in ("arguments_gb", "temp_gb", "total_gb")}
        if target.hbm_bytes is not None:
            row.update(hbm_gb=target.hbm_bytes / 1e9, usable_gb=target.usable_bytes / 1e9,
                       fits=memory is not None and memory["total_gb"] * 1e9 <= target.usable_bytes)
        fallbacks = audit_fallbacks()
        if target.platform == "gpu" and args.dtype in ("bf16", "bfloat16") and (
                fallbacks or not report["attention"]["cudnn_calls"]):
            row["error"] = ("attention fell back to XLA: " + "; ".join(f["reason"] for f in fallbacks) if fallbacks
                            else "no cuDNN attention call in the GPU program (attention fell back to XLA)")
        if target.platform == "tpu" and (fallbacks or not report["attention"].get("pallas_calls")):
            row["error"] = ("attention fell back to XLA: " + "; ".join(f["reason"] for f in fallbacks) if fallbacks
                            else "no splash attention kernel in the TPU program (attention fell back to XLA)")
        rows.append(row)
        log(format_audit([row]).splitlines()[-1])
        del compiled
    return rows


def audit_fallbacks() -> list[dict[str, str]]:
    """The cuDNN-attention fallbacks recorded by the model so far (`models.decoder.attention_fallbacks`)."""
    from mcpo_jax import models

    return models.decoder.attention_fallbacks()


def format_audit(rows: Sequence[dict]) -> str:
    lines = [f"{'model':11s} {'step':21s} {'HLO FLOPs':>10s} {'formula':>10s} {'ratio':>6s} {'anchor':>10s} "
             f"{'GB':>6s} {'passes':>6s} {'attn f/b':>8s}  largest vocab buffer"]
    for r in rows:
        if "hlo_flops" not in r:  # refused by the compiler
            lines.append(f"{r['model']:11s} {r['step']:21s} ERROR {r.get('error', '')}")
            continue
        vb = r["vocab_buffers"][0] if r["vocab_buffers"] else None
        mem = (r.get("compiled_mem") or {}).get("total_gb")
        lines.append(
            f"{r['model']:11s} {r['step']:21s} {r['hlo_flops']:10.4g} {r['formula_flops']:10.4g} "
            f"{r['hlo_over_formula']:6.3f} {r['anchor_flops']:10.4g} {_num(mem, '.1f', 6)} {r['layer_passes']:6d} "
            f"{r['attention']['forward_calls']:>3d}/{r['attention']['backward_calls']:<4d}  "
            + (f"{vb['dtype']}{vb['shape']} {vb['gb']:.2f} GB" if vb else "-")
            + (f"  {'fits' if r['fits'] else 'DOES NOT FIT'} ({r['usable_gb']:.1f} GB usable)" if "fits" in r
               else "")
            + (f"  ERROR {r['error']}" if "error" in r else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Results, tables, the comparison with the anchor

ANCHOR_STEP = {"dpo": "dpo", "dpo_precomputed_ref": "dpo_precomputed_ref", "mcpo": "mcpo_naive"}


def result_row(*, model: str, variant: str, shapes: Shapes, work: Work, times: Sequence[float],
               compile_s: float | None, peak_tflops: float, memory: dict,
               compiled_mem: dict | None, anchor: Work | None = None) -> dict[str, Any]:
    """`work`: what the step executes (MFU and TFLOP/s credit only that); `anchor`: the anchor's work for the
    same variant, credited over the same time (the anchor-equivalent MFU, comparable with the anchor's own)."""
    med = statistics.median(times)
    flops = work.flops(shapes)
    anchor_flops = (anchor or work).flops(shapes)
    return {
        "model": model,
        "step": variant,
        "seq": work.seq,
        "median_s": med,
        "times": list(times),
        "compile_s": compile_s,
        # tokens the model ran, with and without gradient (a shared prompt counted once per example and pass)
        "trained_tokens": work.trained_tokens + work.prompt_trained_tokens,
        "forward_tokens": work.forward_tokens + work.prompt_forward_tokens,
        "model_flops": flops,
        "trained_tok_per_s": (work.trained_tokens + work.prompt_trained_tokens) / med,
        "model_tflops": flops / med / 1e12,
        "mfu": flops / med / (peak_tflops * 1e12),
        "anchor_flops": anchor_flops,
        "anchor_equivalent_mfu": anchor_flops / med / (peak_tflops * 1e12),
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


def format_count(n: int) -> str:
    """1.236 B / 106.5 K / 12.3 M: parameters in the unit that reads."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}" if unit == "B" else f"{n / scale:.1f} {unit}"
    return str(n)


def format_table(runs: Sequence[dict]) -> str:
    lines = ["model       step                   s/step  compile s  trained tok/s  TFLOP/s    MFU  anchor-eq MFU  peak GB  "
             "step GB"]
    for r in runs:
        if "error" in r and "median_s" not in r:
            lines.append(f"{r['model']:11s} {r['step']:21s} ERROR {r['error'][:200]}")
            continue
        step_gb = (r.get("compiled_mem") or {}).get("total_gb")
        comp = r.get("compile_s")
        lines.append(
            f"{r['model']:11s} {r['step']:21s} {r['median_s']:7.3f} {comp if comp is not None else float('nan'):10.1f} "
            f"{r['trained_tok_per_s']:14.0f} {r['model_tflops']:8.1f} {r['mfu']:6.3f} "
            f"{r.get('anchor_equivalent_mfu', r['mfu']):14.3f} {_gb(r.get('peak_mem_gb'))} "
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
                 f"{'jax MFU':>8s} {'jax MFU*':>8s} {'torch GB':>8s} {'jax GB':>8s} {'target s':>8s}  met")
    for bench in benches:
        cfg = bench.get("config", {})
        remat = cfg.get("remat", "minimal")  # the bench's default policy carries no tag
        tags = ([] if remat == "minimal" else [f"remat={remat}"]) + (
            ["f32w"] if cfg.get("param_dtype") in ("f32", "float32") else [])
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
                f"{_num(r.get('anchor_equivalent_mfu'), '.3f', 8)} "
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
    lines.append("jax MFU: the work the step executes; jax MFU*: the anchor's work for the same step over the same "
                 "time (anchor-equivalent, the figure to set beside torch MFU)")
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
    p.add_argument("--prompts", type=int, default=None, help="B: prompts per step (DPO: B pairs); default 8 "
                   "(tiny: 2)")
    p.add_argument("--candidates", type=int, default=5, help="L: candidates per prompt besides y0")
    p.add_argument("--negatives", type=int, default=1, help="M: negatives the MC kernel selects")
    p.add_argument("--prompt-len", type=int, default=None, help="default 256 (tiny: 16)")
    p.add_argument("--completion-len", type=int, default=None, help="default 768 (tiny: 48)")
    p.add_argument("--reference", choices=("online", "precomputed", "both"), default="both",
                   help="which variants: reference forward in the step, precomputed, or both (default)")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    dtypes = sorted((*DTYPES, *DTYPE_ALIASES))
    p.add_argument("--dtype", default=None, choices=dtypes, help="compute dtype (default bf16; tiny: f32, "
                   "the CPU's fast path)")
    p.add_argument("--param-dtype", default=None, choices=dtypes,
                   help="weight and optimizer-state dtype (default: --dtype, as the anchor's pure-bf16 AdamW)")
    p.add_argument("--remat", default="minimal", type=lambda s: {"false": False, "true": True}.get(s.lower(), s),
                   help="false, true, a policy name of models.REMAT_POLICIES (default minimal: the backward keeps "
                        "only what it needs, no matmul recomputed; see docs/performance.md section 0), or auto (the "
                        "trainer's remat='auto': the cheapest of minimal, minimal_offload, true that fits)")
    p.add_argument("--memory-budget-gb", type=float, default=0.0,
                   help="--remat auto: GB per device the step may use (default: the target's usable HBM, or the "
                        "device's own limit)")
    p.add_argument("--chunk-size", type=int, default=None, help="log-prob chunk over the sequence")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after compilation (default 2; tiny: 1)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS_H200_BF16,
                   help="the MFU denominator (default: H200 dense bf16, 989)")
    p.add_argument("--generation", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the sampler (prefill + decode tokens/s)")
    p.add_argument("--gen-batch", type=int, default=None, help="default: prompts x (1 + candidates)")
    p.add_argument("--gen-new-tokens", type=int, default=None, help="default: min(completion-len, 128)")
    p.add_argument("--share-prompt", action=argparse.BooleanOptionalAction, default=True,
                   help="encode each prompt once per example (the trainer's default, share_prompt=True); "
                        "--no-share-prompt encodes every row whole")
    p.add_argument("--reuse-prompt", action=argparse.BooleanOptionalAction, default=False,
                   help="the policy's prompt encoded once for its no-gradient and gradient passes (the trainer's "
                        "reuse_prompt_encoding=True; off by default): fewer FLOPs, one more gradient-sized stack")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--compile-only", action="store_true",
                   help="compile each variant from abstract shapes (no parameter allocated, runs on a CPU at the real "
                        "shapes) and print the program audit: HLO FLOPs, formula FLOPs, memory, passes, buffers")
    p.add_argument("--target", default="cpu",
                   help="--compile-only: the devices to compile for, from this host (mcpo_jax.targets: h100, h200, "
                        "h100x8, h200x8, tpu-v5e-4, tpu-v5e-8, tpu-v4-8, tpu-v5p-8, tpu-v5p-16, tpu-v5p-64, tpu-v6e-4, "
                        "tpu-v6e-8); rows gain per-device memory against the target's HBM. Default cpu: the CPU audit")
    p.add_argument("--compare", nargs="+", metavar=("ANCHOR_JSON", "BENCH_JSON"), default=None,
                   help="only print the side-by-side table of the anchor's JSON and bench JSONs, then exit")
    args = p.parse_args(argv)
    # The tiny preset is for a quick look on a CPU: small shapes unless given (the whole run well under a minute).
    small = args.model == "tiny"
    for name, big, tiny in (("prompts", 8, 2), ("prompt_len", 256, 16), ("completion_len", 768, 48),
                            ("dtype", "bf16", "f32"), ("warmup", 2, 1)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if small else big)
    if small and args.gen_new_tokens is None:
        args.gen_new_tokens = 8
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


def _cpu_only_jax() -> bool:
    """Whether this process's JAX can only run on the CPU (asked before the backend starts)."""
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        return True
    plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu")
    return not any(importlib.util.find_spec(name) for name in plugins)


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
    if args.target != "cpu" and not args.compile_only:
        raise SystemExit("--target needs --compile-only (a timed run measures the devices it runs on)")
    if args.compile_only:
        from mcpo_jax import targets

        try:
            target = targets.get(args.target)
        except targets.TargetError as e:
            raise SystemExit(f"error: {e}") from None
        if target.platform == "cpu":
            audit.cpu_audit_flags()  # before the backend starts: see mcpo_jax.audit (a CPU pass, CPU targets only)
        elif not targets.prepare_environment(target):
            raise SystemExit(f"error: compile target {target.name}: jax already started on another platform")
    elif args.model == "tiny" and _cpu_only_jax() and "XLA_FLAGS" not in os.environ:
        # a smoke run on a CPU: XLA's cheap CPU code generation halves the compile times, which dominate
        os.environ["XLA_FLAGS"] = FAST_CPU_COMPILE
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

    if args.compile_only:
        print(f"# compile-only audit for target {args.target} (host backend {jax.default_backend()}, "
              f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
        rows = compile_only(args, config, shapes, variants)
        result["runs"] = rows
        save()
        if args.json:
            print(f"# wrote {args.json}")
        _fail_without_cudnn(rows)
        return result
    rows = run_steps(args, config, shapes, variants, on_row=on_row)
    on_row(rows)
    if args.generation:
        gen_batch = args.gen_batch or args.prompts * (1 + args.candidates)
        new_tokens = args.gen_new_tokens or min(args.completion_len, 128)
        try:
            dtype, param_dtype = _dtypes(args)
            model = init_model(config, dtype=dtype, param_dtype=param_dtype, remat=False, seed=args.seed)
            result["generation"] = generation_throughput(
                model, batch_size=gen_batch, prompt_len=args.prompt_len, new_tokens=new_tokens,
                vocab_size=config.vocab_size, warmup=1, steps=3, seed=args.seed)
        except Exception as e:  # noqa: BLE001 - the step numbers above stand on their own
            result["generation"] = {"error": repr(e)[:500]}
        save()
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
    _fail_without_cudnn(rows)
    return result


def _fail_without_cudnn(rows):
    """A GPU run in half precision whose program has no cuDNN attention call measured the wrong program."""
    bad = [r["step"] for r in rows if "no cuDNN attention" in r.get("error", "")]
    if bad:
        from mcpo_jax.models import decoder

        raise SystemExit(f"FAILED: no cuDNN attention in {bad}; fallbacks: {decoder.attention_fallbacks()}")


if __name__ == "__main__":
    main()
