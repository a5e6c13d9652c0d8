"""Preference examples -> fixed-shape token arrays: C = 1 + L sequences per example, column 0 = y0.

Every sequence is prompt + completion, right padded to T = max_length. With a chat template (the default) the
prompt is ``apply_chat_template(messages, add_generation_prompt=True)`` and a completion is
``apply_chat_template(messages + [assistant: completion])`` minus that prompt prefix (checked: a template whose
full conversation does not start with the prompt is an error). A completion that already ends with the EOS
token (as the template renders it) is cut right after it; otherwise EOS is appended. In plain-text mode
(`use_chat_template=False`, for base models) the prompt is encoded with the tokenizer's special tokens (BOS
added when the tokenizer has one and its post-processor did not) and EOS is appended to the completion.

Truncation: a prompt longer than `max_prompt_length` keeps its end (and its leading BOS); a completion longer
than `max_completion_length` keeps its start, and is cut further to fit `max_length` after its prompt. An
example whose prompt leaves no room for a completion token is dropped; a candidate that becomes identical to y0
after truncation is marked invalid, and an example left with no valid candidate is dropped. Nothing is dropped
silently: `TokenizedDataset.stats` counts every case and a summary is logged.

Columns for missing candidates (fewer than L) repeat y0's row with `valid = False`, so every computed
log-prob stays finite; an example with more than L candidates is an error (select them in the reader with
``num_candidates=L``).

Speed: the template is rendered twice per example (the prompt, and the conversation with a placeholder
completion, spliced for every candidate; the splice is verified against a full render on a sample, and the
exact path is used for templates that change the content), then all texts are encoded in one batch by the
fast (Rust) tokenizer. Results are cached on disk under `cache_dir`, keyed by a fingerprint of the examples,
the tokenizer (vocabulary, template, special tokens) and the options, as .npy files that are memory-mapped when
read back (and shared with grain worker processes through the page cache instead of being copied to them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence

import numpy as np

from mcpo_jax.batch import HOST_KEYS
from mcpo_jax.data.example import DataError, PreferenceExample

logger = logging.getLogger(__name__)

_CACHE_VERSION = 2
BATCH_KEYS = HOST_KEYS  # the batch is defined once: data/batch.py
# What is stored: the masks are derived from the lengths (right padding), a third of the memory of three
# [N, C, T] arrays.
STORED_KEYS = ("input_ids", "prompt_lengths", "completion_lengths", "valid", "ranks", "fixed_index", "example_id")


def _masks(prompt_lengths: np.ndarray, completion_lengths: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    pos = np.arange(t, dtype=np.int32)
    end = (prompt_lengths + completion_lengths)[..., None]
    attention_mask = (pos < end).astype(np.int32)
    loss_mask = ((pos >= prompt_lengths[..., None]) & (pos < end)).astype(np.int32)
    return attention_mask, loss_mask


@dataclasses.dataclass(eq=False)
class TokenizedDataset:
    """Token arrays of N examples with C = 1 + L columns (column 0 = y0) of T tokens, right padded.

    Stored: input_ids [N, C, T] int32, prompt_lengths / completion_lengths [N, C] int32 (completion incl.
    EOS), valid [N, C] bool, ranks [N, C] int32 (-1 unknown), fixed_index [N] int32 (column 1..L of the
    designated rejected), example_id [N] int64 (index into the examples given to `tokenize_examples`),
    optional ref_logps [N, C] float32 (set by the trainer with `set_ref_logps`).
    Derived: attention_mask / loss_mask [N, C, T] int32 (loss_mask is 1 on completion tokens incl. EOS; token
    t is predicted from position t - 1). Use `take(indices)` for batches: it builds the masks for those rows
    only, whereas the full mask properties materialize (and keep) two more [N, C, T] arrays.
    A dataset loaded from the cache is memory-mapped, and pickles (to grain workers) as its path.
    """

    input_ids: np.ndarray
    prompt_lengths: np.ndarray
    completion_lengths: np.ndarray
    valid: np.ndarray
    ranks: np.ndarray
    fixed_index: np.ndarray
    example_id: np.ndarray
    stats: dict = dataclasses.field(default_factory=dict)
    ref_logps: np.ndarray | None = None
    fingerprint: str | None = None  # content hash (the cache key) when made by `tokenize_examples`
    path: str | None = None  # the cache directory it was loaded from

    def __post_init__(self):
        n, c, t = self.input_ids.shape
        for key in ("prompt_lengths", "completion_lengths", "valid", "ranks"):
            if getattr(self, key).shape != (n, c):
                raise ValueError(f"{key} has shape {getattr(self, key).shape}, expected {(n, c)}")
        for key in ("fixed_index", "example_id"):
            if getattr(self, key).shape != (n,):
                raise ValueError(f"{key} has shape {getattr(self, key).shape}, expected {(n,)}")
        if (self.prompt_lengths + self.completion_lengths > t).any():
            raise ValueError(f"prompt + completion lengths exceed T = {t}")
        self.set_ref_logps(self.ref_logps)
        self._full_masks = None
        self._row_lengths = None

    @classmethod
    def from_masks(cls, *, input_ids, attention_mask, loss_mask, **arrays) -> TokenizedDataset:
        """Builds from right-padded masks (checked) instead of lengths."""
        attention_mask, loss_mask = np.asarray(attention_mask), np.asarray(loss_mask)
        total, completion = attention_mask.sum(-1), loss_mask.sum(-1)
        ds = cls(input_ids=np.asarray(input_ids, np.int32), prompt_lengths=(total - completion).astype(np.int32),
                 completion_lengths=completion.astype(np.int32), **arrays)
        again = _masks(ds.prompt_lengths, ds.completion_lengths, ds.max_length)
        if not (np.array_equal(again[0], attention_mask) and np.array_equal(again[1], loss_mask)):
            raise ValueError("masks are not right padded with the completion after the prompt")
        return ds

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_columns(self) -> int:
        """C = 1 + L."""
        return self.input_ids.shape[1]

    @property
    def max_length(self) -> int:
        return self.input_ids.shape[2]

    @property
    def attention_mask(self) -> np.ndarray:
        return self._materialized_masks()[0]

    @property
    def loss_mask(self) -> np.ndarray:
        return self._materialized_masks()[1]

    def _materialized_masks(self):
        if self._full_masks is None:
            self._full_masks = _masks(self.prompt_lengths, self.completion_lengths, self.max_length)
        return self._full_masks

    def set_ref_logps(self, ref_logps) -> None:
        """Attach precomputed reference log-probs [N, C] (None removes them)."""
        if ref_logps is not None:
            ref_logps = np.asarray(ref_logps, dtype=np.float32)
            if ref_logps.shape != self.valid.shape:
                raise ValueError(f"ref_logps has shape {ref_logps.shape}, expected {self.valid.shape}")
        self.ref_logps = ref_logps

    @property
    def row_lengths(self) -> np.ndarray:
        """[N] int32: each example's longest sequence (prompt + completion over its C columns), the fewest
        tokens its row can be padded to."""
        if getattr(self, "_row_lengths", None) is None:
            self._row_lengths = np.asarray(self.prompt_lengths + self.completion_lengths).max(axis=1).astype(np.int32)
        return self._row_lengths

    @property
    def sequence_lengths(self) -> np.ndarray:
        """[N, C] int32: prompt + completion tokens of every sequence (the real, unpadded tokens)."""
        return np.asarray(self.prompt_lengths + self.completion_lengths, np.int32)

    def take(self, indices, length: int | None = None) -> dict[str, np.ndarray]:
        """The rows `indices` as a batch dict: BATCH_KEYS (+ ref_logps), numpy arrays with leading dim
        len(indices). `length` (default: max_length) pads / cuts the token axis to that many positions; it
        must hold the rows' longest sequence (`row_lengths`)."""
        indices = np.asarray(indices)
        t = self.max_length if length is None else int(length)
        prompt, completion = self.prompt_lengths[indices], self.completion_lengths[indices]
        longest = int((prompt + completion).max()) if indices.size else 0
        if not longest <= t <= self.max_length:
            raise ValueError(f"length={t} must be between the rows' longest sequence ({longest}) and "
                             f"max_length={self.max_length}")
        attention_mask, loss_mask = _masks(prompt, completion, t)
        out = {
            "input_ids": np.asarray(self.input_ids[indices, :, :t]),
            "attention_mask": attention_mask,
            "loss_mask": loss_mask,
            **{key: np.asarray(getattr(self, key)[indices]) for key in ("valid", "ranks", "fixed_index", "example_id")},
        }
        if self.ref_logps is not None:
            out["ref_logps"] = self.ref_logps[indices]
        return out

    def save(self, path: str) -> None:
        """Atomically writes a directory of .npy files (+ stats.json); `load` memory-maps it."""
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-tokenized-")
        try:
            for key in STORED_KEYS:
                np.save(os.path.join(tmp, f"{key}.npy"), np.asarray(getattr(self, key)))
            if self.ref_logps is not None:
                np.save(os.path.join(tmp, "ref_logps.npy"), self.ref_logps)
            with open(os.path.join(tmp, "stats.json"), "w") as f:
                json.dump({"stats": self.stats, "fingerprint": self.fingerprint}, f)
            try:
                os.rename(tmp, path)
            except OSError:  # another process wrote the same content first
                if not os.path.isdir(path):
                    raise
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, path: str, *, mmap: bool = True) -> TokenizedDataset:
        mode = "r" if mmap else None
        arrays = {key: np.load(os.path.join(path, f"{key}.npy"), mmap_mode=mode) for key in STORED_KEYS}
        ref = os.path.join(path, "ref_logps.npy")
        with open(os.path.join(path, "stats.json")) as f:
            meta = json.load(f)
        return cls(**arrays, stats=meta["stats"], fingerprint=meta["fingerprint"],
                   ref_logps=np.load(ref) if os.path.exists(ref) else None, path=os.path.abspath(path) if mmap else None)

    def __getstate__(self):
        state = {**self.__dict__, "_full_masks": None, "_row_lengths": None}
        if self.path is not None:  # memory-mapped: workers re-open the files instead of receiving copies
            # (an array replaced in memory, e.g. a fixed_index drawn per prompt, travels as it is)
            state.update({key: None for key in STORED_KEYS if isinstance(getattr(self, key), np.memmap)})
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.path is not None:
            for key in STORED_KEYS:
                if getattr(self, key) is None:
                    setattr(self, key, np.load(os.path.join(self.path, f"{key}.npy"), mmap_mode="r"))


