"""Readers: exact y0 / candidates / ranks per format and source, and every bad-input path."""

import json
import logging

import pytest

from _data_fixtures import (
    MULTI_TURN_PROMPT,
    NECTAR_ANSWERS,
    nectar_row,
    ultrafeedback_row,
    write_jsonl,
)
from mcpo_jax.data import DataError, load_examples, parse_nectar_prompt


# ------------------------------------------------------------------------------------------- nectar


def test_nectar_paper_default_multi_turn(tmp_path):
    path = write_jsonl(tmp_path / "nectar.jsonl", [nectar_row(NECTAR_ANSWERS, prompt=MULTI_TURN_PROMPT)])
    (ex,) = load_examples(path, format="nectar")
    assert ex.prompt == [
        {"role": "user", "content": "Hi there!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ]
    assert ex.preferred == "answer of rank 1"
    # rank 2 dropped, the rest best first
    assert ex.candidates == [f"answer of rank {r}" for r in (3, 4, 5, 6, 7)]
    assert ex.candidate_ranks == [3, 4, 5, 6, 7]
    assert ex.preferred_rank == 1 and ex.fixed_index == 0
    assert ex.meta["source"] == path and ex.meta["line"] == 1 and ex.meta["row"] == 0


def test_nectar_raw_prompt_and_float_ranks():
    row = nectar_row([(a, float(r)) for a, r in NECTAR_ANSWERS])
    (ex,) = load_examples([row], format="nectar", parse_turns=False)
    assert ex.prompt == "\n\nHuman: What is 2+2?\n\nAssistant: "
    assert ex.candidate_ranks == [3, 4, 5, 6, 7]


def test_nectar_negs_datasets_keep_lowest_quality():
    # Fig. 2 "x negs": drop the highest-ranked remaining candidates first
    (ex,) = load_examples([nectar_row(NECTAR_ANSWERS)], format="nectar", num_candidates=3)
    assert ex.candidate_ranks == [5, 6, 7]
    (ex,) = load_examples([nectar_row(NECTAR_ANSWERS)], format="nectar", num_candidates=1)
    assert ex.candidates == ["answer of rank 7"]
    (ex,) = load_examples([nectar_row(NECTAR_ANSWERS)], format="nectar", drop_ranks=(2, 3))
    assert ex.candidate_ranks == [4, 5, 6, 7]
    (ex,) = load_examples([nectar_row(NECTAR_ANSWERS)], format="nectar", drop_ranks=())
    assert ex.candidate_ranks == [2, 3, 4, 5, 6, 7]


def test_nectar_inject_noise_is_the_fixed_candidate():
    answers = [("the cat sat on the mat today", 1)] + [(f"other {r}", r) for r in range(2, 8)]
    rows = [nectar_row(answers)]
    (ex,) = load_examples(rows, format="nectar", inject_noise=True, noise_seed=3)
    assert len(ex.candidates) == 6 and ex.fixed_index == 5 and ex.candidate_ranks[-1] == -1
    noise = ex.candidates[5]
    assert noise != ex.preferred
    assert sorted(noise.split()) == sorted(ex.preferred.split())
    assert sum(a != b for a, b in zip(noise.split(), ex.preferred.split())) == 2
    (again,) = load_examples(rows, format="nectar", inject_noise=True, noise_seed=3)
    assert again.candidates[5] == noise  # deterministic
    # with num_candidates the noise comes on top of the L kept candidates
    (ex,) = load_examples(rows, format="nectar", inject_noise=True, num_candidates=2)
    assert ex.candidates[:2] == ["other 6", "other 7"] and len(ex.candidates) == 3 and ex.fixed_index == 2
    # one-word y0: characters are swapped
    (ex,) = load_examples([nectar_row([("abc", 1), ("x", 2), ("y", 3)])], format="nectar", inject_noise=True)
    assert sorted(ex.candidates[-1]) == ["a", "b", "c"] and ex.candidates[-1] != "abc"


def test_parse_nectar_prompt_rejects_bad_layout():
    assert parse_nectar_prompt("\n\nHuman: hi\n\nAssistant: ") == [{"role": "user", "content": "hi"}]
    with pytest.raises(Exception, match="alternating"):
        parse_nectar_prompt("Hi, no markers")


# ------------------------------------------------------------------------------------- ultrafeedback


def test_ultrafeedback_raw_ties_keep_listed_order():
    row = ultrafeedback_row([("r0", 3.0), ("r1", 4.5), ("r2", 3.0), ("r3", 4.5)])
    (ex,) = load_examples([row], format="ultrafeedback")
    # 4.5 tie: r1 (listed first) wins; 3.0 tie: r0 before r2
    assert ex.preferred == "r1" and ex.preferred_score == 4.5
    assert ex.candidates == ["r3", "r0", "r2"]
    assert ex.candidate_scores == [4.5, 3.0, 3.0]
    assert ex.candidate_ranks == [2, 3, 4] and ex.preferred_rank == 1
    (ex,) = load_examples([row], format="ultrafeedback", score_field="overall_score")  # 10, 9, 8, 7
    assert ex.preferred == "r0" and ex.candidates == ["r1", "r2", "r3"]
    (ex,) = load_examples([row], format="ultrafeedback", num_candidates=2)
    assert ex.candidates == ["r0", "r2"] and ex.candidate_scores == [3.0, 3.0]


def test_ultrafeedback_binarized_message_lists_and_strings():
    user = {"role": "user", "content": "Say hi."}
    row = {
        "prompt": "Say hi.",
        "chosen": [user, {"role": "assistant", "content": "Hi!"}],
        "rejected": [user, {"role": "assistant", "content": "No."}],
        "score_chosen": 8.0,
        "score_rejected": 2.5,
    }
    (ex,) = load_examples([row], format="ultrafeedback_binarized")
    assert ex.prompt == [user] and ex.preferred == "Hi!" and ex.candidates == ["No."]
    assert ex.preferred_score == 8.0 and ex.candidate_scores == [2.5] and ex.fixed_index == 0
    (ex,) = load_examples([{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}], format="ultrafeedback_binarized")
    assert ex.prompt == "Say hi." and ex.candidates == ["No."]
    bad = dict(row, rejected=[{"role": "user", "content": "Other"}, {"role": "assistant", "content": "No."}])
    with pytest.raises(DataError, match=r"<list>, row 0, field 'rejected'.*differs"):
        load_examples([bad], format="ultrafeedback_binarized")


# ------------------------------------------------------------------------------------------- generic


def test_pairs_and_ranked_jsonl_both_layouts(tmp_path):
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "p0", "chosen": "good", "rejected": "bad"},
            {"prompt": [{"role": "user", "content": "p1"}], "chosen": "good", "rejected": ["bad1", "bad2", "bad3"]},
        ],
    )
    a, b = load_examples(pairs, format="pairs")
    assert (a.prompt, a.preferred, a.candidates, a.candidate_ranks) == ("p0", "good", ["bad"], None)
    assert b.prompt == [{"role": "user", "content": "p1"}] and b.candidates == ["bad1", "bad2", "bad3"]
    (a, b) = load_examples(pairs, format="pairs", num_candidates=2, min_candidates=1)
    assert b.candidates == ["bad1", "bad2"]  # unranked: first L
    ranked = write_jsonl(
        tmp_path / "ranked.jsonl",
        [
            {"prompt": "q", "completions": ["c", "a", "d", "b"], "ranks": [3, 1, 4, 2]},
            {"prompt": "q", "completions": ["x", "y", "z"], "scores": [0.5, 0.9, 0.5]},
        ],
    )
    a, b = load_examples(ranked, format="ranked")
    assert (a.preferred, a.candidates, a.candidate_ranks, a.preferred_rank) == ("a", ["b", "c", "d"], [2, 3, 4], 1)
    assert (b.preferred, b.candidates, b.candidate_scores, b.candidate_ranks) == ("y", ["x", "z"], [0.5, 0.5], [2, 3])
    (a, _) = load_examples(ranked, format="ranked", drop_ranks=(2,))
    assert a.candidates == ["c", "d"]


