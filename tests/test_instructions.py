"""The instruction-following task and its rule judge: every rule, pass and fail, edge cases."""

import pytest

from mcpo_jax.data import instructions as I
from mcpo_jax.judges import TIE, A, B, RewardFunctionJudge, make_judge


def _rule(kind, *args):
    return I.Instruction(kind, tuple(str(a) for a in args))


def test_count_words_and_sentences():
    assert I.count_words("Don't stop: well-known facts, 3 of them!") == 7
    assert I.count_words("   ") == 0
    assert I.count_sentences("One. Two! Three?") == 3
    assert I.count_sentences("Pi is 3.14 today. Yes") == 2  # decimal point, and a last sentence without a stop
    assert I.count_sentences("Wait... what?!") == 2
    assert I.count_sentences("...") == 0


@pytest.mark.parametrize("kind,args,good,bad", [
    ("max_words", (3,), "one two three", "one two three four"),
    ("min_words", (4,), "one two three four.", "one two three"),
    ("max_sentences", (2,), "First one. Second one.", "One. Two. Three."),
    ("lowercase", (), "all quiet here, 42.", "All quiet here."),
    ("keyword", ("blue",), "The sky is BLUE today.", "The sky is blueish today."),
    ("forbidden", ("the",), "A cat sat on a mat.", "A cat sat on The mat."),
    ("ending", ("That is all.",), "Bread is good. That is all.  \n", "That is all. Bread is good."),
    ("numeric", (17, 25), "42", "The answer is 42."),
])
def test_every_rule_passes_and_fails(kind, args, good, bad):
    rule = _rule(kind, *args)
    assert rule.check(good), (kind, good)
    assert not rule.check(bad), (kind, bad)
    # the phrasing written into prompts parses back to the same rule
    assert I.parse_instructions(f"Describe rain. {rule.text}") == [rule]


@pytest.mark.parametrize("kind,args,answer,expected", [
    ("max_words", (3,), "", False),  # an empty answer satisfies no length limit
    ("max_words", (3,), "don't well-known x", True),
    ("max_sentences", (1,), "", False),
    ("max_sentences", (1,), "Pi is 3.14 exactly.", True),
    ("lowercase", (), "123 !!!", False),  # no letter at all
    ("lowercase", (), "café über", True),
    ("keyword", ("light",), "Lights are on.", False),  # whole words only
    ("keyword", ("light",), "light-hearted", True),
    ("forbidden", ("it",), "", False),  # an empty answer does not "avoid" a word
    ("forbidden", ("it",), "Italy is warm.", True),
    ("ending", ("The end.",), "the end.", False),  # exact phrase, case included
    ("numeric", (2, 9), "11.", True),
    ("numeric", (2, 9), "**11**", True),
    ("numeric", (500, 600), "1,100", True),
    ("numeric", (2, 9), "11.0", True),
    ("numeric", (2, 9), "12", False),
    ("numeric", (2, 9), "11 12", False),
    ("numeric", (2, 9), "eleven", False),
])
def test_rule_edge_cases(kind, args, answer, expected):
    assert _rule(kind, *args).check(answer) is expected


def test_one_sentence_phrasing():
    rule = _rule("max_sentences", 1)
    assert rule.text == "Answer in at most 1 sentence."
    assert I.parse_instructions(rule.text) == [rule]


def test_parse_instructions_order_chat_messages_and_errors():
    text = 'Describe owls. Do not use the word "the". End your answer with the exact phrase "The end."'
    assert [r.kind for r in I.parse_instructions(text)] == ["forbidden", "ending"]
    chat = [{"role": "system", "content": 'Include the word "blue" in your answer.'},
            {"role": "user", "content": "Describe rain. Write your whole answer in lowercase letters."}]
    assert [r.kind for r in I.parse_instructions(chat)] == ["lowercase"]  # the last user turn only
    with pytest.raises(ValueError, match="no checkable instruction"):
        I.parse_instructions("Describe rain.")
    with pytest.raises(ValueError, match="no checkable instruction"):
        I.instruction_score("Describe rain.", "rain")


def test_score_is_the_fraction_satisfied():
    p = 'Describe rain. Answer in at most 5 words. Include the word "water" in your answer.'
    assert I.instruction_score(p, "rain is falling water") == 1.0
    assert I.instruction_score(p, "rain is falling from the sky today") == 0.0
    assert I.instruction_score(p, "rain") == 0.5


def test_judge_interface_compare_rank_and_spec():
    judge = make_judge("rule:instructions")
    assert isinstance(judge, RewardFunctionJudge)
    p = 'Describe rain. Answer in at most 5 words. Include the word "water" in your answer.'
    good, half, bad = "falling water", "rain falls", "rain falls from the grey sky all day long"
    assert judge.compare(p, good, half) == A
    assert judge.compare(p, bad, half) == B
    assert judge.compare(p, half, "drops everywhere") == TIE  # equal scores tie
    assert judge.rank(p, [bad, half, good]) == [2, 1, 0]
    assert judge.rank_many([p, p], [[half, good], [good, good]]) == [[1, 0], [0, 1]]  # stable on ties
    via_spec = make_judge("reward:mcpo_jax.data.instructions:instruction_score")
    assert via_spec.compare(p, good, half) == A


def test_prompts_are_deterministic_parseable_and_split():
    train, again = I.prompts(200, seed=3), I.prompts(200, seed=3)
    assert train == again and train != I.prompts(200, seed=4)
    held = I.prompts(200, seed=3, split="eval")
    topic_of = lambda ps: {t for p in ps for t in I.TOPICS if f" {t}." in p.split(". ")[0] + "."}
    assert topic_of(train) and topic_of(held) and not topic_of(train) & topic_of(held)
    kinds = set()
    for p in train + held:
        rules = I.parse_instructions(p)
        assert 1 <= len(rules) <= 2
        assert {r.kind for r in rules} not in ({"max_words", "min_words"}, {"min_words", "max_sentences"})
        if any(r.kind == "ending" for r in rules):
            assert rules[-1].kind == "ending"
        kinds |= {r.kind for r in rules}
    assert kinds == set(I.TEMPLATES)
    with pytest.raises(ValueError):
        I.prompts(1, split="test")


def test_score_table():
    ps = ["What is 1 + 2? Reply with the number only.", "Describe rain. Write your whole answer in lowercase letters."]
    assert I.score_table(ps, ["3", "Rain."]) == {"lowercase": 0.0, "numeric": 1.0}
