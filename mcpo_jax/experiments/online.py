"""OnMC-PO vs online DPO vs offline MC-PO (Sec. 3.2, App. B.1 batched online setup).

Online: the training prompts are split into 3 equal segments; at the start of each, the current policy samples
K = 6 answers per prompt (temperatures 0.6, 0.6, 0.8, 0.8, 1.0, 1.0), the oracle picks y0 by iterative pairwise
ranking, the other (distinct) answers are the candidates, and the segment trains on them: OnMC-PO with the MC
kernel, online DPO with a random negative. As many prompts as the offline data has rows, so the three runs
take the same number of steps; offline MC-PO is Table 1's run (oracle-ranked fixed candidates). pi_ref (the
reference of the objective and of the MC kernel) is either the SFT policy throughout (App. B.1: the initial
model is pi_ref and the kernel's proposal; the online driver's default) or the policy each segment starts from
(the driver's `online.reference = "segment_start"`: every segment restarts with r = 0, a uniform kernel).

    python -m mcpo_jax.experiments.online [--scale small|gpu] [--seeds 0,1,2] [--out DIR]
"""

from mcpo_jax.experiments import common


REFERENCES = (("SFT", "initial"), ("segment start", "segment_start"))


def cells(scale: str):
    out = []
    for label, ref in REFERENCES:
        out += [
            common.po_cell(f"OnMC-PO (π_ref = {label})", "batched online", "mcpo", "mc", kind="online",
                           online__reference=ref),
            common.po_cell(f"Online DPO (π_ref = {label})", "batched online", "dpo", "random", kind="online",
                           online__reference=ref),
        ]
    return out + [common.po_cell("MC-PO (offline)", "offline", "mcpo", "mc")]


def tables(cells, results):
    metrics = common.METRICS + (("steps", "steps", 1.0),)
    return [common.metrics_table("Online vs offline (mean ± std over seeds)", cells, results, metrics=metrics)]


EXPERIMENT = common.Experiment(
    name="online",
    title="OnMC-PO vs online DPO vs offline MC-PO",
    cells=cells, tables=tables, description=__doc__.split("\n\n")[0])

if __name__ == "__main__":
    common.main(EXPERIMENT)
