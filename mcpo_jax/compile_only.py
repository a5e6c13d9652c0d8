"""A run's programs compiled for the hardware it targets, from this host, before any weight is read.

    python -m mcpo_jax.train --config configs/nectar.py --compile-only --target h100x8

`check(config, "h100x8")` builds the programs the run would compile — the train step at the config's micro-batch
(and the warm start's SFT step), the reference log-probs precompute (`reference="precomputed"`), the OnMC-PO
sampler (`online.enabled`) — from abstract parameters (the model's shapes from its config.json or preset; nothing
loaded, nothing allocated), compiles each for the target's devices (`mcpo_jax.targets`: compile-only TPU or GPU
devices, or this host's) over the config's mesh, and reads, per device:

- memory: arguments / temporaries / total (XLA's memory analysis), plus what the run keeps on the device beside
  that program (the train state while the sampler or the reference precompute runs), against the target's usable
  HBM: "fits (X GB free)" or "does not fit by X GB" (a TPU compiler that refuses the program says so itself);
- HLO FLOPs counted for that backend (`mcpo_jax.audit`: convolutions, loop bounds, every fused-attention kernel),
  against the anchor's formula for the work the train step executes;
- collectives per step, by kind and bytes; the compile time.

Deviceless programs are not autotuned and nothing runs: time comes only from a real device.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from typing import Any

import jax
import numpy as np

from mcpo_jax import targets as targets_lib

log = logging.getLogger("mcpo_jax.train")


class DoesNotFit(RuntimeError):
    """A program of the run does not fit the target's devices (the message says by how much)."""


@dataclasses.dataclass
class ProgramCheck:
    """One compiled program of a run on a target, per device (GB = 1e9 bytes)."""

    name: str  # train | warm_start | reference | generation
    shapes: str  # what it was compiled for, in words
    compile_s: float | None = None
    arguments_gb: float | None = None
    temp_gb: float | None = None
    host_temp_gb: float | None = None
    total_gb: float | None = None  # XLA's peak of live buffers (`audit.program_bytes`)
    resident_gb: float = 0.0  # the run's other device arrays alive while this program runs
    usable_gb: float | None = None
    fits: bool | None = None  # None: no limit to compare with (the cpu target)
    over_gb: float | None = None  # by how much it does not fit
    remat: Any = None  # the train step's remat (the choice of remat="auto")
    hlo_flops: float | None = None  # every device's together (the SPMD program's x the devices)
    formula_flops: float | None = None
    unknown_loops: int = 0
    collectives: dict | None = None  # kind -> {"count", "bytes"}
    attention: dict | None = None  # fused-attention calls: cudnn_calls, pallas_calls, forward/backward calls
    note: str = ""

    @property
    def need_gb(self) -> float | None:
        return None if self.total_gb is None else self.total_gb + self.resident_gb

    def verdict(self) -> str:
        if self.fits is None:
            return "compiled (no HBM limit to compare)" if self.total_gb is not None else "failed"
        if self.fits:
            return f"fits ({self.usable_gb - self.need_gb:.1f} GB free)"
        return f"does not fit by {self.over_gb:.1f} GB" if self.over_gb is not None else "does not fit"

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(need_gb=self.need_gb, verdict=self.verdict())
        return out


# ------------------------------------------------------------------------------------------------ inputs


def model_config(config):
    """The model's shapes: model.path's config.json (a local folder, or only that file from the hub), else the
    preset with its overrides. No weight is read."""
    from mcpo_jax import hub, models

    path = config.model.path
    if not path:
        return models.preset_config(config.model.preset, **config.model.overrides.to_dict())
    kind, where = hub.resolve(path, key="model.path", what="folder")
    if kind == "local":
        return models.load_config(where)
    from huggingface_hub import hf_hub_download

    return models.load_config(hf_hub_download(where, "config.json", local_files_only=kind == "cached"))


