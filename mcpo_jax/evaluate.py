"""Win-rate evaluation, the one path: generate answers for a prompt set, judge them against a baseline's answers.

The paper's metric (Sec. 5.1) is the adjusted win rate (N_cand + N_tie / 2) / (N_cand + N_base + N_tie) with
an LLM judge. Pairs the judge could not parse are reported as ``invalid`` and left out of the denominator.

    # answers in AlpacaEval's output format (instruction, output, generator), usable by external evaluators
    python -m mcpo_jax.evaluate --model runs/x/hf --prompts alpaca_eval.json --output runs/x/alpaca.json
    # adjusted win rate with a bootstrap CI against a baseline's answers, with any judge
    python -m mcpo_jax.evaluate --candidate runs/x/alpaca.json --baseline gpt4_turbo.json \
        --judge llm:/models/judge --results runs/x/winrate.json

Prompt files: see ``mcpo_jax.data.text.load_prompts`` (JSON/JSONL rows with ``instruction`` | ``turns`` |
``prompt`` | ``messages``, or text lines). In code: :func:`evaluate_models` (greedy answers of two models, judged),
:func:`final_evaluation` (a config's ``final_eval`` block, used at the end of a run), :func:`win_rate` (answers
already there), :func:`generate_outputs`, :func:`adjusted_win_rate`, :func:`bootstrap_ci`. The training loop,
the online driver and the experiments all evaluate through these.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from mcpo_jax.data import tasks
from mcpo_jax.data.text import encode_prompts, load_prompts, read_rows, row_prompt
from mcpo_jax.judges import A, B, INVALID, TIE, Judge, judge_task, make_judge


# -- answer files ----------------------------------------------------------------------------------------------
def load_outputs(path: str) -> list[dict]:
    """AlpacaEval-format answer rows ({instruction, output, generator, ...}) in file order, duplicates kept."""
    out = []
    for i, row in enumerate(read_rows(path)):
        if "output" not in row:
            raise ValueError(f"{path}: row {i} has no 'output' (AlpacaEval outputs need instruction + output)")
        out.append({**row, "instruction": row_prompt(row, f"{path}: row {i}")})
    return out


def _key(instruction) -> str:
    return instruction if isinstance(instruction, str) else json.dumps(instruction, sort_keys=True)


def model_name(path: str) -> str:
    """A model folder's display name: its run's name for an export folder called ``hf`` (``runs/demo/hf`` ->
    ``demo``), the folder name otherwise."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    return parts[-2] if parts[-1] == "hf" and len(parts) > 1 else parts[-1]


def write_outputs(path: str, prompts: Sequence[dict], outputs: Sequence[str], generator: str) -> None:
    """AlpacaEval's model_outputs.json: a list of {instruction, output, generator, dataset}."""
    rows = [{"instruction": p["instruction"], "output": o, "generator": generator,
             "dataset": p.get("dataset", "")} for p, o in zip(prompts, outputs)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False, indent=1)


# -- generation --------------------------------------------------------------------------------------------------
def generate_outputs(model, tokenizer, instructions: Sequence[Any], *, max_new_tokens: int = 512,
                     batch_size: int = 16, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                     use_chat_template: bool = True, max_prompt_tokens: int | None = None) -> list[str]:
    """Answers of ``model`` to ``instructions`` (greedy by default), batched and left-padded."""
    from mcpo_jax.online.generate import generate_texts

    rows = encode_prompts(tokenizer, instructions, use_chat_template=use_chat_template,
                          max_prompt_tokens=max_prompt_tokens)
    # batches of similar length waste less compute on padding (widths rounded up to 32: few programs)
    return generate_texts(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          temperature=temperature, top_p=top_p, seed=seed, multiple=32)


# -- win rates ---------------------------------------------------------------------------------------------------
def adjusted_win_rate(n_cand: float, n_base: float, n_tie: float) -> float:
    """(N_cand + N_tie / 2) / (N_cand + N_base + N_tie), the paper's adjusted win rate (Sec. 5.1), in [0, 1]."""
    total = n_cand + n_base + n_tie
    if total <= 0:
        return float("nan")
    return (n_cand + 0.5 * n_tie) / total


