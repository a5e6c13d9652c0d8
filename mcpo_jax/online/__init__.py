"""Online parts: KV-cache sampling (`generate`), judges, and batched-online training (`onmcpo`).

`mcpo_jax.online.generate` is the function (DESIGN.md contract); reach the module's other names with
`from mcpo_jax.online.generate import ...`.
"""

from mcpo_jax.online.judges import (A, B, INVALID, TIE, Judge, LLMJudge, RewardFunctionJudge,  # noqa: F401
                                    iterative_pairwise_ranking, make_judge, oracle_judge, parse_verdict,
                                    round_robin_ranking)

from mcpo_jax.online.generate import filter_logits, generate, generation_throughput  # noqa: F401,E402
