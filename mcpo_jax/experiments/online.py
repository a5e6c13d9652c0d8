"""OnMC-PO vs online DPO vs offline MC-PO (Sec. 3.2, App. B.1 batched online setup).

Online: the training prompts are split into 3 equal segments; at the start of each, the current policy samples
K = 6 answers per prompt (temperatures 0.6, 0.6, 0.8, 0.8, 1.0, 1.0), the oracle picks y0 by iterative pairwise
ranking, the other (distinct) answers are the candidates, and the segment trains on them: OnMC-PO with the MC
kernel, online DPO with a random negative. As many prompts as the offline data has rows, so the three runs
take the same number of steps; offline MC-PO is Table 1's run (oracle-ranked fixed candidates).

    python -m mcpo_jax.experiments.online [--scale small|gpu] [--seeds 0,1,2] [--out DIR]
"""

from mcpo_jax.experiments import common


def cells(scale: str):
    return [
        common.po_cell("OnMC-PO", "batched online", "mcpo", "mc", kind="online"),
        common.po_cell("Online DPO", "batched online", "dpo", "random", kind="online"),
        common.po_cell("MC-PO (offline)", "offline", "mcpo", "mc"),
    ]


def tables(cells, results):
    metrics = common.METRICS + (("steps", "steps", 1.0),)
    return [common.metrics_table("Online vs offline (mean ± std over seeds)", cells, results, metrics=metrics)]


EXPERIMENT = common.Experiment(
    name="online",
    title="OnMC-PO vs online DPO vs offline MC-PO",
    cells=cells, tables=tables, description=__doc__.split("\n\n")[0])

if __name__ == "__main__":
    common.main(EXPERIMENT)
