"""OnMC-PO: batched online preference optimization (paper Sec. 3.2, Appendix B.1 "Batched online setup").

The total training steps are split into S equal segments (paper: 3). At the start of each segment the current
policy samples K completions per prompt (paper: 6, at temperatures 0.6, 0.6, 0.8, 0.8, 1.0, 1.0), a judge ranks
them (paper: iterative pairwise ranking with an LLM judge), the winner becomes y0 and the others the candidates,
and the trainer runs the segment's steps on that data: MC-PO picks the negatives with its kernel, online DPO
(the paper's comparison) a random one. Proposition 3.3 is why y0 should come from the policy itself.

Everything a segment produces is written under ``workdir/online/segment_<s>/``:

* ``samples.jsonl``: one row per prompt, all K completions with their temperatures, the judge's winner/order
  and each judgment (raw judge text included for LLM judges);
* ``data.jsonl``: the training rows: ``pairs`` (prompt, chosen = y0, rejected = the unranked candidates) when the
  judge found the winner only, ``ranked`` (prompt, completions, ranks) after a full ranking;
* ``stats.json``: counts (kept, skipped and why), mean oracle/judge scores where the judge has them, timings.

A segment whose ``data.jsonl`` exists is never regenerated: a run resumes mid-run from the trainer's checkpoint
with the same data (files are written to a temporary name and renamed, so a crash leaves no half file).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from mcpo_jax.judges import Judge, iterative_pairwise_ranking, round_robin_ranking

log = logging.getLogger(__name__)

PAPER_TEMPERATURES = (0.6, 0.6, 0.8, 0.8, 1.0, 1.0)  # Appendix B.1: two completions at each of 0.6, 0.8, 1.0


# -- sampling ----------------------------------------------------------------------------------------------------
def sample_completions(model, tokenizer, prompts: Sequence[Any], *, temperatures: Sequence[float] = PAPER_TEMPERATURES,
                       max_new_tokens: int, top_p: float = 1.0, batch_size: int = 64, seed: int = 0,
                       use_chat_template: bool = True, max_prompt_tokens: int | None = None,
                       gather_weights: bool = True) -> list[list[str]]:
    """K = len(temperatures) completions per prompt from ``model``; completion k uses ``temperatures[k]``.

    The K copies of a prompt go into the same batches with per-row temperatures, so one compiled program
    serves all temperatures. Batches hold ``batch_size`` rows (prompt x temperature), prompts sorted by length.
    """
    from mcpo_jax.data.text import encode_prompts
    from mcpo_jax.online.generate import generate_texts

    encoded = encode_prompts(tokenizer, prompts, use_chat_template=use_chat_template,
                             max_prompt_tokens=max_prompt_tokens)
    k = len(temperatures)
    texts = generate_texts(model, tokenizer, [r for r in encoded for _ in range(k)], max_new_tokens=max_new_tokens,
                           batch_size=batch_size, temperature=np.tile(np.asarray(temperatures, np.float32),
                                                                      len(encoded)),
                           top_p=top_p, seed=seed, width=max(len(r) for r in encoded),  # one program a segment
                           gather_weights=gather_weights)
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]


# -- judging -----------------------------------------------------------------------------------------------------
def judge_completions(judge: Judge, prompts: Sequence[Any], completions: Sequence[Sequence[str]], *,
                      ranking: str = "winner", seed: int = 0) -> list[dict]:
    """Per prompt: {"winner": index, "order": indices best first (None when only the winner is known),
    "judgments": [...]} with the paper's iterative pairwise ranking ("winner") or a full ranking ("full")."""
    judgments: list[dict] = []
    if ranking == "winner":
        orders = iterative_pairwise_ranking(judge, prompts, completions, log=judgments, seed=seed)
    elif ranking == "full":
        if judge.score_based:  # ranks exactly by sorting, no pairwise round robin
            orders = judge.rank_many(prompts, completions)
        else:
            orders = round_robin_ranking(judge, prompts, completions, log=judgments)
    else:
        raise ValueError(f"online.ranking={ranking!r}: expected 'winner' (iterative pairwise) or 'full'")
    per_prompt = [[] for _ in prompts]
    for j in judgments:
        per_prompt[j.pop("prompt_index")].append(j)
    return [{"winner": int(o[0]), "order": [int(x) for x in o] if ranking == "full" else None, "judgments": js}
            for o, js in zip(orders, per_prompt)]


