"""Table 3 analogue: RNCE (random negatives) vs MC-PO (kernel negatives) with M = 1, 2, 3 negatives per prompt.

Both use the ranking-NCE loss -beta r_0 + log sum_{i in {0} + selected} exp(beta r_i) over y0 and the M
selected candidates (L = 5); M > 1 draws without replacement (Gumbel top-k for MC-PO).

    python -m mcpo_jax.experiments.table3_negatives [--scale small|gpu] [--seeds 0,1,2] [--out DIR]
"""

from mcpo_jax.experiments import common

METHODS = (("RNCE", "rnce", "random"), ("MC-PO", "mcpo", "mc"))


def cells(scale: str):
    return [common.po_cell(row, f"M = {m}", objective, sampler, M=m)
            for row, objective, sampler in METHODS for m in (1, 2, 3)]


def tables(cells, results):
    return common.win_rate_tables(cells, results, "Table 3 analogue")


EXPERIMENT = common.Experiment(
    name="table3_negatives",
    title="Table 3 analogue: number of negatives M",
    cells=cells, tables=tables, description=__doc__.split("\n\n")[0])

if __name__ == "__main__":
    common.main(EXPERIMENT)