def per_device_bytes(tree) -> int:
    """Bytes each device holds of a pytree of ShapeDtypeStructs with shardings (the largest shard's device)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def _refused(error: BaseException) -> tuple[float | None, float | None] | None:
    """(required, available) GB from a TPU compiler's out-of-memory refusal; None for any other error."""
    from mcpo_jax.training.program import is_out_of_memory

    if not is_out_of_memory(error):
        return None
    m = re.search(r"\(([\d.]+)([GM])\) exceeds available HBM \(([\d.]+)([GM])\)", str(error))
    if not m:
        return None, None
    unit = {"G": 2**30, "M": 2**20}
    return float(m.group(1)) * unit[m.group(2)] / 1e9, float(m.group(3)) * unit[m.group(4)] / 1e9


# ------------------------------------------------------------------------------------------------ programs


class _Run:
    """The pieces every program of a run shares on a target: the mesh, the rules, the abstract model."""

    def __init__(self, config, target: targets_lib.Target, devices):
        from mcpo_jax import sharding as shd

        self.config, self.target = config, target
        self.devices = devices
        self.mesh = shd.make_mesh(int(config.mesh.data), int(config.mesh.fsdp), int(config.mesh.tensor),
                                  devices=devices)
        self.rules = shd.rules_from_config(config.sharding_rules.to_dict() or None)
        self.processes = len({d.process_index for d in devices})
        self.model_config = model_config(config)
        budget = float(config.model.memory_budget_gb)
        self.budget = int(budget * 1e9) if budget > 0 else target.usable_bytes

    def abstract_model(self, model_cfg):
        from flax import nnx

        from mcpo_jax import models
        from mcpo_jax import sharding as shd
        from mcpo_jax.training import build

        layout = shd.model_layout(self.mesh, self.rules)
        return nnx.eval_shape(lambda: models.Transformer(
            self.model_config, dtype=models.dtype_of(model_cfg.dtype),
            param_dtype=models.dtype_of(model_cfg.param_dtype), remat=build.model_remat(model_cfg), layout=layout,
            rngs=nnx.Rngs(0)))

    def usable_gb(self) -> float | None:
        return None if self.budget is None else self.budget / 1e9

    def finish(self, check: ProgramCheck, compiled, *, compile_s: float, work=None) -> ProgramCheck:
        """Memory, verdict, FLOPs and collectives of a compiled program."""
        from mcpo_jax import audit

        info = audit.memory_fields(compiled)
        check.compile_s = compile_s
        if info:
            check.arguments_gb = info["argument_size_in_bytes"] / 1e9
            check.temp_gb = info["temp_size_in_bytes"] / 1e9
            check.host_temp_gb = info.get("host_temp_size_in_bytes", 0) / 1e9
            check.total_gb = audit.program_bytes(info) / 1e9
        check.usable_gb = self.usable_gb()
        if check.usable_gb is not None and check.need_gb is not None:
            check.fits = check.need_gb <= check.usable_gb
            check.over_gb = None if check.fits else check.need_gb - check.usable_gb
        c = self.model_config
        report = audit.hlo_report(compiled.as_text(), num_layers=c.num_hidden_layers, vocab_size=c.vocab_size)
        check.hlo_flops = report["hlo_flops"] * len(self.devices)  # one device's SPMD program, on every device
        check.unknown_loops = int(report.get("unknown_loops") or 0)
        check.collectives = report["collectives"]["by_kind"]
        check.attention = {k: v for k, v in report["attention"].items() if k.endswith("calls")}
        if work is not None:
            check.formula_flops = work
        return check

    def refused(self, check: ProgramCheck, error: BaseException) -> ProgramCheck:
        """A program the TPU compiler refused for its size."""
        sizes = _refused(error)
        if sizes is None:
            raise error
        required, available = sizes
        check.usable_gb, check.fits = self.usable_gb(), False
        if required is not None:
            check.total_gb = required
            check.over_gb = required + check.resident_gb - available
        check.note = "refused by the TPU compiler: " + str(error).strip().splitlines()[0][:200]
        return check

    # -- the train step ---------------------------------------------------------------------------

    def train(self, config, name: str) -> ProgramCheck:
        from mcpo_jax import audit
        from mcpo_jax import batch as batch_lib
        from mcpo_jax.training import config as cfg_lib
        from mcpo_jax.training import program as program_lib
        from mcpo_jax.training import step as step_lib

        step_cfg = step_lib.step_config_from(config)
        opt = config.optimizer
        tx, schedule = step_lib.make_optimizer(
            learning_rate=float(opt.learning_rate), total_steps=1000, warmup_ratio=float(opt.warmup_ratio),
            decay=opt.decay, weight_decay=float(opt.weight_decay), b1=float(opt.b1), b2=float(opt.b2),
            eps=float(opt.eps), max_grad_norm=float(opt.max_grad_norm))
        model = self.abstract_model(config.model)
        prog = program_lib.TrainProgram(model, step_cfg, tx, schedule, mesh=self.mesh, rules=self.rules,
                                        remat="auto" if config.model.remat == "auto" else None,
                                        memory_budget=self.budget)
        accum = int(config.batch_size) // int(config.micro_batch_size)
        micro, columns, length = int(config.micro_batch_size), cfg_lib.num_columns(config), int(config.data.max_length)
        shapes = batch_lib.abstract_shapes((accum, micro), columns=columns, length=length,
                                           precomputed_ref=step_cfg.reference == "precomputed")
        if self.processes > 1:  # multi-process runs carry each process's stop request through the step
            shapes["stop_request"] = ((accum, micro), np.int32)
        check = ProgramCheck(name, f"{accum} x {micro} examples x {columns} rows x {length} tokens "
                             f"(batch {config.batch_size}, {step_cfg.objective}, reference {step_cfg.reference})")
        t0 = time.perf_counter()
        try:
            compiled = prog.compiled(prog.abstract_batch(shapes))
        except program_lib.DoesNotFit as e:
            check.usable_gb, check.fits, check.note = self.usable_gb(), False, str(e)
            needs = [float(g) for g in re.findall(r": ([\d.]+) GB >", str(e))]
            if needs:
                check.total_gb = min(needs)
                check.over_gb = check.total_gb - check.usable_gb
            return check
        except Exception as e:  # noqa: BLE001 - a TPU compiler's refusal (remat fixed by the config)
            return self.refused(check, e)
        info = next(iter(prog.compile_info.values()))
        check.remat = info.get("remat", config.model.remat)
        work = None
        try:
            prompt_len = int(config.data.max_prompt_length)
            one = audit.executed_work(step_cfg, prompts=micro, columns=columns, prompt_len=prompt_len,
                                      completion_len=length - prompt_len, rope_type=self.model_config.rope_type)
            work = accum * one.flops(audit.Shapes.of(self.model_config))
        except ValueError as e:  # the formula needs prompt + completion windows that add up to the row length
            check.note = f"no formula: {e}"
        return self.finish(check, compiled, compile_s=time.perf_counter() - t0, work=work)

    # -- the reference precompute -----------------------------------------------------------------

    def reference(self, config) -> ProgramCheck:
        from mcpo_jax import sharding as shd
        from mcpo_jax.training import config as cfg_lib
        from mcpo_jax.training import program as program_lib
        from mcpo_jax.training import refcache
        from mcpo_jax.training import state as state_lib
        from mcpo_jax.training import step as step_lib

        step_cfg = step_lib.step_config_from(config)
        model = self.abstract_model(config.model)
        tx, schedule = step_lib.make_optimizer(learning_rate=1e-6, total_steps=1000)
        prog = program_lib.TrainProgram(model, step_cfg, tx, schedule, mesh=self.mesh, rules=self.rules)
        fn = refcache.make_logps_fn(prog.graphdef, prog.rest, self.mesh, step_cfg.logprob_chunk_size,
                                    window=step_cfg.completion_window, prompt_window=step_cfg.prompt_window)
        dp = shd.data_parallel_size(self.mesh, self.rules)
        rows = max(dp, (int(config.micro_batch_size) // dp) * dp)
        columns, length = cfg_lib.num_columns(config), int(config.data.max_length)
        ids = jax.ShapeDtypeStruct((rows, columns, length), np.int32, sharding=shd.batch_sharding(self.mesh, 3, 0))
        ref = state_lib.abstract_state(prog.abstract_params, prog.param_shardings)
        check = ProgramCheck("reference", f"{rows} examples x {columns} rows x {length} tokens (no gradient)",
                             resident_gb=per_device_bytes(prog.abstract_state()) / 1e9)
        t0 = time.perf_counter()
        try:
            compiled = fn.lower(ref, ids, ids, ids).compile()
        except Exception as e:  # noqa: BLE001
            return self.refused(check, e)
        return self.finish(check, compiled, compile_s=time.perf_counter() - t0)

    # -- the OnMC-PO sampler ----------------------------------------------------------------------

    def generation(self, config) -> ProgramCheck:
        from flax import nnx

        from mcpo_jax.online.generate import lower_generate
        from mcpo_jax.training import program as program_lib
        from mcpo_jax.training import state as state_lib
        from mcpo_jax.training import step as step_lib

        o = config.online
        step_cfg = step_lib.step_config_from(config)
        model = self.abstract_model(config.model)
        tx, schedule = step_lib.make_optimizer(learning_rate=1e-6, total_steps=1000)
        prog = program_lib.TrainProgram(model, step_cfg, tx, schedule, mesh=self.mesh, rules=self.rules)
        params = state_lib.abstract_state(prog.abstract_params, prog.param_shardings)
        # `generate` takes the model split whole (a Transformer holds parameters only)
        graphdef, _ = nnx.split(state_lib.merge_model(prog.graphdef, prog.abstract_params, prog.rest))
        # the trainer keeps its state (and the reference) while the policy samples
        resident = per_device_bytes(prog.abstract_state()) - per_device_bytes(params)
        if prog.ref_shardings is not None:
            resident += per_device_bytes(prog.abstract_ref())
        batch = int(o.generation_batch_size)
        prompt_len = int(o.max_prompt_tokens) or int(config.data.max_prompt_length)
        new = int(o.max_new_tokens)
        check = ProgramCheck("generation", f"{batch} rows x {prompt_len} prompt tokens + {new} new tokens "
                             f"(KV cache {prompt_len + new}; weights "
                             f"{'gathered once per call' if o.gather_weights else 'gathered per layer and token'})",
                             resident_gb=resident / 1e9)
        t0 = time.perf_counter()
        try:
            compiled = lower_generate(graphdef, params, self.mesh, batch_size=batch, prompt_len=prompt_len,
                                      max_new_tokens=new, use_filter=float(o.top_p) < 1,
                                      gather_weights=bool(o.gather_weights)).compile()
        except Exception as e:  # noqa: BLE001
            return self.refused(check, e)
        check = self.finish(check, compiled, compile_s=time.perf_counter() - t0)
        check.note = (check.note + " " if check.note else "") + "decode loop: up to max_new_tokens steps (stops at EOS)"
        return check


def check(config, target: str | targets_lib.Target, *, log_fn=None) -> list[ProgramCheck]:
    """Compile every program of the run `config` describes for `target`; one ProgramCheck each (see the module
    docstring). `config` is validated for the target's device and process count (ConfigError otherwise)."""
    from mcpo_jax.training import config as cfg_lib

    target = targets_lib.get(target) if isinstance(target, str) else target
    if not targets_lib.prepare_environment(target):
        raise targets_lib.TargetError(
            f"compile target {target.name!r}: this process's jax already runs on {jax.config.jax_platforms!r}; "
            "compile in a fresh process (JAX_PLATFORMS=cpu)")
    devices = targets_lib.devices(target)
    processes = len({d.process_index for d in devices})
    config = cfg_lib.prepare(config, device_count=len(devices), process_count=processes)
    run = _Run(config, target, devices)
    say = log_fn or (lambda msg: log.info("%s", msg))
    programs = []
    if config.warm_start is not None:
        sft = cfg_lib.with_overrides(config, config.warm_start)
        with sft.unlocked():
            sft.warm_start = None
            sft.online.enabled = False
            sft.final_eval.judge = ""
        programs.append(("warm_start", lambda: run.train(cfg_lib.prepare(sft, device_count=len(devices),
                                                                          process_count=processes), "warm_start")))
    if config.reference == "precomputed" and config.objective != "sft":
        programs.append(("reference", lambda: run.reference(config)))
    if config.online.enabled:
        programs.append(("generation", lambda: run.generation(config)))
    programs.append(("train", lambda: run.train(config, "train")))
    out = []
    for name, make in programs:
        say(f"compiling {name} for {target.name} ...")
        out.append(make())
        say(format_row(out[-1]))
    return out


# ------------------------------------------------------------------------------------------------ report


def header(target: targets_lib.Target, config) -> str:
    devices = target.num_devices or len(jax.devices())
    usable = "no limit" if target.usable_bytes is None else f"{target.usable_bytes / 1e9:.1f} GB usable"
    return (f"# {target.name}: {devices} x {target.device_kind}, {usable} per device; mesh data={config.mesh.data} "
            f"fsdp={config.mesh.fsdp} tensor={config.mesh.tensor}; GB = 1e9 bytes, per device")


COLUMNS = (f"{'program':11s} {'compile s':>9s} {'args GB':>8s} {'temp GB':>8s} {'total GB':>8s} {'+resident':>9s} "
           f"{'usable':>7s}  {'HLO FLOPs':>10s} {'/formula':>8s}  verdict")


def format_row(c: ProgramCheck) -> str:
    num = lambda x, fmt, w: f"{x:{w}{fmt}}" if isinstance(x, (int, float)) else f"{'-':>{w}s}"
    ratio = c.hlo_flops / c.formula_flops if c.hlo_flops and c.formula_flops else None
    line = (f"{c.name:11s} {num(c.compile_s, '.1f', 9)} {num(c.arguments_gb, '.2f', 8)} {num(c.temp_gb, '.2f', 8)} "
            f"{num(c.total_gb, '.2f', 8)} {num(c.resident_gb, '.2f', 9)} {num(c.usable_gb, '.1f', 7)}  "
            f"{num(c.hlo_flops, '.4g', 10)} {num(ratio, '.3f', 8)}  {c.verdict()}")
    if c.remat not in (None, False) or c.name in ("train", "warm_start"):
        line += f"  [remat={c.remat!r}]"
    return line


def format_collectives(c: ProgramCheck) -> str:
    if not c.collectives:
        return f"{c.name}: no collectives"
    parts = [f"{kind} {v['count']:g} ({v['bytes'] / 1e9:.2f} GB)" for kind, v in sorted(c.collectives.items())
             if v.get("count")]
    return f"{c.name} collectives per step: " + (", ".join(parts) or "none")


def summary(checks: list[ProgramCheck], target: targets_lib.Target) -> tuple[int, str]:
    """(exit status, last line): 0 when every program fits (or there is no limit), 2 when one does not."""
    bad = [c for c in checks if c.fits is False]
    if not bad:
        return 0, f"every program fits on {target.name}"
    worst = max(bad, key=lambda c: c.over_gb or math.inf)
    by = f" by {worst.over_gb:.1f} GB" if worst.over_gb is not None else ""
    return 2, f"does not fit on {target.name}{by}: the {worst.name} program ({worst.note or worst.verdict()})"
