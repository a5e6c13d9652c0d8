"""The compiled-program audit: what a train step costs, read from the program XLA compiles, on any machine.

Much of a step's cost is fixed at compile time, and XLA compiles the same program on the CPU at the real
shapes in seconds, from abstract shapes (no parameter is allocated). From `compiled.as_text()` and
`compiled.memory_analysis()` this module reads:

- **HLO FLOPs**: every `dot` (fused or not) × 2 × output size × contracted size, multiplied by how many times
  its computation runs (each `while` loop's `known_trip_count`; XLA's `cost_analysis()` counts a loop body
  once); plus attention by formula where attention is an opaque custom call (cuDNN on a GPU; on the CPU the
  stand-in `opaque_attention` below: forward 4·T·S·H·hd per sequence, backward twice that, as the anchor counts);
- **passes over the layer stack**: the while loops whose trip count is the number of layers;
- **compiled memory**: arguments + outputs + temporaries − donated aliases;
- **the largest vocab-sized buffers**, the **number of attention calls** (cuDNN on a GPU);
- **saved activation bytes per token per layer**: what the backward of one layer body keeps (the remat
  policy applied), from JAX's own residual list.

Reading memory on the CPU needs `--xla_disable_hlo_passes=while-loop-invariant-code-motion`: the CPU
pipeline hoists float32 copies of whole bf16 weight stacks out of the layer loop (1B: 46 → 82 GB), which
the GPU pipeline does not do. `cpu_audit_flags()` sets it before the backend starts.

The FLOP accounting of the PyTorch anchor (`../shared/bench/torch_dpo_anchor.py`) lives here too (`Shapes`,
`flops_per_token`, `Work`, `anchor_work`), with `executed_work`: the same formula credited only for the work a
`StepConfig` makes the step execute (pruned passes, LM head on completion positions).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DISABLED_CPU_PASS = "while-loop-invariant-code-motion"
STANDIN_FWD, STANDIN_BWD = "audit_attention_fwd", "audit_attention_bwd"


def cpu_audit_flags() -> bool:
    """Add `--xla_disable_hlo_passes=while-loop-invariant-code-motion` to XLA_FLAGS. Effective only before
    the backend starts (returns False, changing nothing, when it already has)."""
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return DISABLED_CPU_PASS in os.environ.get("XLA_FLAGS", "")
    flags = os.environ.get("XLA_FLAGS", "")
    if DISABLED_CPU_PASS not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_disable_hlo_passes={DISABLED_CPU_PASS}".strip()
    return True


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

    @property
    def head_params(self) -> int:
        return self.hidden_size * self.vocab_size


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
    """Tokens one step pushes through the model, by kind of pass.

    `head_trained_tokens` / `head_forward_tokens`: positions the LM head runs on (None: every token, as the
    anchor's formula assumes); the step that runs the head on completion positions only gives fewer."""

    trained_tokens: int  # forward + backward
    forward_tokens: int  # forward only (policy and reference log-probs without gradient)
    seq: int
    head_trained_tokens: int | None = None
    head_forward_tokens: int | None = None
    # The shared prompt (`StepConfig.prompt_window`): prompt tokens encoded once per example and pass, attending
    # over `prompt_seq` keys, no LM head; the tokens above then count the completions' (attending over `seq` =
    # prompt + completion keys) and the rows of passes encoded whole.
    prompt_trained_tokens: int = 0
    prompt_forward_tokens: int = 0
    prompt_seq: int = 0

    def flops(self, s: Shapes) -> float:
        total = self.trained_tokens * flops_per_token(s, self.seq, train=True) + self.forward_tokens * flops_per_token(
            s, self.seq, train=False
        )
        if self.head_trained_tokens is not None:
            total -= 6 * s.head_params * (self.trained_tokens - self.head_trained_tokens)
        if self.head_forward_tokens is not None:
            total -= 2 * s.head_params * (self.forward_tokens - self.head_forward_tokens)
        if self.prompt_trained_tokens or self.prompt_forward_tokens:
            total += self.prompt_trained_tokens * (flops_per_token(s, self.prompt_seq, train=True) - 6 * s.head_params)
            total += self.prompt_forward_tokens * (flops_per_token(s, self.prompt_seq, train=False)
                                                   - 2 * s.head_params)
        return float(total)


def anchor_work(variant: str, *, prompts: int, candidates: int, negatives: int, seq: int) -> Work:
    """The anchor's work for each bench variant on `prompts` prompts of 1 + `candidates` sequences.

    DPO: 2 sequences per prompt trained, their reference forward when it is in the step.
    MC-PO (the anchor's `mcpo_naive`): policy (and reference, when in the step) forward without gradient
    over all 1 + L, then forward + backward on y0 and the M selected.
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
    raise ValueError(f"unknown bench variant {variant!r}")


def pass_rows(cfg, columns: int) -> dict[str, int]:
    """Rows per example of each model pass the step executes under `cfg` (a `training.step.StepConfig`)."""
    policy = 0
    if cfg.selection_reads_policy(columns):
        policy = columns - 1 if cfg.prune_passes and not cfg.include_preferred else columns
    reference = columns if (cfg.reference == "online" and not cfg.is_sft) else 0
    trained = 1 if cfg.is_sft else 1 + cfg.num_negatives
    return {"policy_no_grad": policy, "reference_no_grad": reference, "trained": trained}


def executed_work(cfg, *, prompts: int, columns: int, prompt_len: int, completion_len: int) -> Work:
    """The anchor's formula credited for the work the step really executes: its passes (`pass_rows`) and, when
    `cfg.completion_window` is set, the LM head on that many positions per row only."""
    rows = pass_rows(cfg, columns)
    seq = prompt_len + completion_len
    fwd_rows = rows["policy_no_grad"] + rows["reference_no_grad"]
    window = getattr(cfg, "completion_window", None)
    if getattr(cfg, "prompt_window", None) and window:
        from mcpo_jax.logprobs import shared_prompt_windows

        # per pass: the prompt once per example (no LM head) and the rows' completions, or the rows whole
        tokens = dict(trained_tokens=0, forward_tokens=0, head_trained_tokens=0, head_forward_tokens=0,
                      prompt_trained_tokens=0, prompt_forward_tokens=0)
        windows = {}
        for name, kind, k in (("trained", "trained", rows["trained"]), ("policy", "forward", rows["policy_no_grad"]),
                              ("reference", "forward", rows["reference_no_grad"])):
            shared = shared_prompt_windows(cfg.prompt_window, window, k, seq) if k else None
            if shared is not None and sum(shared) != seq:
                raise ValueError(f"the formula needs prompt_len + completion_len = the windows {shared}")
            windows[name] = shared
            p, w = shared or (0, seq)
            tokens[f"{kind}_tokens"] += prompts * k * w
            tokens[f"head_{kind}_tokens"] += prompts * k * min(w, window, seq - 1)
            # the policy's no-gradient pass reuses the gradient pass's prompt encoding (`step.prompt_reuse`)
            reused = (name == "policy" and shared is not None and shared == windows["trained"]
                      and getattr(cfg, "reuse_prompt_encoding", False))
            tokens[f"prompt_{kind}_tokens"] += prompts * p if k and not reused else 0
        if tokens["prompt_trained_tokens"] or tokens["prompt_forward_tokens"]:
            return Work(seq=seq, prompt_seq=min(int(cfg.prompt_window), seq - 1), **tokens)
    work = Work(trained_tokens=prompts * rows["trained"] * seq, forward_tokens=prompts * fwd_rows * seq, seq=seq)
    if window:
        head = min(window, seq - 1)
        work = dataclasses.replace(work, head_trained_tokens=prompts * rows["trained"] * head,
                                   head_forward_tokens=prompts * fwd_rows * head)
    return work


# ----------------------------------------------------------------------------------------------
# The opaque attention stand-in (compile-only: never executed)


def _attention_standin(q, k, v, lengths, scale, window):
    del scale, window

    @jax.custom_vjp
    def attend(q, k, v):
        return _fwd(q, k, v)[0]

    def _fwd(q, k, v):
        b, t, h, _ = q.shape
        with jax.named_scope(STANDIN_FWD):
            out, stats = jax.pure_callback(
                _never_run,
                (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)),
                q, k, v, *([] if lengths is None else [lengths]))
        return out, (q, k, v, out, stats)

    def _bwd(res, g):
        q, k, v, out, stats = res
        with jax.named_scope(STANDIN_BWD):
            return jax.pure_callback(
                _never_run, (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                             jax.ShapeDtypeStruct(v.shape, v.dtype)), q, k, v, out, stats, g)

    attend.defvjp(_fwd, _bwd)
    return attend(q, k, v)


def _never_run(*_):
    raise RuntimeError("the audit's attention stand-in is for compilation only")


def opaque_attention(q, k, v, lengths, scale, window):
    """Attention as an opaque call that keeps cuDNN flash attention's residuals (q, k, v, the output and
    float32 softmax statistics [B, H, T]); for `Transformer(attention_impl=opaque_attention)` in
    compile-only audits (its FLOPs are added by formula)."""
    return _attention_standin(q, k, v, lengths, scale, window)


# ----------------------------------------------------------------------------------------------
# Reading the optimized HLO

_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|c64|c128|f8\w*)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) \(")
_INSTR = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = ")
_CALLEE = re.compile(r"\b(calls|body|to_apply|condition)=%([\w.\-]+)")
_CALLEE_LIST = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(text)]


def _nbytes(dtype: str, dims: tuple[int, ...]) -> int:
    return _BYTES.get(dtype, 1) * int(np.prod(dims, dtype=np.int64)) if dims else _BYTES.get(dtype, 1)


@dataclasses.dataclass
class _Instr:
    name: str
    result: str  # the result type text
    opcode: str
    rest: str  # operands and attributes


def _split_instr(line: str) -> _Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    body = line[m.end():]
    if body.startswith("("):  # tuple result: up to the matching parenthesis
        depth = 0
        for i, ch in enumerate(body):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        result, tail = body[: i + 1], body[i + 1:].lstrip()
    else:
        result, _, tail = body.partition(" ")
    opcode, _, rest = tail.partition("(")
    return _Instr(m.group(1), result, opcode.strip(), rest)


def parse_hlo(text: str) -> tuple[dict[str, list[_Instr]], str]:
    """{computation name: instructions}, and the entry computation's name."""
    comps: dict[str, list[_Instr]] = {}
    entry, current = None, None
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h and line.rstrip().endswith("{"):
            current = h.group(2)
            comps[current] = []
            if h.group(1):
                entry = current
            continue
        if current is not None:
            ins = _split_instr(line)
            if ins is not None:
                comps[current].append(ins)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def multiplicities(comps: dict[str, list[_Instr]], entry: str) -> tuple[dict[str, int], list[dict]]:
    """How many times each computation runs per execution (while bodies × their known trip count), and the
    while loops met (trip count, multiplicity of the loop instruction)."""
    mult: dict[str, int] = defaultdict(int)
    loops = []

    def visit(name: str, times: int):
        mult[name] += times
        for ins in comps.get(name, ()):
            trip = 1
            if ins.opcode == "while":
                m = _TRIP.search(ins.rest)
                trip = int(m.group(1)) if m else 1
                loops.append({"name": ins.name, "trip_count": int(m.group(1)) if m else None, "times": times})
            for kind, callee in _CALLEE.findall(ins.rest):
                if kind == "condition":
                    continue
                visit(callee, times * (trip if kind == "body" else 1))
            for _, names in _CALLEE_LIST.findall(ins.rest):
                for callee in re.findall(r"%([\w.\-]+)", names):
                    visit(callee, times)

    visit(entry, 1)
    return dict(mult), loops


