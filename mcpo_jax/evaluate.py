"""Win-rate evaluation: generate answers for a prompt set, judge them against a baseline's answers.

The paper's metric (Sec. 5.1) is the adjusted win rate (N_cand + N_tie / 2) / (N_cand + N_base + N_tie) with
an LLM judge. Pairs the judge could not parse are reported as ``invalid`` and left out of the denominator.

    # answers in AlpacaEval's output format (instruction, output, generator), usable by external evaluators
    python -m mcpo_jax.evaluate --model runs/x/export --prompts alpaca_eval.json --output runs/x/alpaca.json
    # adjusted win rate with a bootstrap CI against a baseline's answers, with any judge
    python -m mcpo_jax.evaluate --candidate runs/x/alpaca.json --baseline gpt4_turbo.json \
        --judge llm:/models/judge --results runs/x/winrate.json

Prompt files: JSON (a list) or JSONL rows holding ``instruction`` (AlpacaEval), ``turns`` = [{"content": ...}]
(Arena-Hard question files), ``prompt`` (Arena-Hard v2) or ``messages`` (chat). Library functions
(``adjusted_win_rate``, ``bootstrap_ci``, ``win_rate``, ``generate_outputs``) are used by the online loop and
the experiments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from mcpo_jax.online.judges import A, B, INVALID, TIE, Judge


# -- prompt and output files -------------------------------------------------------------------------------------
def _read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} is a {type(row).__name__}, expected an object")
    return rows


def _row_prompt(row: dict, where: str):
    if "instruction" in row:
        instruction = row["instruction"]
        if row.get("input"):  # Alpaca-style instruction + input
            instruction = f"{instruction}\n\n{row['input']}"
        return instruction
    if "turns" in row:
        turns = row["turns"]
        if not turns or not isinstance(turns, list):
            raise ValueError(f"{where}: 'turns' must be a non-empty list")
        if len(turns) > 1:
            raise ValueError(f"{where}: {len(turns)} turns; only single-turn questions can be answered in one go")
        turn = turns[0]
        return turn["content"] if isinstance(turn, dict) else str(turn)
    if "prompt" in row and isinstance(row["prompt"], str):
        return row["prompt"]
    if "messages" in row:
        return list(row["messages"])
    raise ValueError(f"{where}: no prompt field; expected 'instruction', 'turns', 'prompt' or 'messages' "
                     f"(got keys {sorted(row)})")


def load_prompts(path: str) -> list[dict]:
    """Rows ``{"instruction": str | messages, "id": ..., "dataset": ...}`` from an eval prompt file."""
    out = []
    for i, row in enumerate(_read_rows(path)):
        instruction = _row_prompt(row, f"{path}: row {i}")
        ident = row.get("question_id", row.get("uid", row.get("id", i)))
        out.append({"instruction": instruction, "id": ident,
                    "dataset": row.get("dataset", row.get("category", os.path.basename(path)))})
    return out


def load_outputs(path: str) -> dict[str, dict]:
    """AlpacaEval-format answers keyed by instruction text (the key AlpacaEval itself matches on)."""
    out = {}
    for i, row in enumerate(_read_rows(path)):
        if "output" not in row:
            raise ValueError(f"{path}: row {i} has no 'output' (AlpacaEval outputs need instruction + output)")
        out[_key(_row_prompt(row, f"{path}: row {i}"))] = row
    return out


def _key(instruction) -> str:
    return instruction if isinstance(instruction, str) else json.dumps(instruction, sort_keys=True)


def write_outputs(path: str, prompts: Sequence[dict], outputs: Sequence[str], generator: str) -> None:
    """AlpacaEval's model_outputs.json: a list of {instruction, output, generator, dataset}."""
    rows = [{"instruction": p["instruction"], "output": o, "generator": generator,
             "dataset": p.get("dataset", "")} for p, o in zip(prompts, outputs)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False, indent=1)