def verdict_counts(verdicts: Sequence[str]) -> dict[str, int]:
    """Counts of candidate wins ("A"), baseline wins ("B"), ties and invalid pairs."""
    unknown = set(verdicts) - {A, B, TIE, INVALID}
    if unknown:
        raise ValueError(f"unknown verdicts {sorted(unknown)}; expected 'A', 'B', 'tie' or 'invalid'")
    return {"cand": verdicts.count(A), "base": verdicts.count(B), "tie": verdicts.count(TIE),
            "invalid": verdicts.count(INVALID)}


def bootstrap_ci(verdicts: Sequence[str], *, num_samples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the adjusted win rate, resampling the valid verdicts with replacement."""
    score = np.array([{A: 1.0, TIE: 0.5, B: 0.0}[v] for v in verdicts if v != INVALID])
    if score.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = score[rng.integers(0, score.size, (num_samples, score.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


@dataclasses.dataclass
class WinRate:
    """Adjusted win rate of a candidate over a baseline, its bootstrap CI and the verdict counts.

    ``scores`` holds per-side task metrics when the prompts belong to a registered task (``policy_score``,
    ``baseline_score``: mean task score; ``policy_exact``, ``baseline_exact``: fraction of perfect answers);
    ``prompts`` / ``candidate`` / ``baseline`` keep the judged answers when they were generated here.
    """

    win_rate: float
    ci_low: float
    ci_high: float
    n_cand: int
    n_base: int
    n_tie: int
    n_invalid: int
    verdicts: list = dataclasses.field(repr=False, default_factory=list)
    scores: dict = dataclasses.field(default_factory=dict)
    prompts: list = dataclasses.field(repr=False, default_factory=list)
    candidate: list = dataclasses.field(repr=False, default_factory=list)
    baseline: list = dataclasses.field(repr=False, default_factory=list)

    def summary(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("verdicts", "scores", "prompts", "candidate", "baseline")}
        return {**out, "num_prompts": len(self.verdicts), **self.scores}


def win_rate_from_verdicts(verdicts: Sequence[str], *, num_bootstrap: int = 1000, confidence: float = 0.95,
                           seed: int = 0) -> WinRate:
    c = verdict_counts(list(verdicts))
    lo, hi = bootstrap_ci(verdicts, num_samples=num_bootstrap, confidence=confidence, seed=seed)
    return WinRate(adjusted_win_rate(c["cand"], c["base"], c["tie"]), lo, hi, c["cand"], c["base"], c["tie"],
                   c["invalid"], list(verdicts))


def win_rate(judge: Judge, prompts: Sequence[Any], candidate: Sequence[str], baseline: Sequence[str], *,
             num_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0,
             task: tasks.Task | None = None) -> WinRate:
    """Adjusted win rate of ``candidate`` over ``baseline`` answers (aligned with ``prompts``) under ``judge``.

    The candidate is shown as assistant A; LLM judges evaluate both orders anyway. With ``task``, the result also
    holds each side's mean task score and fraction of perfect answers (:func:`task_scores`).
    """
    if not (len(prompts) == len(candidate) == len(baseline)):
        raise ValueError(f"{len(prompts)} prompts, {len(candidate)} candidate and {len(baseline)} baseline answers")
    verdicts = judge.compare_many(list(zip(prompts, candidate, baseline)))
    result = win_rate_from_verdicts(verdicts, num_bootstrap=num_bootstrap, confidence=confidence, seed=seed)
    result.prompts, result.candidate, result.baseline = list(prompts), list(candidate), list(baseline)
    if task is not None:
        result.scores = {**task_scores(task, prompts, candidate, prefix="policy_"),
                         **task_scores(task, prompts, baseline, prefix="baseline_")}
    return result


def task_scores(task: tasks.Task, prompts: Sequence[Any], answers: Sequence[str], *, prefix: str = "") -> dict:
    """``{prefix}score``: mean of the task's score over the answers; ``{prefix}exact``: fraction reaching the
    task's perfect score (when it has one)."""
    s = np.array([task.score(p, a) for p, a in zip(prompts, answers)], np.float64)
    out = {f"{prefix}score": float(s.mean()) if s.size else float("nan")}
    if task.perfect_score is not None:
        out[f"{prefix}exact"] = float(np.mean(s >= task.perfect_score)) if s.size else float("nan")
    return out


def evaluate_models(policy, baseline, tokenizer, prompts: Sequence[Any], judge: Judge, *, max_new_tokens: int,
                    batch_size: int, use_chat_template: bool = True, max_prompt_tokens: int | None = None,
                    task: tasks.Task | None = None, num_bootstrap: int = 1000, seed: int = 0) -> WinRate:
    """Greedy answers of ``policy`` and ``baseline`` (models sharing ``tokenizer``) to ``prompts``, judged by
    ``judge`` (LLM judges see both orders), as the adjusted win rate of the policy with counts and bootstrap CI.

    The answers stay in the result (``.candidate``, ``.baseline``); ``task`` adds the per-side task scores.
    """
    prompts = list(prompts)
    kwargs = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, use_chat_template=use_chat_template,
                  max_prompt_tokens=max_prompt_tokens)
    ours = [a.strip() for a in generate_outputs(policy, tokenizer, prompts, **kwargs)]
    base = [a.strip() for a in generate_outputs(baseline, tokenizer, prompts, **kwargs)]
    return win_rate(judge, prompts, ours, base, num_bootstrap=num_bootstrap, seed=seed, task=task)


