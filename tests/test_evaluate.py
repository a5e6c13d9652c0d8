"""Win-rate evaluation: arithmetic, bootstrap CI, prompt/output file formats, the CLI."""

import json

import numpy as np
import pytest

from mcpo_jax import evaluate as E
from mcpo_jax.online.judges import RewardFunctionJudge


def test_adjusted_win_rate_hand_made_verdicts():
    verdicts = ["A"] * 6 + ["B"] * 3 + ["tie"] * 2 + ["invalid"] * 4
    c = E.verdict_counts(verdicts)
    assert c == {"cand": 6, "base": 3, "tie": 2, "invalid": 4}
    # (6 + 2/2) / (6 + 3 + 2) = 7 / 11; invalid pairs are not in the denominator
    assert E.adjusted_win_rate(6, 3, 2) == pytest.approx(7 / 11)
    r = E.win_rate_from_verdicts(verdicts, num_bootstrap=2000)
    assert r.win_rate == pytest.approx(7 / 11) and r.n_invalid == 4
    assert E.adjusted_win_rate(0, 0, 5) == 0.5 and E.adjusted_win_rate(4, 0, 0) == 1.0
    assert np.isnan(E.adjusted_win_rate(0, 0, 0))
    with pytest.raises(ValueError, match="unknown verdicts"):
        E.verdict_counts(["A", "C"])


def test_bootstrap_ci_covers_and_shrinks():
    rng = np.random.default_rng(1)
    small = list(rng.choice(["A", "B", "tie"], size=40, p=[0.5, 0.3, 0.2]))
    big = list(rng.choice(["A", "B", "tie"], size=1600, p=[0.5, 0.3, 0.2]))
    lo_s, hi_s = E.bootstrap_ci(small, num_samples=2000, seed=0)
    lo_b, hi_b = E.bootstrap_ci(big, num_samples=2000, seed=0)
    assert lo_s < E.win_rate_from_verdicts(small).win_rate < hi_s
    assert lo_b < 0.6 < hi_b  # true adjusted rate 0.5 + 0.2 / 2
    # width ~ 1 / sqrt(n): 40x the data -> about sqrt(40) ~ 6.3x narrower
    assert 4.5 < (hi_s - lo_s) / (hi_b - lo_b) < 8.5
    # the analytic standard error of the mean score gives the same width within 15%
    score = np.array([{"A": 1, "tie": 0.5, "B": 0}[v] for v in big])
    assert (hi_b - lo_b) == pytest.approx(2 * 1.96 * score.std() / np.sqrt(score.size), rel=0.15)
    assert E.bootstrap_ci(small, seed=3) == E.bootstrap_ci(small, seed=3)


def test_win_rate_with_a_reward_judge():
    judge = RewardFunctionJudge(lambda p, c: len(c))
    r = E.win_rate(judge, ["p1", "p2", "p3", "p4"], ["long", "x", "same", "longer"], ["s", "yy", "abcd", "z"],
                   num_bootstrap=100)
    assert (r.n_cand, r.n_base, r.n_tie) == (2, 1, 1)
    assert r.win_rate == pytest.approx(2.5 / 4)
    with pytest.raises(ValueError, match="3 prompts"):
        E.win_rate(judge, ["a", "b", "c"], ["x"], ["y"])