def training_row(prompt, completions: Sequence[str], result: dict,
                 drop_ranks: Sequence[int] = ()) -> tuple[dict | None, str | None]:
    """The training row, or (None, reason skipped): with the winner only known, a ``pairs`` row (chosen = y0 =
    the winner, rejected = the rest, unranked); with a full ranking, a ``ranked`` row (completions = y0 and the
    candidates best first, ranks = their places in the judge's order), so the kernel's rank histogram shows
    which places the negatives came from.

    Candidates identical to y0 (after stripping) or empty are dropped: the readers reject such rows, and a copy of
    y0 is no negative.
    """
    winner = result["winner"]
    chosen = completions[winner]
    if not chosen.strip():
        return None, "empty_winner"
    order = result.get("order")
    others = list(enumerate(order[1:], start=2)) if order else [(None, i) for i in range(len(completions))
                                                                if i != winner]
    if drop_ranks and order:  # Nectar's preprocessing (Sec. 5.1): rank 1 = y0, rank 2 dropped
        others = [(r, i) for r, i in others if r not in drop_ranks]
    kept = [(r, completions[i]) for r, i in others
            if completions[i].strip() and completions[i].strip() != chosen.strip()]
    if not kept:
        return None, "no_distinct_candidates"
    if order:
        return {"prompt": prompt, "completions": [chosen] + [c for _, c in kept],
                "ranks": [1] + [r for r, _ in kept]}, None
    return {"prompt": prompt, "chosen": chosen, "rejected": [c for _, c in kept]}, None


# -- files -------------------------------------------------------------------------------------------------------
def _barrier(name: str) -> None:
    """Multi-host: every process waits until process 0 has written the segment's files (shared filesystem)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
    """Atomic JSONL write (temporary name, then rename). Multi-host: every process samples the same rows in
    SPMD, process 0 writes them."""
    from mcpo_jax.sharding import is_primary

    if not is_primary():
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def segment_bounds(total_steps: int, num_segments: int) -> list[tuple[int, int]]:
    """[start, end) step ranges of S equal segments (the first ones take the remainder)."""
    if num_segments < 1 or total_steps < num_segments:
        raise ValueError(f"cannot split {total_steps} steps into {num_segments} segments")
    base, extra = divmod(total_steps, num_segments)
    bounds, start = [], 0
    for s in range(num_segments):
        end = start + base + (s < extra)
        bounds.append((start, end))
        start = end
    return bounds


def segment_dir(workdir: str, segment: int) -> str:
    """Segment `segment`'s folder in a local workdir (under a URL workdir: `files.Staged(workdir, "online")`)."""
    return os.path.join(workdir, "online", f"segment_{segment}")