# -- the end-of-run evaluation of a training config --------------------------------------------------------------
class EvalConfigError(ValueError):
    """A final-evaluation block that cannot be run as written (unknown task, prompts of another task, ...)."""


@dataclasses.dataclass(frozen=True)
class FinalEvalSpec:
    """What an end-of-run evaluation runs, typed: a training config's `final_eval` block (its schema and defaults
    are `training.config.base_config`'s; `from_block` builds this from it, less the pipeline's own keys)."""

    judge: str  # a `make_judge` spec
    prompts: str  # "task:NAME" or a prompt file
    num_prompts: int
    seed: int
    max_new_tokens: int
    batch_size: int
    use_chat_template: bool
    max_prompt_tokens: int  # 0: the prompts as they are
    num_bootstrap: int
    tie_margin: float  # oracle / rule judges: answers whose scores differ by at most this tie
    judge_max_new_tokens: int  # llm judges; 0: the judge's default
    judge_batch_size: int  # llm judges; 0: the judge's default

    @classmethod
    def from_block(cls, block, *, pipeline_keys: Sequence[str] = ("baseline_path", "redo")) -> FinalEvalSpec:
        """From a `final_eval` block (a ConfigDict or dict); `pipeline_keys` are the pipeline's, left out. A
        missing or unknown key is an EvalConfigError naming it."""
        block = block.to_dict() if hasattr(block, "to_dict") else dict(block)
        fields = {f.name: {"int": int, "float": float, "str": str, "bool": bool}[f.type]
                  for f in dataclasses.fields(cls)}
        missing = [k for k in fields if k not in block]
        unknown = [k for k in block if k not in fields and k not in pipeline_keys]
        if missing or unknown:
            raise EvalConfigError("final_eval: " + "; ".join(
                ([f"missing {', '.join(missing)}"] if missing else [])
                + ([f"unknown {', '.join(unknown)}"] if unknown else [])) + f" (fields: {', '.join(fields)})")
        return cls(**{k: cast(block[k]) for k, cast in fields.items()})


