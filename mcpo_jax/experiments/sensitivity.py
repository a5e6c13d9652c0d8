"""Sensitivity check (added after the main tables, declared before running it): are the main tables' findings
artefacts of the demo's learning rate / beta? DPO and MC-PO (and MC-PO's Max / Min variants) again, offline
with L = 5, M = 1 (and, added after that check, OnMC-PO / online DPO), at a 10x lower learning rate (2e-4 instead of 2e-3), and at the paper's beta = 0.01 (instead
of 0.1) with the demo's learning rate. Nothing else changes; every number is reported, none is selected.

    python -m mcpo_jax.experiments.sensitivity [--scale small|gpu] [--seeds 0,1,2] [--out DIR]
"""

from mcpo_jax.experiments import common

SETTINGS = (  # (column, overrides)
    ("lr 2e-4, β 0.1", {"optimizer__learning_rate": 2e-4}),
    ("lr 2e-3, β 0.01", {"beta": 0.01}),
)
METHODS = (("DPO", "dpo", "random"), ("MC-PO", "mcpo", "mc"), ("MC-PO Max", "mcpo", "max"),
           ("MC-PO Min", "mcpo", "min"))


ONLINE = (("OnMC-PO (π_ref = SFT)", "mcpo", "mc"), ("Online DPO (π_ref = SFT)", "dpo", "random"))
MAIN = "lr 2e-3, β 0.1 (main)"


def cells(scale: str):
    main = [common.po_cell(row, MAIN, objective, sampler) for row, objective, sampler in METHODS]
    out = main + [common.po_cell(row, col, objective, sampler, **overrides)
                  for col, overrides in SETTINGS for row, objective, sampler in METHODS
                  if not (col.endswith("β 0.01") and sampler in ("max", "min"))]
    # the batched online runs (online.py) at the lower learning rate too (added after the offline check)
    for col, overrides in ((MAIN, {}), SETTINGS[0]):
        out += [common.po_cell(row, col, objective, sampler, kind="online", online__reference="initial", **overrides)
                for row, objective, sampler in ONLINE]
    return out


def tables(cells, results):
    return common.win_rate_tables(cells, results, "Sensitivity")


EXPERIMENT = common.Experiment(
    name="sensitivity",
    title="Sensitivity check: learning rate and beta",
    cells=cells, tables=tables, description=__doc__.split("\n\n")[0])

if __name__ == "__main__":
    common.main(EXPERIMENT)