def test_sources_json_parquet_folder_dataset(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(3)]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows[:1]}))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))  # datasets' to_json layout
    (tmp_path / "one.json").write_text(json.dumps(rows[0]))
    import datasets

    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    for name, n in (("list.json", 3), ("wrapped.json", 1), ("lines.json", 3), ("one.json", 1), ("rows.parquet", 3)):
        out = load_examples(str(tmp_path / name), format="pairs")
        assert [e.prompt for e in out] == [f"p{i}" for i in range(n)], name
    folder = load_examples(str(tmp_path), format="pairs")  # every file, sorted by name
    assert len(folder) == 3 + 3 + 1 + 3 + 1
    assert [e.preferred for e in load_examples(ds, format="pairs")] == ["c0", "c1", "c2"]
    assert len(load_examples(datasets.DatasetDict({"train": ds}), format="pairs")) == 3
    assert len(load_examples(ds.to_iterable_dataset(), format="pairs")) == 3
    assert [e.meta["row"] for e in load_examples((r for r in rows), format="pairs")] == [0, 1, 2]


def test_hub_id_offline_says_pass_a_local_path():
    with pytest.raises(DataError, match=r"cannot reach the Hugging Face hub.*pass a local file or folder \(--config\.data\.source="):
        load_examples("berkeley-nest/Nectar", format="nectar")
    with pytest.raises(DataError, match="no such file"):
        load_examples("./missing/data.jsonl", format="nectar")


