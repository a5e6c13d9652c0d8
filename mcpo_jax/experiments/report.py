"""docs/results.md tables and docs/figures/*.png from the experiments' results (nothing is retrained).

    python -m mcpo_jax.experiments.report [--scale small] [--out runs/experiments] [--doc docs/results.md]

The generated part of the document sits between the markers below; text outside them (setup, discussion)
is kept as written.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from mcpo_jax.experiments import common

BEGIN, END = "<!-- generated:begin -->", "<!-- generated:end -->"
ORDER = ("table1_baselines", "fig2_sampling", "table2_noise", "table3_negatives", "online", "cost", "sensitivity")


def load(out: str, scale: str) -> dict[str, dict]:
    root = os.path.join(os.path.abspath(out), scale)
    found = {}
    for name in ORDER:
        path = os.path.join(root, name, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                found[name] = json.load(f)
    return found


def _table_md(t: dict) -> str:
    table = common.Table(t["title"], t["rows"], t["cols"],
                         {(c["row"], c["col"]): c["values"] for c in t["cells"]}, metric=t["metric"],
                         scale=t["scale"], row_header=t.get("row_header", "method"),
                         digits=2 if t["metric"] == "step_time_median" else 1)
    return table.markdown()


def plot_fig2(rec: dict, path: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = next((t for t in rec["tables"] if t["metric"] == "win_rate"), None)
    if t is None:
        return None
    cols = t["cols"]
    xs = [int(c.split()[0]) for c in cols]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, row in enumerate(t["rows"]):
        ms, ss = [], []
        for c in cols:
            cell = next(x for x in t["cells"] if x["row"] == row and x["col"] == c)
            m, s, _ = common.mean_std(cell["values"])
            ms.append(100 * m)
            ss.append(100 * s)
        ax.errorbar([x + 0.06 * (i - 1.5) for x in xs], ms, yerr=ss, marker="o", capsize=3, label=row)
    ax.axhline(50, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("candidates per prompt (highest-ranked removed first)")
    ax.set_ylabel("adjusted win rate vs SFT (%)")
    ax.set_xticks(xs)
    ax.invert_xaxis()
    ax.legend(title="sampler")
    ax.set_title("Fig. 2 analogue (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(rec: dict, path: str, *, seed: int = 0, title: str = "") -> str | None:
    """Training loss and reward accuracy per step of each row's run for one seed (online: segments chained)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in rec["runs"] if r["seed"] == seed]
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = plt.cm.tab20(np.linspace(0, 1, 20)) if len(runs) > 10 else plt.cm.tab10(np.arange(10))
    for ax in axes:
        ax.set_prop_cycle(color=list(colors))
    for r in runs:
        steps, loss, acc, offset = [], [], [], 0
        for m in r.get("metrics_files", []):
            curve = common.read_curve(m)
            steps += [offset + s for s in curve["step"]]
            loss += curve.get("loss", [])
            acc += curve.get("rewards/accuracies", [])
            offset = steps[-1] if steps else offset
        if not steps:
            continue
        label = r["row"] if r["col"] in ("offline", "batched online", "noise injected") else f"{r['row']} {r['col']}"
        axes[0].plot(steps, loss, label=label, lw=1)
        axes[1].plot(steps, _smooth(acc), label=label, lw=1)
    axes[0].set_title("training loss (each objective on its own scale)")
    lows = [min(ln.get_ydata()) for ln in axes[0].get_lines() if len(ln.get_ydata())]
    highs = [max(ln.get_ydata()) for ln in axes[0].get_lines() if len(ln.get_ydata())]
    if lows and min(lows) > 0 and max(highs) / min(lows) > 20:  # objectives of very different scales
        axes[0].set_yscale("log")
    if "online" in rec["experiment"]:
        axes[1].set_title("reward accuracy on the batch (smoothed; online: 3 segments chained)")
    axes[1].set_title("reward accuracy on the training batch (smoothed)")
    for ax in axes:
        ax.set_xlabel("step")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(title or f"{rec['title']} (seed {seed})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _smooth(xs, k: int = 5):
    out = []
    for i in range(len(xs)):
        window = [x for x in xs[max(0, i - k + 1): i + 1] if x == x]
        out.append(sum(window) / len(window) if window else float("nan"))
    return out


DIAGNOSTICS_NOTE = (
    "Training diagnostics over the last 8 steps of each run (mean ± std over seeds): the reward of y0, "
    "β·(log π(y0) − log π_SFT(y0)) (negative: the policy made the preferred answer *less* likely than the SFT "
    "model did); the margin over the selected negatives; the reward accuracy on the batch; the entropy of the MC "
    "kernel's weights (uniform over L candidates = log L, 1.61 for L = 5; computed for every sampler, used only "
    "by MC); and how often the negative used was the best remaining candidate by the oracle's ranking (the "
    "hardest negative by quality; 1/L for a uniform draw). SimPO and CPO have no reference: their 'reward' is "
    "the trainer's β·log π(y0) (per token for SimPO), not a log-ratio, so their first column is not comparable.")


def diagnostics(rec: dict, last: int = 8) -> str | None:
    """Training-side numbers behind a table: over the last `last` steps of each run, the reward of y0
    (beta * log-ratio; < 0 means the policy made y0 less likely than the SFT model did), the margin over the
    selected negatives, the MC kernel's entropy (log 5 = 1.61 is uniform over 5 candidates) and the share of
    selected negatives that are the best remaining candidate (dataset rank 3, the hardest by quality)."""
    per_row: dict[str, dict[str, list[float]]] = {}
    for r in rec["runs"]:
        rows = []
        for m in r.get("metrics_files", []):
            if os.path.exists(m):
                with open(m) as f:
                    rows += [json.loads(x) for x in f if x.strip()]
        rows = [x for x in rows if x.get("split", "train") == "train"][-last:]
        if not rows:
            continue
        label = r["row"] if r["col"] in ("offline", "batched online", "noise injected") else f"{r['row']} ({r['col']})"
        d = per_row.setdefault(label, {})
        mean = lambda k: sum(x.get(k, float("nan")) for x in rows) / len(rows)
        d.setdefault("chosen", []).append(mean("rewards/chosen"))
        d.setdefault("margin", []).append(mean("rewards/margins"))
        d.setdefault("acc", []).append(mean("rewards/accuracies"))
        d.setdefault("entropy", []).append(mean("kernel/entropy"))
        hist = [sum(x) for x in zip(*[x["kernel/rank_hist"] for x in rows if "kernel/rank_hist" in x])]
        if hist and sum(hist) > 0 and r["kind"] == "offline":
            best = 8 - int(r["overrides"].get("num_candidates", 5))  # 7 ranked answers, the L lowest kept
            d.setdefault("best", []).append(hist[best] / sum(hist))
            if r["overrides"].get("data.options.inject_noise"):
                d.setdefault("noise", []).append(hist[0] / sum(hist))  # the noise candidate has rank -1
    if not per_row:
        return None
    cols = (("reward of y0 (β·r₀)", "chosen", 1.0, 2), ("margin", "margin", 1.0, 2),
            ("reward accuracy (%)", "acc", 100.0, 0), ("kernel entropy", "entropy", 1.0, 2),
            ("negative = best remaining candidate (%)", "best", 100.0, 0))
    if any("noise" in d for d in per_row.values()):
        cols += (("negative = noise candidate (%)", "noise", 100.0, 0),)
    lines = ["| run | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for label, d in per_row.items():
        cells = [common.format_cell(d.get(key, []), scale=scale, digits=digits) for _, key, scale, digits in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def generated_section(found: dict[str, dict], fig_dir: str, doc_dir: str) -> str:
    lines = [BEGIN, ""]
    for name in ORDER:
        rec = found.get(name)
        if rec is None:
            lines += [f"### {name}", "", "_not run (no results.json)_", ""]
            continue
        own = {(r["key"], r["seed"]): r for r in rec["runs"]}  # a run shown in two rows counted once
        minutes = sum(r.get("train_seconds", 0.0) for r in own.values()) / 60
        lines += [f"### {rec['title']}", "",
                  f"`python -m mcpo_jax.experiments.{name} --scale {rec['scale']} --seeds "
                  f"{','.join(map(str, rec['seeds']))}`: {len(rec['runs'])} (cell, seed) results; their training "
                  f"took {minutes:.0f} min of wall time in all on the shared CPU (runs shared with other "
                  "experiments included, evaluation and the SFT warm starts not).", ""]
        if rec.get("failures"):
            lines += [f"Failed runs: {rec['failures']}", ""]
        for t in rec["tables"]:
            lines += [f"**{t['title']}**", "", _table_md(t), ""]
        controlled = os.path.join(rec["out"], "cost", "controlled.json")
        if name == "cost" and os.path.exists(controlled):
            from mcpo_jax.experiments import cost

            with open(controlled) as f:
                ctl = json.load(f)
            lines += [f"**Controlled timing** (`python -m mcpo_jax.experiments.cost --controlled`): the trainer's "
                      f"jitted step for each variant in one process, interleaved ({ctl['rounds']} rounds x "
                      f"{ctl['steps_per_round']} steps each), batch {ctl['batch']}, T = {ctl['seq']}, reference "
                      "log-probs precomputed as in the runs:", "", cost.controlled_markdown(ctl), ""]
        diag = diagnostics(rec) if name != "cost" else None
        if diag:
            lines += [DIAGNOSTICS_NOTE, "", diag, ""]
        figs = []
        if name == "fig2_sampling":
            figs.append(plot_fig2(rec, os.path.join(fig_dir, "fig2_sampling.png")))
        if name in ("table1_baselines", "online", "table2_noise", "table3_negatives"):
            figs.append(plot_curves(rec, os.path.join(fig_dir, f"curves_{name}.png")))
        for f in figs:
            if f:
                lines += [f"![{os.path.basename(f)}]({os.path.relpath(f, doc_dir)})", ""]
    lines.append(END)
    return "\n".join(lines)


def write(doc: str, section: str) -> None:
    text = open(doc).read() if os.path.exists(doc) else f"# Results\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(doc)), exist_ok=True)
    with open(doc, "w") as f:
        f.write(text)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mcpo_jax.experiments.report")
    p.add_argument("--scale", default="small", choices=sorted(common.SCALES))
    p.add_argument("--out", default=common.DEFAULT_OUT)
    p.add_argument("--doc", default="docs/results.md")
    p.add_argument("--figures", default="docs/figures")
    args = p.parse_args(argv)
    found = load(args.out, args.scale)
    os.makedirs(args.figures, exist_ok=True)
    section = generated_section(found, os.path.abspath(args.figures), os.path.dirname(os.path.abspath(args.doc)))
    write(args.doc, section)
    print(f"wrote {args.doc} ({', '.join(found) or 'no results'})")


if __name__ == "__main__":
    main()
