"""Table 1 analogue: offline preference optimisation from the SFT model, every method with the same data.

Pairwise baselines (the paper's ten: DPO, RPO, EXO, SimPO, CPO, BCO, KTO, APO-zero, SPPO, NCA, plus IPO)
get one uniformly random negative among the L = 5
candidates (the paper's protocol, Sec. 5.1); RNCE is the ranking-NCE objective with a random negative
(M = 1: mathematically DPO's loss, Proposition 2.1, so its row checks the two code paths agree); MC-PO draws
its negative with the MC kernel (Algorithm 1).

    python -m mcpo_jax.experiments.table1_baselines [--scale small|gpu] [--seeds 0,1,2] [--out DIR]
"""

from mcpo_jax.experiments import common

METHODS = (  # (row, objective, sampler), in the paper's order (contrastive, then classification-based)
    ("DPO", "dpo", "random"),
    ("RNCE", "rnce", "random"),
    ("RPO", "rpo", "random"),
    ("EXO", "exo", "random"),
    ("SimPO", "simpo", "random"),
    ("CPO", "cpo", "random"),
    ("IPO", "ipo", "random"),
    ("BCO", "bco", "random"),
    ("KTO", "kto", "random"),
    ("APO", "apo_zero", "random"),
    ("SPPO", "sppo", "random"),
    ("NCA", "nca", "random"),
    ("MC-PO", "mcpo", "mc"),
)


def cells(scale: str):
    return [common.po_cell(row, "offline", objective, sampler) for row, objective, sampler in METHODS]


def tables(cells, results):
    return [common.metrics_table("Table 1 analogue (offline, L = 5, M = 1; mean ± std over seeds)", cells,
                                 results)]


EXPERIMENT = common.Experiment(
    name="table1_baselines",
    title="Table 1 analogue: offline methods vs the SFT policy",
    cells=cells, tables=tables, description=__doc__.split("\n\n")[0])

if __name__ == "__main__":
    common.main(EXPERIMENT)