def _dot_flops(ins: _Instr, symbols: dict[str, tuple[int, ...]]) -> int:
    out = _shapes(ins.result)[0][1]
    operands = re.findall(r"%([\w.\-]+)", ins.rest.split(")", 1)[0])
    lhs = symbols.get(operands[0]) if operands else None
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.rest)
    contracted = 1
    if lhs is not None and m:
        for d in (int(x) for x in m.group(1).split(",") if x):
            contracted *= lhs[d]
    return 2 * int(np.prod(out, dtype=np.int64)) * contracted


def _keys(ins: _Instr, symbols: dict[str, tuple[int, ...]], default: int) -> int:
    """S, the key length of an attention call: its second operand is k [B, S, K, hd] (the stand-in's and
    cuDNN's layout); `default` (T) when the operand's shape is not known."""
    operands = re.findall(r"%([\w.\-]+)", ins.rest.split(")", 1)[0])
    shape = symbols.get(operands[1]) if len(operands) > 1 else None
    return shape[1] if shape is not None and len(shape) == 4 else default


def hlo_report(text: str, *, num_layers: int | None = None, vocab_size: int | None = None) -> dict[str, Any]:
    """FLOPs, loops, attention calls and vocab-sized buffers of an optimized HLO module's text."""
    comps, entry = parse_hlo(text)
    mult, loops = multiplicities(comps, entry)
    fused = {callee for instrs in comps.values() for ins in instrs if ins.opcode == "fusion"
             for kind, callee in _CALLEE.findall(ins.rest) if kind == "calls"}
    dot_flops = 0
    attn = {"forward_calls": 0, "backward_calls": 0, "cudnn_calls": 0, "flops": 0}
    buffers: dict[tuple[str, tuple[int, ...]], int] = defaultdict(int)
    for name, instrs in comps.items():
        times = mult.get(name, 0)
        if not times:
            continue
        symbols = {}
        for ins in instrs:
            shapes = _shapes(ins.result)
            if shapes:
                symbols[ins.name] = shapes[0][1]
        for ins in instrs:
            if ins.opcode == "dot":
                dot_flops += times * _dot_flops(ins, symbols)
            elif ins.opcode == "custom-call":
                out = _shapes(ins.result)
                if STANDIN_FWD in ins.rest or "__cudnn$fmhaSoftmax" in ins.rest and "Backward" not in ins.rest:
                    b, t, h, hd = out[0][1]
                    attn["forward_calls"] += times
                    attn["flops"] += times * 4 * b * t * _keys(ins, symbols, t) * h * hd
                elif STANDIN_BWD in ins.rest or "__cudnn$fmhaSoftmaxBackward" in ins.rest:
                    b, t, h, hd = out[0][1]
                    attn["backward_calls"] += times
                    attn["flops"] += times * 8 * b * t * _keys(ins, symbols, t) * h * hd
                if "__cudnn$fmha" in ins.rest:
                    attn["cudnn_calls"] += times
            if vocab_size and name not in fused and ins.opcode not in ("parameter", "get-tuple-element", "bitcast",
                                                                          "tuple"):
                for dt, dims in _shapes(ins.result):
                    if vocab_size in dims:
                        buffers[(dt, dims)] += 1
    layer_passes = sum(lp["times"] for lp in loops if num_layers and lp["trip_count"] == num_layers)
    biggest = sorted(buffers.items(), key=lambda kv: -_nbytes(*kv[0]))[:4]
    return {
        "dot_flops": float(dot_flops),
        "attention": attn,
        "hlo_flops": float(dot_flops + attn["flops"]),
        "while_loops": [lp for lp in loops],
        "layer_passes": layer_passes,
        "vocab_buffers": [{"dtype": dt, "shape": list(dims), "gb": _nbytes(dt, dims) / 1e9, "instructions": n}
                          for (dt, dims), n in biggest],
    }


