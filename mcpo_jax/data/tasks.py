"""Tasks with a computable judge: a name, held-out prompts and a score per answer.

A task is what the evaluation needs to score a model without an external judge: ``prompts(n, seed)`` (held-out
prompts, deterministic in the seed), ``score(prompt, completion) -> float`` (higher is better; the oracle of a
synthetic task or the rule of a rule-checked one) and, optionally, ``is_prompt(prompt) -> bool``, which
recognizes the task's prompts so that a judge of this task refuses prompts of another one (without it, a prompt
whose ``score`` raises ``ValueError`` is refused). ``perfect_score`` is the score of a fully right answer (the
"exact" fraction of a report counts answers reaching it; None when the task has no such notion).

Registering a task is one line::

    from mcpo_jax.data import tasks
    tasks.register("reverse", prompts=my_prompts, score=my_score, is_prompt=my_is_prompt)

after which ``judges.make_judge("oracle:reverse")`` and a final evaluation with ``prompts="task:reverse"`` use
it. ``kind="rule"`` marks a rule judge (spelled ``"rule:NAME"`` in judge specs; it works the same way).
The project's own tasks are registered in :func:`_register_builtins` at the end of this module, one line each;
their modules (``data/synthetic.py``, ...) do not import this one, so there is no import cycle.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

KINDS = ("oracle", "rule")


class UnknownTaskError(ValueError):
    """A task name that no one registered."""


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    prompts: Callable[[int, int], Sequence[Any]]
    score: Callable[[Any, str], float]
    is_prompt: Callable[[Any], bool] | None = None
    kind: str = "oracle"
    perfect_score: float | None = 1.0
    description: str = ""
    # Training prompts (online sampling): disjoint from `prompts` where the task can guarantee it; None = `prompts`
    train_prompts: Callable[[int, int], Sequence[Any]] | None = None

    def recognizes(self, prompt) -> bool:
        """Whether ``prompt`` is a prompt of this task (``is_prompt``, else: ``score`` accepts it)."""
        if self.is_prompt is not None:
            return bool(self.is_prompt(prompt))
        try:
            self.score(prompt, "")
        except ValueError:
            return False
        return True


_TASKS: dict[str, Task] = {}


def register(name: str, *, prompts: Callable[[int, int], Sequence[Any]], score: Callable[[Any, str], float],
             is_prompt: Callable[[Any], bool] | None = None, kind: str = "oracle",
             perfect_score: float | None = 1.0, description: str = "", replace: bool = False,
             train_prompts: Callable[[int, int], Sequence[Any]] | None = None) -> Task:
    """Add a task to the registry (``replace=True`` to redefine a name; otherwise a second use is an error)."""
    if not name or ":" in name:
        raise ValueError(f"task name {name!r}: a non-empty name without ':'")
    if kind not in KINDS:
        raise ValueError(f"task {name!r}: kind={kind!r}, expected one of {KINDS}")
    if name in _TASKS and not replace:
        raise ValueError(f"task {name!r} is already registered (pass replace=True to redefine it)")
    task = Task(name, prompts, score, is_prompt, kind, perfect_score, description, train_prompts)
    _TASKS[name] = task
    return task


def get(name: str) -> Task:
    if name not in _TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; registered tasks: {', '.join(names()) or '(none)'} "
                               "(add one with mcpo_jax.data.tasks.register)")
    return _TASKS[name]


def names() -> list[str]:
    return sorted(_TASKS)


def _register_builtins() -> None:
    from mcpo_jax.data import instructions, synthetic

    register("sorting", prompts=synthetic.prompts, score=synthetic.oracle_score, is_prompt=synthetic.is_prompt,
             train_prompts=lambda n, seed: [r["prompt"] for r in synthetic.sft_rows(n, seed=seed)],
             description="sort the digits of 'sort 5391' (data/synthetic.py); oracle: 1 - normalized edit distance")
    register("instructions", kind="rule", score=instructions.instruction_score, is_prompt=instructions.is_prompt,
             prompts=lambda n, seed: instructions.prompts(n, seed, split="eval"),
             train_prompts=lambda n, seed: instructions.prompts(n, seed, split="train"),
             description="short writing tasks with program-checked instructions (data/instructions.py); rule "
                         "judge: the fraction of the prompt's instructions the answer satisfies")


_register_builtins()