def eval_prompts(spec: str, *, num_prompts: int, seed: int, judge_spec: str) -> tuple[list, tasks.Task | None]:
    """The prompts of a final evaluation and the task they belong to (None: a file of the user's own prompts).

    ``spec`` is ``"task:NAME"`` (``num_prompts`` held-out prompts of a registered task, drawn with ``seed``) or a
    prompt file (``load_prompts``: JSON/JSONL rows or text lines; the first ``num_prompts``, 0 = all). A task
    judge (``oracle:T`` / ``rule:T``) refuses prompts that are not T's: another task's, or a file whose prompts
    T does not recognize; the judge names no task, the file's prompts need no task.
    """
    try:
        judged = judge_task(judge_spec)
    except ValueError as e:
        raise EvalConfigError(f"final_eval.judge={judge_spec!r}: {e}") from None
    if not spec:
        raise EvalConfigError("final_eval.prompts is empty: 'task:NAME' (registered: "
                              f"{', '.join(tasks.names())}) or a prompt file (JSON/JSONL/text)")
    if spec.startswith("task:"):
        try:
            task = tasks.get(spec[len("task:"):])
        except tasks.UnknownTaskError as e:
            raise EvalConfigError(f"final_eval.prompts={spec!r}: {e}") from None
        if judged is not None and judged.name != task.name:
            raise EvalConfigError(f"final_eval: judge {judge_spec!r} scores task {judged.name!r} but the prompts "
                                  f"are task {task.name!r}'s")
        if num_prompts <= 0:
            raise EvalConfigError(f"final_eval.num_prompts={num_prompts}: task prompts need a positive count")
        return list(task.prompts(num_prompts, seed)), task
    if not os.path.exists(spec):
        raise EvalConfigError(f"final_eval.prompts={spec!r} is neither 'task:NAME' (registered: "
                              f"{', '.join(tasks.names())}) nor an existing prompt file")
    prompts = [p["instruction"] for p in load_prompts(spec)]
    if num_prompts > 0:
        prompts = prompts[:num_prompts]
    if not prompts:
        raise EvalConfigError(f"final_eval.prompts={spec!r}: the file holds no prompt")
    if judged is not None:
        foreign = [p for p in prompts if not judged.recognizes(p)]
        if foreign:
            raise EvalConfigError(
                f"final_eval: judge {judge_spec!r} scores task {judged.name!r}, but {len(foreign)} of {len(prompts)} "
                f"prompts in {spec} are not {judged.name!r} prompts (e.g. {str(foreign[0])[:80]!r}); judge your "
                f"own task with a registered task of yours (mcpo_jax.data.tasks.register), 'llm:MODEL_DIR' or "
                f"'reward:module:function'")
    return prompts, judged


