"""The paper's protocol (Sec. 5.1, App. B.1): per-method learning rate, selected on validation prompts, reported
on held-out test prompts over seeds, with paired tests for the head-to-head comparisons.

For every method:
  1. a learning-rate grid: the paper's (`training.config.PAPER_LR_GRID`: App. B.1 prints 8e-7, 1e-6, 2e-6, 5e-6,
     8e-7, 1e-5, 2e-5, 8e-7 twice, so 6 distinct rates) scaled so that 5e-6 is the base config's learning rate;
     a selected rate on the grid's edge is flagged, and with `max_extensions` the grid is extended past that
     edge (x2 / /2) until the selection is inside it;
  2. beta fixed for every method, as the paper fixes beta = 0.01 for all (App. B.2): the base config's beta
     (0.01 in the paper-scale configs, 2 in configs/demo.py, whose model is too small for 0.01);
  3. every grid point trained on the selection seeds, its greedy answers judged against the start policy's on
     the VALIDATION prompts; the learning rate with the highest mean adjusted win rate over the selection seeds
     is selected (ties: the smaller one). Selection seeds are never reported (`selection_seeds`, disjoint from
     `seeds`); the old single `selection_seed` = seeds[0] is still accepted and marked as biased;
  4. the selected setting run on every reported seed and evaluated on the TEST prompts (disjoint from the
     validation prompts), mean +- std over seeds;
  5. comparisons with the seed as the unit (stats.py): per-seed differences of the test win rates vs the start,
     an exact sign-flip permutation p over seeds and a paired t-test, a bootstrap over seeds then prompts; the
     pooled head-to-head verdicts (sign test) are kept as a description, not as the test.

One start policy per seed, shared by every method (the synthetic task's SFT warm start is built once per seed by
`common.Runner` and reused by path; a real model's start is the released model). Runs are cached under
``OUT/runs/<method>/lr=<lr>/seed<s>/result.json`` (answers and verdicts included), so an interrupted protocol
resumes and methods shared between tables run once.

The task is a parameter (`Task`): the base config (a `configs/X.py[:variant]` spec, plus one for online methods),
how a seed's start policy is built, how a policy answers, the judge and the prompts. `synthetic_task` is the
sorting task with its oracle; `config_task` is any real-model config with a judge and a prompt file (SmolLM2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mcpo_jax.experiments import common, stats
from mcpo_jax.training.config import PAPER_LR_GRID, set_keys

log = logging.getLogger("mcpo_jax.experiments.protocol")

PAPER_LRS = PAPER_LR_GRID  # App. B.1, increasing (one copy, in training/config.py)
PAPER_LR_ANCHOR = 5e-6  # the grid value mapped onto the base config's learning rate
SCORE = {"A": 1.0, "tie": 0.5, "B": 0.0}


def _round(lr: float) -> float:
    return float(f"{lr:.3g}")


def lr_grid(base_lr: float, points: int | Sequence[int] = len(PAPER_LRS)) -> tuple[float, ...]:
    """The paper's grid scaled to the model: PAPER_LRS * base_lr / 5e-6 (rounded to 3 significant digits).
    `points` = k keeps k values centred on the anchor; a sequence keeps those indices."""
    n = len(PAPER_LRS)
    scaled = [_round(v * base_lr / PAPER_LR_ANCHOR) for v in PAPER_LRS]
    if isinstance(points, int):
        if not 1 <= points <= n:
            raise ValueError(f"grid points must be 1..{n}, got {points}")
        anchor = PAPER_LRS.index(PAPER_LR_ANCHOR)
        start = min(max(anchor - (points - 1) // 2, 0), n - points)
        return tuple(scaled[start:start + points])
    return tuple(scaled[i] for i in points)


def grid_edge(lr: float, lrs: Sequence[float]) -> str | None:
    """"low" / "high" when `lr` is the smallest / largest of `lrs` (the optimum may lie outside), else None."""
    if len(lrs) < 2:
        return "low+high"
    return "low" if lr == min(lrs) else "high" if lr == max(lrs) else None


@dataclasses.dataclass(frozen=True)
class Method:
    """A row: trainer overrides (objective, sampler, L, M, ...) and offline or batched online."""

    name: str
    overrides: tuple[tuple[str, Any], ...]
    kind: str = "offline"

    @staticmethod
    def of(name: str, objective: str, sampler: str, *, L: int | None = None, M: int = 1, kind: str = "offline",
           **extra) -> "Method":
        o = dict(objective=objective, sampler=sampler, num_negatives=M, **extra)
        if L is not None:
            o["num_candidates"] = L
        return Method(name, tuple(sorted((k.replace("__", "."), v) for k, v in o.items())), kind)

    @property
    def key(self) -> str:
        slug = ",".join([self.kind] + [f"{k.split('.')[-1]}={v}" for k, v in self.overrides])
        digest = hashlib.sha1(json.dumps([self.kind, self.overrides], default=str).encode()).hexdigest()[:8]
        return f"{slug.replace('/', '_').replace(' ', '')[:80]}-{digest}"


# ------------------------------------------------------------------------------------------------ the task


def load_config(spec: str):
    """`path/to/config.py[:variant]` -> its get_config(variant) (the trainer CLI's convention)."""
    path, _, variant = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} (from {spec!r}) does not exist")
    mod_spec = importlib.util.spec_from_file_location(f"_protocol_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(variant or None)


@dataclasses.dataclass
class Task:
    """What the protocol needs to know about a task; everything else is the base config's."""

    name: str
    base: str  # config spec of the offline runs, e.g. "configs/demo.py" or "configs/smollm2.py:gpu"
    online_base: str  # config spec of the batched online runs ("" = no online methods)
    start: Callable[[int], str]  # seed -> start policy (HF folder); also the reference policy
    answers: Callable[[str, Sequence[str]], list[str]]  # (policy folder, prompts) -> greedy answers
    judge: Any  # mcpo_jax.judges.Judge
    validation_prompts: list[str]
    test_prompts: list[str]
    overrides: tuple[tuple[str, Any], ...] = ()  # applied to every run's config (sizes for toy runs)
    online_overrides: tuple[tuple[str, Any], ...] = ()  # applied to the online runs' configs after `overrides`
    # (prompts, answers) -> {name: value}: task-specific answer metrics (e.g. exact answers on repeat prompts)
    answer_metrics: Callable[[Sequence[str], Sequence[str]], dict] | None = None

    def base_lr(self, kind: str = "offline") -> float:
        return float(load_config(self.online_base if kind == "online" else self.base).optimizer.learning_rate)

    def run_config(self, method: Method, lr: float, seed: int, start: str, workdir: str):
        spec = self.online_base if method.kind == "online" else self.base
        if not spec:
            raise ValueError(f"{method.name} is an online method but the task has no online config")
        c = load_config(spec)
        with c.unlocked():
            c.name = f"{method.name}-lr{lr:g}-seed{seed}"
            c.seed = int(seed)
            c.model.path = start
            c.model.preset = ""
            c.warm_start = None  # the start policy is built once per seed, outside the run
            c.final_eval.judge = ""  # the protocol evaluates (validation and test prompts)
            c.checkpoint.save_every = 0
            c.checkpoint.keep = 1
            c.checkpoint.async_save = False
            c.export_hf = True
            c.progress_bar = False
            c.tensorboard = False
            c.optimizer.learning_rate = float(lr)
            if method.kind == "online":
                c.online.seed = int(seed)
        set_keys(c, self.overrides)
        if method.kind == "online":
            set_keys(c, self.online_overrides)
        set_keys(c, method.overrides)
        if method.kind == "online" and "num_candidates" not in dict(method.overrides):
            c.num_candidates = len(c.online.temperatures) - 1
        return c


def _split(prompts: Sequence[str], num_validation: int, num_test: int) -> tuple[list[str], list[str]]:
    """Disjoint validation / test prompts, assigned by a hash of the prompt (stable under reordering)."""
    unique = list(dict.fromkeys(prompts))
    side = lambda p: int(hashlib.sha1(p.encode()).hexdigest(), 16) % 2
    val = [p for p in unique if side(p) == 0][:num_validation]
    test = [p for p in unique if side(p) == 1][:num_test]
    if len(val) < num_validation or len(test) < num_test:
        raise ValueError(f"{len(unique)} distinct prompts give {len(val)} validation and {len(test)} test prompts;"
                         f" asked for {num_validation} and {num_test}")
    return val, test


def synthetic_task(out: str, scale: str = "small", *, base: str = "configs/demo.py",
                   online_base: str = "configs/demo.py:online", num_validation: int = 256, num_test: int = 512,
                   overrides: Sequence[tuple[str, Any]] = (), online_overrides: Sequence[tuple[str, Any]] = ()) -> Task:
    """The sorting task: SFT warm start per seed from `common.Runner` (SCALES[scale]'s recipe, cached under
    OUT/<scale>/sft/seed<s>), greedy answers, the oracle judge, prompts no training row can contain."""
    from mcpo_jax.data import synthetic
    from mcpo_jax.judges import oracle_judge

    runner = common.Runner(out, scale)
    pool = synthetic.prompts(4 * (num_validation + num_test), seed=1)
    val, test = _split(pool, num_validation, num_test)
    gated = common.SCALES[scale].get("gate", False)

    def start(seed: int) -> str:
        """The seed's SFT export; at a gated scale it must pass `common.sft_gate` on the repeat-digit test prompts
        before any preference run starts from it (else GateFailed stops the protocol)."""
        path = runner.sft(seed)
        if gated:
            gate_path = os.path.join(runner.sft_dir(seed), "gate.json")
            if not os.path.exists(gate_path):
                _write(gate_path, common.sft_gate(path, test, common.greedy_answers(path, test)))
            gate = _read(gate_path)
            log.info("SFT gate, seed %d: %s", seed, json.dumps(gate))
            if not gate["passed"]:
                raise common.GateFailed(
                    f"SFT seed {seed} ({path}) fails the gate: greedy dedup {100 * gate['greedy_dedup']:.1f}% of "
                    f"{gate['repeat_prompts']} repeat-digit test prompts (need >= {100 * gate['threshold']:.0f}%), "
                    f"log-prob order {gate['order']} (need dedup, correct first): this SFT lacks the structure the "
                    "experiment tests; no preference run was started from it")
        return path

    return Task("synthetic", base, online_base, start, common.greedy_answers, oracle_judge("sorting"), val, test,
                tuple(overrides), tuple(online_overrides), answer_metrics=sorting_metrics)


def sorting_metrics(prompts: Sequence[str], answers: Sequence[str]) -> dict:
    """Exact-answer rates (all prompts, repeat-digit prompts) and the dedup-error rate on repeat-digit prompts."""
    from mcpo_jax.data import synthetic

    digits = [synthetic.parse_prompt(p) for p in prompts]
    exact = [a.strip() == "".join(sorted(d)) for a, d in zip(answers, digits)]
    rep = [i for i, d in enumerate(digits) if synthetic.has_repeats(d)]
    dedup = [answers[i].strip() == "".join(sorted(set(digits[i]))) for i in rep]
    return {"exact": float(np.mean(exact)), "exact_repeat": float(np.mean([exact[i] for i in rep])) if rep else
            float("nan"), "dedup_repeat": float(np.mean(dedup)) if rep else float("nan")}


def config_task(base: str, online_base: str, model_dir: str, prompts_path: str, judge: str, *,
                num_validation: int = 64, num_test: int = 256, max_new_tokens: int = 256, batch_size: int = 64,
                overrides: Sequence[tuple[str, Any]] = (), online_overrides: Sequence[tuple[str, Any]] = ()) -> Task:
    """A real model: every seed starts from `model_dir` (the released instruct model, as in the paper's
    instruct setup), answers greedily with its chat template, judged by `judge` (a judges.make_judge spec)."""
    from mcpo_jax import evaluate
    from mcpo_jax.data.text import load_prompts
    from mcpo_jax.judges import make_judge

    if prompts_path.startswith("task:"):  # a registered task's held-out prompts (e.g. task:instructions)
        from mcpo_jax.data import tasks

        prompts = list(tasks.get(prompts_path[len("task:"):]).prompts(4 * (num_validation + num_test), 1))
    else:
        rows = load_prompts(prompts_path)
        prompts = [r["instruction"] if isinstance(r, dict) else r for r in rows]
    val, test = _split([p for p in prompts if isinstance(p, str)], num_validation, num_test)

    def answers(policy: str, ps: Sequence[str]) -> list[str]:
        import transformers

        from mcpo_jax import models

        tok = transformers.AutoTokenizer.from_pretrained(policy if os.path.exists(
            os.path.join(policy, "tokenizer_config.json")) else model_dir)
        return evaluate.generate_outputs(models.from_pretrained(policy), tok, list(ps), batch_size=batch_size,
                                         max_new_tokens=max_new_tokens)

    return Task("config", base, online_base, lambda seed: model_dir, answers, make_judge(judge), val, test,
                tuple(overrides), tuple(online_overrides))


# ------------------------------------------------------------------------------------------------- runs


def _read(path):
    with open(path) as f:
        return json.load(f)


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def _verdicts(judge, prompts, a, b) -> list[str]:
    return list(judge.compare_many(list(zip(prompts, a, b))))


def win_rate_of(verdicts: Sequence[str]) -> float:
    valid = [SCORE[v] for v in verdicts if v in SCORE]
    return float(np.mean(valid)) if valid else float("nan")


def _last_eval_metrics(paths: Sequence[str]) -> dict:
    """The last held-out record of the run's metrics.jsonl (heldout/* margins and rank correlations)."""
    last: dict = {}
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    if r.get("split") == "eval":
                        last = r
    return {k: v for k, v in last.items() if k.startswith("heldout/") or k in ("loss", "rewards/accuracies")}


class NotRun(RuntimeError):
    """A (method, lr, seed) run that is not cached, in a protocol that only reports (train=False)."""


class Protocol:
    """Runs (method, lr, seed) under OUT, selects, reruns, compares; every run cached on disk."""

    def __init__(self, task: Task, out: str, *, seeds: Sequence[int] = (0, 1, 2), grid: Sequence[float] = (),
                 online_grid: Sequence[float] = (), selection_seed: int | None = None,
                 selection_seeds: Sequence[int] = (), max_extensions: int = 0, extension_factor: float = 2.0,
                 train: Callable | None = None, train_online: Callable | None = None, report_only: bool = False):
        self.task, self.out = task, os.path.abspath(out)
        self.seeds = tuple(seeds)
        if len(self.seeds) < 1:
            raise ValueError("at least one seed")
        if selection_seeds:
            self.selection_seeds = tuple(selection_seeds)
            shared = sorted(set(self.selection_seeds) & set(self.seeds))
            if shared:
                raise ValueError(f"selection seeds {shared} are also reported seeds: selection seeds must not be "
                                 "reported (their validation optimum inflates their test score)")
        else:  # the old protocol: one selection seed, reused in the report (flagged in the tables)
            self.selection_seeds = (self.seeds[0] if selection_seed is None else selection_seed,)
        self.selection_seed = self.selection_seeds[0]
        self.selection_reused = bool(set(self.selection_seeds) & set(self.seeds))
        self.max_extensions, self.extension_factor = int(max_extensions), float(extension_factor)
        self.grid = tuple(grid) or lr_grid(task.base_lr())
        self.online_grid = tuple(online_grid) or (lr_grid(task.base_lr("online")) if task.online_base else ())
        self._train = train or common._train
        self._train_online = train_online or common._train_online
        self._start_answers: dict[int, dict] = {}
        self.report_only = report_only

    # -- the start policy of a seed, and its answers (the baseline of every win rate) ----------------------
    def start_answers(self, seed: int) -> dict:
        if seed not in self._start_answers:
            path = os.path.join(self.out, "start", f"seed{seed}.json")
            if os.path.exists(path):
                self._start_answers[seed] = _read(path)
            else:
                policy = self.task.start(seed)
                rec = {"policy": policy,
                       "validation": self.task.answers(policy, self.task.validation_prompts),
                       "test": self.task.answers(policy, self.task.test_prompts)}
                _write(path, rec)
                self._start_answers[seed] = rec
        return self._start_answers[seed]

    def run_dir(self, method: Method, lr: float, seed: int) -> str:
        return os.path.join(self.out, "runs", method.key, f"lr={lr:g}", f"seed{seed}")

    def run(self, method: Method, lr: float, seed: int) -> dict:
        wd = self.run_dir(method, lr, seed)
        path = os.path.join(wd, "result.json")
        if os.path.exists(path):
            return _read(path)
        if self.report_only:
            raise NotRun(f"not run: lr {lr:g} seed {seed}")
        start = self.start_answers(seed)
        if os.path.exists(wd):
            shutil.rmtree(wd)
        config = self.task.run_config(method, lr, seed, start["policy"], wd)
        t0 = time.time()
        if method.kind == "online":
            summary = self._train_online(config, wd)
            policy = summary.get("final_policy")
            segs = sorted(d for d in os.listdir(os.path.join(wd, "online"))) if os.path.isdir(
                os.path.join(wd, "online")) else []
            metrics = [os.path.join(wd, "online", d, "train", "metrics.jsonl") for d in segs]
        else:
            summary = self._train(config, wd)
            policy = summary.get("hf_export")
            metrics = [os.path.join(wd, "metrics.jsonl")]
        if summary.get("status") != "completed" or not policy:
            raise RuntimeError(f"{method.name} lr {lr:g} seed {seed}: training ended with {summary.get('status')!r}")
        seconds = time.time() - t0
        result = {"method": method.name, "key": method.key, "kind": method.kind, "lr": lr, "seed": seed,
                  "overrides": dict(method.overrides), "train_seconds": seconds, "steps": summary.get("total_steps"),
                  "git": common.git_state(), "heldout": _last_eval_metrics(metrics),
                  "train_diag": train_diagnostics(metrics, int(config.num_candidates))}
        for split, prompts in (("validation", self.task.validation_prompts), ("test", self.task.test_prompts)):
            answers = self.task.answers(policy, prompts)
            verdicts = _verdicts(self.task.judge, prompts, answers, start[split])
            result[split] = {"answers": answers, "verdicts": verdicts, "win_rate": win_rate_of(verdicts)}
            if self.task.answer_metrics is not None:
                result[split]["metrics"] = self.task.answer_metrics(prompts, answers)
        for root, dirs, _ in os.walk(wd):  # keep the answers and metrics, not the weights
            for d in list(dirs):
                if d in ("checkpoints", "cache", "hf", "export"):
                    shutil.rmtree(os.path.join(root, d), ignore_errors=True)
                    dirs.remove(d)
        _write(path, result)
        log.info("%s lr %g seed %d: validation %.3f test %.3f (%.0fs)", method.name, lr, seed,
                 result["validation"]["win_rate"], result["test"]["win_rate"], seconds)
        return result

    # -- steps 1-4 ------------------------------------------------------------------------------------------
    def select(self, method: Method) -> dict:
        """The lr with the best mean validation win rate over the selection seeds; while it sits on the grid's
        edge, up to `max_extensions` points are added past that edge (x / ÷ extension_factor)."""
        lrs = sorted(self.online_grid if method.kind == "online" else self.grid)
        extended: list[float] = []
        while True:
            per_seed = {lr: [self.run(method, lr, s)["validation"]["win_rate"] for s in self.selection_seeds]
                        for lr in lrs}
            grid = {lr: float(np.mean(v)) for lr, v in per_seed.items()}
            lr = select_lr(grid)
            edge = grid_edge(lr, lrs)
            if edge is None or len(extended) >= self.max_extensions:
                break
            new = _round(lrs[0] / self.extension_factor) if edge.startswith("low") else _round(
                lrs[-1] * self.extension_factor)
            log.info("%s: selected lr %g is on the grid's %s edge; extending the grid with %g", method.name, lr,
                     edge, new)
            extended.append(new)
            lrs = sorted(lrs + [new])
        if edge is not None:
            log.warning("%s: selected lr %g is on the %s edge of the grid %s: the optimum may lie outside",
                        method.name, lr, edge, lrs)
        return {"grid": grid, "lr": lr, "edge": edge, "extended": extended, "per_seed_grid": per_seed}

    def evaluate(self, method: Method, lr: float | None = None) -> dict:
        """Select (unless `lr` is given: a pre-declared carry-over), then run the reported seeds."""
        sel = self.select(method) if lr is None else {"grid": {}, "lr": lr, "edge": None, "extended": [],
                                                        "per_seed_grid": {}}
        runs = [self.run(method, sel["lr"], s) for s in self.seeds]
        return {"method": method.name, "key": method.key, "method_obj": method, "selected_lr": sel["lr"],
                "grid": sel["grid"], "edge": sel["edge"], "extended": sel["extended"],
                "per_seed_grid": sel["per_seed_grid"], "selection_seeds": list(self.selection_seeds),
                "runs": runs, "test_win_rates": [r["test"]["win_rate"] for r in runs]}

    # -- step 5 ---------------------------------------------------------------------------------------------
    def compare(self, a: dict, b: dict, *, alternative: str = "two-sided") -> dict:
        """A vs B on the test prompts, seed by seed (same seeds). The unit is the seed: d_s = A's test win rate vs
        the start minus B's (seed s), tested by an exact sign-flip permutation p and a paired t-test
        (`alternative` = "greater": A > B, one-sided), with a bootstrap over seeds then prompts of the per-prompt
        score differences. The head-to-head verdicts pooled over seeds (sign test) are descriptive."""
        by_seed_b = {r["seed"]: r for r in b["runs"]}
        wins = losses = ties = 0
        per_seed = []
        scores_a, scores_b = [], []
        for ra in a["runs"]:
            rb = by_seed_b[ra["seed"]]
            v = _verdicts(self.task.judge, self.task.test_prompts, ra["test"]["answers"], rb["test"]["answers"])
            w, l, t = v.count("A"), v.count("B"), v.count("tie")
            per_seed.append({"seed": ra["seed"], "wins": w, "losses": l, "ties": t, "p": stats.sign_test(w, l)})
            wins, losses, ties = wins + w, losses + l, ties + t
            scores_a.append([SCORE.get(x, np.nan) for x in ra["test"]["verdicts"]])
            scores_b.append([SCORE.get(x, np.nan) for x in rb["test"]["verdicts"]])
        boot = stats.paired_bootstrap(np.nanmean(scores_a, axis=0), np.nanmean(scores_b, axis=0))
        return {"a": a["method"], "b": b["method"], "lr_a": a["selected_lr"], "lr_b": b["selected_lr"],
                "wins": wins, "losses": losses, "ties": ties, "sign_p": stats.sign_test(wins, losses),
                "per_seed": per_seed, "bootstrap": boot,
                "seed_level": seed_level(np.asarray(scores_a) - np.asarray(scores_b), alternative=alternative),
                "seeds": [r["seed"] for r in a["runs"]]}


def seed_level(D: np.ndarray, *, alternative: str = "two-sided") -> dict:
    """The seed-level test of a [seeds, prompts] matrix of per-prompt score differences (NaN = unjudged): the
    per-seed mean differences, their exact sign-flip p, the paired t-test, the bootstrap over seeds then prompts."""
    D = np.asarray(D, float)
    d = np.nanmean(D, axis=1)
    return {"diffs": d.tolist(), "mean": float(d.mean()), "alternative": alternative,
            "sign_flip_p": stats.sign_flip_p(d, alternative=alternative),
            "t_test": stats.paired_t(d, alternative=alternative),
            "bootstrap": stats.hierarchical_bootstrap(D, num_samples=4000)}


def train_diagnostics(metrics_paths: Sequence[str], num_candidates: int, last: int = 8) -> dict:
    """Kernel numbers over the last `last` logged training steps: the entropy of the kernel's weights, the share
    of negatives that were y0 (Algorithm 1's zero-gradient draws) and that were the best remaining candidate
    (dataset rank 8 - L of 7 ranked answers: the hardest by quality)."""
    rows = []
    for path in metrics_paths:
        if os.path.exists(path):
            with open(path) as f:
                rows += [json.loads(x) for x in f if x.strip()]
    rows = [r for r in rows if r.get("split", "train") == "train"][-last:]
    if not rows:
        return {}
    mean = lambda k: float(np.mean([r[k] for r in rows if k in r])) if any(k in r for r in rows) else float("nan")
    out = {"entropy": mean("kernel/entropy"), "selected_is_y0": mean("kernel/selected_is_y0")}
    hist = [sum(x) for x in zip(*[r["kernel/rank_hist"] for r in rows if "kernel/rank_hist" in r])]
    best = 8 - int(num_candidates)
    if hist and sum(hist) > 0 and best < len(hist):
        out["best_remaining"] = hist[best] / sum(hist)
    return out


def select_lr(grid: dict[float, float]) -> float:
    """The learning rate with the highest validation win rate; ties (and NaNs last) go to the smaller one."""
    if not grid:
        raise ValueError("empty learning-rate grid")
    return min(grid, key=lambda lr: (-(grid[lr] if grid[lr] == grid[lr] else -math.inf), lr))


# ----------------------------------------------------------------------------------------------- tables


def fmt_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-").replace("e+0", "e")


def cell(ev: dict | None, *, scale: float = 100.0) -> str:
    """`mean ± std (lr X)` of the test win rates over seeds; `(n=k)` when fewer than 3 seeds."""
    if not ev:
        return "—"
    m, s, n = common.mean_std(ev["test_win_rates"])
    if n == 0:
        return f"— (lr {fmt_lr(ev['selected_lr'])})"
    text = f"{scale * m:.1f} ± {scale * s:.1f}" if n > 1 else f"{scale * m:.1f}"
    return text + f" (lr {fmt_lr(ev['selected_lr'])}" + (f", n={n})" if n < 3 else ")")


def grid_table(rows: Sequence[str], cols: Sequence[str], evals: dict[tuple[str, str], dict], *,
               row_header: str = "method") -> str:
    lines = [f"| {row_header} | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(cell(evals.get((r, c))) for c in cols) + " |")
    return "\n".join(lines)


def heldout_summary(ev: dict) -> str:
    keys = ("heldout/margin_mean", "heldout/margin_min", "heldout/spearman")
    vals = {k: [r["heldout"].get(k) for r in ev["runs"] if r.get("heldout", {}).get(k) is not None] for k in keys}
    return " | ".join(("—" if not v else f"{np.mean(v):.2f}") for v in vals.values())


def method_table(names: Sequence[str], evals: dict[str, dict], *, start_label: str = "start (SFT)") -> str:
    """Table 1: test win rate vs the start policy with the selected lr, the validation win rate of every grid
    point (selection seed), and the sampler-independent held-out metrics (mean over seeds)."""
    lines = ["| method | test win rate vs " + start_label + " (%) | selected lr | validation win rate by lr (%) "
             "| margin over all candidates (mean) | (min) | Spearman vs data ranking | test W/L vs start (sign p) |",
             "|---|---|---|---|---|---|---|---|"]
    for n in names:
        ev = evals.get(n)
        if not ev:
            lines.append(f"| {n} | — | — | — | — | — | — | — |")
            continue
        grid = ", ".join(f"{fmt_lr(lr)}: {100 * v:.1f}" for lr, v in sorted(ev["grid"].items())) or "carried over"
        verdicts = [v for r in ev["runs"] for v in r["test"]["verdicts"]]
        w, l = verdicts.count("A"), verdicts.count("B")
        lines.append(f"| {n} | {cell(ev)} | {fmt_lr(ev['selected_lr'])}{edge_mark(ev)} | {grid} "
                     f"| {heldout_summary(ev)} | {w}/{l} ({stats.format_p(stats.sign_test(w, l))}) |")
    return "\n".join(lines)


def edge_mark(ev: dict) -> str:
    return f" (⚠ {ev['edge']} edge of the grid)" if ev.get("edge") else ""


def comparison_table(comparisons: Sequence[dict]) -> str:
    """Seed-level columns first (the test); the pooled head-to-head counts after them (a description)."""
    lines = ["| A vs B (test prompts) | per-seed Δ win rate vs start (pp): mean [95% t CI] | sign-flip p (seeds) "
             "| paired t p | bootstrap seeds→prompts [95% CI] | pooled A wins / B wins / ties (sign p, descriptive) "
             "| per seed Δ (pp) |",
             "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        sl = c["seed_level"]
        t, b = sl["t_test"], sl["bootstrap"]
        side = "" if sl["alternative"] == "two-sided" else " (one-sided)"
        per = ", ".join(f"s{s}: {100 * d:+.1f}" for s, d in zip(c["seeds"], sl["diffs"]))
        lines.append(
            f"| {c['a']} (lr {fmt_lr(c['lr_a'])}) vs {c['b']} (lr {fmt_lr(c['lr_b'])}) "
            f"| {100 * sl['mean']:+.1f} [{100 * t['ci_low']:+.1f}, {100 * t['ci_high']:+.1f}] "
            f"| {stats.format_p(sl['sign_flip_p'])}{side} | {stats.format_p(t['p'])}{side} "
            f"| {100 * b['diff']:+.1f} [{100 * b['ci_low']:+.1f}, {100 * b['ci_high']:+.1f}] "
            f"| {c['wins']} / {c['losses']} / {c['ties']} ({stats.format_p(c['sign_p'])}) | {per} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- experiments


def table1_methods(baselines: Sequence[tuple[str, str]] = ()) -> list[Method]:
    """DPO, RNCE, MC-PO (L = 5 candidates from the base config, M = 1) + the given (name, objective) baselines,
    each with a uniformly random negative as in the paper."""
    return ([Method.of("DPO", "dpo", "random"), Method.of("RNCE", "rnce", "random")]
            + [Method.of(n, o, "random") for n, o in baselines] + [Method.of("MC-PO", "mcpo", "mc")])


# The baselines that beat the SFT start in docs/results.md's Table 1 (one lr for all): RPO, CPO, KTO, APO, SPPO, NCA.
WINNING_BASELINES = (("RPO", "rpo"), ("CPO", "cpo"), ("KTO", "kto"), ("APO", "apo_zero"), ("SPPO", "sppo"),
                     ("NCA", "nca"))
SAMPLERS = (("MC", "mc"), ("Max", "max"), ("Min", "min"), ("Random", "random"))


def fig2_methods(candidates: Sequence[int], base_L: int | None = None) -> dict[tuple[str, str], Method]:
    """MC / Max / Min / Random x L; at the base config's L the methods are Table 1's runs (MC = MC-PO)."""
    out = {}
    for L in candidates:
        for name, sampler in SAMPLERS:
            # with one candidate every sampler is the same run (the MC one)
            label = "MC-PO" if (name == "MC" and L == base_L) else f"MC-PO {name} (L = {L})"
            out[(name, f"L = {L}")] = Method.of(label, "mcpo", sampler if L > 1 else "mc",
                                                L=None if L == base_L else L)
    return out


def table3_methods(ms: Sequence[int]) -> dict[tuple[str, str], Method]:
    out = {}
    for M in ms:
        out[("RNCE", f"M = {M}")] = Method.of(f"RNCE (M = {M})", "rnce", "random", M=M)
        out[("MC-PO", f"M = {M}")] = Method.of(f"MC-PO (M = {M})", "mcpo", "mc", M=M)
    return out


def online_methods() -> list[Method]:
    return [Method.of("OnMC-PO", "mcpo", "mc", kind="online"), Method.of("Online DPO", "dpo", "random", kind="online")]


def run_all(proto: Protocol, *, table1: bool = True, baselines: Sequence[tuple[str, str]] = WINNING_BASELINES,
            fig2: Sequence[int] = (5, 3, 1), table3: Sequence[int] = (1, 2, 3), online: bool = False,
            extra: Sequence[Method] = ()) -> dict:
    """Every requested experiment; failures of one method are recorded and the others still run."""
    record: dict[str, Any] = {"task": proto.task.name, "base": proto.task.base, "online_base": proto.task.online_base,
                              "seeds": list(proto.seeds), "selection_seed": proto.selection_seed,
                              "selection_seeds": list(proto.selection_seeds),
                              "selection_reused": proto.selection_reused,
                              "grid": list(proto.grid), "validation_prompts": len(proto.task.validation_prompts),
                              "test_prompts": len(proto.task.test_prompts), "failures": [], "sections": []}
    t0 = time.time()
    cache: dict[str, dict] = {}

    def ev(m: Method):
        if m.key not in cache:
            try:
                cache[m.key] = proto.evaluate(m)
            except NotRun as e:
                record["failures"].append({"method": m.name, "error": str(e)})
                cache[m.key] = {}
            except common.GateFailed:
                raise  # the start policies lack what the experiment tests: stop, say so
            except Exception as e:  # noqa: BLE001 - reported, the other methods still run
                log.exception("%s failed", m.name)
                record["failures"].append({"method": m.name, "error": repr(e)})
                cache[m.key] = {}
        return cache[m.key] or None

    def comparisons(pairs):
        out = []
        for a, b in pairs:
            ea, eb = ev(a), ev(b)
            if ea and eb:
                out.append(proto.compare(ea, eb))
        return out

    base_L = int(load_config(proto.task.base).num_candidates)
    if table1:
        methods = table1_methods(baselines)
        evals = {m.name: ev(m) for m in methods}
        names = [m.name for m in methods]
        by = {m.name: m for m in methods}
        pairs = [(by["MC-PO"], by["DPO"]), (by["MC-PO"], by["RNCE"])]
        pairs += [(by["MC-PO"], by[n]) for n, _ in baselines]
        comps = comparisons(pairs)
        record["sections"].append({"name": "table1", "title": "Table 1 under the protocol",
                                   "markdown": method_table(names, evals) + "\n\n" + comparison_table(comps),
                                   "evals": {n: _slim(e) for n, e in evals.items()}, "comparisons": comps})
    for name, spec, rows, cols, compare_pairs in (
        ("fig2", fig2_methods(fig2, base_L) if fig2 else {}, [s for s, _ in SAMPLERS], [f"L = {L}" for L in fig2],
         lambda ms: [(ms[(a, c)], ms[(b, c)]) for c in [f"L = {L}" for L in fig2 if L > 1]
                     for a, b in (("Max", "MC"), ("MC", "Random"), ("Random", "Min"))]),
        ("table3", table3_methods(table3) if table3 else {}, ["RNCE", "MC-PO"], [f"M = {M}" for M in table3],
         lambda ms: [(ms[("MC-PO", c)], ms[("RNCE", c)]) for c in [f"M = {M}" for M in table3]]
         + [(ms[("MC-PO", f"M = {M}")], ms[("MC-PO", f"M = {table3[0]}")]) for M in table3[1:]]),
    ):
        if not spec:
            continue
        evals = {k: ev(m) for k, m in spec.items()}
        comps = comparisons(compare_pairs(spec))
        title = ("Fig. 2 under the protocol: test win rate vs start (%) by sampler x number of candidates"
                 if name == "fig2" else "Table 3 under the protocol: test win rate vs start (%) by number of negatives")
        record["sections"].append({"name": name, "title": title,
                                   "markdown": grid_table(rows, cols, evals, row_header="sampler" if name == "fig2"
                                                          else "method") + "\n\n" + comparison_table(comps),
                                   "evals": {f"{r} | {c}": _slim(e) for (r, c), e in evals.items()},
                                   "comparisons": comps})
    if online:
        on = online_methods()
        evals = {m.name: ev(m) for m in on}
        comps = comparisons([(on[0], on[1])])
        record["online_grid"] = list(proto.online_grid)
        record["sections"].append({"name": "online", "title": "OnMC-PO vs online DPO under the protocol",
                                   "markdown": method_table([m.name for m in on], evals) + "\n\n"
                                   + comparison_table(comps),
                                   "evals": {n: _slim(e) for n, e in evals.items()}, "comparisons": comps})
    if extra:  # a list of methods; MC-PO (if listed) against each of the others
        evals = {m.name: ev(m) for m in extra}
        mc = [m for m in extra if m.name == "MC-PO"]
        comps = comparisons([(mc[0], m) for m in extra if mc and m is not mc[0]])
        record["sections"].append({"name": "methods", "title": "Methods under the protocol",
                                   "markdown": method_table([m.name for m in extra], evals) + (
                                       "\n\n" + comparison_table(comps) if comps else ""),
                                   "evals": {n: _slim(e) for n, e in evals.items()}, "comparisons": comps})
    record["seconds"] = time.time() - t0
    used = {(r["key"], r["lr"], r["seed"]) for e in cache.values() if e for r in e["runs"]}
    used |= {(e["key"], lr, proto.selection_seed) for e in cache.values() if e for lr in e["grid"]}
    methods = {e["key"]: e for e in cache.values() if e}
    record["train_seconds"] = sum(
        proto.run(methods[k]["method_obj"], lr, seed)["train_seconds"] for k, lr, seed in used)
    record["runs"] = len(used)
    record["grid_points"] = len(proto.grid)
    return record


def _slim(ev: dict | None) -> dict | None:
    if not ev:
        return None
    return {"method": ev["method"], "selected_lr": ev["selected_lr"], "grid": {str(k): v for k, v in ev["grid"].items()},
            "edge": ev.get("edge"), "extended": ev.get("extended", []), "test_win_rates": ev["test_win_rates"],
            "runs": [{k: r[k] for k in ("seed", "lr", "steps", "train_seconds", "heldout")} for r in ev["runs"]]}


def markdown(record: dict, *, heading: str = "###") -> str:
    online = (f"; online runs: {', '.join(fmt_lr(x) for x in record['online_grid'])}"
              if record.get("online_grid") else "")
    sel = record.get("selection_seeds", [record["selection_seed"]])
    reused = (" — the selection seed is also reported (the old protocol: its validation optimum inflates its test "
              "score)" if record.get("selection_reused", True) else " (never reported)")
    head = (f"{heading} The paper's protocol on `{record['base']}` ({record['task']} task)\n\n"
            f"Learning-rate grid {', '.join(fmt_lr(x) for x in record['grid'])}{online} (the paper's grid "
            f"scaled to the base config's learning rate), selected per method on {record['validation_prompts']} validation "
            f"prompts with seed{'s' if len(sel) > 1 else ''} {', '.join(map(str, sel))}{reused}, reported on "
            f"{record['test_prompts']} test prompts over "
            f"seeds {', '.join(map(str, record['seeds']))} (mean ± std; every cell names its selected lr). "
            f"{record['runs']} runs, {record['train_seconds'] / 60:.1f} min of summed training (the runs' own "
            f"wall time, evaluation not included).\n")
    parts = [head]
    for s in record["sections"]:
        parts += [f"**{s['title']}**", "", s["markdown"], ""]
    if record["failures"]:
        parts.append("Failed: " + "; ".join(f"{f['method']}: {f['error']}" for f in record["failures"]))
    return "\n".join(parts)


MARK_BEGIN = "<!-- protocol:{name}:begin -->"
MARK_END = "<!-- protocol:{name}:end -->"


def write_into(doc_path: str, name: str, text: str) -> None:
    """Replace the text between this protocol's markers in `doc_path` (appended at the end the first time)."""
    begin, end = MARK_BEGIN.format(name=name), MARK_END.format(name=name)
    doc = open(doc_path).read() if os.path.exists(doc_path) else ""
    block = f"{begin}\n\n{text.strip()}\n\n{end}"
    if begin in doc and end in doc:
        doc = doc[:doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    with open(doc_path, "w") as f:
        f.write(doc)