# ------------------------------------------------------------------------------------------ bad input

GOOD = nectar_row(NECTAR_ANSWERS)


def _answers(**changes):
    answers = [dict(a) for a in GOOD["answers"]]
    for i, change in changes.items():
        answers[int(i[1:])].update(change)
    return dict(GOOD, answers=answers)


BAD_NECTAR = [  # (row, reason, field, message fragment)
    ({k: v for k, v in GOOD.items() if k != "answers"}, "missing_field", "answers", "missing field"),
    (dict(GOOD, prompt=7), "wrong_type", "prompt", "expected a string"),
    (dict(GOOD, answers=[]), "no_candidates", "answers", "no answers"),
    (dict(GOOD, answers="nope"), "wrong_type", "answers", "expected a list"),
    (_answers(a0={"rank": "4"}), "wrong_type", "answers[0].rank", "expected a number"),
    (_answers(a2={"answer": ""}), "empty_text", "answers[2].answer", "empty text"),
    (_answers(a0={"rank": 1}), "rank_tie", "answers[1].rank", "also given to answers[0].rank"),
    (_answers(a5={"answer": "answer of rank 1"}), "candidate_equals_preferred", "answers[5].answer", "identical"),
    (dict(GOOD, prompt="Human: no newlines"), "prompt_format", "prompt", "alternating"),
    (nectar_row([("a", 1), ("b", 2)]), "no_candidates", "answers", "no candidates left"),
]


@pytest.mark.parametrize("row, reason, field, fragment", BAD_NECTAR, ids=[b[1] + ":" + b[2] for b in BAD_NECTAR])
def test_bad_nectar_rows_name_file_line_and_field(tmp_path, row, reason, field, fragment):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, row, GOOD])
    with pytest.raises(DataError) as info:
        load_examples(path, format="nectar")
    message = str(info.value)
    assert message.startswith(f"{path}, line 3, field '{field}'"), message
    assert fragment in message and f"[{reason}]" in message
    out = load_examples(path, format="nectar", on_bad_example="skip")
    assert len(out) == 3 and out.skipped == {reason: 1} and out.num_rows == 4


def test_fewer_candidates_than_L_and_min_candidates():
    rows = [GOOD, nectar_row([("a", 1), ("b", 2), ("c", 3), ("d", 4)])]  # 2 candidates after dropping rank 2
    with pytest.raises(DataError, match=r"row 1, field 'answers': 2 candidates, fewer than 5 .*\[too_few_candidates\]"):
        load_examples(rows, format="nectar", num_candidates=5)
    out = load_examples(rows, format="nectar", num_candidates=5, on_bad_example="skip")
    assert len(out) == 1 and out.skipped == {"too_few_candidates": 1}
    out = load_examples(rows, format="nectar", num_candidates=5, min_candidates=1)
    assert [len(e.candidates) for e in out] == [5, 2]
    # every row readable but short of candidates: the message says which knob, not "is the format right?"
    with pytest.raises(DataError, match=r"fewer than min_candidates=5 candidates.*min_candidates=1") as e:
        load_examples(rows[1:] * 3, format="nectar", num_candidates=5, on_bad_example="skip")
    assert "Is the format right" not in str(e.value)


def test_malformed_and_non_utf8_lines_skipped_with_summary(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [GOOD, GOOD, GOOD],
        raw_lines={1: b'{"prompt": "\\n\\nHuman: x', 3: b'{"prompt": "caf\xe9"}', 4: b"[1, 2]"},
    )
    with pytest.raises(DataError, match=r"mixed.jsonl, line 2: malformed JSON.*\[malformed_json\]"):
        load_examples(path, format="nectar")
    with caplog.at_level(logging.WARNING, logger="mcpo_jax.data.readers"):
        out = load_examples(path, format="nectar", on_bad_example="skip")
    assert len(out) == 3
    assert out.skipped == {"malformed_json": 1, "not_utf8": 1, "wrong_type": 1}
    assert [e.meta["line"] for e in out] == [1, 3, 6]
    summary = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 3 of 6 rows" in summary and "'not_utf8': 1" in summary
    bad_utf8 = write_jsonl(tmp_path / "u.jsonl", [GOOD], raw_lines={0: b'{"a": "\xff"}'})
    with pytest.raises(DataError, match=r"u.jsonl, line 1: not valid UTF-8"):
        load_examples(bad_utf8, format="nectar")


