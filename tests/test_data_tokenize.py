"""Tokenization: chat template and plain text, masks, truncation, dropping, padding columns, cache, speed."""

import logging
import time

import numpy as np
import pytest

from _data_fixtures import CHAT_TEMPLATE, train_tokenizer
from mcpo_jax.data import PreferenceExample, TokenizedDataset, load_examples, tokenize_examples
from mcpo_jax.data import tokenize as tokenize_mod


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


def _ids(tok, text):
    return tok.backend_tokenizer.encode(text, add_special_tokens=False).ids


def _seq(ds, i, c):
    return ds.input_ids[i, c, : ds.attention_mask[i, c].sum()].tolist()


def _completion(ds, i, c):
    return ds.input_ids[i, c][ds.loss_mask[i, c] == 1].tolist()


EXAMPLES = [
    PreferenceExample(
        prompt=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is the capital of france?"},
        ],
        preferred=" paris.",
        candidates=["the sea", "hello there"],
        candidate_ranks=[3, 4],
        preferred_rank=1,
        fixed_index=1,
    ),
    PreferenceExample(prompt="write a poem", preferred="the sea is blue", candidates=["no", "the dog", "fox"]),
]


def test_chat_template_columns_masks_and_eos(tok):
    ds = tokenize_examples(EXAMPLES, tok, num_candidates=3, max_prompt_length=32, max_completion_length=16,
                           max_length=48)
    assert ds.input_ids.shape == (2, 4, 48) and ds.input_ids.dtype == np.int32
    msgs = EXAMPLES[0].prompt
    prompt_text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    prompt_ids = _ids(tok, prompt_text)
    for c, text in enumerate([" paris.", "the sea", "hello there"]):
        full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": text}], tokenize=False)
        completion_text = full[len(prompt_text):]
        # the template ends the turn with "</s>\n": cut after the EOS
        expected = _ids(tok, completion_text[: completion_text.rindex("</s>") + 4])
        assert expected[-1] == tok.eos_token_id
        assert _seq(ds, 0, c) == prompt_ids + expected
        assert _completion(ds, 0, c) == expected
        assert ds.prompt_lengths[0, c] == len(prompt_ids) and ds.completion_lengths[0, c] == len(expected)
    # padding is right padding with pad id, masks zero there
    assert (ds.input_ids[0, 0, ds.attention_mask[0, 0].sum():] == tok.pad_token_id).all()
    assert ds.valid[0].tolist() == [True, True, True, False]  # 2 candidates, L = 3
    assert _seq(ds, 0, 3) == _seq(ds, 0, 0) and _completion(ds, 0, 3) == _completion(ds, 0, 0)  # y0 repeated
    assert ds.ranks[0].tolist() == [1, 3, 4, -1] and ds.ranks[1].tolist() == [-1] * 4
    assert ds.fixed_index.tolist() == [2, 1] and ds.example_id.tolist() == [0, 1]
    assert ds.valid[1].all()
    # a string prompt is one user turn
    assert _seq(ds, 1, 0)[: ds.prompt_lengths[1, 0]] == _ids(
        tok, tok.apply_chat_template([{"role": "user", "content": "write a poem"}], add_generation_prompt=True,
                                     tokenize=False))
    assert ds.stats == {"examples": 2, "kept": 2, "dropped": {}, "examples_with_padded_columns": 1}


def test_plain_text_mode_adds_bos_and_eos(tok):
    ds = tokenize_examples([EXAMPLES[1]], tok, num_candidates=3, max_prompt_length=16, max_completion_length=16,
                           max_length=32, use_chat_template=False)
    prompt = [tok.bos_token_id] + _ids(tok, "write a poem")
    assert _seq(ds, 0, 0) == prompt + _ids(tok, "the sea is blue") + [tok.eos_token_id]
    assert _completion(ds, 0, 2) == _ids(tok, "the dog") + [tok.eos_token_id]
    with pytest.raises(ValueError, match="use_chat_template=False"):
        tokenize_examples([EXAMPLES[0]], tok, num_candidates=3, max_prompt_length=16, max_completion_length=16,
                          max_length=32, use_chat_template=False)


