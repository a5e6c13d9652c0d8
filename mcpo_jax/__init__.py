"""mcpo-jax: preference optimization via contrastive divergence (MC-PO, OnMC-PO) and the DPO family."""

__version__ = "0.1.0"
