"""Small-scale reproductions of the paper's findings on the synthetic sorting task with an oracle judge.

One module per experiment, each one command (``--scale small|gpu|tiny``, ``--seeds 0,1,2``, ``--out DIR``):

    python -m mcpo_jax.experiments.table1_baselines   # Table 1: DPO, RNCE, MC-PO, SimPO, IPO, KTO, NCA, SPPO
    python -m mcpo_jax.experiments.fig2_sampling      # Fig. 2: MC / Max / Min / Random with 5..1 negatives
    python -m mcpo_jax.experiments.table2_noise       # Table 2: a noise candidate (y0 with two tokens swapped)
    python -m mcpo_jax.experiments.table3_negatives   # Table 3: RNCE vs MC-PO with M = 1, 2, 3
    python -m mcpo_jax.experiments.online             # OnMC-PO vs online DPO vs offline MC-PO (batched online)
    python -m mcpo_jax.experiments.cost               # wall time per step of each method (from the same runs)
    python -m mcpo_jax.experiments.sensitivity        # DPO / MC-PO at another learning rate and beta
    python -m mcpo_jax.experiments.report             # docs/results.md tables + docs/figures/*.png

`common` holds what they share: the SFT warm start (trained once per seed and reused by every method and
every experiment under the same ``--out``), the per-(cell, seed) run cache, the oracle win-rate evaluation
and the mean +- std tables.
"""
