"""Instruction following with program-checkable instructions, and its rule judge.

A prompt is a small writing task ("Describe bicycles.") followed by one or two instructions a program can
check, each in a fixed phrasing:

=============  ==========================================================  ===================================
kind           phrasing                                                     satisfied when
=============  ==========================================================  ===================================
max_words      "Answer in at most N words."                                 words (``\\w+['-]?\\w*`` runs) <= N
min_words      "Answer in at least N words."                                words >= N
max_sentences  "Answer in at most N sentence(s)."                          sentences (runs ending . ! ?) <= N
lowercase      "Write your whole answer in lowercase letters."              a letter, and no uppercase letter
keyword        "Include the word "W" in your answer."                       W as a whole word, any case
forbidden      "Do not use the word "W"."                                   W nowhere as a whole word, any case
ending         "End your answer with the exact phrase "P""                  the stripped answer ends with P
numeric        "What is A + B? Reply with the number only."                 the answer is that number
=============  ==========================================================  ===================================

The judge reads the instructions back from the prompt text (:func:`parse_instructions`), so it needs nothing
but the prompt and the answer: it works on prompts that went through Nectar rows, chat messages or JSONL files.
A prompt without any recognised instruction is an error, never a guess.

The rule judge scores an answer by the fraction of its prompt's instructions it satisfies (an empty answer scores
0); the module registers as the task "instructions" (data/tasks.py), so the judge is ``judges.oracle_judge(
"instructions")``, spelled ``rule:instructions`` in configs and the CLI: equal scores are a tie, ranking sorts by
score.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

_WORD = re.compile(r"[A-Za-z0-9]+(?:['\u2019-][A-Za-z0-9]+)*")
_SENTENCE = re.compile(r"[^.!?]*[A-Za-z0-9][^.!?]*(?:[.!?]+|$)")

TEMPLATES = {
    "max_words": "Answer in at most {n} words.",
    "min_words": "Answer in at least {n} words.",
    "max_sentences": "Answer in at most {n} sentences.",  # "1 sentence." when n = 1
    "lowercase": "Write your whole answer in lowercase letters.",
    "keyword": 'Include the word "{word}" in your answer.',
    "forbidden": 'Do not use the word "{word}".',
    "ending": 'End your answer with the exact phrase "{phrase}"',
    "numeric": "What is {a} + {b}? Reply with the number only.",
}
_PATTERNS = {
    "max_words": re.compile(r"Answer in at most (\d+) words\."),
    "min_words": re.compile(r"Answer in at least (\d+) words\."),
    "max_sentences": re.compile(r"Answer in at most (\d+) sentences?\."),
    "lowercase": re.compile(r"Write your whole answer in lowercase letters\."),
    "keyword": re.compile(r'Include the word "([^"]+)" in your answer\.'),
    "forbidden": re.compile(r'Do not use the word "([^"]+)"\.'),
    "ending": re.compile(r'End your answer with the exact phrase "([^"]+)"'),
    "numeric": re.compile(r"What is (-?\d+) \+ (-?\d+)\? Reply with the number only\."),
}


def count_words(text: str) -> int:
    """Words: runs of letters/digits, joined by an apostrophe or hyphen ("don't", "well-known" = 1)."""
    return len(_WORD.findall(text))


def count_sentences(text: str) -> int:
    """Sentences: runs that hold a letter or digit and end at ``.``, ``!``, ``?`` (or the end of the text).

    Decimal points ("3.14") and ellipses do not split a sentence more than once; abbreviations ("e.g.") do:
    a rule judge must be simple enough to predict.
    """
    text = re.sub(r"(\d)\.(\d)", r"\1\2", text)
    return len([s for s in _SENTENCE.findall(text) if s.strip()])


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", text, re.IGNORECASE) is not None


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One checkable instruction: ``kind`` (a key of ``TEMPLATES``) and its arguments."""

    kind: str
    args: tuple = ()

    @property
    def text(self) -> str:
        names = {"max_words": ("n",), "min_words": ("n",), "max_sentences": ("n",), "lowercase": (),
                 "keyword": ("word",), "forbidden": ("word",), "ending": ("phrase",), "numeric": ("a", "b")}
        text = TEMPLATES[self.kind].format(**dict(zip(names[self.kind], self.args)))
        return text.replace(" 1 sentences.", " 1 sentence.")

    def check(self, answer: str) -> bool:
        a = answer.strip()
        if self.kind == "max_words":
            return 0 < count_words(a) <= int(self.args[0])
        if self.kind == "min_words":
            return count_words(a) >= int(self.args[0])
        if self.kind == "max_sentences":
            return 0 < count_sentences(a) <= int(self.args[0])
        if self.kind == "lowercase":
            return any(ch.isalpha() for ch in a) and a == a.lower()
        if self.kind == "keyword":
            return _has_word(a, self.args[0])
        if self.kind == "forbidden":
            return bool(a) and not _has_word(a, self.args[0])
        if self.kind == "ending":
            return a.endswith(self.args[0])
        if self.kind == "numeric":
            # the number alone; thousands commas, a final period and markdown bold are forgiven
            m = re.fullmatch(r"\**(-?\d+)(?:\.0+)?\**\.?", a.replace(",", ""))
            return m is not None and int(m.group(1)) == int(self.args[0]) + int(self.args[1])
        raise ValueError(f"unknown instruction kind {self.kind!r}")


