"""The compiled-program audit: what a train step costs, read from the program XLA compiles, on any machine.

Much of a step's cost is fixed at compile time, and XLA compiles the same program on the CPU at the real
shapes in seconds, from abstract shapes (no parameter is allocated). From `compiled.as_text()` and
`compiled.memory_analysis()` this module reads:

- **HLO FLOPs**: every `dot` and `convolution` (fused or not; the TPU compiler writes matmuls as convolutions)
  × 2 × output size × contracted size, multiplied by how many times its computation runs (each `while` loop's
  `known_trip_count`, or where the compiler gives none, as the TPU's does, the count read from the loop's
  condition; XLA's `cost_analysis()` counts a loop body once); plus attention by formula where attention is an
  opaque kernel (cuDNN on a GPU, splash attention's Pallas kernels on a TPU; on the CPU the stand-in
  `opaque_attention` below: forward 4·T·S·H·hd per sequence, backward twice that, as the anchor counts);
- **passes over the layer stack**: the while loops whose trip count is the number of layers;
- **collectives**: per kind, how many run and the bytes they move, and the largest with the loop they sit in;
- **compiled memory**: arguments + outputs + temporaries − donated aliases;
- **the largest vocab-sized buffers**, the **number of attention calls** (cuDNN, Pallas);
- **saved activation bytes per token per layer**: what the backward of one layer body keeps (the remat
  policy applied), from JAX's own residual list.

The program can be compiled for a GPU or TPU this host does not have (`mcpo_jax.targets`); what `hlo_report`
reads is then that device's program, per device.

Reading memory on the CPU needs `--xla_disable_hlo_passes=while-loop-invariant-code-motion`: the CPU
pipeline hoists float32 copies of whole bf16 weight stacks out of the layer loop (1B: 46 → 82 GB), which
the GPU pipeline does not do. `cpu_audit_flags()` sets it before the backend starts.

The FLOP accounting of the PyTorch anchor (`scripts/anchor/torch_dpo_anchor.py`) lives here too (`Shapes`,
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
    """Rows per example of each model pass the step executes under `cfg` (a `training.step.StepConfig`): its
    `PassPlan`'s, which do not depend on the length."""
    return cfg.pass_plan(columns, 0, rope_type="default").rows()


def executed_work(cfg, *, prompts: int, columns: int, prompt_len: int, completion_len: int,
                  rope_type: str = "default") -> Work:
    """The anchor's formula credited for the work the step really executes under `cfg` (a
    `training.step.StepConfig`): the passes of its `PassPlan` and, when `cfg.completion_window` is set, the LM
    head on that many positions per row only. `rope_type`: the model's (dynamic NTK RoPE reuses no prompt)."""
    seq = prompt_len + completion_len
    plan = cfg.pass_plan(columns, seq, rope_type=rope_type)
    rows = plan.rows()
    fwd_rows = rows["policy_no_grad"] + rows["reference_no_grad"]
    window = plan.completion_window
    if plan.prompt_window and window:
        # per pass: the prompt once per example (no LM head) and the rows' completions, or the rows whole
        tokens = dict(trained_tokens=0, forward_tokens=0, head_trained_tokens=0, head_forward_tokens=0,
                      prompt_trained_tokens=0, prompt_forward_tokens=0)
        # the policy's no-gradient pass reuses the gradient pass's prompt encoding: its prompt is not counted again
        for kind, k, shared, reused in (
                ("trained", plan.trained_rows, plan.trained_windows, False),
                ("forward", plan.policy_rows, plan.policy_windows, plan.reuses_prompt_encoding),
                ("forward", plan.reference_rows, plan.reference_windows, False)):
            if shared is not None and sum(shared) != seq:
                raise ValueError(f"the formula needs prompt_len + completion_len = the windows {shared}")
            p, w = shared or (0, seq)
            tokens[f"{kind}_tokens"] += prompts * k * w
            tokens[f"head_{kind}_tokens"] += prompts * k * min(w, window, seq - 1)
            tokens[f"prompt_{kind}_tokens"] += prompts * p if k and not reused else 0
        if tokens["prompt_trained_tokens"] or tokens["prompt_forward_tokens"]:
            return Work(seq=seq, prompt_seq=min(int(plan.prompt_window), seq - 1), **tokens)
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
_INSTR = re.compile(r"^\s+(ROOT )?%([\w.\-]+) = ")
_CALLEE = re.compile(r"\b(calls|body|to_apply|condition)=%([\w.\-]+)")
_CALLEE_LIST = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_NAME = re.compile(r"%([\w.\-]+)")
_DIRECTION = re.compile(r"direction=(LT|LE|GT|GE|NE|EQ)")
_FLIPPED = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE", "NE": "NE", "EQ": "EQ"}
_DIM_LABELS = re.compile(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_SCORES = re.compile(r'"intermediate_tensor_shape":\s*\{[^{}]*?"dimensions":\s*\[([^\]]*)\]')
_SPLASH = re.compile(r"splash_(?:mha|mqa)_(fwd|dq|dkv)\w*")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(text)]


