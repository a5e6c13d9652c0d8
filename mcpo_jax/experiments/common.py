"""What the experiments share: scales, configs, the SFT warm start, the run cache, oracle win rates, tables.

Protocol (paper Sec. 5.1 / App. B.1, transposed to the synthetic sorting task of `mcpo_jax.data.synthetic`):

* SFT warm start, once per seed: a tiny Llama trained by maximum likelihood on an imperfect teacher's answers
  (`synthetic.sft_rows`). Every method and every experiment of that seed starts from this one export
  (``OUT/sft/seed<s>/hf``) and uses it as the reference policy.
* Preference optimisation: Nectar-schema rows ranked by the oracle, rank 1 = y0, rank 2 dropped, L = 5
  candidates; pairwise baselines get a uniformly random negative (the paper's protocol), MC-PO draws its
  negative with the MC kernel. One epoch, same batch size, learning rate and beta for every method (the
  configs of `configs/demo.py`; no per-method tuning).
* Win rate: greedy answers of the trained policy and of the SFT policy to held-out prompts (a set no training
  row can contain, `synthetic.prompts`), judged pairwise by the oracle; the paper's adjusted win rate
  (wins + ties / 2) / (wins + losses + ties) of the trained policy against the SFT policy.
* Seeds: seed s sets the SFT data and initialisation, the preference data, the data order and the kernel's
  randomness. The evaluation prompts are the same for every seed (a fixed benchmark, like AlpacaEval).
  Every cell is mean +- std (sample std, ddof = 1) over the seeds.

A run is identified by (cell overrides, seed) and cached in ``OUT/runs/<cell key>/seed<s>/result.json``:
identical cells of different experiments (e.g. MC-PO with 5 negatives in Table 1 and Fig. 2) run once, an
interrupted experiment resumes where it stopped, and several experiment processes may share ``OUT`` (file
locks serialise the same run).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mcpo_jax.training.config import set_keys

log = logging.getLogger("mcpo_jax.experiments")

DEFAULT_OUT = "runs/experiments"
DEFAULT_SEEDS = (0, 1, 2)

# Sizes per scale. "small": the CPU reproduction (the demo's model and optimiser settings, one epoch over
# 2048 preference rows = 64 steps of 32). "gpu": the same task with a larger model and more data.
# "tiny": a few steps, for the test suite.
SCALES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        model={"vocab_size": 128}, sft_rows=64, sft_batch=32, po_rows=48, batch=16, epochs=1,
        eval_prompts=16, online_prompts=48, generation_batch=64, sft_lr=3e-3, lr=2e-3),
    "small": dict(
        model={"vocab_size": 128}, sft_rows=8000, sft_batch=32, po_rows=2048, batch=32, epochs=1,
        eval_prompts=512, online_prompts=2048, generation_batch=768, sft_lr=3e-3, lr=2e-3),
    # "medium": a 0.5M-parameter model (2 layers x 128) that learns the teacher's structure the paper's argument
    # needs: on repeat-digit prompts its greedy answer is the teacher's "dedup" error and the correct
    # answer is its log-prob runner-up (checked by `sft_gate` before any preference run).
    "medium": dict(
        model={"vocab_size": 128, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32},
        sft_rows=16000, sft_batch=64, po_rows=2048, batch=32, epochs=1, eval_prompts=512, online_prompts=2048,
        generation_batch=768, sft_lr=2e-3, lr=5e-4, gate=True),
    "gpu": dict(
        model={"vocab_size": 128, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
               "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32},
        sft_rows=32000, sft_batch=64, po_rows=16384, batch=128, epochs=2, eval_prompts=4096,
        online_prompts=16384, generation_batch=4096, sft_lr=1e-3, lr=5e-4, gate=True),
}
BETA = 0.1  # configs/demo.py: the paper's 0.01 barely moves a 0.1M-parameter model's log-probs


@dataclasses.dataclass(frozen=True)
class Cell:
    """One table cell: `row` x `col`, trained with the config `overrides` (dotted keys), offline or online."""

    row: str
    col: str
    overrides: tuple[tuple[str, Any], ...] = ()
    kind: str = "offline"  # offline | online

    @staticmethod
    def of(row: str, col: str, kind: str = "offline", **overrides) -> "Cell":
        return Cell(row, col, tuple(sorted((k.replace("__", "."), v) for k, v in overrides.items())), kind)

    @property
    def key(self) -> str:
        """A readable, stable directory name for the run (same overrides = same run, whatever the table)."""
        parts = [self.kind] + [f"{k.split('.')[-1]}={v}" for k, v in self.overrides]
        slug = ",".join(parts).replace("/", "_").replace(" ", "")
        digest = hashlib.sha1(json.dumps([self.kind, self.overrides], default=str).encode()).hexdigest()[:8]
        return f"{slug[:80]}-{digest}"


# ------------------------------------------------------------------------------------------------ configs


def _base(scale: str, seed: int, name: str):
    from mcpo_jax.data.synthetic import TOKEN_LIMITS
    from mcpo_jax.training.config import base_config

    import ml_collections

    s = SCALES[scale]
    c = base_config()
    c.name = name
    c.seed = int(seed)
    c.tokenizer = "synthetic"
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.data.max_prompt_length = TOKEN_LIMITS["max_prompt_length"]
    c.data.max_completion_length = TOKEN_LIMITS["max_completion_length"]
    c.data.max_length = TOKEN_LIMITS["max_length"]
    c.data.eval_fraction = 0.0
    c.num_epochs = int(s["epochs"])
    c.optimizer.warmup_ratio = 0.1
    c.optimizer.decay = "linear"
    c.mesh.fsdp = -1
    c.checkpoint.save_every = 0  # final checkpoint only
    c.checkpoint.keep = 1
    c.checkpoint.async_save = False
    c.eval_every = 0
    c.log_every = 1000
    c.progress_bar = False
    c.tensorboard = False
    c.export_hf = True
    del ml_collections
    return c


def sft_config(scale: str, seed: int):
    """The warm start (configs/demo.py's `warm_start`): SFT on the teacher's answers, from a random init."""
    import ml_collections

    s = SCALES[scale]
    c = _base(scale, seed, f"sft-seed{seed}")
    c.model.preset = "tiny"
    c.model.overrides = ml_collections.ConfigDict(dict(s["model"]))
    c.model.seed = int(seed)
    c.objective = "sft"
    c.num_candidates = 1
    c.num_negatives = 1
    c.data.source = "synthetic_sft"
    c.data.format = "pairs"
    c.data.synthetic_rows = int(s["sft_rows"])
    c.batch_size = c.micro_batch_size = int(s["sft_batch"])
    c.num_epochs = 1
    c.optimizer.learning_rate = float(s["sft_lr"])
    c.optimizer.warmup_ratio = 0.05
    return c


def po_config(scale: str, seed: int, sft_path: str, overrides: Sequence[tuple[str, Any]] = (),
              cache_dir: str = ""):
    """Preference optimisation from the seed's SFT model (configs/demo.py's second phase), plus `overrides`."""
    s = SCALES[scale]
    c = _base(scale, seed, f"po-seed{seed}")
    c.model.path = sft_path
    c.data.source = "synthetic"
    c.data.format = "nectar"
    c.data.synthetic_rows = int(s["po_rows"])
    c.data.synthetic_candidates = 6  # 7 answers: y0 + rank 2 (dropped) + 5 candidates
    c.data.cache_dir = cache_dir
    c.objective = "mcpo"
    c.sampler = "mc"
    c.num_candidates = 5
    c.num_negatives = 1
    c.beta = BETA
    c.reference = "precomputed"
    c.batch_size = c.micro_batch_size = int(s["batch"])
    c.optimizer.learning_rate = float(s["lr"])
    set_keys(c, overrides)
    return c


def online_config(scale: str, seed: int, sft_path: str, overrides: Sequence[tuple[str, Any]] = ()):
    """OnMC-PO / online DPO (App. B.1 batched online): 3 segments, K = 6 samples at 0.6/0.8/1.0, oracle judge."""
    from mcpo_jax.data.synthetic import TOKEN_LIMITS

    s = SCALES[scale]
    c = po_config(scale, seed, sft_path)
    c.data.source = ""
    o = c.online
    o.enabled = True
    o.prompts = "synthetic"
    o.num_prompts = int(s["online_prompts"])  # as many prompts as offline rows: the same number of steps
    o.judge = "oracle:sorting"
    o.ranking = "winner"  # iterative pairwise ranking (App. B.1)
    o.max_new_tokens = TOKEN_LIMITS["max_completion_length"]
    o.max_prompt_tokens = TOKEN_LIMITS["max_prompt_length"]
    o.generation_batch_size = int(s["generation_batch"])
    o.seed = int(seed)
    c.num_candidates = len(o.temperatures) - 1
    set_keys(c, overrides)
    return c


# --------------------------------------------------------------------------------------------- utilities


def parse_seeds(text: str | Sequence[int]) -> tuple[int, ...]:
    """"0,1,2" -> (0, 1, 2); duplicates are an error (they would average a run with itself)."""
    seeds = tuple(int(x) for x in text.split(",") if x.strip()) if isinstance(text, str) else tuple(map(int, text))
    if not seeds:
        raise ValueError("no seeds given")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"duplicate seeds in {seeds}")
    return seeds


@contextlib.contextmanager
def file_lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def setup_jax(out: str) -> None:
    """A persistent compilation cache: the same step (same method, other seed) compiles once per machine."""
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(out), "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _train(config, workdir):
    from mcpo_jax import pipeline

    return pipeline.run(config, workdir)  # looked up per call: tests replace pipeline.run


_train_online = _train


# ------------------------------------------------------------------------------------------- evaluation


def eval_prompts(scale: str) -> list[str]:
    from mcpo_jax.data import synthetic

    return synthetic.prompts(int(SCALES[scale]["eval_prompts"]), seed=1)


def greedy_answers(model_path: str, prompts: Sequence[str]) -> list[str]:
    """Greedy answers of an exported policy to the sorting prompts (kept per SFT seed and reused as the baseline)."""
    from mcpo_jax import models
    from mcpo_jax.data.synthetic import TOKEN_LIMITS, make_tokenizer
    from mcpo_jax.evaluate import generate_outputs

    return generate_outputs(models.from_pretrained(model_path), make_tokenizer(), list(prompts), batch_size=256,
                            max_new_tokens=TOKEN_LIMITS["max_completion_length"])


def oracle_win_rate(prompts: Sequence[str], policy: Sequence[str], baseline: Sequence[str]) -> dict:
    """The paper's adjusted win rate of `policy` over `baseline` answers under the sorting oracle, plus each
    side's fraction of exact answers and mean oracle score (`evaluate.win_rate` with the task)."""
    from mcpo_jax.data import tasks
    from mcpo_jax.evaluate import win_rate
    from mcpo_jax.judges import make_judge

    wr = win_rate(make_judge("oracle:sorting"), list(prompts), list(policy), list(baseline), num_bootstrap=1000,
                  task=tasks.get("sorting"))
    return wr.summary()


