"""Table 2 analogue: a noise candidate (y0 with two tokens swapped; here two characters of the sorted digits)
is added to the L = 5 candidates of every prompt.

DPO(-) takes the noise candidate as its negative (the `fixed` sampler: the reader marks it as the row's
designated rejected), DPO takes a uniformly random one of the 6 candidates, MC-PO draws from the kernel over
all 6 (Sec. 5.4).

    python -m mcpo_jax.experiments.table2_noise [--scale small|gpu] [--seeds 0,1,2] [--out DIR]
"""

from mcpo_jax.experiments import common

METHODS = (("DPO(-)", "dpo", "fixed"), ("DPO", "dpo", "random"), ("MC-PO", "mcpo", "mc"))


def cells(scale: str):
    return [common.po_cell(row, "noise injected", objective, sampler, data__options__inject_noise=True)
            for row, objective, sampler in METHODS]


def tables(cells, results):
    return [common.metrics_table("Table 2 analogue (noise candidate injected; mean ± std over seeds)", cells,
                                 results)]


EXPERIMENT = common.Experiment(
    name="table2_noise",
    title="Table 2 analogue: robustness to a near-duplicate noise candidate",
    cells=cells, tables=tables, description=__doc__.split("\n\n")[0])

if __name__ == "__main__":
    common.main(EXPERIMENT)