def _nbytes(dtype: str, dims: tuple[int, ...]) -> int:
    return _BYTES.get(dtype, 1) * int(np.prod(dims, dtype=np.int64)) if dims else _BYTES.get(dtype, 1)


@dataclasses.dataclass
class _Instr:
    name: str
    result: str  # the result type text
    opcode: str
    rest: str  # operands and attributes (continuation lines included)
    root: bool = False

    @property
    def operands(self) -> list[str]:
        return _NAME.findall(self.rest.split(")", 1)[0])


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
    return _Instr(m.group(2), result, opcode.strip(), rest, root=bool(m.group(1)))


def parse_hlo(text: str) -> tuple[dict[str, list[_Instr]], str]:
    """{computation name: instructions}, and the entry computation's name. An instruction printed over several
    lines (a Pallas kernel's `frontend_attributes` hold newlines) is one instruction."""
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
        if current is None:
            continue
        last = comps[current][-1] if comps[current] else None
        if line.strip() == "}" and (last is None or last.rest.count("{") <= last.rest.count("}")):
            current = None  # the computation's end, not the end of an attribute that runs over lines
            continue
        ins = _split_instr(line)
        if ins is not None:
            comps[current].append(ins)
        elif last is not None:
            last.rest += "\n" + line
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


# ----- while-loop trip counts read from the condition

_Index = dict[str, dict[str, _Instr]]


def _root(index: _Index, comp: str) -> _Instr | None:
    instrs = list(index.get(comp, {}).values())
    return next((i for i in instrs if i.root), instrs[-1] if instrs else None)


def _callee(ins: _Instr) -> str | None:
    m = re.search(r"\bcalls=%([\w.\-]+)", ins.rest)
    return m.group(1) if m else None


def _follow(index: _Index, comp: str, name: str, env: dict, depth: int):
    """Through copies, bitcasts, converts, fusions and bound fusion parameters to the instruction that computes
    `name`: (computation, instruction, env), env binding a fused computation's parameters to the caller's
    operands; None past a dead end."""
    while depth < 64:
        depth += 1
        ins = index.get(comp, {}).get(name)
        if ins is None:
            return None
        if ins.opcode in ("copy", "bitcast", "convert", "reshape") and ins.operands:
            name = ins.operands[0]
        elif ins.opcode == "parameter" and env:
            k = int(re.match(r"\s*(\d+)", ins.rest).group(1))
            if k not in env:
                return None
            comp, name, env = env[k]
        elif ins.opcode == "fusion" and _callee(ins):
            inner = _callee(ins)
            root = _root(index, inner)
            if root is None:
                return None
            env = {k: (comp, o, env) for k, o in enumerate(ins.operands)}
            comp, name = inner, root.name
        else:
            return comp, ins, env
    return None


