"""Readers: Nectar, UltraFeedback (raw and binarized) and generic pairs / ranked rows -> `PreferenceExample`.

`load_examples(source, *, format, on_bad_example="error", **options)` reads `source` (a .jsonl / .json / .parquet
file, a folder of them, a list of dict rows, a `datasets.Dataset`, or a hub dataset id through `datasets`) and
validates every row at load: a bad row raises `DataError` naming the source, the row (or line) and the field, or,
with ``on_bad_example="skip"``, is skipped and counted by reason (summary logged; also on the result's
``.skipped``). Candidates are ordered best first when the data ranks or scores them.

Formats and their options (every format takes `num_candidates` and `min_candidates`):

- ``nectar`` (berkeley-nest/Nectar: ``prompt`` as "\\n\\nHuman: ...\\n\\nAssistant: " text, ``answers`` =
  [{answer, model, rank}]). The paper's preprocessing (Sec. 5.1, App. B.1) is the default: rank 1 is y0, the
  ranks in `drop_ranks` (default (2,)) are dropped, the rest are the candidates. `num_candidates=L` keeps the L
  lowest-quality candidates (Fig. 2's "x negs" data: the highest-ranked remaining go first). `inject_noise=True`
  adds a candidate made by swapping two random whitespace-separated tokens of y0 (characters when y0 has fewer
  than two distinct tokens), seeded by (`noise_seed`, row), and makes it the `fixed_index` candidate (Table 2's
  DPO(-)); it comes on top of the L candidates. `parse_turns=True` parses the prompt into chat messages (user /
  assistant turns); False keeps the raw text.
- ``ultrafeedback`` (openbmb/UltraFeedback: ``instruction``, ``completions`` = [{response, <score_field>}]):
  y0 is the highest-scored completion and the candidates the rest, best first; `score_field` defaults to
  "fine-grained_score" ("overall_score" is the other choice). Equal scores keep the order of ``completions``
  (the earlier one ranks higher), and ranks 1..K are derived from that order.
- ``ultrafeedback_binarized`` (HuggingFaceH4/ultrafeedback_binarized: ``prompt``, ``chosen``, ``rejected``,
  optional ``score_chosen`` / ``score_rejected``), and ``pairs`` ({prompt, chosen, rejected}): chosen / rejected
  are strings or chat-message lists (then the prompt is the messages before the last, assistant, turn, and it
  must be the same in chosen and rejected); ``rejected`` may also be a list of strings or of message lists, all
  candidates in the given order. ``fixed_index`` = 0, the (first) rejected.
- ``ranked`` ({prompt, completions, ranks | scores}): ranks are 1 = best and must be distinct; scores are
  higher = better, equal scores keep the listed order. `drop_ranks` (default none) drops dataset ranks.

`min_candidates` (default: `num_candidates` when given, else 1) is the fewest candidates a row may have after
selection; pass ``min_candidates=1`` with ``num_candidates=L`` to keep rows with fewer than L (their missing
columns are padded and marked invalid by the tokenizer). A candidate identical to y0, rank ties, empty texts,
missing or mistyped fields, malformed JSON lines and non-UTF-8 lines are bad rows.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator

import numpy as np

from mcpo_jax.data.example import DataError, PreferenceExample

logger = logging.getLogger(__name__)

FORMATS = ("nectar", "ultrafeedback", "ultrafeedback_binarized", "pairs", "ranked")
FILE_EXTENSIONS = (".jsonl", ".json", ".parquet")
ROLES = ("system", "user", "assistant")


class LoadedExamples(list):
    """The examples of `load_examples` (a list), with `.skipped` (Counter of reasons), `.skipped_at` (per
    "reason 'field'": where the first skipped rows are, as file:line or source[row]) and `.num_rows`."""

    skipped: Counter
    skipped_at: dict
    num_rows: int


MAX_SKIPPED_FRACTION = 0.5
_SHOWN_LOCATIONS = 3


def _short_location(loc: dict) -> str:
    """file.jsonl:12 (a line) or source[row]."""
    return f"{loc['source']}:{loc['line']}" if "line" in loc else f"{loc['source']}[{loc['row']}]"


def _skip_summary(skipped_at: dict, counts: Counter) -> str:
    parts = []
    for key, n in counts.most_common():
        where = skipped_at[key]
        more = ", ..." if n > len(where) else ""
        parts.append(f"{key} x{n} (first: {', '.join(where)}{more})" if n > 1 else f"{key} ({where[0]})")
    return "; ".join(parts)


class _Bad(Exception):
    def __init__(self, reason: str, field: str | None, message: str):
        super().__init__(message)
        self.reason, self.field, self.message = reason, field, message


# --------------------------------------------------------------------------------------------- fields


def _get(row: dict, name: str, types, what: str, field: str | None = None):
    field = field or name
    if name not in row or row[name] is None:
        raise _Bad("missing_field", field, f"missing field (expected {what})")
    value = row[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise _Bad("wrong_type", field, f"expected {what}, got {type(value).__name__}: {_short(value)}")
    return value


def _as_tuple(types):
    return types if isinstance(types, tuple) else (types,)


def _short(value, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def _text(value, field: str) -> str:
    if not isinstance(value, str):
        raise _Bad("wrong_type", field, f"expected a string, got {type(value).__name__}: {_short(value)}")
    if not value.strip():
        raise _Bad("empty_text", field, "empty text")
    return value


def _number(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _Bad("wrong_type", field, f"expected a number, got {_short(value)}")
    return float(value)


def _messages(value, field: str) -> list[dict]:
    """A validated list of chat messages."""
    if not isinstance(value, list) or not value:
        raise _Bad("wrong_type", field, f"expected a non-empty list of chat messages, got {_short(value)}")
    out = []
    for j, m in enumerate(value):
        f = f"{field}[{j}]"
        if not isinstance(m, dict):
            raise _Bad("wrong_type", f, f"expected a message {{role, content}}, got {_short(m)}")
        role = _get(m, "role", str, "a role string", f"{f}.role")
        if role not in ROLES:
            raise _Bad("wrong_type", f"{f}.role", f"role must be one of {ROLES}, got {role!r}")
        content = _get(m, "content", str, "a string", f"{f}.content")
        out.append({"role": role, "content": content})
    return out


def _prompt(value, field: str):
    """A prompt: non-empty text or a message list ending with a user turn."""
    if isinstance(value, str):
        return _text(value, field)
    messages = _messages(value, field)
    if messages[-1]["role"] != "user":
        raise _Bad("prompt_format", field, "a chat prompt must end with a user message")
    return messages


def _conversation(value, field: str) -> tuple[list[dict], str]:
    """(prompt messages, final assistant reply) of a message list."""
    messages = _messages(value, field)
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise _Bad("prompt_format", field, "expected a conversation ending with an assistant message")
    reply = _text(messages[-1]["content"], f"{field}[{len(messages) - 1}].content")
    return _prompt(messages[:-1], field), reply


_NECTAR_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_nectar_prompt(text: str) -> list[dict]:
    """"\\n\\nHuman: q1\\n\\nAssistant: a1\\n\\nHuman: q2\\n\\nAssistant: " -> chat messages ending with q2."""
    pieces = _NECTAR_TURN.split(text)
    head, roles, contents = pieces[0], pieces[1::2], pieces[2::2]
    expected = ["Human", "Assistant"] * (len(roles) // 2)
    if head.strip() or not roles or roles != expected or contents[-1].strip():
        raise _Bad(
            "prompt_format",
            "prompt",
            "expected alternating '\\n\\nHuman: ...' / '\\n\\nAssistant: ...' turns ending with an empty "
            f"'\\n\\nAssistant: ', got {_short(text, 100)}",
        )
    messages = [
        {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        for role, content in zip(roles[:-1], contents[:-1])
    ]
    for j, m in enumerate(messages):
        if not m["content"]:
            raise _Bad("empty_text", "prompt", f"turn {j + 1} ({m['role']}) is empty")
    return messages


# ------------------------------------------------------------------------------------------ formats


def _check_rank_ties(ranks: list[float], fields: list[str]) -> None:
    seen: dict[float, int] = {}
    for j, r in enumerate(ranks):
        if r in seen:
            raise _Bad("rank_tie", fields[j], f"rank {r:g} also given to {fields[seen[r]]}; ranks must be distinct")
        seen[r] = j


def _rank_value(value, field: str) -> int:
    r = _number(value, field)
    if r != int(r):
        raise _Bad("wrong_type", field, f"expected an integer rank, got {value!r}")
    return int(r)


def _inject_noise(text: str, rng: np.random.Generator) -> str | None:
    """y0 with two random tokens (whitespace-separated, else characters) swapped; None if impossible."""
    words = re.split(r"(\s+)", text)  # the separators are kept at odd positions so the spacing survives
    for pieces, slots in (
        (words, [i for i, w in enumerate(words) if w and not w.isspace()]),
        (list(text), list(range(len(text)))),
    ):
        if len({pieces[i] for i in slots}) < 2:
            continue
        while True:
            a, b = rng.choice(slots, size=2, replace=False)
            if pieces[a] != pieces[b]:
                break
        pieces = list(pieces)
        pieces[a], pieces[b] = pieces[b], pieces[a]
        return "".join(pieces)
    return None


def _parse_nectar(row, index, *, drop_ranks=(2,), parse_turns=True, inject_noise=False, noise_seed=0,
                  num_candidates=None):
    raw_prompt = _text(_get(row, "prompt", str, "a string"), "prompt")
    prompt = parse_nectar_prompt(raw_prompt) if parse_turns else raw_prompt
    answers = _get(row, "answers", list, "a list of {answer, model, rank}")
    if not answers:
        raise _Bad("no_candidates", "answers", "no answers")
    entries = []
    for j, a in enumerate(answers):
        f = f"answers[{j}]"
        if not isinstance(a, dict):
            raise _Bad("wrong_type", f, f"expected {{answer, model, rank}}, got {_short(a)}")
        text = _text(_get(a, "answer", str, "a string", f"{f}.answer"), f"{f}.answer")
        rank = _rank_value(_get(a, "rank", (int, float), "a number", f"{f}.rank"), f"{f}.rank")
        entries.append((rank, text, f"{f}.answer", f"{f}.rank"))
    _check_rank_ties([e[0] for e in entries], [e[3] for e in entries])
    entries.sort(key=lambda e: e[0])
    (best_rank, preferred, _, _), rest = entries[0], entries[1:]
    rest = [e for e in rest if e[0] not in set(drop_ranks)]
    candidates = [e[1] for e in rest]
    ranks = [e[0] for e in rest]
    fields = [e[2] for e in rest]
    candidates, ranks, fields = _keep_lowest(candidates, ranks, fields, num_candidates)
    fixed_index = 0
    if inject_noise:
        noise = _inject_noise(preferred, np.random.default_rng([noise_seed, index]))
        if noise is None:
            raise _Bad("noise_impossible", "answers", "cannot make a noise candidate: y0 has one distinct token")
        candidates, ranks, fields = candidates + [noise], ranks + [-1], fields + ["<noise>"]
        fixed_index = len(candidates) - 1
    return PreferenceExample(
        prompt=prompt,
        preferred=preferred,
        candidates=candidates,
        candidate_ranks=ranks,
        preferred_rank=best_rank,
        fixed_index=fixed_index,
    ), fields


def _keep_lowest(candidates, ranks, fields, num_candidates):
    """The `num_candidates` last (lowest-quality when ordered best first) candidates."""
    if num_candidates is None or len(candidates) <= num_candidates:
        return candidates, ranks, fields
    cut = len(candidates) - num_candidates
    return candidates[cut:], (ranks[cut:] if ranks is not None else None), fields[cut:]


def _ordered_by_score(texts, scores, fields):
    order = sorted(range(len(texts)), key=lambda j: (-scores[j], j))  # equal scores: listed order
    return [texts[j] for j in order], [scores[j] for j in order], [fields[j] for j in order]


def _parse_ultrafeedback(row, index, *, score_field="fine-grained_score", num_candidates=None):
    prompt = _text(_get(row, "instruction", str, "a string"), "instruction")
    completions = _get(row, "completions", list, "a list of {response, ...}")
    if len(completions) < 2:
        raise _Bad("no_candidates", "completions", f"{len(completions)} completions, need at least 2")
    texts, scores, fields = [], [], []
    for j, c in enumerate(completions):
        f = f"completions[{j}]"
        if not isinstance(c, dict):
            raise _Bad("wrong_type", f, f"expected {{response, {score_field}}}, got {_short(c)}")
        texts.append(_text(_get(c, "response", str, "a string", f"{f}.response"), f"{f}.response"))
        scores.append(_number(_get(c, score_field, (int, float), "a number", f"{f}.{score_field}"),
                              f"{f}.{score_field}"))
        fields.append(f"{f}.response")
    texts, scores, fields = _ordered_by_score(texts, scores, fields)
    ranks = list(range(2, len(texts) + 1))
    candidates, ranks, fields = _keep_lowest(texts[1:], ranks, fields[1:], num_candidates)
    return PreferenceExample(
        prompt=prompt,
        preferred=texts[0],
        candidates=candidates,
        candidate_scores=scores[len(scores) - len(candidates):],
        candidate_ranks=ranks,
        preferred_score=scores[0],
        preferred_rank=1,
    ), fields


def _completion(value, field: str):
    """(prompt messages or None, reply) of a completion given as text or as a conversation."""
    if isinstance(value, str):
        return None, _text(value, field)
    if isinstance(value, list):
        return _conversation(value, field)
    raise _Bad("wrong_type", field, f"expected a string or a list of chat messages, got {type(value).__name__}")


def _parse_pairs(row, index, *, num_candidates=None):
    chosen_prompt, preferred = _completion(_get(row, "chosen", (str, list), "a string or chat messages"), "chosen")
    rejected = _get(row, "rejected", (str, list), "a string, a list of strings, or chat messages")
    if isinstance(rejected, str) or (rejected and all(isinstance(m, dict) for m in rejected)):
        rejected = [rejected]
        fields = ["rejected"]
    else:
        fields = [f"rejected[{j}]" for j in range(len(rejected))]
    if not rejected:
        raise _Bad("no_candidates", "rejected", "empty list of rejected completions")
    candidates = []
    for value, f in zip(rejected, fields):
        cand_prompt, text = _completion(value, f)
        if cand_prompt is not None and chosen_prompt is not None and cand_prompt != chosen_prompt:
            raise _Bad("inconsistent_prompt", f, "the conversation before the reply differs from chosen's")
        candidates.append(text)
    if chosen_prompt is not None:
        prompt = chosen_prompt
    else:
        prompt = _prompt(_get(row, "prompt", (str, list), "a string or chat messages"), "prompt")
    ex = PreferenceExample(prompt=prompt, preferred=preferred, candidates=candidates)
    if "score_chosen" in row and "score_rejected" in row and len(candidates) == 1:
        ex.preferred_score = _number(row["score_chosen"], "score_chosen")
        ex.candidate_scores = [_number(row["score_rejected"], "score_rejected")]
    if num_candidates is not None and len(candidates) > num_candidates:  # unranked: keep the first L
        ex.candidates = ex.candidates[:num_candidates]
        ex.candidate_scores = ex.candidate_scores[:num_candidates] if ex.candidate_scores else None
        fields = fields[:num_candidates]
    return ex, fields


def _parse_ranked(row, index, *, drop_ranks=(), num_candidates=None):
    prompt = _prompt(_get(row, "prompt", (str, list), "a string or chat messages"), "prompt")
    completions = _get(row, "completions", list, "a list of completions")
    if len(completions) < 2:
        raise _Bad("no_candidates", "completions", f"{len(completions)} completions, need at least 2")
    texts, fields = [], []
    for j, c in enumerate(completions):
        _, text = _completion(c, f"completions[{j}]")
        texts.append(text)
        fields.append(f"completions[{j}]")
    has_ranks, has_scores = row.get("ranks") is not None, row.get("scores") is not None
    if has_ranks == has_scores:
        raise _Bad("missing_field", "ranks",
                   "expected exactly one of 'ranks' (1 = best) or 'scores' (higher = better)")
    key = "ranks" if has_ranks else "scores"
    values = _get(row, key, list, f"a list of {len(texts)} numbers")
    if len(values) != len(texts):
        raise _Bad("wrong_type", key, f"{len(values)} {key} for {len(texts)} completions")
    scores = None
    if has_ranks:
        ranks = [_rank_value(v, f"ranks[{j}]") for j, v in enumerate(values)]
        _check_rank_ties(ranks, [f"ranks[{j}]" for j in range(len(ranks))])
        order = sorted(range(len(texts)), key=lambda j: ranks[j])
        ranks = [ranks[j] for j in order]
    else:
        scores = [_number(v, f"scores[{j}]") for j, v in enumerate(values)]
        order = sorted(range(len(texts)), key=lambda j: (-scores[j], j))
        scores = [scores[j] for j in order]
        ranks = list(range(1, len(texts) + 1))
    texts, fields = [texts[j] for j in order], [fields[j] for j in order]
    keep = [j for j in range(1, len(texts)) if ranks[j] not in set(drop_ranks)]
    candidates, cranks, cfields = _keep_lowest(
        [texts[j] for j in keep], [ranks[j] for j in keep], [fields[j] for j in keep], num_candidates
    )
    ex = PreferenceExample(
        prompt=prompt, preferred=texts[0], candidates=candidates, candidate_ranks=cranks, preferred_rank=ranks[0]
    )
    if scores is not None:
        by_field = dict(zip(fields, scores))
        ex.preferred_score = scores[0]
        ex.candidate_scores = [by_field[f] for f in cfields]
    return ex, cfields


_PARSERS = {
    "nectar": _parse_nectar,
    "ultrafeedback": _parse_ultrafeedback,
    "ultrafeedback_binarized": _parse_pairs,
    "pairs": _parse_pairs,
    "ranked": _parse_ranked,
}
_CANDIDATES_FIELD = {
    "nectar": "answers",
    "ultrafeedback": "completions",
    "ultrafeedback_binarized": "rejected",
    "pairs": "rejected",
    "ranked": "completions",
}
_OPTIONS = {
    "nectar": {"drop_ranks", "parse_turns", "inject_noise", "noise_seed"},
    "ultrafeedback": {"score_field"},
    "ultrafeedback_binarized": set(),
    "pairs": set(),
    "ranked": {"drop_ranks"},
}


# ------------------------------------------------------------------------------------------- sources


def _location(loc: dict) -> str:
    where = f"line {loc['line']}" if "line" in loc else f"row {loc['row']}"
    return f"{loc['source']}, {where}"


def _read_jsonl(path: str, lines) -> Iterator[tuple[dict, object, _Bad | None]]:
    row = 0
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        loc = {"source": path, "row": row, "line": lineno}
        row += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield loc, None, _Bad("not_utf8", None, f"not valid UTF-8 ({e.reason} at byte {e.start})")
            continue
        try:
            yield loc, json.loads(text), None
        except json.JSONDecodeError as e:
            yield loc, None, _Bad("malformed_json", None, f"malformed JSON: {e.msg} at column {e.colno}")


def _read_file(path: str) -> Iterator[tuple[dict, object, _Bad | None]]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                yield {"source": path, "row": row}, record, None
                row += 1
        return
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".json"):
        try:
            parsed = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            parsed = None
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data": JSON lines in a .json file (datasets' to_json writes that)
                raise DataError(f"{path}: malformed JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
            parsed = None
        if parsed is not None:
            if isinstance(parsed, dict):  # {"data": rows}, or a single row (one JSON line)
                parsed = parsed["data"] if isinstance(parsed.get("data"), list) else [parsed]
            if not isinstance(parsed, list):
                raise DataError(
                    f"{path}: expected a JSON list of rows (or {{'data': [...]}}), got {type(parsed).__name__}"
                )
            for row, record in enumerate(parsed):
                yield {"source": path, "row": row}, record, None
            return
    yield from _read_jsonl(path, data.splitlines())


def _files(folder: str) -> list[str]:
    files = sorted(
        os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(FILE_EXTENSIONS)
    )
    if not files:
        raise DataError(f"{folder}: no {'/'.join(FILE_EXTENSIONS)} files in this folder")
    return files


def _hub_dataset(name: str, split: str):
    from mcpo_jax import hub

    if not hub.hub_reachable():
        if not hub.offline_env():  # no connection: datasets would retry for a minute
            raise DataError(
                f"data.source={name!r}: cannot reach the Hugging Face hub for {name!r}; pass a local file or "
                f"folder ({hub.FIXES['data.source']}), or set HF_HUB_OFFLINE=1 to use a cached copy")
        try:  # offline by request: datasets reads its cache without network calls
            import datasets

            return datasets.load_dataset(name, split=split)
        except Exception:  # noqa: BLE001
            raise DataError(
                f"data.source={name!r}: cannot reach the Hugging Face hub for {name!r} (HF_HUB_OFFLINE is set) "
                f"and it is not in the datasets cache; pass a local file or folder "
                f"({hub.FIXES['data.source']})") from None
    try:
        import datasets

        return datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 (offline, unknown id, missing split: all need the same advice)
        raise DataError(
            f"could not load {name!r} from the Hugging Face hub ({type(e).__name__}: {str(e)[:200]}). "
            f"If you are offline or the id is wrong, download the data and pass a local path: a .jsonl / "
            f".json / .parquet file or a folder of them."
        ) from e


def _rows(source, split: str) -> Iterator[tuple[dict, object, _Bad | None]]:
    if isinstance(source, (list, tuple)):
        for row, record in enumerate(source):
            yield {"source": "<list>", "row": row}, record, None
        return
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            for file in _files(path):
                yield from _read_file(file)
            return
        if os.path.isfile(path):
            if not path.endswith(FILE_EXTENSIONS):
                raise DataError(f"{path}: unknown file type; expected {'/'.join(FILE_EXTENSIONS)}")
            yield from _read_file(path)
            return
        if path.startswith((".", "/", "~")) or path.endswith(FILE_EXTENSIONS) or path.count("/") > 1:
            raise DataError(f"{path}: no such file or folder")
        source = _hub_dataset(path, split)
    try:
        import datasets
    except ImportError:  # pragma: no cover
        datasets = None
    if datasets is not None and isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise DataError(f"the DatasetDict has no split {split!r} (has {list(source)})")
        source = source[split]
    if datasets is not None and isinstance(source, datasets.Dataset):
        name = f"<dataset {source.info.dataset_name or ''}>".replace(" >", ">")
        for row, record in enumerate(source):
            yield {"source": name, "row": row}, record, None
        return
    if hasattr(source, "__iter__") and not isinstance(source, (str, bytes, dict)):  # IterableDataset, generator
        for row, record in enumerate(source):
            yield {"source": f"<{type(source).__name__}>", "row": row}, record, None
        return
    raise DataError(f"unsupported source of type {type(source).__name__}: pass a path, a list of dicts or a Dataset")


# ------------------------------------------------------------------------------------------- loading


def load_examples(
    source,
    *,
    format: str,
    on_bad_example: str = "error",
    num_candidates: int | None = None,
    min_candidates: int | None = None,
    split: str = "train",
    max_skipped_fraction: float = MAX_SKIPPED_FRACTION,
    **options,
) -> LoadedExamples:
    """Reads and validates `source` as `format`; see the module docstring for formats and options.

    With ``on_bad_example="skip"``, a load that skips every row, or more than `max_skipped_fraction` of
    them, raises one `DataError` ("50 of 50 rows skipped: missing_field 'answers' x50 (first: f.jsonl:1,
    ...)"): the data or the format is wrong, and training on what is left would hide it.
    """
    if format not in _PARSERS:
        raise ValueError(f"unknown format {format!r}; known: {FORMATS}")
    if on_bad_example not in ("error", "skip"):
        raise ValueError(f"on_bad_example must be 'error' or 'skip', got {on_bad_example!r}")
    unknown = set(options) - _OPTIONS[format]
    if unknown:
        raise TypeError(f"unknown options for format {format!r}: {sorted(unknown)}; known: {sorted(_OPTIONS[format])}")
    if num_candidates is not None and num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    min_candidates = min_candidates if min_candidates is not None else (num_candidates or 1)
    parse = _PARSERS[format]

    out = LoadedExamples()
    skipped: Counter = Counter()
    by_field: Counter = Counter()
    skipped_at: dict[str, list[str]] = {}
    num_rows = 0
    for loc, record, bad in _rows(source, split):
        num_rows += 1
        try:
            if bad is not None:
                raise bad
            if not isinstance(record, dict):
                raise _Bad("wrong_type", None, f"expected a JSON object per row, got {type(record).__name__}")
            ex, fields = parse(record, loc["row"], num_candidates=num_candidates, **options)
            _validate(ex, fields, min_candidates, _CANDIDATES_FIELD[format])
        except _Bad as e:
            if on_bad_example == "error":
                field = f", field {e.field!r}" if e.field else ""
                raise DataError(f"{_location(loc)}{field}: {e.message} [{e.reason}]") from None
            skipped[e.reason] += 1
            key = f"{e.reason} {e.field!r}" if e.field else e.reason
            by_field[key] += 1
            where = skipped_at.setdefault(key, [])
            if len(where) < _SHOWN_LOCATIONS:
                where.append(_short_location(loc))
            continue
        ex.meta = {**loc, "format": format}
        out.append(ex)
    if num_rows == 0:
        raise DataError(f"{_describe(source)}: no rows")
    out.skipped, out.skipped_at, out.num_rows = skipped, skipped_at, num_rows
    n_skipped = sum(skipped.values())
    if n_skipped and (n_skipped == num_rows or n_skipped > max_skipped_fraction * num_rows):
        if skipped["too_few_candidates"] > n_skipped / 2:  # the rows are readable: they hold fewer candidates
            hint = (f"Most rows hold fewer than min_candidates={min_candidates} candidates: keep them with "
                    "--config.data.min_candidates=1 (missing columns are masked), or lower --config.num_candidates "
                    "(and --config.num_negatives with it). ")
        else:
            hint = f"Is the format right (format={format!r})? "
        raise DataError(
            f"{n_skipped} of {num_rows} rows of {_describe(source)} skipped as bad {format} rows: "
            f"{_skip_summary(skipped_at, by_field)}. {hint}"
            + ("" if n_skipped == num_rows else
               f"More than {max_skipped_fraction:.0%} of the rows are bad; fix the data.")
        )
    if skipped:
        logger.warning(
            "skipped %d of %d rows of %s as bad examples: %s; %s",
            n_skipped, num_rows, _describe(source), dict(skipped), _skip_summary(skipped_at, by_field),
        )
    logger.info("loaded %d %s examples from %s", len(out), format, _describe(source))
    return out


def _validate(ex: PreferenceExample, fields: list[str], min_candidates: int, candidates_field: str) -> None:
    if not ex.candidates:
        raise _Bad("no_candidates", candidates_field, "no candidates left after selection")
    if len(ex.candidates) < min_candidates:
        raise _Bad(
            "too_few_candidates",
            candidates_field,
            f"{len(ex.candidates)} candidates, fewer than {min_candidates} (num_candidates / min_candidates)",
        )
    for text, field in zip(ex.candidates, fields):
        if text.strip() == ex.preferred.strip():
            raise _Bad("candidate_equals_preferred", field, "candidate identical to the preferred completion")


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"<{type(source).__name__}>"