def test_truncation_keeps_prompt_end_and_completion_start(tok):
    import logging

    long_prompt = "the quick brown fox jumps over the lazy dog " * 3
    ex = PreferenceExample(prompt=long_prompt, preferred="the sea is blue and deep and wide", candidates=["hello"])
    full_prompt = [tok.bos_token_id] + _ids(tok, long_prompt)
    full_y0 = _ids(tok, ex.preferred) + [tok.eos_token_id]
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("mcpo_jax.data.tokenize").addHandler(handler)
    try:
        ds = tokenize_examples([ex], tok, num_candidates=1, max_prompt_length=6, max_completion_length=4,
                               max_length=16, use_chat_template=False)
    finally:
        logging.getLogger("mcpo_jax.data.tokenize").removeHandler(handler)
    # the cut is a warning with the count and the limit
    assert any("1 of 1 prompts are longer than data.max_prompt_length=6" in w for w in warnings), warnings
    assert any("1 completions are longer than data.max_completion_length=4" in w for w in warnings), warnings
    p = ds.prompt_lengths[0, 0]
    assert p == 6 and _seq(ds, 0, 0)[:p] == [tok.bos_token_id] + full_prompt[-5:]  # BOS kept, end kept
    assert _completion(ds, 0, 0) == full_y0[:4]  # start kept, EOS lost
    assert ds.stats["prompt_truncated"] == 1 and ds.stats["completion_truncated"] == 1
    # max_length binds before max_completion_length: the completion is cut to fit after the prompt
    ds = tokenize_examples([ex], tok, num_candidates=1, max_prompt_length=6, max_completion_length=10,
                           max_length=9, use_chat_template=False)
    assert ds.completion_lengths[0, 0] == 3 and ds.attention_mask[0, 0].sum() == 9


def test_candidates_identical_after_truncation_are_invalid_or_dropped(tok, caplog):
    same_start = PreferenceExample(prompt="p", preferred="the sea is blue", candidates=["the sea is red", "fox"])
    all_same = PreferenceExample(prompt="p", preferred="the sea is blue", candidates=["the sea is red"])
    with caplog.at_level(logging.WARNING, logger="mcpo_jax.data.tokenize"):
        ds = tokenize_examples([same_start, all_same], tok, num_candidates=2, max_prompt_length=4,
                               max_completion_length=3, max_length=8, use_chat_template=False)
    assert len(ds) == 1 and ds.example_id.tolist() == [0]
    assert ds.valid[0].tolist() == [True, False, True]
    assert ds.fixed_index.tolist() == [2]  # the designated column (1) became invalid: moved to the first valid
    assert ds.stats["dropped"] == {"no_distinct_candidate_after_truncation": 1}
    assert ds.stats["candidate_equal_to_preferred_after_truncation"] == 2
    assert ds.stats["fixed_index_moved"] == 1
    assert "dropped 1 of 2 examples" in caplog.text


def test_more_candidates_than_L_and_bad_options(tok):
    with pytest.raises(ValueError, match=r"example 1: 3 candidates but num_candidates=2.*num_candidates=2"):
        tokenize_examples(EXAMPLES, tok, num_candidates=2, max_prompt_length=8, max_completion_length=8,
                          max_length=16)
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        tokenize_examples(EXAMPLES, tok, num_candidates=3, max_prompt_length=16, max_completion_length=8,
                          max_length=16)


def test_template_that_does_not_extend_the_prompt_is_an_error():
    tok = train_tokenizer(
        "{% for m in messages %}{{ m['role'] + ':' + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT>' }}{% endif %}"
    )
    with pytest.raises(ValueError, match="does not start with the rendering of the prompt"):
        tokenize_examples(EXAMPLES[1:], tok, num_candidates=3, max_prompt_length=16, max_completion_length=8,
                          max_length=32)