GATE_DEDUP = 0.70  # the SFT's greedy answer is the teacher's "dedup" error on >= 70% of repeat prompts
GATE_KINDS = ("correct", "dedup", "desc", "copy", "sub1")  # the teacher's kinds on repeat-digit inputs


class GateFailed(RuntimeError):
    """The SFT start lacks the structure the experiment tests (a hard, likely wrong answer above the right one)."""


def sequence_logps(model_path: str, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    """log pi(completion + EOS | chat-templated prompt) per pair, summed over the completion's tokens."""
    import jax
    import jax.numpy as jnp

    from mcpo_jax import models
    from mcpo_jax.data.synthetic import make_tokenizer

    tok = make_tokenizer()
    model = models.from_pretrained(model_path)
    rows, starts = [], []
    for p, c in zip(prompts, completions):
        ids_p = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        ids_p = list(ids_p["input_ids"] if hasattr(ids_p, "keys") else ids_p)
        ids_c = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(ids_p + ids_c)
        starts.append(len(ids_p))
    t = max(map(len, rows))
    ids = np.full((len(rows), t), tok.pad_token_id, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    out = []
    for s in range(0, len(rows), 512):
        logits = model(jnp.asarray(ids[s:s + 512]), jnp.asarray(mask[s:s + 512]))
        logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
        for i in range(logp.shape[0]):
            r, st = rows[s + i], starts[s + i]
            out.append(float(sum(logp[i, j - 1, r[j]] for j in range(st, len(r)))))
    return np.asarray(out)


def sft_gate(model_path: str, prompts: Sequence[str], answers: Sequence[str], *, threshold: float = GATE_DEDUP) -> dict:
    """Whether an SFT start has the structure the MC kernel's argument needs, on the repeat-digit
    prompts among `prompts`: its greedy `answers` are the teacher's "dedup" error on >= `threshold` of them, and
    the correct answer is the log-prob runner-up (mean log pi over those prompts: dedup first, correct second
    among GATE_KINDS). Returns the measured numbers and `passed`."""
    from mcpo_jax.data import synthetic

    rng = np.random.default_rng(0)
    rep = [(p, a) for p, a in zip(prompts, answers) if synthetic.has_repeats(synthetic.parse_prompt(p))]
    if not rep:
        raise ValueError("no repeat-digit prompts to check the SFT gate on")
    digits = [synthetic.parse_prompt(p) for p, _ in rep]
    dedup = float(np.mean([a.strip() == synthetic.completion_of_kind(rng, d, "dedup") for (_, a), d in zip(rep, digits)]))
    exact = float(np.mean([a.strip() == synthetic.answer(p) for p, a in rep]))
    texts = {k: [synthetic.completion_of_kind(rng, d, k) for d in digits] for k in GATE_KINDS}
    logps = {k: sequence_logps(model_path, [p for p, _ in rep], texts[k]) for k in GATE_KINDS}
    means = {k: float(np.mean(v)) for k, v in logps.items()}
    order = sorted(means, key=lambda k: -means[k])
    stacked = np.stack([logps[k] for k in GATE_KINDS])  # [K, P]
    second = np.argsort(-stacked, axis=0)[1]
    runner_up_share = float(np.mean(second == GATE_KINDS.index("correct")))
    passed = dedup >= threshold and order[:2] == ["dedup", "correct"]
    return {"passed": bool(passed), "repeat_prompts": len(rep), "greedy_dedup": dedup, "greedy_exact": exact,
            "threshold": threshold, "mean_logp": means, "order": order,
            "correct_runner_up_per_prompt": runner_up_share}


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof = 1 (0 for one value), n) of the finite values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return float("nan"), float("nan"), 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def format_cell(values: Sequence[float], *, scale: float = 100.0, digits: int = 1, expected_n: int = 3) -> str:
    m, s, n = mean_std(values)
    if n == 0:
        return "—"
    text = f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"
    return text + (f" (n={n})" if n != expected_n else "")


def step_time_stats(metrics_paths: Sequence[str]) -> dict:
    """Median wall time per optimiser step over the run(s), the first (compiling / warming) step left out."""
    times, tokens = [], []
    for path in metrics_paths:
        if not os.path.exists(path):
            continue
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        rows = [r for r in rows if r.get("split", "train") == "train" and "step_time" in r]
        for r in rows[1:]:
            times.append(float(r["step_time"]))
            tokens.append(float(r.get("tokens", 0.0)))
    if not times:
        return {"step_time_median": float("nan"), "step_time_mean": float("nan"), "steps_timed": 0,
                "tokens_per_step": float("nan")}
    return {"step_time_median": float(np.median(times)), "step_time_mean": float(np.mean(times)),
            "steps_timed": len(times), "tokens_per_step": float(np.mean(tokens))}


def read_curve(metrics_path: str, keys=("loss", "rewards/accuracies", "rewards/margins")) -> dict[str, list]:
    out: dict[str, list] = {"step": []}
    if not os.path.exists(metrics_path):
        return out
    with open(metrics_path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("split", "train") != "train":
                continue
            out["step"].append(r["step"])
            for k in keys:
                out.setdefault(k, []).append(r.get(k, float("nan")))
    return out


# ------------------------------------------------------------------------------------------------- runs


class Runner:
    """Runs (cell, seed) pairs under one output folder, reusing the SFT model of each seed and past runs."""

    def __init__(self, out: str = DEFAULT_OUT, scale: str = "small", *, keep_checkpoints: bool = False):
        if scale not in SCALES:
            raise ValueError(f"unknown scale {scale!r}; known: {sorted(SCALES)}")
        self.out = os.path.abspath(os.path.join(out, scale))
        self.scale = scale
        self.keep_checkpoints = keep_checkpoints
        os.makedirs(self.out, exist_ok=True)
        self._prompts = None

    # -- SFT warm start, once per seed ---------------------------------------------------------------------
    def sft_dir(self, seed: int) -> str:
        return os.path.join(self.out, "sft", f"seed{seed}")

    def sft(self, seed: int) -> str:
        """The seed's SFT export (trained on first use, then reused by every method and experiment)."""
        wd = self.sft_dir(seed)
        hf = os.path.join(wd, "hf")
        with file_lock(wd + ".lock"):
            if not os.path.exists(os.path.join(wd, "done.json")):
                log.info("SFT warm start, seed %d -> %s", seed, wd)
                t0 = time.time()
                summary = _train(sft_config(self.scale, seed), wd)
                if summary.get("status") != "completed":
                    raise RuntimeError(f"SFT seed {seed} ended with status {summary.get('status')!r}")
                self._prune(wd)
                answers = greedy_answers(hf, self.prompts)
                _write_json(os.path.join(wd, "greedy.json"), answers)
                _write_json(os.path.join(wd, "done.json"), {"seconds": time.time() - t0, "seed": seed,
                                                            "steps": summary.get("total_steps")})
        return hf

    def sft_answers(self, seed: int) -> list[str]:
        self.sft(seed)
        return _read_json(os.path.join(self.sft_dir(seed), "greedy.json"))

    @property
    def prompts(self) -> list[str]:
        if self._prompts is None:
            self._prompts = eval_prompts(self.scale)
        return self._prompts

    # -- one (cell, seed) ------------------------------------------------------------------------------------
    def run_dir(self, cell: Cell, seed: int) -> str:
        return os.path.join(self.out, "runs", cell.key, f"seed{seed}")

    def result(self, cell: Cell, seed: int) -> dict | None:
        path = os.path.join(self.run_dir(cell, seed), "result.json")
        return _read_json(path) if os.path.exists(path) else None

    def run(self, cell: Cell, seed: int) -> dict:
        wd = self.run_dir(cell, seed)
        with file_lock(wd + ".lock"):
            done = self.result(cell, seed)
            if done is not None:
                return done
            sft = self.sft(seed)
            baseline = self.sft_answers(seed)
            log.info("run %s seed %d (%s x %s)", cell.key, seed, cell.row, cell.col)
            if os.path.exists(wd):  # an interrupted attempt: start over (runs are short)
                shutil.rmtree(wd)
            t0 = time.time()
            extra: dict[str, Any] = {}
            if cell.kind == "online":
                config = online_config(self.scale, seed, sft, cell.overrides)
                summary = _train_online(config, wd)
                if summary.get("status") != "completed":
                    raise RuntimeError(f"{cell.key} seed {seed}: online run ended with {summary.get('status')!r}")
                policy = summary["final_policy"]
                segs = sorted(d for d in os.listdir(os.path.join(wd, "online")) if d.startswith("segment_"))
                metrics = [os.path.join(wd, "metrics.jsonl")]  # one trajectory: one metrics file
                extra["segments"] = [_read_json(os.path.join(wd, "online", d, "stats.json")) for d in segs]
                extra["generation_seconds"] = sum(s.get("sample_seconds", 0.0) + s.get("judge_seconds", 0.0)
                                                  for s in extra["segments"])
                steps = summary.get("total_steps")
                final = summary.get("final_metrics") or {}
            else:
                config = po_config(self.scale, seed, sft, cell.overrides,
                                   cache_dir=os.path.join(self.out, "cache", f"seed{seed}"))
                if config.data.source == "@pairs":
                    config.data.source = self.pairs_file(seed)
                summary = _train(config, wd)
                if summary.get("status") != "completed":
                    raise RuntimeError(f"{cell.key} seed {seed}: training ended with {summary.get('status')!r}")
                policy = summary["hf_export"]
                metrics = [os.path.join(wd, "metrics.jsonl")]
                steps = summary.get("total_steps")
                final = summary.get("final_metrics") or {}
            train_seconds = time.time() - t0
            answers = greedy_answers(policy, self.prompts)
            result = {
                "git": git_state(),
                "row": cell.row, "col": cell.col, "kind": cell.kind, "key": cell.key, "seed": seed,
                "overrides": dict(cell.overrides), "scale": self.scale, "steps": steps,
                "train_seconds": train_seconds,
                "final_loss": final.get("loss"), "final_reward_accuracy": final.get("rewards/accuracies"),
                **oracle_win_rate(self.prompts, answers, baseline),
                **step_time_stats(metrics), **extra,
                "metrics_files": metrics,
                "examples": [{"prompt": p, "policy": a, "sft": b}
                             for p, a, b in list(zip(self.prompts, answers, baseline))[:8]],
            }
            self._prune(wd)
            _write_json(os.path.join(wd, "result.json"), result)
            log.info("done %s seed %d: win rate %.3f (exact %.3f vs SFT %.3f), %.0fs", cell.key, seed,
                     result["win_rate"], result["policy_exact"], result["baseline_exact"], train_seconds)
            return result

    def pairs_file(self, seed: int) -> str:
        """The seed's preference rows with the random negative drawn once, up front (TRL's DPO protocol):
        the same prompts and y0 as the Nectar-schema rows of `po_config`, one of the L = 5 candidates each."""
        path = os.path.join(self.out, "data", f"pairs_seed{seed}.jsonl")
        with file_lock(path + ".lock"):
            if not os.path.exists(path):
                from mcpo_jax.data import load_examples, synthetic

                s = SCALES[self.scale]
                rows = synthetic.generate_rows(int(s["po_rows"]), seed=seed, num_candidates=6)
                examples = load_examples(rows, format="nectar", num_candidates=5)
                rng = np.random.default_rng([seed, 0xDA1A])
                pairs = [{"prompt": ex.prompt, "chosen": ex.preferred,
                          "rejected": ex.candidates[int(rng.integers(len(ex.candidates)))]} for ex in examples]
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path + ".tmp", "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in pairs)
                os.replace(path + ".tmp", path)
        return path

    def _prune(self, wd: str) -> None:
        """Checkpoints and data caches are not needed once a run is evaluated (the HF export is kept)."""
        if self.keep_checkpoints:
            return
        for root, dirs, _ in os.walk(wd):
            for d in list(dirs):
                if d in ("checkpoints", "cache"):
                    shutil.rmtree(os.path.join(root, d), ignore_errors=True)
                    dirs.remove(d)


# ----------------------------------------------------------------------------------------------- tables


@dataclasses.dataclass
class Table:
    """A method x setting table of one metric over seeds."""

    title: str
    rows: list[str]
    cols: list[str]
    values: dict[tuple[str, str], list[float]]  # (row, col) -> per-seed values
    metric: str = "win_rate"
    scale: float = 100.0
    digits: int = 1
    expected_n: int = 3
    row_header: str = "method"

    def cell(self, row: str, col: str) -> str:
        return format_cell(self.values.get((row, col), []), scale=self.scale, digits=self.digits,
                           expected_n=self.expected_n)

    def markdown(self) -> str:
        lines = [f"| {self.row_header} | " + " | ".join(self.cols) + " |",
                 "|---|" + "---|" * len(self.cols)]
        for r in self.rows:
            lines.append(f"| {r} | " + " | ".join(self.cell(r, c) for c in self.cols) + " |")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"title": self.title, "rows": self.rows, "cols": self.cols, "metric": self.metric,
                "scale": self.scale, "row_header": self.row_header,
                "cells": [{"row": r, "col": c, "values": self.values.get((r, c), []),
                           "mean": mean_std(self.values.get((r, c), []))[0],
                           "std": mean_std(self.values.get((r, c), []))[1]}
                          for r in self.rows for c in self.cols]}


def table_from_results(title: str, cells: Sequence[Cell], results: dict[tuple[str, str], list[dict]], *,
                       metric: str = "win_rate", col_label: Callable[[str], str] | None = None,
                       **kwargs) -> Table:
    rows = list(dict.fromkeys(c.row for c in cells))
    cols = list(dict.fromkeys(c.col for c in cells))
    values = {}
    for (r, c), rs in results.items():
        values[(r, c)] = [x.get(metric) for x in rs if x is not None]
    if col_label is not None:
        cols_l = [col_label(c) for c in cols]
        values = {(r, col_label(c)): v for (r, c), v in values.items()}
        cols = cols_l
    return Table(title, rows, cols, values, metric=metric, **kwargs)


@dataclasses.dataclass
class Experiment:
    """A named list of cells; `tables(results)` turns the per-seed results into the report's tables."""

    name: str
    title: str
    cells: Callable[[str], list[Cell]]
    tables: Callable[[list[Cell], dict], list[Table]]
    description: str = ""


def run_experiment(exp: Experiment, *, scale: str = "small", seeds: Sequence[int] = DEFAULT_SEEDS,
                   out: str = DEFAULT_OUT) -> dict:
    """Every cell for every seed (seed-major: a first complete seed comes early), then the tables.

    A failing run is logged and left out of its cell (the table marks the missing seeds with n=...)."""
    runner = Runner(out, scale)
    cells = exp.cells(scale)
    t0 = time.time()
    failures = []
    results: dict[tuple[str, str], list[dict]] = {}
    for seed in seeds:
        for cell in cells:
            try:
                # a run shared with another experiment carries that one's labels: use this table's
                r = dict(runner.run(cell, seed), row=cell.row, col=cell.col)
            except Exception as e:  # noqa: BLE001 - reported in the results, the other cells still run
                log.exception("run %s seed %d failed", cell.key, seed)
                failures.append({"row": cell.row, "col": cell.col, "seed": seed, "error": repr(e)})
                continue
            results.setdefault((cell.row, cell.col), []).append(r)
    tables = exp.tables(cells, results)
    exp_dir = os.path.join(runner.out, exp.name)
    os.makedirs(exp_dir, exist_ok=True)
    record = {
        "experiment": exp.name, "title": exp.title, "description": exp.description, "scale": scale,
        "seeds": list(seeds), "out": runner.out, "seconds": time.time() - t0, "failures": failures,
        "host": host_info(),
        "cells": [{"row": c.row, "col": c.col, "kind": c.kind, "key": c.key, "overrides": dict(c.overrides)}
                  for c in cells],
        "tables": [t.to_json() for t in tables],
        "runs": [{k: v for k, v in r.items() if k not in ("examples",)} for rs in results.values() for r in rs],
    }
    _write_json(os.path.join(exp_dir, "results.json"), record)
    md = [f"## {exp.title}", "", exp.description, ""]
    for t in tables:
        md += [f"**{t.title}**", "", t.markdown(), ""]
    with open(os.path.join(exp_dir, "table.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md), flush=True)
    return record


def git_state() -> dict:
    """The commit the code ran at, and whether the tree had uncommitted changes (other people's, in a shared tree)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        return {"commit": head, "modified": [line[3:] for line in dirty if line.strip()]}
    except (OSError, subprocess.SubprocessError):
        return {}


def host_info() -> dict:
    import jax

    return {"git": git_state(), "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
            "python": platform.python_version()}


METRICS = (  # (column label, result key, scale): what a method x metric table shows
    ("win rate vs SFT (%)", "win_rate", 100.0),
    ("exact answers (%)", "policy_exact", 100.0),
    ("mean oracle score (%)", "policy_score", 100.0),
)


SFT_ROW = "SFT (start)"


def metrics_table(title: str, cells, results, *, metrics=METRICS, row_header: str = "method") -> Table:
    """Rows = the cells' rows, columns = metrics (values stored already scaled); a first row shows the SFT
    policy every run starts from and is judged against (win rate 50% by definition, its own exact answers)."""
    rows = [SFT_ROW] + list(dict.fromkeys(c.row for c in cells))
    values = {}
    sft = {r["seed"]: r for rs in results.values() for r in rs}  # every run of a seed has the same baseline
    sft_keys = {"win_rate": lambda r: 0.5, "policy_exact": lambda r: r["baseline_exact"],
                "policy_score": lambda r: r["baseline_score"]}
    for label, key, scale in metrics:
        if key in sft_keys:
            values[(SFT_ROW, label)] = [scale * sft_keys[key](r) for _, r in sorted(sft.items())]
    for (r, _), rs in results.items():
        for label, key, scale in metrics:
            values[(r, label)] = [None if x.get(key) is None else scale * float(x[key]) for x in rs]
    return Table(title, rows, [m[0] for m in metrics], values, metric="+".join(m[1] for m in metrics),
                 scale=1.0, row_header=row_header)


def win_rate_tables(cells, results, title: str, *, extra: bool = True, **kwargs) -> list[Table]:
    """The win-rate table, plus (with `extra`) the exact-answer rate and mean oracle score of the policies."""
    tables = [table_from_results(f"{title}: adjusted win rate vs the SFT policy (%), oracle judge", cells,
                                 results, metric="win_rate", **kwargs)]
    if extra:
        tables.append(table_from_results(f"{title}: exact answers of the trained policy (%)", cells, results,
                                         metric="policy_exact", **kwargs))
    return tables


def main(exp: Experiment, argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog=f"python -m mcpo_jax.experiments.{exp.name}", description=exp.title)
    p.add_argument("--scale", default="small", choices=sorted(SCALES))
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)))
    p.add_argument("--out", default=DEFAULT_OUT, help="output root (shared by all experiments: runs are reused)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("absl", "orbax", "grain", "jax._src"):
        logging.getLogger(name).setLevel(logging.WARNING)
    setup_jax(args.out)
    return run_experiment(exp, scale=args.scale, seeds=parse_seeds(args.seeds), out=args.out)


def po_cell(row: str, col: str, objective: str, sampler: str, *, L: int = 5, M: int = 1, kind: str = "offline",
            **extra) -> Cell:
    """A cell with the method spelled out in full (objective, sampler, L, M), so that the same method in two
    experiments is the same run (one cache key)."""
    return Cell.of(row, col, kind=kind, objective=objective, sampler=sampler, num_candidates=L, num_negatives=M,
                   **extra)