def final_evaluation(spec: FinalEvalSpec, policy, tokenizer, *, baseline, baseline_name: str,
                     workdir: str | None = None) -> dict:
    """The end-of-run evaluation a config asks for: greedy answers of ``policy`` and ``baseline`` (both loaded
    by the caller, the same way) to the spec's prompts, judged by its judge, as the adjusted win rate (plus the
    task's scores when the prompts are a task's). Everything is checked before any model runs: an unknown task
    or judge, prompts of another task than the judge's, a missing prompt file are :class:`EvalConfigError`.
    ``baseline_name`` names the baseline in the printed line (e.g. its folder). With ``workdir``, the prompts,
    both answers and the verdicts go to ``workdir/final_eval.json``. Prints the one-line result.
    """
    import logging

    fe = spec
    prompts, task = eval_prompts(fe.prompts, num_prompts=fe.num_prompts, seed=fe.seed, judge_spec=fe.judge)
    judge_kwargs = {}
    if fe.judge.startswith(("oracle:", "rule:")):
        judge_kwargs["tie_margin"] = fe.tie_margin
    if fe.judge.startswith("llm:"):
        judge_kwargs.update({k[len("judge_"):]: getattr(fe, k) for k in ("judge_max_new_tokens", "judge_batch_size")
                             if getattr(fe, k)})
    judge = make_judge(fe.judge, **judge_kwargs)
    result = evaluate_models(policy, baseline, tokenizer, prompts, judge, max_new_tokens=fe.max_new_tokens,
                             batch_size=fe.batch_size, use_chat_template=fe.use_chat_template,
                             max_prompt_tokens=fe.max_prompt_tokens or None, task=task,
                             num_bootstrap=fe.num_bootstrap, seed=fe.seed)
    out = {**result.summary(), "judge": fe.judge, "prompts": fe.prompts, "baseline": baseline_name,
           "examples": [{"prompt": p, "policy": a, "baseline": b}
                        for p, a, b in list(zip(result.prompts, result.candidate, result.baseline))[:5]]}
    kind = fe.judge.partition(":")[0]
    where = f"held-out {task.name} prompts" if task is not None and fe.prompts.startswith("task:") else \
        f"prompts of {fe.prompts}"
    msg = (f"{kind} win rate of the trained policy vs {baseline_name}: {100 * result.win_rate:.1f}% "
           f"({result.n_cand} wins / {result.n_tie} ties / {result.n_base} losses"
           + (f" / {result.n_invalid} invalid" if result.n_invalid else "")
           + f" on {len(prompts)} {where}, greedy; 95% CI [{100 * result.ci_low:.1f}, {100 * result.ci_high:.1f}])")
    if "policy_score" in result.scores:
        s = result.scores
        if "policy_exact" in s:
            msg += f"; exact answers {100 * s['policy_exact']:.1f}% vs {100 * s['baseline_exact']:.1f}%"
        msg += f", mean {task.kind} score {s['policy_score']:.3f} vs {s['baseline_score']:.3f}"
    out["message"] = msg
    # the run's log gets it; a console that shows the printed line leaves this record out (result_line)
    logging.getLogger("mcpo_jax.evaluate").info(msg, extra={"result_line": True})
    print(msg, flush=True)
    if workdir is not None:
        path = os.path.join(workdir, "final_eval.json")
        os.makedirs(workdir, exist_ok=True)
        rows = [{"prompt": p, "policy": a, "baseline": b, "verdict": v}
                for p, a, b, v in zip(result.prompts, result.candidate, result.baseline, result.verdicts)]
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"summary": {k: v for k, v in out.items() if k != "examples"}, "rows": rows}, f,
                      ensure_ascii=False, indent=1)
        out["file"] = path
    return out


def format_table(rows: Sequence[tuple[str, WinRate]], *, baseline: str = "baseline") -> str:
    head = f"{'generator':<32} {'win rate %':>10} {'95% CI':>15} {'wins':>6} {'losses':>6} {'ties':>6} {'invalid':>7}"
    lines = [f"adjusted win rate vs {baseline}", head, "-" * len(head)]
    for name, r in rows:
        ci = f"[{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}]"
        lines.append(f"{name[-32:]:<32} {100 * r.win_rate:>10.2f} {ci:>15} {r.n_cand:>6} {r.n_base:>6} "
                     f"{r.n_tie:>6} {r.n_invalid:>7}")
    return "\n".join(lines)


def pair_with_baseline(candidate: Sequence[dict], baseline: Sequence[dict], *, name: str):
    """Aligned (prompts, candidate outputs, baseline outputs) over the candidate's rows, in order.

    Rows are matched on the instruction; a prompt the candidate answers several times is matched with the
    baseline's answers to it in order (the baseline's last one when it answered fewer times).
    """
    by_key: dict[str, list[dict]] = {}
    for row in baseline:
        by_key.setdefault(_key(row["instruction"]), []).append(row)
    missing = sorted({_key(r["instruction"]) for r in candidate} - set(by_key))
    if missing:
        raise ValueError(f"{name}: {len(missing)} instructions have no baseline answer, e.g. {missing[0][:80]!r}")
    seen: dict[str, int] = {}
    prompts, cand_out, base_out = [], [], []
    for row in candidate:
        key = _key(row["instruction"])
        j = seen.get(key, 0)
        seen[key] = j + 1
        answers = by_key[key]
        prompts.append(row["instruction"])
        cand_out.append(row["output"])
        base_out.append(answers[min(j, len(answers) - 1)]["output"])
    return prompts, cand_out, base_out


def _generator_name(rows: Sequence[dict], path: str) -> str:
    """The name of the model that wrote an answer file (its ``generator``; the file's name for an unnamed export)."""
    name = next(iter(rows), {}).get("generator")
    return name if name and name != "hf" else os.path.splitext(os.path.basename(path))[0]