def memory_report(compiled, *, unit: float = 1e9) -> dict[str, float] | None:
    """XLA's accounting of a compiled executable in units of `unit` bytes (GB = 1e9 by default; the timed
    bench reports GiB, 2**30): arguments + outputs + temporaries − donated aliases = what that program needs on
    the device."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if ma is None:
        return None
    total = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes
    return {"arguments_gb": ma.argument_size_in_bytes / unit, "outputs_gb": ma.output_size_in_bytes / unit,
            "temp_gb": ma.temp_size_in_bytes / unit, "aliased_gb": ma.alias_size_in_bytes / unit,
            "total_gb": total / unit}


# ----------------------------------------------------------------------------------------------
# What one layer's backward keeps


def saved_bytes_per_token_per_layer(model, *, tokens: int = 97) -> dict[str, Any]:
    """Bytes the backward of one layer body keeps per token (remat policy applied), from JAX's residual list
    of the layer as the model scans it, on one row of `tokens` tokens (a prime: no weight dimension equals it). Residuals without a token axis
    (weights) and constants (RoPE tables, computed once for all layers) are left out: not per-layer activations."""
    from jax._src import ad_checkpoint

    c = model.config
    from flax import nnx

    layer = {name: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for name, v in vars(model.layers).items()
             if isinstance(v, nnx.Param)}
    x = jax.ShapeDtypeStruct((1, tokens, c.hidden_size), model.dtype)
    positions = jnp.arange(tokens, dtype=jnp.int32)[None]

    def one_layer(x, p):
        out, _ = body(x, p)
        return jnp.sum(out.astype(jnp.float32))

    x0 = jnp.zeros(x.shape, x.dtype)
    p0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), layer)
    body = model.layer_body(None, positions)  # RoPE's cos / sin: computed once for all layers, not per layer
    residuals = ad_checkpoint.saved_residuals(one_layer, x0, p0)
    kept, total = [], 0
    # The attention output is one buffer whether listed as attention's own residual or as `attn_out`.
    named_out = any("named 'attn_out'" in why for _, why in residuals)
    for aval, why in residuals:
        if tokens not in aval.shape or why.startswith(("from the argument p", "from a constant")):
            continue
        if named_out and "pure_callback" in why and aval.dtype != jnp.float32:
            continue
        nbytes = int(np.prod(aval.shape)) * jnp.dtype(aval.dtype).itemsize
        total += nbytes
        kept.append({"shape": list(aval.shape), "dtype": str(aval.dtype), "per_token": nbytes / tokens,
                     "what": why.split("\n")[0][:120]})
    return {"bytes_per_token": total / tokens, "residuals": kept}


def summarize(report: dict, *, formula_flops: float, anchor_flops: float | None = None) -> dict[str, Any]:
    out = dict(report)
    out["formula_flops"] = formula_flops
    out["hlo_over_formula"] = report["hlo_flops"] / formula_flops if formula_flops else math.nan
    if anchor_flops is not None:
        out["anchor_flops"] = anchor_flops
    return out