# -- generation --------------------------------------------------------------------------------------------------
def encode_prompts(tokenizer, instructions: Sequence[Any], *, use_chat_template: bool = True,
                   max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Token ids per prompt: the chat template with a generation prompt when the tokenizer has one."""
    chat = use_chat_template and getattr(tokenizer, "chat_template", None) is not None
    rows = []
    for inst in instructions:
        if chat:
            messages = inst if not isinstance(inst, str) else [{"role": "user", "content": inst}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            if not isinstance(inst, str):
                raise ValueError("chat-message prompts need a tokenizer with a chat template")
            ids = tokenizer(inst)["input_ids"]
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            ids = ids[-max_prompt_tokens:]  # keep the end, where the question and generation prompt are
        rows.append(list(ids))
    return rows


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, *, width: int | None = None,
             multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded [B, W] ids and mask; W = ``width`` or the longest row, rounded up to ``multiple``
    (fewer distinct shapes, fewer compilations)."""
    width = max(width or 0, max(len(r) for r in rows))
    width = -(-width // multiple) * multiple
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def decode_completion(tokenizer, ids: Sequence[int], eos_ids: Sequence[int]) -> str:
    """Text of one generated row, cut at its first EOS."""
    ids = [int(t) for t in ids]
    for n, t in enumerate(ids):
        if t in eos_ids:
            ids = ids[:n]
            break
    return tokenizer.decode(ids, skip_special_tokens=True)


def generate_outputs(model, tokenizer, instructions: Sequence[Any], *, max_new_tokens: int = 512,
                     batch_size: int = 16, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                     use_chat_template: bool = True, max_prompt_tokens: int | None = None) -> list[str]:
    """Answers of ``model`` to ``instructions`` (greedy by default), batched and left-padded."""
    import jax

    from mcpo_jax.online.generate import generate, stop_ids, to_host

    eos_ids = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    rows = encode_prompts(tokenizer, instructions, use_chat_template=use_chat_template,
                          max_prompt_tokens=max_prompt_tokens)
    # batches of similar length waste less compute on padding; results go back in input order
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    outputs: list[str] = [""] * len(rows)
    key = jax.random.key(seed)
    for b, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start:start + batch_size]
        # the last batch is filled up with repeats, so every batch of a width bucket shares one program
        fill = idx + [idx[-1]] * (batch_size - len(idx)) if len(order) > batch_size else idx
        ids, mask = left_pad([rows[i] for i in fill], pad, multiple=32)
        new = to_host(generate(model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, key=jax.random.fold_in(key, b), eos_id=eos_ids))
        for i, row in zip(idx, new):
            outputs[i] = decode_completion(tokenizer, row, eos_ids)
    return outputs


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
    win_rate: float
    ci_low: float
    ci_high: float
    n_cand: int
    n_base: int
    n_tie: int
    n_invalid: int
    verdicts: list = dataclasses.field(repr=False, default_factory=list)

    def summary(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "verdicts"}


def win_rate_from_verdicts(verdicts: Sequence[str], *, num_bootstrap: int = 1000, confidence: float = 0.95,
                           seed: int = 0) -> WinRate:
    c = verdict_counts(list(verdicts))
    lo, hi = bootstrap_ci(verdicts, num_samples=num_bootstrap, confidence=confidence, seed=seed)
    return WinRate(adjusted_win_rate(c["cand"], c["base"], c["tie"]), lo, hi, c["cand"], c["base"], c["tie"],
                   c["invalid"], list(verdicts))


def win_rate(judge: Judge, prompts: Sequence[Any], candidate: Sequence[str], baseline: Sequence[str], *,
             num_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> WinRate:
    """Adjusted win rate of ``candidate`` over ``baseline`` answers (aligned with ``prompts``) under ``judge``.

    The candidate is shown as assistant A; LLM judges evaluate both orders anyway.
    """
    if not (len(prompts) == len(candidate) == len(baseline)):
        raise ValueError(f"{len(prompts)} prompts, {len(candidate)} candidate and {len(baseline)} baseline answers")
    verdicts = judge.compare_many(list(zip(prompts, candidate, baseline)))
    return win_rate_from_verdicts(verdicts, num_bootstrap=num_bootstrap, confidence=confidence, seed=seed)


def format_table(rows: Sequence[tuple[str, WinRate]], *, baseline: str = "baseline") -> str:
    head = f"{'generator':<32} {'win rate %':>10} {'95% CI':>15} {'wins':>6} {'losses':>6} {'ties':>6} {'invalid':>7}"
    lines = [f"adjusted win rate vs {baseline}", head, "-" * len(head)]
    for name, r in rows:
        ci = f"[{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}]"
        lines.append(f"{name[-32:]:<32} {100 * r.win_rate:>10.2f} {ci:>15} {r.n_cand:>6} {r.n_base:>6} "
                     f"{r.n_tie:>6} {r.n_invalid:>7}")
    return "\n".join(lines)


def pair_with_baseline(candidate: dict[str, dict], baseline: dict[str, dict], *, name: str):
    """Aligned (prompts, candidate outputs, baseline outputs) over the candidate's instructions."""
    missing = [k for k in candidate if k not in baseline]
    if missing:
        raise ValueError(f"{name}: {len(missing)} instructions have no baseline answer, e.g. {missing[0][:80]!r}")
    keys = list(candidate)
    prompts = [candidate[k]["instruction"] if "instruction" in candidate[k] else k for k in keys]
    return prompts, [candidate[k]["output"] for k in keys], [baseline[k]["output"] for k in keys]


# -- CLI ---------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mcpo_jax.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", help="eval prompts (JSON/JSONL: instruction | turns | prompt | messages)")
    p.add_argument("--model", help="Hugging Face model folder to answer the prompts (with --prompts)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
    p.add_argument("--output", help="where to write the AlpacaEval-format answers of --model")
    p.add_argument("--generator", help="generator name in the outputs (default: the model folder name)")
    p.add_argument("--candidate", action="append", default=[], help="existing AlpacaEval-format answers "
                   "to evaluate (repeatable); the --model answers are added to them")
    p.add_argument("--baseline", help="the baseline's AlpacaEval-format answers")
    p.add_argument("--judge", help="oracle | reward:module:function | llm:MODEL_DIR")
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
        generator = args.generator or os.path.basename(os.path.normpath(args.model))
        write_outputs(args.output, prompts, outputs, generator)
        print(f"wrote {len(outputs)} answers of {generator} to {args.output}")
        candidates.append(args.output)
    if not args.baseline:
        return []
    if not candidates:
        raise SystemExit("--baseline needs answers to judge: --candidate FILE or --model ... --output FILE")
    if not args.judge:
        raise SystemExit("--baseline needs --judge (oracle | reward:module:function | llm:MODEL_DIR)")
    from mcpo_jax.online.judges import make_judge

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
        name = next(iter(cand.values()), {}).get("generator") or os.path.basename(path)
        prompts, cand_out, base_out = pair_with_baseline(cand, baseline, name=path)
        result = win_rate(judge, prompts, cand_out, base_out, num_bootstrap=args.num_bootstrap, seed=args.seed)
        rows.append((name, result))
        results[name] = {**result.summary(), "file": path,
                         "per_prompt": [{"instruction": p, "verdict": v} for p, v in zip(prompts, result.verdicts)]}
    base_name = next(iter(baseline.values()), {}).get("generator") or os.path.basename(args.baseline)
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
