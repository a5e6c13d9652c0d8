"""A synthetic preference task with a computable oracle: sorting digits.

The demo (`configs/demo.py`), the tests and the reproduction experiments train a tiny Llama on it on a CPU, so
it must be learnable in minutes yet leave preference optimization something to fix.

Task. The user writes ``sort 5391`` (3-6 digits); the right answer is the digits in ascending order, ``1359``.

Oracle. ``oracle_score(prompt, completion) = 1 - levenshtein(completion, answer) / max(len(completion),
len(answer))`` in [0, 1]: 1 for the exact answer, graded by the number of wrong characters otherwise.
The task is registered as ``"sorting"`` in `mcpo_jax.data.tasks`; its judge is
``mcpo_jax.judges.oracle_judge("sorting")`` (equal scores are a tie).

Completions come in kinds of graded quality:

- ``correct``: the answer (score 1).
- ``sub1`` / ``sub2`` / ``sub3``: the answer with 1 / 2 / 3 digits replaced (score 1 - k/n): near misses.
- ``dedup``: the answer with repeated digits written once (``1339`` -> ``139``; only for inputs with repeats):
  a systematic error, close in edit distance.
- ``desc``: the digits sorted in descending order: a wrong *mode* (score near 0 for most inputs).
- ``copy``: the input digits unchanged: a lazy answer (score varies, often low).
- ``random``: random digits of the right length (score near 0).

Preference rows (`generate_rows`) are in the Nectar schema with 1 + num_candidates answers ranked by the oracle
score (equal scores ranked in the order of the list above, so ranks are unique), listed in a shuffled order so
that the reader's sort by rank is exercised. The default 7 answers are ``correct``, ``sub1`` (always rank 2:
no other kind scores higher, and ties go to it), ``sub2``, ``desc``, ``copy``, ``random`` and ``dedup`` for
inputs with repeated digits or ``sub3`` otherwise; with the paper's preprocessing (rank 1 = y0, rank 2 dropped)
5 candidates remain, like Nectar.

Why preference optimization has room to improve. The SFT data (`sft_rows`) comes from an imperfect teacher
(`TEACHER_MIX`): on inputs with repeated digits (about 60% of prompts) it answers ``dedup`` 55% of the time and
``correct`` only 25% (else ``desc`` 10%, ``sub1`` 7%, ``copy`` 3%); on inputs without repeats it answers
``correct`` 60%, ``desc`` 20%, ``sub1`` 15%, ``copy`` 5%. A model trained on it by maximum likelihood puts real
mass on wrong answers, and even its greedy answer is wrong on inputs with repeats (the teacher's most frequent
answer there is ``dedup``). Its likelihood does not order candidates by quality: ``dedup`` and ``desc`` are far
more likely under the SFT model than the ``sub2``/``sub3`` near misses that rank above ``desc``, and ``random``
is unlikely but no worse than ``desc``. The MC kernel does not weight candidates by their likelihood: its weights
are exp(beta * r), r = log pi - log pi_ref, uniform at the start (pi = pi_ref) and then largest for the candidates
whose likelihood training has raised (or failed to lower) the most relative to the SFT model. Whether that finds
the harmful ``dedup`` answer more often than a uniform draw is what the experiments measure (the tiny
model's SFT answers ``dedup`` on most repeat prompts only at `--scale medium`, which `common.sft_gate` checks).

Held-out prompts. A fixed eighth of all digit strings (by a CRC32 hash) is reserved for evaluation:
`generate_rows` and `sft_rows` never emit them and `prompts` emits only them, whatever the seeds.

Tokenizer. `make_tokenizer()` builds, in memory, a character-level `PreTrainedTokenizerFast` (digits, letters,
punctuation, space, newline; ~100 tokens) with ``<pad>``, ``<s>`` (bos), ``</s>`` (eos), ``<unk>``, role markers
and a chat template ``<s><|user|>sort 5391</s><|assistant|>1359</s>``: a prompt of n digits is 9 + n tokens
with the template and a completion n + 1 (with the EOS), so ``TOKEN_LIMITS`` (16 / 8 / 24) fit every row.
"""

from __future__ import annotations

import re
import string
import zlib
from collections.abc import Sequence

import numpy as np