def make_segment_data(load_model: Callable[[], Any], tokenizer, load_judge: Callable[[], Judge],
                      prompts: Sequence[Any], out_dir: str, *,
                      temperatures=PAPER_TEMPERATURES, max_new_tokens: int, top_p: float = 1.0,
                      batch_size: int = 64, seed: int = 0, ranking: str = "winner", use_chat_template: bool = True,
                      max_prompt_tokens: int | None = None,
                      score_fn: Callable[[Any, str], float] | None = None, drop_ranks: Sequence[int] = (),
                      gather_weights: bool = True) -> dict:
    """Sample, judge and write one segment's files; returns its stats. Skips the work if data.jsonl exists.

    ``load_model`` and ``load_judge`` are zero-argument loaders, called in turn: the policy is dropped before
    the judge is loaded, so an 8B policy and a 70B judge never share the accelerators' memory.
    """
    data_path = os.path.join(out_dir, "data.jsonl")
    stats_path = os.path.join(out_dir, "stats.json")
    if os.path.exists(data_path):
        log.info("online: %s exists, not regenerating", data_path)
        with open(stats_path, encoding="utf-8") as f:
            return json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    model = load_model()
    completions = sample_completions(model, tokenizer, prompts, temperatures=temperatures,
                                     max_new_tokens=max_new_tokens, top_p=top_p, batch_size=batch_size, seed=seed,
                                     use_chat_template=use_chat_template, max_prompt_tokens=max_prompt_tokens,
                                     gather_weights=gather_weights)
    del model
    t1 = time.perf_counter()
    judge = load_judge()
    before = dict(judge.stats)
    results = judge_completions(judge, prompts, completions, ranking=ranking, seed=seed)
    t2 = time.perf_counter()
    samples, data, skipped = [], [], {}
    # A score-based judge that gives every sample of a prompt the same score expresses no preference: such a
    # row would train y0 against negatives that are just as good (noise); it is skipped as "no_preference".
    for i, (p, c, r) in enumerate(zip(prompts, completions, results)):
        row, reason = training_row(p, c, r, drop_ranks)
        if row is not None and judge.score_based:
            s_ = np.asarray(judge.scores([p] * len(c), list(c)), np.float64)
            if float(s_.max() - s_.min()) <= float(judge.tie_margin):
                row, reason = None, "no_preference"
        samples.append({"prompt": p, "completions": list(c), "temperatures": list(temperatures), **r,
                        "skipped": reason})
        if row is None:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            data.append(row)
    stats = {"prompts": len(prompts), "rows": len(data), "skipped": skipped,
             "completions": sum(len(c) for c in completions),
             "distinct_per_prompt": float(np.mean([len(set(c)) for c in completions])) if completions else 0.0,
             "mean_completion_chars": float(np.mean([len(x) for c in completions for x in c])) if completions else 0.0,
             "sample_seconds": t1 - t0, "judge_seconds": t2 - t1,
             "judge_stats": {k: v - before.get(k, 0) for k, v in judge.stats.items()}}
    if score_fn is not None and completions:
        all_scores = [[score_fn(p, x) for x in c] for p, c in zip(prompts, completions)]
        stats["mean_score"] = float(np.mean(all_scores))
        stats["mean_winner_score"] = float(np.mean([s[r["winner"]] for s, r in zip(all_scores, results)]))
        stats["best_possible_winner_score"] = float(np.mean([max(s) for s in all_scores]))
    write_jsonl(os.path.join(out_dir, "samples.jsonl"), samples)
    from mcpo_jax.sharding import is_primary

    if is_primary():
        with open(stats_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=1)
        os.replace(stats_path + ".tmp", stats_path)
    write_jsonl(data_path, data)  # last: its existence marks the segment's data as complete
    _barrier(f"onmcpo:{out_dir}")
    return stats


# -- driver ------------------------------------------------------------------------------------------------------
def load_online_prompts(o) -> list:
    """The prompt pool of ``config.online``: a registered task's prompts ("task:NAME"; "synthetic" = the sorting
    task's training prompts), a prompts file, or a hub dataset."""
    source, n = o.prompts, int(o.num_prompts)
    if source == "synthetic":
        from mcpo_jax.data import synthetic

        return [r["prompt"] for r in synthetic.sft_rows(n or 1024, seed=int(o.seed))]
    if source.startswith("task:"):  # the task's training prompts (held out from its evaluation prompts)
        from mcpo_jax.data import tasks

        task = tasks.get(source[len("task:"):])
        return list((task.train_prompts or task.prompts)(n or 1024, int(o.seed)))
    if os.path.exists(source):
        from mcpo_jax.data.text import load_prompts

        prompts = [p["instruction"] for p in load_prompts(source)]
    else:
        import datasets

        ds = datasets.load_dataset(source, split=o.prompt_split)
        field = o.prompt_field or next((f for f in ("prompt", "instruction") if f in ds.column_names), None)
        if field is None:
            raise ValueError(f"online.prompts={source!r}: no 'prompt'/'instruction' column "
                             f"(columns {ds.column_names}); set --config.online.prompt_field")
        prompts = list(ds[field])
    return prompts[:n] if n else prompts


def segment_prompts(prompts: Sequence[Any], num_segments: int, seed: int) -> list[list]:
    """The prompt pool shuffled once (seeded) and cut into S equal parts: segment s trains on part s, so the
    S segments together take the steps of one run over the data (App. B.1: "generate preference data for the
    first 150 steps", then the next 150, ...)."""
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [[prompts[i] for i in part] for part in np.array_split(order, num_segments)]