# ------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(name, *, config_key: str = "tokenizer"):
    """A Hugging Face tokenizer from a local folder or a hub id ("synthetic": the synthetic task's).

    Fails fast with `mcpo_jax.hub` errors that name `config_key` and the flag to pass: a missing folder
    (`MissingPath`), a hub id while the hub is unreachable and the id is not cached (`HubUnreachable`, after
    a probe of at most ~2 s, no retries), a folder without tokenizer files (`NoTokenizer`). A tokenizer
    without a pad token pads with EOS.
    """
    from mcpo_jax import hub

    if name == "synthetic":
        from mcpo_jax.data import synthetic

        return synthetic.make_tokenizer()
    if not name:
        raise hub.LocationError(f"{config_key} is empty: pass a tokenizer folder or hub id "
                                f"({hub.FIXES.get(config_key, '--config.tokenizer=/path/to/folder')})")
    kind, where = hub.resolve(name, key=config_key, what="folder", cached_file="tokenizer_config.json")
    if kind == "local":
        hub.require_tokenizer(where, key=config_key)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(where, local_files_only=kind != "hub")
    except Exception as e:  # noqa: BLE001 (missing sentencepiece, a broken file, a gated repo: one message)
        raise hub.LocationError(
            f"{config_key}={os.fspath(name)!r}: could not load a tokenizer from {where} ({type(e).__name__}: "
            f"{str(e)[:300]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# ------------------------------------------------------------------------------------------- rendering


def _as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _slot(i: int) -> str:
    return f"\u2063MCPO_SLOT_{i}\u2063"  # invisible separators: never in real text


class _ChatRenderer:
    """Renders prompt and completion texts with the tokenizer's chat template.

    Rendering jinja per text dominates tokenization time, so for each sequence of roles the template is rendered
    once with placeholder contents and split into literal pieces; a conversation is then the pieces joined with
    its contents (trimmed where the template trims). The splice is checked against a full render for the first
    examples of each role sequence and every 509th example; any mismatch switches to full rendering.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "the tokenizer has no chat template: for a base model, train on plain-text prompts with "
                "--config.data.use_chat_template=false (Python: use_chat_template=False), or use a tokenizer "
                "folder whose tokenizer_config.json has a chat_template"
            )
        self.splice = True
        self._plans: dict[tuple, object] = {}
        self._checked: Counter = Counter()

    def _render(self, messages, add_generation_prompt=False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    @staticmethod
    def _strip_prompt(full: str, prompt_text: str, where: str) -> str:
        if not full.startswith(prompt_text):
            raise DataError(
                f"{where}: the chat template rendering of prompt + completion does not start with the rendering "
                f"of the prompt with add_generation_prompt=True, so completion tokens cannot be separated; "
                f"prompt renders as {prompt_text[-80:]!r}, conversation as {full[:len(prompt_text) + 40][-120:]!r}"
            )
        return full[len(prompt_text):]

    def exact(self, messages, completions, where: str) -> tuple[str, list[str]]:
        prompt_text = self._render(messages, add_generation_prompt=True)
        texts = [
            self._strip_prompt(self._render(messages + [{"role": "assistant", "content": c}]), prompt_text, where)
            for c in completions
        ]
        return prompt_text, texts

    @staticmethod
    def _pieces(text: str, slots: range):
        """Literal pieces around the slots of `text` and, per slot, whether the template trims it."""
        pieces, strip = [], []
        for i in slots:
            padded, bare = f" {_slot(i)} ", _slot(i)
            if text.count(bare) != 1:
                return None
            token = padded if padded in text else bare
            head, text = text.split(token)
            pieces.append(head)
            strip.append(token == bare)
        return pieces + [text], strip

    def _plan(self, roles: tuple):
        if roles not in self._plans:
            n = len(roles)
            messages = [{"role": r, "content": f" {_slot(i)} "} for i, r in enumerate(roles)]
            prompt = self._render(messages, add_generation_prompt=True)
            full = self._render(messages + [{"role": "assistant", "content": f" {_slot(n)} "}])
            plan = None
            if full.startswith(prompt):
                head, tail = self._pieces(prompt, range(n)), self._pieces(full[len(prompt):], range(n, n + 1))
                if head is not None and tail is not None:
                    plan = (head, tail)
            self._plans[roles] = plan
        return self._plans[roles]

    @staticmethod
    def _join(pieces, strip, contents):
        out = [pieces[0]]
        for piece, trim, content in zip(pieces[1:], strip, contents):
            out += [content.strip() if trim else content, piece]
        return "".join(out)

    def __call__(self, index: int, messages, completions, where: str) -> tuple[str, list[str]]:
        try:
            return self._texts(index, messages, completions, where)
        except (_SpliceMismatch, ValueError):
            raise
        except Exception as e:  # jinja TemplateError, raise_exception() in templates (roles, alternation, ...)
            raise DataError(f"{where}: the chat template failed on this conversation: {type(e).__name__}: {e}") from e

    def _texts(self, index: int, messages, completions, where: str) -> tuple[str, list[str]]:
        roles = tuple(m["role"] for m in messages)
        plan = self._plan(roles) if self.splice else None
        if plan is None:
            return self.exact(messages, completions, where)
        (p_pieces, p_strip), (c_pieces, c_strip) = plan
        prompt_text = self._join(p_pieces, p_strip, [m["content"] for m in messages])
        texts = [self._join(c_pieces, c_strip, [c]) for c in completions]
        self._checked[roles] += 1
        if self._checked[roles] <= 2 or index % 509 == 0:
            exact_prompt, exact_texts = self.exact(messages, completions[:1], where)
            if (exact_prompt, exact_texts[0]) != (prompt_text, texts[0]):
                raise _SpliceMismatch
        return prompt_text, texts


class _SpliceMismatch(Exception):
    pass


def _tokenizer_fingerprint(tokenizer) -> str:
    parts = [
        tokenizer.backend_tokenizer.to_str(),
        str(getattr(tokenizer, "chat_template", None)),
        str(tokenizer.bos_token_id),
        str(tokenizer.eos_token_id),
        str(tokenizer.pad_token_id),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def content_fingerprint(examples: Sequence[PreferenceExample], tokenizer, options: dict) -> str:
    """Hash of the examples' content, the tokenizer and the options: the cache key."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": _CACHE_VERSION, "options": options}, sort_keys=True).encode())
    h.update(_tokenizer_fingerprint(tokenizer).encode())
    for ex in examples:
        h.update(
            json.dumps(
                [ex.prompt, ex.preferred, ex.candidates, ex.candidate_ranks, ex.preferred_rank, ex.fixed_index],
                ensure_ascii=False,
            ).encode()
        )
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ tokenization


def _where(ex: PreferenceExample, i: int) -> str:
    meta = ex.meta or {}
    if "source" in meta:
        loc = f"line {meta['line']}" if "line" in meta else f"row {meta.get('row', '?')}"
        return f"{meta['source']}, {loc}"
    return f"example {i}"


def tokenize_examples(
    examples: Sequence[PreferenceExample],
    tokenizer,
    *,
    num_candidates: int,
    max_prompt_length: int,
    max_completion_length: int,
    max_length: int,
    use_chat_template: bool = True,
    cache_dir: str | None = None,
) -> TokenizedDataset:
    """Tokenizes `examples` into a `TokenizedDataset` with C = 1 + num_candidates columns of max_length tokens.

    See the module docstring for the template, truncation and dropping rules. With `cache_dir`, the result
    is read from / written to the directory ``cache_dir/tokenized-<fingerprint>`` (memory-mapped .npy files).
    """
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    if not 1 <= max_prompt_length < max_length or max_completion_length < 1:
        raise ValueError(
            f"need 1 <= max_prompt_length < max_length and max_completion_length >= 1, got "
            f"max_prompt_length={max_prompt_length}, max_completion_length={max_completion_length}, "
            f"max_length={max_length}"
        )
    options = dict(
        num_candidates=num_candidates,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        max_length=max_length,
        use_chat_template=use_chat_template,
    )
    key = content_fingerprint(examples, tokenizer, options)
    path = None
    if cache_dir is not None:
        path = os.path.join(cache_dir, f"tokenized-{key[:24]}")
        if os.path.isdir(path):
            dataset = TokenizedDataset.load(path)
            logger.info("tokenized data read from cache %s (%d examples)", path, len(dataset))
            _warn_truncation(dataset.stats, options)
            return dataset
    for i, ex in enumerate(examples):
        if len(ex.candidates) > num_candidates:
            raise DataError(
                f"{_where(ex, i)}: {len(ex.candidates)} candidates but num_candidates={num_candidates}; "
                f"select candidates in the reader (load_examples(..., num_candidates={num_candidates}))"
            )
    prompt_texts, completion_texts = _render_texts(examples, tokenizer, use_chat_template)
    dataset = _assemble(examples, tokenizer, prompt_texts, completion_texts, **options)
    dataset.fingerprint = key
    _log_stats(dataset.stats)
    _warn_truncation(dataset.stats, options)
    if path is not None:
        dataset.save(path)
        logger.info("tokenized data cached at %s", path)
        return TokenizedDataset.load(path)  # memory-mapped: shared with grain workers through the page cache
    return dataset


def _render_texts(examples, tokenizer, use_chat_template):
    """(prompt text per example, [completion texts (y0 first)] per example)."""
    prompt_texts: list[str] = []
    completion_texts: list[list[str]] = []
    if not use_chat_template:
        for i, ex in enumerate(examples):
            if not isinstance(ex.prompt, str):
                raise DataError(
                    f"{_where(ex, i)}: the prompt is a list of chat messages but use_chat_template=False; "
                    f"keep Nectar prompts as text with --config.data.options.parse_turns=false (Python: "
                    f"parse_turns=False), or use a chat template (--config.data.use_chat_template=true)"
                )
            prompt_texts.append(ex.prompt)
            completion_texts.append([ex.preferred, *ex.candidates])
        return prompt_texts, completion_texts

    renderer = _ChatRenderer(tokenizer)
    for attempt in ("splice", "exact"):
        renderer.splice = attempt == "splice"
        try:
            for i, ex in enumerate(examples):
                prompt_text, texts = renderer(i, _as_messages(ex.prompt), [ex.preferred, *ex.candidates], _where(ex, i))
                prompt_texts.append(prompt_text)
                completion_texts.append(texts)
            return prompt_texts, completion_texts
        except _SpliceMismatch:
            logger.warning("the chat template changes message contents; rendering every conversation in full")
            prompt_texts, completion_texts = [], []
    raise AssertionError("unreachable")


def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [enc.ids for enc in encode(texts, add_special_tokens=add_special_tokens)]


def _assemble(examples, tokenizer, prompt_texts, completion_texts, *, num_candidates, max_prompt_length,
              max_completion_length, max_length, use_chat_template):
    eos_id, bos_id = tokenizer.eos_token_id, tokenizer.bos_token_id
    if isinstance(eos_id, (list, tuple)):
        eos_id = eos_id[0]
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token; set one (completions must end with EOS)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    eos_text = tokenizer.eos_token

    flat, owners = [], []
    for texts in completion_texts:
        owners.append((len(flat), len(texts)))
        for text in texts:
            if use_chat_template and eos_text and eos_text in text:  # template ends the turn with EOS
                text = text[: text.rindex(eos_text) + len(eos_text)]
                flat.append((text, False))
            else:
                flat.append((text, True))
    prompt_ids = _encode(tokenizer, prompt_texts, add_special_tokens=not use_chat_template)
    completion_ids = _encode(tokenizer, [text for text, _ in flat], add_special_tokens=False)
    completion_ids = [ids + [eos_id] if add_eos else ids for ids, (_, add_eos) in zip(completion_ids, flat)]

    n, c, t = len(examples), 1 + num_candidates, max_length
    input_ids = np.full((n, c, t), pad_id, np.int32)
    prompt_lengths = np.zeros((n, c), np.int32)
    completion_lengths = np.zeros((n, c), np.int32)
    valid = np.zeros((n, c), bool)
    ranks = np.full((n, c), -1, np.int32)
    fixed_index = np.ones((n,), np.int32)
    example_id = np.zeros((n,), np.int64)
    dropped: Counter = Counter()
    counts: Counter = Counter()

    kept = 0
    for i, ex in enumerate(examples):
        p = prompt_ids[i]
        if not use_chat_template and bos_id is not None and (not p or p[0] != bos_id):
            p = [bos_id] + p
        if len(p) > max_prompt_length:
            counts["prompt_truncated"] += 1
            p = ([p[0]] + p[len(p) - max_prompt_length + 1:]) if p[0] == bos_id else p[len(p) - max_prompt_length:]
        room = min(max_completion_length, max_length - len(p))
        if room < 1:
            dropped["prompt_too_long"] += 1
            continue
        start, count = owners[i]
        if count < 2:
            dropped["no_candidates"] += 1
            continue
        seqs = []
        for ids in completion_ids[start:start + count]:
            if len(ids) > room:
                counts["completion_truncated"] += 1
                ids = ids[:room]
            seqs.append(ids)
        col_valid = [True] + [s != seqs[0] for s in seqs[1:]]
        counts["candidate_equal_to_preferred_after_truncation"] += col_valid.count(False)
        if not any(col_valid[1:]):
            dropped["no_distinct_candidate_after_truncation"] += 1
            continue
        if count < c:
            counts["examples_with_padded_columns"] += 1
        row_ranks = [ex.preferred_rank] + list(ex.candidate_ranks or [None] * (count - 1))
        for col in range(c):
            real = col < count and col_valid[col]
            ids = seqs[col] if real else seqs[0]
            input_ids[kept, col, : len(p) + len(ids)] = p + ids
            prompt_lengths[kept, col] = len(p)
            completion_lengths[kept, col] = len(ids)
            valid[kept, col] = real
            if col < count and row_ranks[col] is not None:
                ranks[kept, col] = row_ranks[col]
        fixed = 1 + ex.fixed_index
        if not (1 <= fixed < count and col_valid[fixed]):
            counts["fixed_index_moved"] += 1
            fixed = 1 + col_valid[1:].index(True)
        fixed_index[kept] = fixed
        example_id[kept] = i
        kept += 1

    stats = {"examples": n, "kept": kept, "dropped": dict(dropped), **{k: v for k, v in counts.items() if v}}
    cut = (lambda a: a[:kept].copy()) if kept < n else (lambda a: a)
    return TokenizedDataset(
        input_ids=cut(input_ids),
        prompt_lengths=cut(prompt_lengths),
        completion_lengths=cut(completion_lengths),
        valid=cut(valid),
        ranks=cut(ranks),
        fixed_index=cut(fixed_index),
        example_id=cut(example_id),
        stats=stats,
    )


def _warn_truncation(stats: dict, limits: dict) -> None:
    """Cut prompts and completions, counted, with the limit that cut them (a warning: the model never sees the
    cut tokens)."""
    if stats.get("prompt_truncated"):
        logger.warning("%d of %d prompts are longer than data.max_prompt_length=%d tokens: cut to their last %d "
                       "tokens (raise max_prompt_length, and max_length with it, to keep them whole)",
                       stats["prompt_truncated"], stats["examples"], limits["max_prompt_length"],
                       limits["max_prompt_length"])
    if stats.get("completion_truncated"):
        logger.warning("%d completions are longer than data.max_completion_length=%d tokens or than what "
                       "data.max_length=%d leaves after their prompt: cut to their start (the end, EOS included, "
                       "is not trained on)", stats["completion_truncated"], limits["max_completion_length"],
                       limits["max_length"])


def _log_stats(stats: dict) -> None:
    logger.info("tokenized %d examples, kept %d: %s", stats["examples"], stats["kept"], stats)
    if stats["dropped"]:
        logger.warning(
            "dropped %d of %d examples while tokenizing: %s",
            sum(stats["dropped"].values()), stats["examples"], stats["dropped"],
        )
