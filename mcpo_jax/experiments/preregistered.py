"""The pre-registered experiment (docs/results.md): does the MC kernel's hard negative help, tested at the seed level.

Design (written into docs/results.md before it ran; `DESIGN` below is that text's summary):

* Task: the sorting task at `--scale medium` (a 0.5M-parameter SFT start that passes `common.sft_gate`: its
  greedy answer on repeat-digit prompts is the teacher's "dedup" error and the correct answer its log-prob
  runner-up). Objective MC-PO (Table 5) for every sampler: with M = 1 a random negative makes it DPO exactly.
* Selection: samplers {random (= DPO), mc, max, min} at L = 5, each on the paper's lr grid scaled to the base
  config; each picks its lr by the mean validation win rate over selection seeds 100, 101 (never reported); a
  pick on the grid's edge extends the grid past it (up to 2 points).
* Evaluation: fresh seeds 0-5 (each its own SFT start), 512 test prompts, adjusted win rate vs the seed's SFT
  policy. All 4 samplers at L = 5; mc and random at L = 3, 2 (the best candidates removed first) and 1 with the
  lr each selected at L = 5 (carried over, pre-declared); mc with y0 excluded from the kernel at mc's lr.
* Primary hypotheses (one-sided, unit = seed, exact sign-flip permutation p over seeds; Holm over the three):
  P1 tuned MC > tuned random at L = 5; P2 tuned MC > tuned min at L = 5; P3 (MC - random) at L = 5 > at L = 2.
  The paired t-test and a bootstrap over seeds then prompts are reported beside each.
* Secondary (exploratory, unadjusted): Max vs MC; MC vs random at L = 3 and L = 1; MC vs random at every shared
  lr (the selection seeds' runs, test prompts, n = 2: descriptive); y0 included vs excluded; exact-answer and
  dedup rates on repeat-digit test prompts; kernel entropy, share of y0 draws and of the best remaining candidate.
* Pre-declared extension: if P1's estimate lands in [1, 2] pp, seeds 6-9 are added to every evaluated cell and
  everything is recomputed on seeds 0-9. Whatever comes out is reported, for or against the paper.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from mcpo_jax.experiments import common, protocol, stats

log = logging.getLogger("mcpo_jax.experiments.preregistered")

DESIGN = __doc__.split("Design (", 1)[1]
SAMPLER_NAMES = {"random": "Random (= DPO)", "mc": "MC", "max": "Max", "min": "Min"}
SELECTION_ORDER = ("mc", "random", "min", "max")
ABLATION_L = (3, 2, 1)
EXTRA_SEEDS = (6, 7, 8, 9)
P1_EXTEND_BAND = (0.01, 0.02)  # P1 estimate in [1, 2] pp -> add EXTRA_SEEDS


def method(sampler: str, L: int, **extra) -> protocol.Method:
    suffix = ", y0 excluded" if extra.get("include_preferred") is False else ""
    return protocol.Method.of(f"{SAMPLER_NAMES[sampler]}{suffix} (L = {L})", "mcpo", sampler, L=L, **extra)


def _diag(ev: dict, key: str) -> list[float]:
    return [r.get("train_diag", {}).get(key) for r in ev["runs"] if r.get("train_diag", {}).get(key) is not None]


def _answer_metric(ev: dict, key: str) -> list[float]:
    return [r["test"]["metrics"][key] for r in ev["runs"] if key in r["test"].get("metrics", {})]


def run(proto: protocol.Protocol, *, L: int = 5, ablation: Sequence[int] = ABLATION_L,
        extra_seeds: Sequence[int] = EXTRA_SEEDS, on_progress: Callable[[dict], None] | None = None) -> dict:
    """The design above, primaries first; `on_progress(record)` after each phase (partial results on disk)."""
    t0 = time.time()
    record: dict = {"design": DESIGN, "grid": list(proto.grid), "selection_seeds": list(proto.selection_seeds),
                    "seeds": list(proto.seeds), "L": L, "ablation": list(ablation), "phases": [],
                    "validation_prompts": len(proto.task.validation_prompts),
                    "test_prompts": len(proto.task.test_prompts)}
    main = {s: method(s, L) for s in SELECTION_ORDER}
    sel: dict[str, dict] = {}
    evals: dict[str, dict] = {}

    def phase(name: str) -> None:
        record["phases"].append({"name": name, "seconds": time.time() - t0, "seeds": list(proto.seeds)})
        record.update(summarize(proto, main, sel, evals, L=L, ablation=ablation))
        if on_progress is not None:
            on_progress(record)

    def evaluate(key: str, m: protocol.Method, lr: float | None = None) -> None:
        evals[key] = proto.evaluate(m, lr=lr)
        if lr is None:
            sel[key] = {"grid": evals[key]["grid"], "per_seed_grid": evals[key]["per_seed_grid"],
                        "lr": evals[key]["selected_lr"], "edge": evals[key]["edge"],
                        "extended": evals[key]["extended"]}

    # 1. selection of every sampler (runs on the selection seeds only)
    for s in SELECTION_ORDER:
        sel[s] = proto.select(main[s])
    phase("selection")
    # 2. the primaries' cells: P1, P2 (L = 5), P3 (L = 2)
    for s in ("mc", "random", "min"):
        evaluate(s, main[s])
    phase("P1, P2")
    for s in ("mc", "random"):
        if 2 in ablation:
            evaluate(f"{s}@L2", method(s, 2), sel[s]["lr"])
    phase("P3")
    # 3. secondary cells
    evaluate("max", main["max"])
    for Lx in [x for x in ablation if x != 2]:
        for s in ("mc", "random"):
            evaluate(f"{s}@L{Lx}", method(s, Lx), sel[s]["lr"])
    evaluate("mc-y0-excluded", method("mc", L, include_preferred=False), sel["mc"]["lr"])
    phase("secondary")
    # 4. the pre-declared extension
    p1 = record["primary"][0]["estimate"]
    record["p1_first_estimate"] = p1
    if extra_seeds and P1_EXTEND_BAND[0] <= p1 <= P1_EXTEND_BAND[1]:
        log.info("P1 estimate %.2f pp is in [1, 2] pp: adding seeds %s (pre-declared)", 100 * p1, list(extra_seeds))
        proto.seeds = tuple(proto.seeds) + tuple(x for x in extra_seeds if x not in proto.seeds)
        record["seeds"] = list(proto.seeds)
        for key, ev in list(evals.items()):
            evaluate(key, ev["method_obj"], None if key in sel and key in main else ev["selected_lr"])
        phase("extra seeds")
    record["seconds"] = time.time() - t0
    return record


def time_one(proto: protocol.Protocol, *, L: int = 5) -> dict:
    """One seed's cost before committing to the whole design: the first selection seed's SFT start (and gate)
    and one MC run at the grid's middle lr (both cached, so the design reuses them); the estimate multiplies by
    the design's run count (selection grid x 4 samplers x selection seeds + 11 cells x evaluation seeds)."""
    seed = proto.selection_seeds[0]
    t0 = time.time()
    proto.start_answers(seed)
    start_s = time.time() - t0
    lr = sorted(proto.grid)[len(proto.grid) // 2]
    t1 = time.time()
    proto.run(method("mc", L), lr, seed)
    run_s = time.time() - t1
    runs = len(proto.grid) * len(SELECTION_ORDER) * len(proto.selection_seeds) + 11 * len(proto.seeds)
    starts = len(proto.selection_seeds) + len(proto.seeds)
    return {"start_seconds": start_s, "run_seconds": run_s, "runs": runs, "starts": starts,
            "estimate_minutes": (runs * run_s + starts * start_s) / 60}


def summarize(proto, main, sel, evals, *, L: int, ablation) -> dict:
    """Tables and tests from what has run so far (a cell not yet run is absent)."""
    out: dict = {"selection": {s: {"grid": {str(k): v for k, v in x["grid"].items()},
                                   "per_seed_grid": {str(k): v for k, v in x["per_seed_grid"].items()},
                                   "lr": x["lr"], "edge": x["edge"], "extended": x["extended"]}
                               for s, x in sel.items()}}
    tuned = {}
    for key, ev in evals.items():
        wr = ev["test_win_rates"]
        t = stats.paired_t(np.asarray(wr) - 0.5)
        tuned[key] = {"method": ev["method"], "lr": ev["selected_lr"], "seeds": [r["seed"] for r in ev["runs"]],
                      "win_rates": wr, "mean": float(np.mean(wr)), "std": float(np.std(wr, ddof=1)) if len(wr) > 1
                      else 0.0, "ci_low": t["ci_low"] + 0.5, "ci_high": t["ci_high"] + 0.5,
                      "exact_repeat": _answer_metric(ev, "exact_repeat"), "dedup_repeat": _answer_metric(ev, "dedup_repeat"),
                      "exact": _answer_metric(ev, "exact"), "entropy": _diag(ev, "entropy"),
                      "selected_is_y0": _diag(ev, "selected_is_y0"), "best_remaining": _diag(ev, "best_remaining")}
    out["tuned"] = tuned
    primary, secondary = [], []

    def cmp(a, b, alternative):
        return proto.compare(evals[a], evals[b], alternative=alternative) if a in evals and b in evals else None

    for name, a, b, text in (("P1", "mc", "random", f"tuned MC > tuned random (= DPO) at L = {L}"),
                             ("P2", "mc", "min", f"tuned MC > tuned Min at L = {L}")):
        c = cmp(a, b, "greater")
        if c:
            primary.append({"name": name, "hypothesis": text, "estimate": c["seed_level"]["mean"],
                            "p": c["seed_level"]["sign_flip_p"], "t_p": c["seed_level"]["t_test"]["p"],
                            "comparison": c})
    if all(k in evals for k in ("mc", "random", "mc@L2", "random@L2")):
        c5, c2 = cmp("mc", "random", "greater"), cmp("mc@L2", "random@L2", "greater")
        d5, d2 = np.asarray(c5["seed_level"]["diffs"]), np.asarray(c2["seed_level"]["diffs"])
        dd = d5 - d2
        primary.append({"name": "P3", "hypothesis": f"(MC − random) at L = {L} > (MC − random) at L = 2",
                        "estimate": float(dd.mean()), "p": stats.sign_flip_p(dd, alternative="greater"),
                        "t_p": stats.paired_t(dd, alternative="greater")["p"],
                        "diffs": dd.tolist(), "seeds": c5["seeds"], "d5": d5.tolist(), "d2": d2.tolist(),
                        "t": stats.paired_t(dd, alternative="greater")})
    if len(primary) == 3:
        for p, adj in zip(primary, stats.holm([p["p"] for p in primary])):
            p["holm_p"] = adj
    out["primary"] = primary
    for name, a, b in (("Max vs MC (L = 5)", "max", "mc"), ("MC vs random, L = 3", "mc@L3", "random@L3"),
                       ("MC vs random, L = 2", "mc@L2", "random@L2"), ("MC vs random, L = 1", "mc@L1", "random@L1"),
                       ("y0 included vs excluded (MC, L = 5)", "mc", "mc-y0-excluded")):
        c = cmp(a, b, "two-sided")
        if c:
            secondary.append({"name": name, "comparison": c})
    out["secondary"] = secondary
    # MC vs random at every shared lr: the selection seeds' runs (descriptive, n = len(selection seeds))
    same_lr = []
    if "mc" in sel and "random" in sel:
        for lr in sorted(set(sel["mc"]["grid"]) & set(sel["random"]["grid"])):
            rows = {}
            for s in ("mc", "random"):
                rs = [proto.run(main[s], lr, seed) for seed in proto.selection_seeds]
                rows[s] = {"test": [r["test"]["win_rate"] for r in rs],
                           "validation": [r["validation"]["win_rate"] for r in rs]}
            same_lr.append({"lr": lr, **rows,
                            "diff_test": float(np.mean(rows["mc"]["test"]) - np.mean(rows["random"]["test"]))})
    out["same_lr"] = same_lr
    return out


# ---------------------------------------------------------------------------------------------- markdown


def _pp(x: float) -> str:
    return "—" if x is None or x != x else f"{100 * x:.1f}"


def _mean(xs) -> str:
    xs = [x for x in xs if x is not None and x == x]
    return "—" if not xs else f"{np.mean(xs):.2f}"


def markdown(record: dict, *, gates: dict | None = None) -> str:
    lines = [f"Seeds: selection {', '.join(map(str, record['selection_seeds']))} (never reported); evaluation "
             f"{', '.join(map(str, record['seeds']))}. {record['validation_prompts']} validation / "
             f"{record['test_prompts']} test prompts. Grid {', '.join(protocol.fmt_lr(x) for x in record['grid'])}. "
             f"Phases done: {', '.join(p['name'] for p in record['phases'])} "
             f"({record['phases'][-1]['seconds'] / 60:.0f} min of wall time in this process, cached runs free).", ""]
    if gates:
        lines += ["**SFT gate** (repeat-digit test prompts; must be ≥ 70 % dedup with the correct answer the log-prob "
                  "runner-up):", "", "| seed | repeat prompts | greedy = dedup (%) | greedy exact (%) | mean log π: dedup "
                  "| correct | desc | correct is runner-up per prompt (%) | passed |", "|---|---|---|---|---|---|---|---|---|"]
        for seed, g in sorted(gates.items()):
            m = g["mean_logp"]
            lines.append(f"| {seed} | {g['repeat_prompts']} | {_pp(g['greedy_dedup'])} | {_pp(g['greedy_exact'])} "
                         f"| {m['dedup']:.2f} | {m['correct']:.2f} | {m['desc']:.2f} "
                         f"| {_pp(g['correct_runner_up_per_prompt'])} | {g['passed']} |")
        lines.append("")
    lines += ["**Selection** (mean validation win rate vs SFT over the selection seeds, %; the selected lr in bold):",
              "", "| sampler (L = 5) | " + " | ".join(protocol.fmt_lr(x) for x in _all_lrs(record)) + " | selected |",
              "|---|" + "---|" * (len(_all_lrs(record)) + 1)]
    for s, x in record["selection"].items():
        grid = {float(k): v for k, v in x["grid"].items()}
        cells = [("**" + _pp(grid[lr]) + "**" if lr == x["lr"] else _pp(grid[lr])) if lr in grid else "·"
                 for lr in _all_lrs(record)]
        edge = f" ⚠ {x['edge']} edge" if x["edge"] else ""
        lines.append(f"| {SAMPLER_NAMES[s]} | " + " | ".join(cells) + f" | {protocol.fmt_lr(x['lr'])}{edge} |")
    lines += ["", "**Tuned** (test win rate vs SFT, %, over the evaluation seeds; 95 % t interval over seeds; "
              "answer rates on repeat-digit test prompts; kernel numbers over the last logged training steps):", "",
              "| cell | lr | win rate mean ± sd | [95 % CI] | n | exact on repeat prompts (%) | dedup on repeat "
              "prompts (%) | kernel entropy | negative = y0 (%) | negative = best remaining (%) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for key, t in record["tuned"].items():
        lines.append(f"| {t['method']} | {protocol.fmt_lr(t['lr'])} | {_pp(t['mean'])} ± {_pp(t['std'])} "
                     f"| [{_pp(t['ci_low'])}, {_pp(t['ci_high'])}] | {len(t['win_rates'])} "
                     f"| {_pp(np.mean(t['exact_repeat'])) if t['exact_repeat'] else '—'} "
                     f"| {_pp(np.mean(t['dedup_repeat'])) if t['dedup_repeat'] else '—'} | {_mean(t['entropy'])} "
                     f"| {_pp(np.mean(t['selected_is_y0'])) if t['selected_is_y0'] else '—'} "
                     f"| {_pp(np.mean(t['best_remaining'])) if t['best_remaining'] else '—'} |")
    lines += ["", "**Primary hypotheses** (one-sided; unit = seed; exact sign-flip permutation p over seeds; Holm "
              "over the three):", "",
              "| | hypothesis | estimate (pp) | per seed (pp) | sign-flip p | Holm p | paired t p | bootstrap "
              "seeds→prompts [95 % CI] |", "|---|---|---|---|---|---|---|---|"]
    for p in record["primary"]:
        if "comparison" in p:
            sl = p["comparison"]["seed_level"]
            per = ", ".join(f"{100 * d:+.1f}" for d in sl["diffs"])
            boot = f"{_pp(sl['bootstrap']['diff'])} [{_pp(sl['bootstrap']['ci_low'])}, {_pp(sl['bootstrap']['ci_high'])}]"
        else:
            per = ", ".join(f"{100 * d:+.1f}" for d in p["diffs"])
            boot = "— (a difference of differences)"
        lines.append(f"| {p['name']} | {p['hypothesis']} | {100 * p['estimate']:+.1f} | {per} "
                     f"| {stats.format_p(p['p'])} | {stats.format_p(p.get('holm_p', float('nan')))} "
                     f"| {stats.format_p(p['t_p'])} | {boot} |")
    comps = [s["comparison"] for s in record["secondary"]]
    if comps:
        lines += ["", "**Secondary comparisons** (exploratory: two-sided, unadjusted):", "",
                  protocol.comparison_table(comps)]
    if record.get("same_lr"):
        lines += ["", "**MC vs random at the same lr** (exploratory, descriptive: the selection seeds' runs, n = "
                  f"{len(record['selection_seeds'])}, test prompts, win rate vs SFT %):", "",
                  "| lr | MC | random | MC − random (pp) |", "|---|---|---|---|"]
        for r in record["same_lr"]:
            lines.append(f"| {protocol.fmt_lr(r['lr'])} | {_pp(np.mean(r['mc']['test']))} "
                         f"| {_pp(np.mean(r['random']['test']))} | {100 * r['diff_test']:+.1f} |")
    return "\n".join(lines)


def _all_lrs(record: dict) -> list[float]:
    return sorted({float(k) for x in record["selection"].values() for k in x["grid"]})


def gates_of(out: str, scale: str, seeds: Sequence[int]) -> dict:
    found = {}
    for seed in seeds:
        path = os.path.join(os.path.abspath(out), scale, "sft", f"seed{seed}", "gate.json")
        if os.path.exists(path):
            with open(path) as f:
                found[seed] = json.load(f)
    return found


def write(record: dict, out_dir: str, *, gates: dict | None = None, doc: str = "") -> str:
    """preregistered.json / .md under `out_dir` (and between markers in `doc`); returns the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    text = markdown(record, gates=gates)
    slim = json.loads(json.dumps(record, default=str))
    for sec in ("primary", "secondary"):
        for p in slim.get(sec, []):
            if "comparison" in p:
                p["comparison"].pop("per_seed", None)
    with open(os.path.join(out_dir, "preregistered.json.tmp"), "w") as f:
        json.dump({**slim, "host": common.host_info()}, f, indent=1, default=str)
    os.replace(os.path.join(out_dir, "preregistered.json.tmp"), os.path.join(out_dir, "preregistered.json"))
    with open(os.path.join(out_dir, "preregistered.md"), "w") as f:
        f.write(text + "\n")
    if doc:
        protocol.write_into(doc, "preregistered", text)
    return text