def _affine(index: _Index, comp: str, name: str, env: dict, depth: int = 0) -> tuple[int | None, int] | None:
    """An integer scalar of a loop's condition or body as (i, c): element i of the loop tuple plus c, or the
    constant c (i None); None when it is neither."""
    found = _follow(index, comp, name, env, depth)
    if found is None or depth > 64:
        return None
    comp, ins, env = found
    if ins.opcode == "constant":
        m = re.match(r"\s*(-?\d+)\)", ins.rest)
        return (None, int(m.group(1))) if m else None
    if ins.opcode == "get-tuple-element":
        tup = _follow(index, comp, ins.operands[0], env, depth + 1)
        if tup is not None and tup[1].opcode == "parameter" and not tup[2]:  # the loop computation's own parameter
            return int(re.search(r"\bindex=(\d+)", ins.rest).group(1)), 0
        return None
    if ins.opcode in ("add", "subtract") and len(ins.operands) == 2:
        a, b = (_affine(index, comp, o, env, depth + 1) for o in ins.operands)
        if a is None or b is None or (a[0] is not None and b[0] is not None):
            return None
        if ins.opcode == "subtract":
            if b[0] is not None:
                return None
            b = (None, -b[1])
        return (a[0] if a[0] is not None else b[0]), a[1] + b[1]
    return None