def _prompt_text(prompt: Any) -> str:
    """The last user turn of a chat prompt, or the prompt string itself."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    if not users:
        raise ValueError("chat prompt without a user turn")
    return users[-1]


def parse_instructions(prompt: Any) -> list[Instruction]:
    """The instructions written in ``prompt`` (a string or chat messages), in order of appearance."""
    text = _prompt_text(prompt)
    found = []
    for kind, pattern in _PATTERNS.items():
        for m in pattern.finditer(text):
            found.append((m.start(), Instruction(kind, m.groups())))
    if not found:
        raise ValueError(f"no checkable instruction in prompt {text[:120]!r} (see mcpo_jax.data.instructions)")
    return [ins for _, ins in sorted(found, key=lambda x: x[0])]


def instruction_score(prompt: Any, answer: str) -> float:
    """Fraction of the prompt's instructions that ``answer`` satisfies, in [0, 1]."""
    rules = parse_instructions(prompt)
    return sum(r.check(answer) for r in rules) / len(rules)


def is_prompt(prompt: Any) -> bool:
    """Whether ``prompt`` carries at least one instruction this task checks."""
    try:
        return bool(parse_instructions(prompt))
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# The task's prompts
# ---------------------------------------------------------------------------------------------------------------

TOPICS = (
    "the ocean", "bicycles", "coffee", "the moon", "libraries", "rain", "volcanoes", "honeybees", "chess",
    "bread", "trains", "winter", "gardening", "the internet", "owls", "music", "deserts", "friendship",
    "mountains", "recycling", "elephants", "paper", "clocks", "forests", "the sun", "football", "tea",
    "rivers", "robots", "cooking", "snow", "birds", "maps", "cities", "the wind", "apples", "bridges",
    "sleep", "islands", "photography",
)
TASKS = ("Describe {t}.", "Write a short note about {t}.", "Explain why people like {t}.",
         "Give one tip about {t}.", "Tell me a fact about {t}.")
KEYWORDS = ("blue", "happy", "small", "water", "light", "green", "morning", "simple", "quiet", "friend")
FORBIDDEN = ("the", "and", "is", "very", "it")
ENDINGS = ("Thank you.", "That is all.", "The end.")


def _instruction(rng: np.random.Generator, kind: str) -> Instruction:
    if kind == "max_words":
        return Instruction(kind, (str(int(rng.choice([10, 15, 20, 30]))),))
    if kind == "min_words":
        return Instruction(kind, (str(int(rng.choice([40, 60, 80]))),))
    if kind == "max_sentences":
        return Instruction(kind, (str(int(rng.choice([1, 2, 3]))),))
    if kind == "lowercase":
        return Instruction(kind)
    if kind == "keyword":
        return Instruction(kind, (str(rng.choice(KEYWORDS)),))
    if kind == "forbidden":
        return Instruction(kind, (str(rng.choice(FORBIDDEN)),))
    if kind == "ending":
        return Instruction(kind, (str(rng.choice(ENDINGS)),))
    raise ValueError(kind)


_COMBINABLE = ("max_words", "min_words", "max_sentences", "lowercase", "keyword", "forbidden", "ending")
_CONFLICTS = {frozenset(("max_words", "min_words")), frozenset(("min_words", "max_sentences"))}


def prompts(n: int, seed: int = 0, *, split: str = "train", numeric_fraction: float = 0.15) -> list[str]:
    """``n`` task prompts with 1-2 instructions each (or a sum with "number only"), deterministic in ``seed``.

    ``split`` "train" uses the even-indexed topics, "eval" the odd ones: held-out prompts share no topic with
    training prompts. (The sums are not split: a held-out "What is A + B?" may also be a training prompt.)
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: 'train' or 'eval'")
    topics = TOPICS[0::2] if split == "train" else TOPICS[1::2]
    rng = np.random.default_rng([seed, split == "eval"])
    out = []
    for _ in range(n):
        if rng.random() < numeric_fraction:
            a, b = (int(x) for x in rng.integers(2, 60, size=2))
            out.append(Instruction("numeric", (str(a), str(b))).text)
            continue
        task = str(rng.choice(TASKS)).format(t=str(rng.choice(topics)))
        kinds = [str(rng.choice(_COMBINABLE))]
        if rng.random() < 0.5:
            second = str(rng.choice([k for k in _COMBINABLE if k != kinds[0]
                                     and frozenset((k, kinds[0])) not in _CONFLICTS]))
            kinds.append(second)
        rules = [_instruction(rng, k) for k in kinds]
        if any(r.kind == "ending" for r in rules):  # the ending instruction goes last
            rules.sort(key=lambda r: r.kind == "ending")
        out.append(" ".join([task] + [r.text for r in rules]))
    return out


def score_table(prompts_: Sequence[Any], answers: Sequence[str]) -> dict[str, float]:
    """Per instruction kind, the fraction of answers that satisfy it (for reports)."""
    hits: dict[str, list[bool]] = {}
    for p, a in zip(prompts_, answers):
        for r in parse_instructions(p):
            hits.setdefault(r.kind, []).append(r.check(a))
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}