def test_eos_appended_when_the_template_does_not_end_the_turn_with_it():
    tok = train_tokenizer(
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    ds = tokenize_examples(EXAMPLES[1:], tok, num_candidates=3, max_prompt_length=16, max_completion_length=16,
                           max_length=32)
    assert _completion(ds, 0, 0) == _ids(tok, "the sea is blue\n") + [tok.eos_token_id]
    assert _seq(ds, 0, 0)[: ds.prompt_lengths[0, 0]] == _ids(tok, "<|user|>write a poem\n<|assistant|>")


def test_template_errors_name_the_example():
    tok = train_tokenizer(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ValueError, match=r"example 0: the chat template failed.*no system role"):
        tokenize_examples(EXAMPLES[:1], tok, num_candidates=3, max_prompt_length=16, max_completion_length=8,
                          max_length=32)


@pytest.mark.parametrize(
    "content",
    ["m['content'] | trim", "m['content'] | upper", "(m['content'] if m['role'] != 'assistant' else m['content'][::-1])"],
)
def test_splice_matches_full_rendering_for_templates_that_change_content(content):
    """Trimming is spliced, other changes fall back to full rendering: the texts equal the exact path."""
    tok = train_tokenizer(CHAT_TEMPLATE.replace("m['content']", content))
    examples = [
        PreferenceExample(prompt=f"  question {i} ", preferred=f" answer {i}  ", candidates=["no", f" x{i}"])
        for i in range(6)
    ]
    prompts, completions = tokenize_mod._render_texts(examples, tok, True)
    renderer = tokenize_mod._ChatRenderer(tok)
    for i, ex in enumerate(examples):
        exact = renderer.exact(tokenize_mod._as_messages(ex.prompt), [ex.preferred, *ex.candidates], "")
        assert (prompts[i], completions[i]) == exact


def test_cache_roundtrip_fingerprint_and_memory_map(tok, tmp_path, monkeypatch):
    import pickle

    kwargs = dict(num_candidates=3, max_prompt_length=32, max_completion_length=16, max_length=48,
                  cache_dir=str(tmp_path))
    plain = tokenize_examples(EXAMPLES, tok, **{**kwargs, "cache_dir": None})
    first = tokenize_examples(EXAMPLES, tok, **kwargs)
    (cached,) = tmp_path.glob("tokenized-*")
    assert first.path == str(cached) and isinstance(first.input_ids, np.memmap)
    assert first.fingerprint == plain.fingerprint and first.fingerprint.startswith(cached.name[len("tokenized-"):])
    monkeypatch.setattr(tokenize_mod, "_render_texts", lambda *a: pytest.fail("cache not used"))
    again = tokenize_examples(EXAMPLES, tok, **kwargs)
    for key in tokenize_mod.STORED_KEYS + ("attention_mask", "loss_mask"):
        np.testing.assert_array_equal(getattr(again, key), getattr(plain, key))
    assert again.stats == plain.stats
    # a memory-mapped dataset pickles as its path (grain workers re-open it); ref_logps travel by value
    again.set_ref_logps(np.ones((2, 4)))
    blob = pickle.dumps(again)
    assert len(blob) < 2000
    back = pickle.loads(blob)
    np.testing.assert_array_equal(back.input_ids, plain.input_ids)
    np.testing.assert_array_equal(back.take([1])["ref_logps"], np.ones((1, 4)))
    assert len(pickle.dumps(plain)) > plain.input_ids.nbytes
    monkeypatch.undo()
    edited = [EXAMPLES[0], PreferenceExample(prompt="write a poem", preferred="other", candidates=["no"])]
    assert tokenize_examples(edited, tok, **kwargs).fingerprint != first.fingerprint
    tokenize_examples(EXAMPLES, tok, **{**kwargs, "max_length": 40})
    assert len(list(tmp_path.glob("tokenized-*"))) == 3


def test_take_masks_and_validation(tok):
    ds = tokenize_examples(EXAMPLES, tok, num_candidates=3, max_prompt_length=32, max_completion_length=16,
                           max_length=48)
    batch = ds.take([1, 0])
    for key in ("attention_mask", "loss_mask"):
        np.testing.assert_array_equal(batch[key], getattr(ds, key)[[1, 0]])
    assert "ref_logps" not in batch
    ds.set_ref_logps(np.zeros((2, 4)))
    assert ds.ref_logps.dtype == np.float32 and ds.take([1, 0])["ref_logps"].shape == (2, 4)
    with pytest.raises(ValueError, match="ref_logps has shape"):
        ds.set_ref_logps(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="valid has shape"):
        TokenizedDataset(**{**{k: getattr(ds, k) for k in tokenize_mod.STORED_KEYS}, "valid": ds.valid[:, :2]})
    with pytest.raises(ValueError, match="not right padded"):
        TokenizedDataset.from_masks(input_ids=ds.input_ids, attention_mask=ds.attention_mask,
                                    loss_mask=ds.attention_mask[:, :, ::-1],
                                    **{k: getattr(ds, k) for k in ("valid", "ranks", "fixed_index", "example_id")})


def test_throughput_on_short_texts():
    """Synthetic Nectar rows (1 prompt + 6 completions each) with the synthetic chat tokenizer."""
    from mcpo_jax.data import synthetic

    tok = synthetic.make_tokenizer()
    examples = load_examples(synthetic.generate_rows(4000, seed=0), format="nectar")
    start = time.perf_counter()
    ds = tokenize_examples(examples, tok, num_candidates=5, **synthetic.TOKEN_LIMITS)
    rate = len(examples) / (time.perf_counter() - start)
    print(f"\ntokenization: {rate:.0f} examples/s (7 sequences each)")
    assert len(ds) == 4000 and ds.valid.all()
    assert rate > 500  # loose: the CI machine is shared; ~4k/s measured on a busy 2-core box


def test_template_errors_name_the_cli_flags(tok):
    from mcpo_jax.data import DataError

    no_template = train_tokenizer(template=None)
    with pytest.raises(DataError, match=r"--config\.data\.use_chat_template=false"):
        tokenize_examples([EXAMPLES[1]], no_template, num_candidates=3, max_prompt_length=16,
                          max_completion_length=16, max_length=32)
    with pytest.raises(DataError, match=r"--config\.data\.options\.parse_turns=false"):
        tokenize_examples([EXAMPLES[0]], tok, num_candidates=3, max_prompt_length=16, max_completion_length=16,
                          max_length=32, use_chat_template=False)


def test_dataset_keeps_row_lengths(tok):
    ds = tokenize_examples(EXAMPLES[:2], tok, num_candidates=3, max_prompt_length=16, max_completion_length=16,
                           max_length=32)
    np.testing.assert_array_equal(ds.sequence_lengths, ds.attention_mask.sum(-1))
    np.testing.assert_array_equal(ds.row_lengths, ds.attention_mask.sum(-1).max(-1))
    batch = ds.take([1, 0], length=int(ds.row_lengths.max()))
    assert batch["input_ids"].shape == (2, 4, int(ds.row_lengths.max()))
