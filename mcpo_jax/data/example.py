"""The unit every reader produces: a prompt, its preferred completion y0 and L candidate completions."""

from __future__ import annotations

import dataclasses
from typing import Any, Union

Message = dict  # {"role": str, "content": str}
Prompt = Union[str, list]  # plain text, or a list of chat messages ending with a user turn


@dataclasses.dataclass
class PreferenceExample:
    """One prompt with its preferred completion and its candidates (dispreferred completions).

    `candidates` are ordered best first when the data ranks them. `candidate_ranks` are the dataset's ranks
    (1 = best, as in Nectar) and `candidate_scores` its scores (higher = better), when it has them.
    `fixed_index` indexes `candidates`: the dataset's designated rejected, used by the ``fixed`` sampler.
    `meta` says where the row came from (``source``, ``row``, and ``line`` for JSON lines).
    """

    prompt: Prompt
    preferred: str
    candidates: list[str]
    candidate_ranks: list[int] | None = None
    candidate_scores: list[float] | None = None
    preferred_rank: int | None = None
    preferred_score: float | None = None
    fixed_index: int = 0
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


class DataError(ValueError):
    """Bad input data, with where it is (source, row or line) and which field."""