def segment_steps(config, num_prompts: int) -> int:
    """A segment's optimizer steps: its prompts / the effective batch, one pass (App. B.1: "the number of total
    training steps is calculated as the number of total data divided by the effective batch size"; no epochs)."""
    import jax

    from mcpo_jax import data as data_lib

    return data_lib.num_batches(num_prompts, batch_size=int(config.batch_size) // jax.process_count(), num_epochs=1,
                                process_count=jax.process_count())


def segment_config(config, data_path: str):
    """The trainer config of a segment's data: the generated rows, ``ranked`` (a full ranking) or ``pairs``."""
    from mcpo_jax.training.config import prepare, with_overrides

    with open(data_path, encoding="utf-8") as f:
        first = f.readline()
    return prepare(with_overrides(config, [
        ("data.source", data_path),
        ("data.format", "ranked" if first.strip() and "completions" in json.loads(first) else "pairs"),
        ("data.options", {}),
        ("data.min_candidates", 1),  # a prompt may keep fewer than K - 1 distinct candidates
        ("data.eval_source", ""),
        ("data.eval_fraction", 0.0),
    ]))


@dataclasses.dataclass
class _Run:
    """An online run once set up: what the segment loop reads."""

    trainer: Any  # training.loop.Trainer
    workdir: str
    tokenizer: Any
    staged: Any  # files.Staged: the online folder, local (and under a URL workdir, its record there)
    parts: list  # each segment's prompts
    bounds: list  # each segment's [begin, end) steps
    total: int
    initial: str  # the initial policy's folder
    load_judge: Callable[[], Judge]
    score_fn: Callable[[Any, str], float] | None
    cache_dir: str


def train_online(config, workdir: str, *, start_path: str, stop) -> dict:
    """Batched online training (OnMC-PO, or online DPO with ``objective=dpo, sampler=random``) as ONE optimizer
    trajectory: the run's steps (``max_steps``, else what the prompts give) are cut into
    ``online.num_segments`` equal segments; each starts by sampling from the current policy and judging, then
    trains its steps. AdamW state, step counter and lr schedule carry across segments; a rerun resumes from
    the last checkpoint (mid-segment included) with the segment's saved data. The workdir may be a URL
    (gs://...): the segment files and model folders are then written on the local disk, where their readers
    need them, and copied under the URL, from which a rerun on another machine fetches them.
    """
    run = _set_up(config, workdir, start_path=start_path, stop=stop)
    try:
        return _train_segments(config, run, stop)
    finally:
        run.trainer.close()


def _set_up(config, workdir: str, *, start_path: str, stop) -> _Run:
    """The initial policy (a random preset is saved once, so pi_ref and the final evaluation can load it), the
    tokenizer, each segment's prompts and steps, the trainer and the judge's loader."""
    from mcpo_jax import models
    from mcpo_jax import sharding as shd
    from mcpo_jax.judges import make_judge
    from mcpo_jax.training import build, files, loop

    o = config.online
    staged = files.Staged(workdir, "online")
    initial = start_path
    if not initial:
        initial = staged.path("initial")
        if not staged.fetch("initial", "config.json"):
            mesh, rules = shd.mesh_and_rules(config)
            if shd.is_primary():
                models.save_pretrained(build.build_model(config.model, mesh, rules), initial,
                                       tokenizer=build.build_tokenizer(config))
                staged.publish("initial", "config.json")
            _barrier("onmcpo:initial")
            staged.fetch("initial", "config.json")  # the other hosts of a URL workdir
    tokenizer = build.build_tokenizer(config, model_path=initial)
    parts = segment_prompts(load_online_prompts(o), int(o.num_segments), int(o.seed))
    planned = [segment_steps(config, len(p)) for p in parts]
    total = int(config.max_steps) if int(config.max_steps) > 0 else sum(planned)
    trainer = loop.Trainer(config, workdir, total_steps=total, stop=stop, model_path=initial)
    judge_kwargs = {}
    if o.judge.startswith("llm:"):
        judge_kwargs = dict(max_new_tokens=int(o.judge_max_new_tokens), batch_size=int(o.judge_batch_size),
                            dtype=models.dtype_of(o.judge_dtype), mode=o.ranking, mesh=trainer.mesh)
    score_fn = None  # a task's own score of every sample, in each segment's stats.json
    if o.prompts.startswith("task:") or o.prompts == "synthetic":
        from mcpo_jax.data import tasks

        score_fn = tasks.get("sorting" if o.prompts == "synthetic" else o.prompts[len("task:"):]).score
    return _Run(trainer, workdir, tokenizer, staged, parts, segment_bounds(total, int(o.num_segments)), total, initial,
                lambda: make_judge(o.judge, **judge_kwargs), score_fn,
                config.data.cache_dir or files.local_cache_dir(workdir))


