"""Text in and out of the models: prompt files, chat-template encoding, left padding, decoding of answers.

The floor under generation, judging and evaluation (``online/``, ``judges.py``, ``evaluate.py``): it knows
tokenizers and files, nothing of models or training.

Prompt files (:func:`load_prompts`): JSON (a list) or JSONL rows holding ``instruction`` (AlpacaEval, with an
optional ``input``), ``turns`` = [{"content": ...}] (Arena-Hard question files), ``prompt`` (Arena-Hard v2) or
``messages`` (chat); or a plain text file (``.txt``, or any file whose first character is not ``[`` / ``{``),
one prompt per line. Rows are kept in file order, duplicates included.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

PROMPT_FIELDS = ("instruction", "turns", "prompt", "messages")


# -- prompt and answer files -------------------------------------------------------------------------------------
def read_rows(path: str) -> list[dict]:
    """JSON objects of a JSON list file or a JSONL file (blank lines skipped, a bad line named by number)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} is a {type(row).__name__}, expected an object")
    return rows


def row_prompt(row: dict, where: str):
    """The prompt of one AlpacaEval / Arena-Hard / chat row: a string, or a list of chat messages."""
    if "instruction" in row:
        instruction = row["instruction"]
        if row.get("input"):  # Alpaca-style instruction + input
            instruction = f"{instruction}\n\n{row['input']}"
        return instruction
    if "turns" in row:
        turns = row["turns"]
        if not turns or not isinstance(turns, list):
            raise ValueError(f"{where}: 'turns' must be a non-empty list")
        if len(turns) > 1:
            raise ValueError(f"{where}: {len(turns)} turns; only single-turn questions can be answered in one go")
        turn = turns[0]
        return turn["content"] if isinstance(turn, dict) else str(turn)
    if "prompt" in row and isinstance(row["prompt"], str):
        return row["prompt"]
    if "messages" in row:
        return list(row["messages"])
    raise ValueError(f"{where}: no prompt field; expected one of {', '.join(map(repr, PROMPT_FIELDS))} "
                     f"(got keys {sorted(row)})")


def _is_plain_text(path: str) -> bool:
    ext = os.path.splitext(path)[1].lower()
    if ext in (".json", ".jsonl"):
        return False
    if ext == ".txt":
        return True
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    return not head.startswith(("[", "{"))


def load_prompts(path: str) -> list[dict]:
    """Rows ``{"instruction": str | messages, "id": ..., "dataset": ...}`` of an eval prompt file, in file order
    (duplicates kept: dropping them would change the denominator of a win rate behind the user's back)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    name = os.path.basename(path)
    if _is_plain_text(path):
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
        return [{"instruction": line, "id": i, "dataset": name} for i, line in enumerate(lines) if line.strip()]
    out = []
    for i, row in enumerate(read_rows(path)):
        instruction = row_prompt(row, f"{path}: row {i}")
        ident = row.get("question_id", row.get("uid", row.get("id", i)))
        out.append({"instruction": instruction, "id": ident,
                    "dataset": row.get("dataset", row.get("category", name))})
    return out


# -- tokens ------------------------------------------------------------------------------------------------------
def encode_prompts(tokenizer, instructions: Sequence[Any], *, use_chat_template: bool = True,
                   max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Token ids per prompt: the chat template with a generation prompt when the tokenizer has one."""
    chat = use_chat_template and getattr(tokenizer, "chat_template", None) is not None
    rows = []
    for inst in instructions:
        if chat:
            messages = inst if not isinstance(inst, str) else [{"role": "user", "content": inst}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            if not isinstance(inst, str):
                raise ValueError("chat-message prompts need a tokenizer with a chat template")
            ids = tokenizer(inst)["input_ids"]
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            ids = ids[-max_prompt_tokens:]  # keep the end, where the question and generation prompt are
        rows.append(list(ids))
    return rows


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, *, width: int | None = None,
             multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded [B, W] ids and mask; W = ``width`` or the longest row, rounded up to ``multiple``
    (fewer distinct shapes, fewer compilations)."""
    width = max(width or 0, max(len(r) for r in rows))
    width = -(-width // multiple) * multiple
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def decode_completion(tokenizer, ids: Sequence[int], eos_ids: Sequence[int]) -> str:
    """Text of one generated row, cut at its first EOS."""
    ids = [int(t) for t in ids]
    for n, t in enumerate(ids):
        if t in eos_ids:
            ids = ids[:n]
            break
    return tokenizer.decode(ids, skip_special_tokens=True)