# -- CLI ---------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mcpo_jax.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", help="eval prompts (JSON/JSONL: instruction | turns | prompt | messages)")
    p.add_argument("--model", help="Hugging Face model folder to answer the prompts (with --prompts)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
    p.add_argument("--output", help="where to write the AlpacaEval-format answers of --model")
    p.add_argument("--generator", "--name", dest="generator",
                   help="the model's name in the outputs and the table (default: the run's name for an export "
                        "folder called hf, else the model folder name)")
    p.add_argument("--candidate", action="append", default=[], help="existing AlpacaEval-format answers "
                   "to evaluate (repeatable); the --model answers are added to them")
    p.add_argument("--baseline", help="the baseline's AlpacaEval-format answers")
    p.add_argument("--judge", help="oracle:TASK | rule:TASK | reward:module:function | llm:MODEL_DIR")
    p.add_argument("--judge_max_new_tokens", type=int, default=512)
    p.add_argument("--judge_batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--max_prompt_tokens", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--no_chat_template", action="store_true")
    p.add_argument("--num_bootstrap", type=int, default=1000)
    p.add_argument("--results", help="write the win rates (and per-prompt verdicts) to this JSON file")
    return p


def main(argv: Sequence[str] | None = None) -> list[tuple[str, WinRate]]:
    args = _parser().parse_args(argv)
    candidates = list(args.candidate)
    if args.model:
        if not (args.prompts and args.output):
            raise SystemExit("--model needs --prompts and --output")
        import jax.numpy as jnp
        import transformers

        from mcpo_jax.models import from_pretrained

        tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        from mcpo_jax import sharding

        # FSDP over every local device: an 8B model fits where one device could not hold it
        model = from_pretrained(args.model, dtype=getattr(jnp, args.dtype), mesh=sharding.make_mesh(1, -1, 1))
        prompts = load_prompts(args.prompts)
        outputs = generate_outputs(model, tokenizer, [p["instruction"] for p in prompts],
                                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                   temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                   use_chat_template=not args.no_chat_template,
                                   max_prompt_tokens=args.max_prompt_tokens)
        generator = args.generator or model_name(args.model)
        write_outputs(args.output, prompts, outputs, generator)
        print(f"wrote {len(outputs)} answers of {generator} to {args.output}")
        candidates.append(args.output)
    if not args.baseline:
        return []
    if not candidates:
        raise SystemExit("--baseline needs answers to judge: --candidate FILE or --model ... --output FILE")
    if not args.judge:
        raise SystemExit("--baseline needs --judge (oracle:TASK | rule:TASK | reward:module:function | "
                         "llm:MODEL_DIR)")

    judge_kwargs = {}
    if args.judge.startswith("llm:"):
        from mcpo_jax import sharding

        judge_kwargs = {"max_new_tokens": args.judge_max_new_tokens, "batch_size": args.judge_batch_size,
                        "mesh": sharding.make_mesh(1, -1, 1)}
    judge = make_judge(args.judge, **judge_kwargs)
    baseline = load_outputs(args.baseline)
    rows, results = [], {}
    for path in candidates:
        cand = load_outputs(path)
        name = _generator_name(cand, path)
        prompts, cand_out, base_out = pair_with_baseline(cand, baseline, name=path)
        result = win_rate(judge, prompts, cand_out, base_out, num_bootstrap=args.num_bootstrap, seed=args.seed)
        rows.append((name, result))
        results[name] = {**result.summary(), "file": path,
                         "per_prompt": [{"instruction": p, "verdict": v} for p, v in zip(prompts, result.verdicts)]}
    base_name = _generator_name(baseline, args.baseline)
    print(format_table(rows, baseline=base_name))
    if judge.stats:
        print("judge:", dict(judge.stats))
    if args.results:
        with open(args.results, "w", encoding="utf-8") as f:
            json.dump({"baseline": args.baseline, "judge": args.judge, "judge_stats": dict(judge.stats),
                       "results": results}, f, ensure_ascii=False, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