TASK_PREFIX = "sort "
KINDS = ("correct", "sub1", "dedup", "sub2", "sub3", "desc", "copy", "random")  # also the tie-break order
# Order in which the non-correct kinds are used when fewer than 6 candidates are asked for: the hard negatives
# (dedup where the input has repeats, desc) and the near misses first.
_CANDIDATE_PRIORITY = ("dedup", "desc", "sub1", "sub2", "copy", "random", "sub3")
# The SFT teacher's answer distribution, for inputs with repeated digits and for inputs without.
TEACHER_MIX = {
    "repeats": {"dedup": 0.55, "correct": 0.25, "desc": 0.10, "sub1": 0.07, "copy": 0.03},
    "distinct": {"correct": 0.60, "desc": 0.20, "sub1": 0.15, "copy": 0.05},
}
MIN_DIGITS, MAX_DIGITS = 3, 6
# Token budgets (with the chat template of `make_tokenizer`) that fit every row with up to MAX_DIGITS digits.
TOKEN_LIMITS = {"max_prompt_length": 16, "max_completion_length": 8, "max_length": 24}
HELDOUT_MODULUS = 8

_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
_CHARS = list(string.digits + string.ascii_lowercase + string.ascii_uppercase + " .,:;!?-+=*/()[]'\"#%&_<>|\n")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def make_tokenizer():
    """A character-level `PreTrainedTokenizerFast` with bos/eos/pad/unk and a chat template; no download."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIAL + _CHARS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(_SPECIAL)
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=_SPECIAL[4:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=TOKEN_LIMITS["max_length"],
    )


# ----------------------------------------------------------------------------------------------- oracle


def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


_DIGITS_RE = re.compile(r"sort\s+(\d+)")


def parse_prompt(prompt) -> str:
    """The digit string of a prompt: user text, Nectar text or a list of chat messages."""
    if isinstance(prompt, (list, tuple)):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        prompt = users[-1] if users else ""
    matches = _DIGITS_RE.findall(prompt)
    if not matches:
        raise ValueError(f"not a prompt of the sorting task: {prompt!r}")
    return matches[-1]


_EXACT_PROMPT_RE = re.compile(r"(?:Human:\s*)?sort (\d+)(?:\s*Assistant:)?")


def is_prompt(prompt) -> bool:
    """Whether ``prompt`` is a prompt of this task: exactly ``sort DIGITS`` (as user text, a Nectar prompt or the
    last user message), not merely a text that mentions sorting some number."""
    if isinstance(prompt, (list, tuple)):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1] if users else ""
    return isinstance(prompt, str) and _EXACT_PROMPT_RE.fullmatch(prompt.strip()) is not None


def answer(prompt) -> str:
    return "".join(sorted(parse_prompt(prompt)))


def oracle_score(prompt, completion: str) -> float:
    """1 - normalized edit distance between the completion and the sorted digits (1 = exact)."""
    target = answer(prompt)
    completion = completion.strip()
    return 1.0 - _levenshtein(completion, target) / max(len(completion), len(target))


# -------------------------------------------------------------------------------------------- generator


def has_repeats(digits: str) -> bool:
    return len(set(digits)) < len(digits)


def is_heldout(digits: str) -> bool:
    return zlib.crc32(digits.encode()) % HELDOUT_MODULUS == 0


def _sample_digits(rng: np.random.Generator, heldout: bool, min_digits: int, max_digits: int) -> str:
    while True:
        n = int(rng.integers(min_digits, max_digits + 1))
        digits = "".join(str(d) for d in rng.integers(0, 10, n))
        ordered = "".join(sorted(digits))
        # An input already sorted either way would make `copy` or `desc` equal to the answer.
        if digits in (ordered, ordered[::-1]) or is_heldout(digits) != heldout:
            continue
        return digits


def _substitute(rng: np.random.Generator, text: str, k: int) -> str:
    chars = list(text)
    for pos in rng.choice(len(chars), size=min(k, len(chars)), replace=False):
        chars[pos] = str((int(chars[pos]) + int(rng.integers(1, 10))) % 10)
    return "".join(chars)


def completion_of_kind(rng: np.random.Generator, digits: str, kind: str) -> str:
    ordered = "".join(sorted(digits))
    if kind == "correct":
        return ordered
    if kind.startswith("sub"):
        return _substitute(rng, ordered, int(kind[3:]))
    if kind == "dedup":
        return "".join(sorted(set(digits)))
    if kind == "desc":
        return ordered[::-1]
    if kind == "copy":
        return digits
    if kind == "random":
        return "".join(str(d) for d in rng.integers(0, 10, len(digits)))
    raise ValueError(f"unknown completion kind {kind!r}; known: {KINDS}")


def _distinct_completions(rng, digits: str, kinds: Sequence[str]) -> list[str]:
    """One completion per kind, all different: deterministic kinds first, random kinds redrawn on collision."""
    out: dict[int, str] = {}
    deterministic = [i for i, k in enumerate(kinds) if k in ("correct", "dedup", "desc", "copy")]
    for i in deterministic + [i for i in range(len(kinds)) if i not in deterministic]:
        for _ in range(1000):
            text = completion_of_kind(rng, digits, kinds[i])
            if text not in out.values():
                break
        else:  # deterministic kinds are distinct by `_sample_digits`; random ones have room with >= 3 digits
            raise AssertionError(f"cannot draw a distinct {kinds[i]!r} completion for {digits!r}")
        out[i] = text
    return [out[i] for i in range(len(kinds))]


def _nectar_prompt(user_text: str) -> str:
    return f"\n\nHuman: {user_text}\n\nAssistant: "


def generate_rows(
    n: int,
    *,
    seed: int,
    num_candidates: int = 6,
    min_digits: int = MIN_DIGITS,
    max_digits: int = MAX_DIGITS,
) -> list[dict]:
    """`n` Nectar-schema rows with 1 + num_candidates answers ranked by the oracle (rank 1 = correct)."""
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    if min_digits < 3:
        raise ValueError(f"min_digits must be >= 3 (for the sub3 kind), got {min_digits}")
    # beyond the kinds, more draws of the near misses and of random strings (all answers stay distinct)
    extra = tuple(("sub1", "sub2", "random")[i % 3] for i in range(num_candidates))
    rng = np.random.default_rng([seed, 0x5EED])
    rows = []
    for _ in range(n):
        digits = _sample_digits(rng, False, min_digits, max_digits)
        user_text = TASK_PREFIX + digits
        pool = [k for k in _CANDIDATE_PRIORITY if k != "dedup" or has_repeats(digits)] + list(extra)
        kinds = ["correct", *pool[:num_candidates]]
        texts = _distinct_completions(rng, digits, kinds)
        scores = [oracle_score(user_text, t) for t in texts]
        by_quality = sorted(range(len(kinds)), key=lambda i: (-scores[i], KINDS.index(kinds[i]), i))  # ties: KINDS
        rank_of = {i: r + 1 for r, i in enumerate(by_quality)}
        answers = [
            {"answer": texts[i], "model": kinds[i], "rank": rank_of[i], "score": scores[i]}
            for i in rng.permutation(len(kinds))
        ]
        rows.append(
            {
                "prompt": _nectar_prompt(user_text),
                "answers": answers,
                "turns": 1,
                "num_responses": len(answers),
                "source": ["synthetic-sort"],
                "good_natured": True,
            }
        )
    return rows


def sft_rows(
    n: int, *, seed: int, min_digits: int = MIN_DIGITS, max_digits: int = MAX_DIGITS, mix=None
) -> list[dict]:
    """`n` SFT rows from the imperfect teacher, in the generic `pairs` layout.

    ``chosen`` is the teacher's answer, drawn from ``mix["repeats"]`` or ``mix["distinct"]`` (default
    `TEACHER_MIX`) by whether the input repeats a digit, and ``rejected`` a ``random`` completion (present only so
    the rows fit the preference layout; an SFT objective uses column 0 only). ``kind`` names the teacher's kind.
    """
    mix = TEACHER_MIX if mix is None else mix
    tables = {
        key: (list(table), np.asarray(list(table.values()), dtype=np.float64) / sum(table.values()))
        for key, table in mix.items()
    }
    rng = np.random.default_rng([seed, 0x5F7])
    rows = []
    for _ in range(n):
        digits = _sample_digits(rng, False, min_digits, max_digits)
        kinds, probs = tables["repeats" if has_repeats(digits) else "distinct"]
        kind = kinds[int(rng.choice(len(kinds), p=probs))]
        chosen = completion_of_kind(rng, digits, kind)
        rejected = chosen
        while rejected == chosen:
            rejected = completion_of_kind(rng, digits, "random")
        rows.append({"prompt": TASK_PREFIX + digits, "chosen": chosen, "rejected": rejected, "kind": kind})
    return rows


def prompts(n: int, seed: int, *, min_digits: int = MIN_DIGITS, max_digits: int = MAX_DIGITS) -> list[str]:
    """`n` held-out user prompts (``"sort 5391"``), disjoint from every training row whatever the seeds."""
    rng = np.random.default_rng([seed, 0xE7A1])
    return [TASK_PREFIX + _sample_digits(rng, True, min_digits, max_digits) for _ in range(n)]
