"""Cost: wall time per optimiser step of each method, read from the same runs as the other tables.

The step of this trainer computes the no-gradient log-probs of all C = 1 + L sequences for every sampler
(the kernel needs them; the random sampler does not, but shares the step), then the gradient through y0 and
the M selected rows. So "DPO" here costs what MC-PO costs. The paper's +30% compares MC-PO with TRL's DPO,
which only ever sees the pair; "DPO (pairs, C = 2)" is that protocol: the random negative drawn once when the
data is built (`@pairs` data), only two sequences per prompt in the step. Medians over the steps of a run
(first step left out), then mean ± std over seeds; the ratio is per seed against that seed's DPO (pairs) run.
Times on a shared CPU are noisy: read the ratios, not the absolute numbers.

    python -m mcpo_jax.experiments.cost [--scale small|gpu] [--seeds 0,1,2] [--out DIR]
"""

from mcpo_jax.experiments import common, table1_baselines, table3_negatives

PAIRS = "DPO (pairs, C = 2)"


def cells(scale: str):
    out = [common.po_cell(PAIRS, "offline", "dpo", "fixed", L=1, data__source="@pairs", data__format="pairs")]
    out += table1_baselines.cells(scale)
    out += [c for c in table3_negatives.cells(scale) if c.col != "M = 1"]
    return out


def tables(cells, results):
    rows, values = [], {}
    base = {r["seed"]: r["step_time_median"] for r in results.get((PAIRS, "offline"), [])}
    cols = ("ms / step", f"ratio to {PAIRS}", "tokens / step", "train + export wall (s)")
    for c in cells:
        row = c.row if c.col in ("offline", "noise injected") else f"{c.row} ({c.col})"
        if row in rows:
            continue
        rows.append(row)
        rs = results.get((c.row, c.col), [])
        values[(row, cols[0])] = [1000.0 * r["step_time_median"] for r in rs]
        values[(row, cols[1])] = [r["step_time_median"] / base[r["seed"]] for r in rs if r["seed"] in base]
        values[(row, cols[2])] = [r["tokens_per_step"] for r in rs]
        values[(row, cols[3])] = [r["train_seconds"] for r in rs]
    return [common.Table("Cost per optimiser step (median over steps; mean ± std over seeds)", rows, list(cols),
                         values, metric="step_time_median", scale=1.0, digits=2)]


EXPERIMENT = common.Experiment(
    name="cost",
    title="Cost: wall time per step",
    cells=cells, tables=tables, description=__doc__.split("\n\n")[0])

if __name__ == "__main__":
    common.main(EXPERIMENT)
