"""Online parts: KV-cache sampling (`generate`) and batched-online training (`onmcpo`).

`mcpo_jax.online.generate` is the function (the package's public contract); reach the module's other names with
`from mcpo_jax.online.generate import ...`. Judges live one floor down, in `mcpo_jax.judges`.
"""

from mcpo_jax.online.generate import filter_logits, generate, generation_throughput  # noqa: F401
