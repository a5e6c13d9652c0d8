"""Synthetic sorting task: tokenizer, oracle, Nectar rows through the reader, held-out prompts, teacher."""

from collections import Counter

import numpy as np
import pytest

from mcpo_jax.data import load_examples, synthetic, tokenize_examples


@pytest.fixture(scope="module")
def tok():
    return synthetic.make_tokenizer()


def test_tokenizer_is_character_level_with_chat_template(tok):
    ids = tok("sort 5391", add_special_tokens=False)["input_ids"]
    assert len(ids) == 9 and tok.decode(ids) == "sort 5391"
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) < 128
    messages = [{"role": "user", "content": "sort 5391"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|user|>sort 5391</s><|assistant|>"
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == 9 + 4
    assert tok.decode([1, 5, 2, 6], skip_special_tokens=True) == ""


def test_oracle_and_judge():
    assert synthetic.oracle_score("sort 5391", "1359") == 1.0
    assert synthetic.oracle_score("sort 5391", " 1358\n") == 0.75
    assert synthetic.oracle_score("sort 5391", "9531") == 0.0
    assert synthetic.oracle_score("sort 5391", "") == 0.0
    assert synthetic.oracle_score("\n\nHuman: sort 5391\n\nAssistant: ", "1339") == 0.75
    assert synthetic.oracle_score([{"role": "user", "content": "sort 5391"}], "13599") == 0.8
    from mcpo_jax.judges import oracle_judge

    judge = oracle_judge("sorting")
    assert judge.compare("sort 5391", "1359", "1358") == "A"
    assert judge.compare("sort 5391", "1358", "1359") == "B"
    assert judge.compare("sort 5391", "1358", "1339") == "tie"
    assert judge.rank("sort 5391", ["9531", "1359", "1358", "1339"]) == [1, 2, 3, 0]
    with pytest.raises(ValueError, match="not a prompt of the sorting task"):
        synthetic.oracle_score("hello", "1")


def test_sorting_prompts_are_recognized_and_registered():
    from mcpo_jax.data import tasks

    for p in synthetic.prompts(20, seed=0) + ["\n\nHuman: sort 5391\n\nAssistant: ",
                                               [{"role": "user", "content": "sort 123"}]]:
        assert synthetic.is_prompt(p), p
    for p in ["please sort 123 apples", "reverse hello", "sort abc", "", [{"role": "assistant", "content": "sort 1"}]]:
        assert not synthetic.is_prompt(p), p
    task = tasks.get("sorting")
    assert task.prompts(8, 3) == synthetic.prompts(8, 3) and task.score("sort 31", "13") == 1.0
    assert task.recognizes("sort 5391") and not task.recognizes("reverse abc")
    with pytest.raises(tasks.UnknownTaskError, match=r"unknown task 'nope'; registered tasks: .*sorting"):
        tasks.get("nope")


def test_rows_are_ranked_by_the_oracle_and_read_as_nectar(tok):
    rows = synthetic.generate_rows(300, seed=1)
    assert rows == synthetic.generate_rows(300, seed=1)
    assert rows != synthetic.generate_rows(300, seed=2)
    for row in rows:
        answers = sorted(row["answers"], key=lambda a: a["rank"])
        assert [a["rank"] for a in answers] == list(range(1, 8))
        scores = [synthetic.oracle_score(row["prompt"], a["answer"]) for a in answers]
        assert scores == sorted(scores, reverse=True) and scores[0] == 1.0 > scores[1]
        assert answers[0]["model"] == "correct" and len({a["answer"] for a in answers}) == 7
        repeats = synthetic.has_repeats(synthetic.parse_prompt(row["prompt"]))
        assert {a["model"] for a in answers} == set(synthetic.KINDS) - {"sub3" if repeats else "dedup"}
        assert answers[1]["model"] == "sub1"  # always rank 2: dropped by the paper's preprocessing
        assert len(row["prompt"]) <= 40 and all(len(a["answer"]) <= synthetic.MAX_DIGITS for a in answers)
    examples = load_examples(rows, format="nectar")
    assert all(len(e.candidates) == 5 and e.candidate_ranks == [3, 4, 5, 6, 7] for e in examples)
    ds = tokenize_examples(examples, tok, num_candidates=5, **synthetic.TOKEN_LIMITS)
    assert ds.stats == {"examples": 300, "kept": 300, "dropped": {}}  # nothing truncated
    for n in (2, 8):
        rows = synthetic.generate_rows(20, seed=0, num_candidates=n)
        assert all(len(r["answers"]) == 1 + n for r in rows)


def test_heldout_prompts_are_disjoint_from_training_prompts():
    heldout = set(synthetic.prompts(500, seed=0)) | set(synthetic.prompts(500, seed=1))
    train = {synthetic.parse_prompt(r["prompt"]) for r in synthetic.generate_rows(2000, seed=0)}
    train |= {synthetic.parse_prompt(r["prompt"]) for r in synthetic.sft_rows(2000, seed=3)}
    assert len(heldout) > 400 and len(train) > 2000
    assert not {synthetic.parse_prompt(p) for p in heldout} & train
    assert synthetic.prompts(5, seed=0) == synthetic.prompts(5, seed=0)


def test_teacher_mix_and_sft_rows_load_as_pairs():
    rows = synthetic.sft_rows(4000, seed=0)
    for key in ("repeats", "distinct"):
        group = [r for r in rows if synthetic.has_repeats(synthetic.parse_prompt(r["prompt"])) == (key == "repeats")]
        assert len(group) > 1200
        freq = Counter(r["kind"] for r in group)
        for kind, p in synthetic.TEACHER_MIX[key].items():
            assert abs(freq[kind] / len(group) - p) < 0.04, (key, kind, freq[kind] / len(group))
    assert synthetic.completion_of_kind(None, "3913", "dedup") == "139"
    for r in rows[:200]:
        expected = synthetic.completion_of_kind(np.random.default_rng(0), synthetic.parse_prompt(r["prompt"]),
                                                r["kind"])
        if r["kind"] in ("correct", "dedup", "desc", "copy"):
            assert r["chosen"] == expected
    examples = load_examples(rows, format="pairs")
    assert len(examples) == 4000 and examples[0].prompt == rows[0]["prompt"]


def test_sft_likelihood_does_not_order_candidates_by_quality():
    """Under the teacher (the ideal SFT model) likelihood and quality disagree among the candidates.

    The teacher never writes `sub2` or `sub3` strings but writes `desc` 10-20% of the time, and `sub2` always
    ranks above `desc` (two substitutions are within edit distance 2, which no other permutation of the digits
    beats). On inputs with repeats the teacher's most likely answer, `dedup`, is wrong: greedy SFT is wrong.
    """
    mix = synthetic.TEACHER_MIX
    for table in mix.values():
        assert table["desc"] >= 0.1 and "sub2" not in table and "sub3" not in table
    assert max(mix["repeats"], key=mix["repeats"].get) == "dedup"
    sub3_above_desc = 0
    for row in synthetic.generate_rows(500, seed=4):
        rank = {a["model"]: a["rank"] for a in row["answers"]}
        assert rank["sub2"] < rank["desc"]  # better ranked, less likely under SFT
        if "dedup" in rank:
            assert rank["dedup"] > 2  # the SFT model's favourite survives the rank-2 drop as a candidate
        else:
            sub3_above_desc += rank["sub3"] < rank["desc"]
    assert sub3_above_desc > 50
