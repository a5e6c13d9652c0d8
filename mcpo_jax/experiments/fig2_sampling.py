"""Fig. 2 analogue: MC vs Max vs Min vs Random sampling of the negative on datasets with 5, 4, 3, 2, 1 candidates.

The "x negs" data keep the x lowest-quality candidates of each prompt: the highest-ranked remaining
candidates are removed first (rank 2 is always dropped; "3 negs" also drops ranks 3 and 4 ...), as in the
paper's Sec. 5.3. The objective is MC-PO's for all four (with M = 1 the Random sampler is RNCE = DPO); Max /
Min take the candidate of largest / smallest kernel weight. With one candidate every sampler picks it, so
the "1 neg" column is one run per seed, shown in all four rows.

    python -m mcpo_jax.experiments.fig2_sampling [--scale small|gpu] [--seeds 0,1,2] [--out DIR]
"""

from mcpo_jax.experiments import common

SAMPLERS = (("MC", "mc"), ("Max", "max"), ("Min", "min"), ("Random", "random"))
NEGATIVES = (5, 4, 3, 2, 1)


def col(L: int) -> str:
    return f"{L} neg" + ("s" if L > 1 else "")


def cells(scale: str):
    out = []
    for L in NEGATIVES:
        for row, sampler in SAMPLERS:
            # one candidate: every sampler is the same run (the MC one)
            out.append(common.po_cell(row, col(L), "mcpo", sampler if L > 1 else "mc", L=L))
    return out


def tables(cells, results):
    return [
        common.table_from_results("Fig. 2 analogue: adjusted win rate vs the SFT policy (%), by sampler x "
                                  "number of candidates", cells, results, metric="win_rate", row_header="sampler"),
        common.table_from_results("Fig. 2 analogue: exact answers of the trained policy (%)", cells, results,
                                  metric="policy_exact", row_header="sampler"),
    ]


EXPERIMENT = common.Experiment(
    name="fig2_sampling",
    title="Fig. 2 analogue: sampling strategies x number of candidates",
    cells=cells, tables=tables, description=__doc__.split("\n\n")[0])

if __name__ == "__main__":
    common.main(EXPERIMENT)