def _train_segments(config, run: _Run, stop) -> dict:
    """Each segment not done yet: its reference, its data (sampled and judged, or the saved copy), its steps."""
    from mcpo_jax import sharding as shd
    from mcpo_jax.training import build, files

    o, trainer, staged = config.online, run.trainer, run.staged
    max_prompt_tokens = int(o.max_prompt_tokens) or int(config.data.max_prompt_length)
    segments, result = [], {"status": "completed", "start_step": trainer.step}
    for s, ((begin, end), part) in enumerate(zip(run.bounds, run.parts)):
        if trainer.step >= end:
            segments.append({"segment": s, "steps": [begin, end], "resumed": "done"})
            continue
        name = f"segment_{s}"
        if o.reference == "segment_start" and trainer.needs_reference:
            ref = f"{name}/reference"  # the policy at the segment's start (resume reloads it)
            if not staged.fetch(ref, "config.json"):
                trainer.export(staged.path(ref), run.tokenizer)
                if shd.is_primary():
                    staged.publish(ref, "config.json")
                _barrier(f"onmcpo:reference:{s}")
                staged.fetch(ref, "config.json")
            trainer.set_reference(staged.path(ref))
        log.info("online: segment %d, steps [%d, %d) of %d", s, begin, end, run.total)
        fetched = staged.fetch(name, "data.jsonl")
        stats = make_segment_data(trainer.policy, run.tokenizer, run.load_judge, part, staged.path(name),
                                  temperatures=tuple(float(t) for t in o.temperatures),
                                  max_new_tokens=int(o.max_new_tokens), top_p=float(o.top_p),
                                  batch_size=int(o.generation_batch_size), seed=int(o.seed) * 1000 + s,
                                  ranking=o.ranking, use_chat_template=bool(config.data.use_chat_template),
                                  max_prompt_tokens=max_prompt_tokens, score_fn=run.score_fn,
                                  drop_ranks=tuple(o.drop_ranks), gather_weights=bool(o.gather_weights))
        if not fetched:
            if shd.is_primary():
                staged.publish(name, "data.jsonl")
            _barrier(f"onmcpo:{name}:published")
        if stop.should_stop():
            result.update(status="interrupted", signal=stop.signal or "a signal on another process",
                          step=trainer.step)
            break
        staged.fetch(name, "data.jsonl")  # the other hosts of a URL workdir
        seg_cfg = segment_config(config, staged.path(name, "data.jsonl"))
        train_ds, _ = build.build_datasets(seg_cfg, run.tokenizer, run.cache_dir)
        # pi_ref's weights are kept for the next segment's data when they stay the initial policy's
        trainer.precompute_reference({name: train_ds}, run.cache_dir, keep_reference=o.reference == "initial")
        out = trainer.train(train_ds, None, start_step=begin, end_step=end)
        segments.append({"segment": s, "steps": [begin, end], "data": stats, "final_metrics": out.final_metrics})
        result.update(out.as_dict(), final_metrics=out.final_metrics)
        if out.status != "completed":
            break
    result.update(total_steps=run.total, segments=segments, initial_policy=run.initial)
    if result["status"] == "completed" and config.export_hf:
        result["hf_export"] = trainer.export(os.fspath(files.workdir_path(run.workdir) / "hf"), run.tokenizer)
        result["final_policy"] = result["hf_export"]
    return result