def _iterations(start: int, step: int, direction: str, bound: int) -> int | None:
    """How many times `counter OP bound` holds for counter = start, start + step, ..."""
    if direction == "LT" and step > 0:
        return max(0, -(-(bound - start) // step))
    if direction == "LE" and step > 0:
        return max(0, (bound - start) // step + 1)
    if direction == "GT" and step < 0:
        return max(0, -(-(start - bound) // -step))
    if direction == "GE" and step < 0:
        return max(0, (start - bound) // -step + 1)
    if direction == "NE" and step and (bound - start) % step == 0 and (bound - start) // step >= 0:
        return (bound - start) // step
    return None


def _condition_trip_count(index: _Index, caller: str, loop: _Instr) -> int | None:
    """The trip count of a while loop whose backend config does not give it (the TPU compiler's): its condition
    compares a counter (element i of the loop tuple: a constant at init, + a constant step in the body) with a
    bound (a constant, or a tuple element the body passes through unchanged)."""
    cond = re.search(r"\bcondition=%([\w.\-]+)", loop.rest)
    body = re.search(r"\bbody=%([\w.\-]+)", loop.rest)
    cond_root, body_root = (_root(index, m.group(1)) if m else None for m in (cond, body))
    if cond_root is None or body_root is None or body_root.opcode != "tuple" or not loop.operands:
        return None
    compare = _follow(index, cond.group(1), cond_root.name, {}, 0)
    init = _follow(index, caller, loop.operands[0], {}, 0)
    if compare is None or compare[1].opcode != "compare" or init is None or init[1].opcode != "tuple":
        return None
    c_comp, c_ins, c_env = compare
    direction = _DIRECTION.search(c_ins.rest).group(1)
    lhs, rhs = (_affine(index, c_comp, o, c_env) for o in c_ins.operands[:2])
    init_ops, body_ops = init[1].operands, body_root.operands

    def initial(i):
        v = _affine(index, init[0], init_ops[i], init[2]) if i < len(init_ops) else None
        return v[1] if v is not None and v[0] is None else None

    def update(i):
        return _affine(index, body.group(1), body_ops[i], {}) if i < len(body_ops) else None

    def constant(v):
        if v is None:
            return None
        if v[0] is None:
            return v[1]
        start = initial(v[0])
        return start + v[1] if update(v[0]) == (v[0], 0) and start is not None else None

    for counter, bound, d in ((lhs, rhs, direction), (rhs, lhs, _FLIPPED[direction])):
        if counter is None or counter[0] is None:
            continue
        start, step, limit = initial(counter[0]), update(counter[0]), constant(bound)
        if start is None or limit is None or step is None or step[0] != counter[0] or not step[1]:
            continue
        return _iterations(start, step[1], d, limit - counter[1])
    return None


def _walk(comps: dict[str, list[_Instr]], entry: str):
    """How many times each computation runs, the while loops met, and the innermost loop around each
    computation (None outside loops)."""
    index = {name: {ins.name: ins for ins in instrs} for name, instrs in comps.items()}
    mult: dict[str, int] = defaultdict(int)
    loops: list[dict] = []
    enclosing: dict[str, dict | None] = {}

    def visit(name: str, times: int, loop: dict | None):
        mult[name] += times
        enclosing.setdefault(name, loop)
        for ins in comps.get(name, ()):
            trip, inner = 1, loop
            if ins.opcode == "while":
                m = _TRIP.search(ins.rest)
                n, source = (int(m.group(1)), "backend_config") if m else (_condition_trip_count(index, name, ins),
                                                                           "condition")
                inner = {"name": ins.name, "trip_count": n, "trip_count_from": source if n is not None else None,
                         "times": times}
                loops.append(inner)
                trip = n if n is not None else 1
            if ins.opcode in ("async-done", "async-update"):
                continue  # the same wrapped computation as its async-start
            for kind, callee in _CALLEE.findall(ins.rest):
                if kind != "condition":
                    visit(callee, times * (trip if kind == "body" else 1), inner if kind == "body" else loop)
            for _, names in _CALLEE_LIST.findall(ins.rest):
                for callee in _NAME.findall(names):
                    visit(callee, times, loop)

    visit(entry, 1, None)
    return dict(mult), loops, enclosing


def multiplicities(comps: dict[str, list[_Instr]], entry: str) -> tuple[dict[str, int], list[dict]]:
    """How many times each computation runs per execution (while bodies × their trip count: the backend
    config's `known_trip_count`, else read from the loop's condition), and the while loops met (trip count,
    where it came from, multiplicity of the loop instruction). A loop whose count cannot be read counts once,
    with `trip_count` None."""
    mult, loops, _ = _walk(comps, entry)
    return mult, loops


# ----- FLOPs of one instruction


def _dot_flops(ins: _Instr, symbols: dict[str, tuple[int, ...]]) -> int:
    out = _shapes(ins.result)[0][1]
    operands = ins.operands
    lhs = symbols.get(operands[0]) if operands else None
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.rest)
    contracted = 1
    if lhs is not None and m:
        for d in (int(x) for x in m.group(1).split(",") if x):
            contracted *= lhs[d]
    return 2 * int(np.prod(out, dtype=np.int64)) * contracted


def _window(rest: str, spatial: int) -> list[dict[str, int]]:
    """Per spatial dimension: size, stride, padding, lhs / rhs dilation of a convolution's `window={...}`."""
    dims = [dict(size=1, stride=1, lo=0, hi=0, lhs_dilate=1, rhs_dilate=1) for _ in range(spatial)]
    m = re.search(r"\bwindow=\{([^}]*)\}", rest)
    for field in (m.group(1).split() if m else ()):
        key, _, value = field.partition("=")
        for d, v in zip(dims, value.split("x")):
            if key == "pad":
                d["lo"], d["hi"] = (int(x) for x in v.split("_"))
            elif key in d:
                d[key] = int(v)
    return dims


def _valid_taps(size: int, out: int, w: dict[str, int]) -> int:
    """Σ over the output positions of one spatial dimension of the window taps that land on an input element
    (not on padding, nor on a hole of lhs dilation)."""
    dilated = (size - 1) * w["lhs_dilate"] + 1
    first = -w["lo"]
    last = (out - 1) * w["stride"] + (w["size"] - 1) * w["rhs_dilate"] - w["lo"]
    if w["lhs_dilate"] == 1 and first >= 0 and last < dilated:
        return out * w["size"]
    positions = np.arange(out, dtype=np.int64) * w["stride"] - w["lo"]
    total = 0
    for t in range(w["size"]):
        x = positions + t * w["rhs_dilate"]
        total += int(np.count_nonzero((x >= 0) & (x < dilated) & (x % w["lhs_dilate"] == 0)))
    return total


def _conv_flops(ins: _Instr, symbols: dict[str, tuple[int, ...]]) -> int:
    """2 × multiply-adds of a `convolution`: for each output element, the kernel's input features (per group)
    × the window taps that read an input element. The TPU compiler writes every matmul as a convolution,
    batch dimensions as spatial ones with lhs dilation (`window={size=B stride=B-1 lhs_dilate=B}`: one real
    tap of B per output), which counting only the taps that read data gets right."""
    m = _DIM_LABELS.search(ins.rest)
    operands = ins.operands
    if not m or len(operands) < 2:
        return 0
    lhs_labels, rhs_labels, out_labels = m.groups()
    out = _shapes(ins.result)[0][1]
    lhs, rhs = symbols.get(operands[0]), symbols.get(operands[1])
    if rhs is None or len(rhs) != len(rhs_labels) or len(out) != len(out_labels):
        return 0
    spatial = sum(ch.isdigit() for ch in out_labels)
    window = _window(ins.rest, spatial)
    taps, out_spatial = 1, 1
    for d in range(spatial):
        w, n_out = window[d], out[out_labels.index(str(d))]
        if "window=" not in ins.rest:
            w["size"] = rhs[rhs_labels.index(str(d))]
        n_in = lhs[lhs_labels.index(str(d))] if lhs is not None and len(lhs) == len(lhs_labels) else None
        taps *= _valid_taps(n_in, n_out, w) if n_in is not None else n_out * w["size"]
        out_spatial *= n_out
    per_position = int(np.prod(out, dtype=np.int64)) // max(out_spatial, 1)
    return 2 * per_position * rhs[rhs_labels.index("i")] * taps


# ----- attention kernels


def _attribute_block(rest: str, key: str) -> str | None:
    """The text inside `key={...}` (braces balanced)."""
    i = rest.find(key + "={")
    if i < 0:
        return None
    start, depth = i + len(key) + 2, 1
    for j in range(start, len(rest)):
        depth += (rest[j] == "{") - (rest[j] == "}")
        if depth == 0:
            return rest[start:j]
    return None


def _operand_shapes(ins: _Instr, types: dict[str, list]) -> list[tuple[str, tuple[int, ...]]]:
    """The operands' types: from `operand_layout_constraints` where the call has them, else their definitions."""
    block = _attribute_block(ins.rest, "operand_layout_constraints")
    if block is not None:
        return _shapes(block)
    return [t for o in ins.operands for t in types.get(o, [])[:1]]


def _keys(ins: _Instr, symbols: dict[str, tuple[int, ...]], default: int) -> int:
    """S, the key length of an attention call: its second operand is k [B, S, K, hd] (the stand-in's and
    cuDNN's layout); `default` (T) when the operand's shape is not known."""
    operands = ins.operands
    shape = symbols.get(operands[1]) if len(operands) > 1 else None
    return shape[1] if shape is not None and len(shape) == 4 else default


def _attention(ins: _Instr, symbols: dict, types: dict) -> tuple[str, str, int] | None:
    """(kernel, "forward" | "backward" | "", FLOPs) of an attention custom call; None for any other instruction.

    Forward 4·B·T·S·H·hd, backward 8·B·T·S·H·hd (H the query heads, S the key length), as the anchor counts.
    cuDNN (`__cudnn$fmha*`: Softmax, ScaleBiasSoftmax (a mask arrives as a bias), their Dropout forms, F8, and
    each one's Backward): B·H·T·S from the backend config's `intermediate_tensor_shape` (the scores), hd from
    q. Splash attention (Pallas `tpu_custom_call`s named `splash_{mha,mqa}_{fwd,dq,dkv}...`): from its first
    float operands q [..., T, hd] and k [..., S, hd]; the dkv kernel carries the whole backward (it computes dq
    as well when the backward is fused), the dq kernel none."""
    if ins.opcode != "custom-call":
        return None
    target = _TARGET.search(ins.rest)
    target = target.group(1) if target else None
    if STANDIN_FWD in ins.rest or STANDIN_BWD in ins.rest:
        b, t, h, hd = _shapes(ins.result)[0][1]
        phase = "forward" if STANDIN_FWD in ins.rest else "backward"
        return "opaque_attention", phase, (4 if phase == "forward" else 8) * b * t * _keys(ins, symbols, t) * h * hd
    if target and target.startswith("__cudnn$fmha"):
        phase = "backward" if "Backward" in target else "forward"
        q = _operand_shapes(ins, types)[0][1]
        scores = _SCORES.search(ins.rest)
        if scores:
            b, h, t, s = (int(x.strip().strip('"')) for x in scores.group(1).split(","))
            hd = int(np.prod(q, dtype=np.int64)) // (b * h * t)
        else:  # q [B, T, H, hd], k [B, S, K, hd]
            (b, t, h, hd), s = q, _keys(ins, symbols, q[1])
        return target, phase, (4 if phase == "forward" else 8) * b * h * t * s * hd
    if target == "tpu_custom_call":
        splash = _SPLASH.search(ins.rest) or _SPLASH.search(ins.name)
        if not splash:
            return re.sub(r"\.\d+$", "", ins.name), "", 0
        floats = [s for s in _operand_shapes(ins, types) if s[0].startswith(("bf16", "f16", "f32", "f8"))]
        q, k = floats[0][1], floats[1][1]
        seq_minor = re.search(r'k_layout\\?"\s*:\s*(\d)', ins.rest)
        keys = k[-1] if seq_minor and seq_minor.group(1) == "2" else k[-2]
        flops = {"fwd": 4, "dkv": 8, "dq": 0}[splash.group(1)] * int(np.prod(q, dtype=np.int64)) * keys
        return splash.group(0), {"fwd": "forward", "dkv": "backward", "dq": ""}[splash.group(1)], flops
    return None


# ----- collectives


def _tuple_elements(text: str) -> list[str]:
    """The top-level elements of a tuple type `(a, (b, c), d)`; [text] for a non-tuple."""
    if not text.startswith("("):
        return [text]
    out, depth, start = [], 0, 1
    for i, ch in enumerate(text):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
            if depth == 0:
                out.append(text[start:i])
        elif ch == "," and depth == 1:
            out.append(text[start:i])
            start = i + 1
    return [e.strip() for e in out if e.strip()]


def _collective(ins: _Instr, types: dict[str, list]) -> tuple[str, list[tuple[str, tuple[int, ...]]]] | None:
    """(kind, the buffers it moves) of a collective; None for any other instruction and for `-done` halves."""
    kind = ins.opcode[: -len("-start")] if ins.opcode.endswith("-start") else ins.opcode
    if kind not in COLLECTIVES:
        return None
    if kind == "all-gather":  # the gathered result; a -start's result is (operands, results)
        elements = _tuple_elements(ins.result)
        return kind, _shapes(elements[1] if ins.opcode.endswith("-start") and len(elements) > 1 else ins.result)
    operands = [t for o in ins.operands for t in types.get(o, [])]
    return kind, operands or _shapes(_tuple_elements(ins.result)[0])


# ----- the report


def hlo_report(text: str, *, num_layers: int | None = None, vocab_size: int | None = None) -> dict[str, Any]:
    """FLOPs, loops, attention calls, collectives and vocab-sized buffers of an optimized HLO module's text.

    Counts are per execution of the program on one device (the HLO of an SPMD program is one device's), each
    instruction multiplied by how many times its computation runs (`multiplicities`).

    - `dot_flops`: `dot` and `convolution` instructions, fused or not (the TPU compiler writes matmuls as
      convolutions); `attention`: the attention kernels by formula (`_attention`), with per-kind call counts
      (`forward_calls`, `backward_calls`, `cudnn_calls`, `pallas_calls`: every `tpu_custom_call`) and `kernels`
      (calls per custom-call target or Pallas kernel name); `hlo_flops` = the two.
    - `while_loops` (with `trip_count` None where it could not be read: `unknown_loops` counts them),
      `layer_passes`: runs of loops whose trip count is `num_layers`.
    - `collectives`: per kind (all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute; an async
      `-start`/`-done` pair is one) the number of ops run and the bytes they move. Bytes of one op: what each
      device holds of the data it exchanges, the larger side: all-gather its result (the gathered buffer),
      reduce-scatter its operand (the buffer before reduction), all-reduce, all-to-all and collective-permute
      their operands. Copies of one op (same channel id and buffers) in several computations count once: the
      TPU compiler repeats an async collective in its start, overlapped and done computations. The TPU's
      reduce-scatter is an all-reduce in an `all-reduce-scatter` fusion: counted as a reduce-scatter.
      `largest_collectives`: the top ops by bytes × times (identical ops of one computation merged: `ops`), each
      with kind, dtype, shape (its largest buffer), times, and `in_loop` / `loop` / `loop_trip_count` for the
      innermost while loop whose body runs it.
    """
    comps, entry = parse_hlo(text)
    mult, loops, enclosing = _walk(comps, entry)
    fused = {callee for instrs in comps.values() for ins in instrs if ins.opcode == "fusion"
             for kind, callee in _CALLEE.findall(ins.rest) if kind == "calls"}
    dot_flops = 0
    attn = {"forward_calls": 0, "backward_calls": 0, "cudnn_calls": 0, "pallas_calls": 0, "flops": 0,
            "kernels": defaultdict(int)}
    by_kind = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    copies: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    moved: dict[tuple, dict] = {}
    buffers: dict[tuple[str, tuple[int, ...]], int] = defaultdict(int)
    for name, instrs in comps.items():
        times = mult.get(name, 0)
        if not times:
            continue
        types = {ins.name: _shapes(ins.result) for ins in instrs}
        symbols = {n: t[0][1] for n, t in types.items() if t}
        for ins in instrs:
            if ins.opcode == "dot":
                dot_flops += times * _dot_flops(ins, symbols)
            elif ins.opcode == "convolution":
                dot_flops += times * _conv_flops(ins, symbols)
            call = _attention(ins, symbols, types)
            if call is not None:
                kernel, phase, flops = call
                attn["flops"] += times * flops
                attn["kernels"][kernel] += times
                if phase:
                    attn[f"{phase}_calls"] += times
                attn["cudnn_calls"] += times * kernel.startswith("__cudnn$fmha")
                attn["pallas_calls"] += times * ("tpu_custom_call" in ins.rest)
            coll = _collective(ins, types)
            if coll is not None:
                kind, data = coll
                if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
                    kind = "reduce-scatter"  # the TPU's reduce-scatter: an all-reduce and a slice, fused
                channel = re.search(r"\bchannel_id=(\d+)", ins.rest)
                op = (kind, tuple(data), channel.group(1) if channel else (name, ins.name))
                copies[op][name] += 1
            if vocab_size and name not in fused and ins.opcode not in ("parameter", "get-tuple-element", "bitcast",
                                                                          "tuple"):
                for dt, dims in _shapes(ins.result):
                    if vocab_size in dims:
                        buffers[(dt, dims)] += 1
    attn["kernels"] = dict(attn["kernels"])
    for (kind, data, _), where in copies.items():
        # One op, the copies of one collective in several computations (same channel): the TPU's async
        # collective fusions repeat it in the start, the overlapped computation(s) and the done.
        name, n = max(where.items(), key=lambda kv: kv[1] * mult[kv[0]])
        times, nbytes = n * mult[name], sum(_nbytes(*t) for t in data)
        by_kind[kind]["count"] += times
        by_kind[kind]["bytes"] += times * nbytes
        dtype, shape = max(data, key=lambda t: _nbytes(*t)) if data else ("", ())
        loop = enclosing.get(name)
        entry_ = moved.setdefault((kind, dtype, shape, nbytes, name), {
            "kind": kind, "dtype": dtype, "shape": list(shape), "bytes": nbytes, "ops": 0, "times": 0,
            "in_loop": loop is not None, "loop": loop["name"] if loop else None,
            "loop_trip_count": loop["trip_count"] if loop else None, "computation": name})
        entry_["ops"] += n
        entry_["times"] += times
    layer_passes = sum(lp["times"] for lp in loops if num_layers and lp["trip_count"] == num_layers)
    biggest = sorted(buffers.items(), key=lambda kv: -_nbytes(*kv[0]))[:4]
    largest = sorted(moved.values(), key=lambda e: -e["bytes"] * e["times"])[:16]
    return {
        "dot_flops": float(dot_flops),
        "attention": attn,
        "hlo_flops": float(dot_flops + attn["flops"]),
        "while_loops": [lp for lp in loops],
        "unknown_loops": sum(lp["trip_count"] is None for lp in loops),
        "layer_passes": layer_passes,
        "collectives": {"by_kind": by_kind, "bytes": sum(v["bytes"] for v in by_kind.values()),
                        "largest_collectives": largest},
        "vocab_buffers": [{"dtype": dt, "shape": list(dims), "gb": _nbytes(dt, dims) / 1e9, "instructions": n}
                          for (dt, dims), n in biggest],
    }


def compiled_platform(compiled) -> str | None:
    """The platform of the devices a compiled program runs on ("gpu", "tpu", "cpu"; compile-only ones too)."""
    try:
        for sharding in jax.tree.leaves(compiled.input_shardings):
            return next(iter(sharding.device_set)).platform
    except Exception:  # noqa: BLE001 - a program without inputs
        return None
    return None


def device_bytes(argument: int, output: int, temp: int, alias: int, peak: int, platform: str | None) -> int:
    """Device bytes a compiled program needs: arguments + outputs + temporaries - donated aliases, except on TPU,
    whose temporaries are not all live at once: there XLA's peak of live buffers (a step whose sum exceeds the chip
    can still fit; the compiler, which refuses what does not, goes by the peak). On GPU the peak equals the sum;
    the CPU's leaves the temporaries out."""
    total = argument + output + temp - alias
    return peak if platform == "tpu" and 0 < peak < total else total


MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes", "alias_size_in_bytes", "host_temp_size_in_bytes",
                 "peak_memory_in_bytes")


def memory_fields(compiled) -> dict[str, Any]:
    """XLA's memory analysis of a compiled program in bytes ({} where the backend has none), with its platform:
    the one place it is read."""
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    if mem is None:
        return {}
    out: dict[str, Any] = {f: int(getattr(mem, f)) for f in MEMORY_FIELDS if hasattr(mem, f)}
    out["platform"] = compiled_platform(compiled)
    return out


def program_bytes(info: dict) -> int | None:
    """`device_bytes` of a `memory_fields` dict (None without a memory analysis)."""
    try:
        return device_bytes(info["argument_size_in_bytes"], info["output_size_in_bytes"], info["temp_size_in_bytes"],
                            info.get("alias_size_in_bytes", 0), info.get("peak_memory_in_bytes", 0),
                            info.get("platform"))
    except KeyError:
        return None


def memory_report(compiled, *, unit: float = 1e9) -> dict[str, float] | None:
    """XLA's accounting of a compiled executable in units of `unit` bytes (GB = 1e9 by default; the timed
    bench reports GiB, 2**30): `sum_gb` is arguments + outputs + temporaries − donated aliases; `total_gb`, what the
    program needs on the device, is that sum, or on TPU XLA's peak of live buffers (its temporaries are not all
    live at once; `device_bytes`)."""
    info = memory_fields(compiled)
    if "temp_size_in_bytes" not in info:
        return None
    get = lambda field: info.get(field, 0) / unit
    total = (info["argument_size_in_bytes"] + info["output_size_in_bytes"] + info["temp_size_in_bytes"]
             - info.get("alias_size_in_bytes", 0))
    return {"arguments_gb": get("argument_size_in_bytes"), "outputs_gb": get("output_size_in_bytes"),
            "temp_gb": get("temp_size_in_bytes"), "aliased_gb": get("alias_size_in_bytes"),
            "host_temp_gb": get("host_temp_size_in_bytes"), "sum_gb": total / unit,
            "total_gb": program_bytes(info) / unit}


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