def test_prompt_files_alpaca_and_arena_hard(tmp_path):
    alpaca = tmp_path / "alpaca_eval.json"
    alpaca.write_text(json.dumps([{"instruction": "Name a color.", "dataset": "helpful_base"},
                                  {"instruction": "Translate", "input": "bonjour"}]))
    arena = tmp_path / "question.jsonl"
    arena.write_text("\n".join(json.dumps(r) for r in [
        {"question_id": "q1", "category": "arena-hard-v0.1", "turns": [{"content": "Write a haiku."}]},
        {"uid": "u2", "category": "hard_prompt", "prompt": "Explain FFT."}]) + "\n")
    a = E.load_prompts(str(alpaca))
    assert [p["instruction"] for p in a] == ["Name a color.", "Translate\n\nbonjour"]
    assert a[0]["dataset"] == "helpful_base"
    h = E.load_prompts(str(arena))
    assert [(p["id"], p["instruction"]) for p in h] == [("q1", "Write a haiku."), ("u2", "Explain FFT.")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no known field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: row 0: no prompt field"):
        E.load_prompts(str(bad))
    multi = tmp_path / "multi.jsonl"
    multi.write_text(json.dumps({"turns": [{"content": "a"}, {"content": "b"}]}) + "\n")
    with pytest.raises(ValueError, match="2 turns"):
        E.load_prompts(str(multi))


def test_cli_judges_candidate_files_against_baseline(tmp_path, capsys):
    prompts = [{"instruction": f"q{i}"} for i in range(5)]
    E.write_outputs(str(tmp_path / "cand.json"), prompts, ["long answer"] * 4 + ["s"], "cand-model")
    E.write_outputs(str(tmp_path / "base.json"), prompts[::-1], ["mid"] * 5, "base-model")  # order differs
    rows = json.loads((tmp_path / "cand.json").read_text())
    assert set(rows[0]) >= {"instruction", "output", "generator"} and rows[0]["generator"] == "cand-model"
    out = E.main(["--candidate", str(tmp_path / "cand.json"), "--baseline", str(tmp_path / "base.json"),
                  "--judge", "reward:tests.test_evaluate:_length", "--results", str(tmp_path / "r.json"),
                  "--num_bootstrap", "200"])
    name, result = out[0]
    assert name == "cand-model" and result.win_rate == pytest.approx(0.8)
    table = capsys.readouterr().out
    assert "adjusted win rate vs base-model" in table and "80.00" in table
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["results"]["cand-model"]["n_cand"] == 4
    assert len(saved["results"]["cand-model"]["per_prompt"]) == 5
    E.write_outputs(str(tmp_path / "short.json"), prompts[:2], ["x", "y"], "b")
    with pytest.raises(ValueError, match="3 instructions have no baseline answer"):
        E.main(["--candidate", str(tmp_path / "cand.json"), "--baseline", str(tmp_path / "short.json"),
                "--judge", "reward:tests.test_evaluate:_length"])


def _length(prompt, completion):
    return len(completion)


def test_cli_generates_alpaca_outputs_with_a_model_and_judges_them(tmp_path, capsys):
    from mcpo_jax.data import synthetic
    from mcpo_jax.models import save_pretrained
    from tests._online_fixtures import tiny_model

    tok = synthetic.make_tokenizer()
    save_pretrained(tiny_model(vocab_size=len(tok), std=0.1, eos_token_id=tok.eos_token_id), str(tmp_path / "m"),
                    tokenizer=tok)
    questions = synthetic.prompts(3, seed=0)
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"question_id": i, "turns": [{"content": q}]}) + "\n"
                                              for i, q in enumerate(questions)))
    E.write_outputs(str(tmp_path / "base.json"), [{"instruction": q} for q in questions],
                    [synthetic.answer(q) for q in questions], "oracle-answers")
    rows = E.main(["--model", str(tmp_path / "m"), "--prompts", str(tmp_path / "q.jsonl"), "--output",
                   str(tmp_path / "out.json"), "--max_new_tokens", "6", "--dtype", "float32",
                   "--baseline", str(tmp_path / "base.json"), "--judge", "oracle", "--num_bootstrap", "100"])
    outputs = json.loads((tmp_path / "out.json").read_text())
    assert [o["instruction"] for o in outputs] == questions and outputs[0]["generator"] == "m"
    # a random model never beats the exact answers: win rate 0 (ties only if it also sorts correctly)
    assert rows[0][1].win_rate == 0.0 and rows[0][1].n_base == 3
    assert "adjusted win rate vs oracle-answers" in capsys.readouterr().out