def test_bad_rows_in_other_formats():
    cases = [
        ("ultrafeedback", ultrafeedback_row([("a", 1.0)]), "completions", "need at least 2"),
        ("ultrafeedback", ultrafeedback_row([("a", 1.0), ("b", None)]), "completions[1].fine-grained_score", "missing"),
        ("ultrafeedback", ultrafeedback_row([("a", 2.0), ("a", 1.0)]), "completions[1].response", "identical"),
        ("pairs", {"prompt": "p", "chosen": "c", "rejected": []}, "rejected", "empty list"),
        ("pairs", {"prompt": "p", "chosen": 3, "rejected": "r"}, "chosen", "expected a string"),
        ("pairs", {"chosen": "c", "rejected": "r"}, "prompt", "missing field"),
        ("pairs", {"prompt": [{"role": "bot", "content": "x"}], "chosen": "c", "rejected": "r"}, "prompt[0].role", "role"),
        ("ranked", {"prompt": "p", "completions": ["a", "b"], "ranks": [1, 1]}, "ranks[1]", "also given"),
        ("ranked", {"prompt": "p", "completions": ["a", "b"]}, "ranks", "exactly one of"),
        ("ranked", {"prompt": "p", "completions": ["a", "b"], "scores": [1.0]}, "scores", "1 scores for 2"),
    ]
    for fmt, row, field, fragment in cases:
        with pytest.raises(DataError) as info:
            load_examples([row], format=fmt)
        assert f"<list>, row 0, field '{field}'" in str(info.value) and fragment in str(info.value), (fmt, str(info.value))


def test_option_and_format_errors():
    with pytest.raises(ValueError, match="unknown format"):
        load_examples([GOOD], format="nope")
    with pytest.raises(TypeError, match="unknown options for format 'pairs'"):
        load_examples([GOOD], format="pairs", drop_ranks=(2,))
    with pytest.raises(DataError, match="no rows"):
        load_examples([], format="pairs")


# ---------------------------------------------------------------------------- errors a user can act on


def test_skipped_rows_are_reported_with_file_and_line(tmp_path, caplog):
    path = write_jsonl(tmp_path / "some.jsonl", [GOOD, GOOD, GOOD, GOOD],
                       raw_lines={2: b'{"prompt": "\\n\\nHuman: x'})
    with caplog.at_level(logging.WARNING, logger="mcpo_jax.data.readers"):
        out = load_examples(path, format="nectar", on_bad_example="skip")
    assert len(out) == 4 and out.skipped == {"malformed_json": 1}
    assert out.skipped_at == {"malformed_json": [f"{path}:3"]}
    summary = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 1 of 5 rows" in summary and f"malformed_json ({path}:3)" in summary


def test_every_row_failing_the_schema_is_one_data_error_at_load(tmp_path):
    rows = [{"prompt": "\n\nHuman: hi\n\nAssistant: ", "answer": "typo: no s"} for _ in range(50)]
    path = write_jsonl(tmp_path / "file.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_examples(path, format="nectar", on_bad_example="skip")
    message = str(info.value)
    assert message.startswith(f"50 of 50 rows of {path} skipped"), message
    assert f"missing_field 'answers' x50 (first: {path}:1, {path}:2, {path}:3, ...)" in message
    assert "format='nectar'" in message


def test_too_many_skipped_rows_is_an_error_a_few_are_not():
    bad = {"prompt": "\n\nHuman: hi\n\nAssistant: "}
    out = load_examples([GOOD, GOOD, bad], format="nectar", on_bad_example="skip")
    assert len(out) == 2 and out.skipped_at == {"missing_field 'answers'": ["<list>[2]"]}
    with pytest.raises(DataError, match=r"2 of 3 rows of <list> skipped.*x2 \(first: <list>\[1\], <list>\[2\]\)"):
        load_examples([GOOD, bad, bad], format="nectar", on_bad_example="skip")
    out = load_examples([GOOD, bad, bad], format="nectar", on_bad_example="skip", max_skipped_fraction=0.9)
    assert len(out) == 1
