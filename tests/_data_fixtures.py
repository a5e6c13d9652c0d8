"""Fixtures for the data tests: rows in each supported layout and a tiny tokenizer trained in the test."""

from __future__ import annotations

import json
import os

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? the capital of france is paris.",
    "write a poem about the sea. the sea is blue and deep and wide.",
    "hello there, how are you today? i am fine, thank you very much.",
    "sort 5391 1359 add two numbers 12 plus 30 is 42",
] * 20


def train_tokenizer(template: str | None = CHAT_TEMPLATE):
    """A BPE tokenizer (vocab ~120) trained on CORPUS with bos/eos/pad/unk and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=specials[4:],
        chat_template=template,
    )


def nectar_row(answers, prompt="\n\nHuman: What is 2+2?\n\nAssistant: ", **extra):
    """answers: list of (text, rank)."""
    row = {
        "prompt": prompt,
        "answers": [{"answer": a, "model": f"m{i}", "rank": r} for i, (a, r) in enumerate(answers)],
        "turns": prompt.count("Human:"),
        "num_responses": len(answers),
        "source": ["test"],
        "good_natured": True,
    }
    row.update(extra)
    return row


# Seven answers listed out of order: rank r has the text "answer of rank r".
NECTAR_ANSWERS = [(f"answer of rank {r}", r) for r in (4, 1, 7, 2, 5, 3, 6)]
MULTI_TURN_PROMPT = (
    "\n\nHuman: Hi there!\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant: "
)


def ultrafeedback_row(responses_scores, instruction="Explain gravity.", score_field="fine-grained_score"):
    return {
        "source": "test",
        "instruction": instruction,
        "models": [f"m{i}" for i in range(len(responses_scores))],
        "completions": [
            {"model": f"m{i}", "response": text, score_field: score, "overall_score": 10 - i, "annotations": {}}
            for i, (text, score) in enumerate(responses_scores)
        ],
    }


def write_jsonl(path, rows, raw_lines: dict[int, bytes] | None = None) -> str:
    """Writes rows as JSON lines; raw_lines {i: bytes} replaces line i (0-based) by raw bytes."""
    lines = [json.dumps(r).encode() for r in rows]
    for i, raw in (raw_lines or {}).items():
        lines.insert(i, raw)
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return os.fspath(path)
