"""Win-rate evaluation: arithmetic, bootstrap CI, prompt/output file formats, the CLI, the one evaluation
path (`evaluate_models`, `final_evaluation`) and its refusals."""

import json

import numpy as np
import pytest

from mcpo_jax import evaluate as E
from mcpo_jax.data import text
from mcpo_jax.judges import RewardFunctionJudge


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
    a = text.load_prompts(str(alpaca))
    assert [p["instruction"] for p in a] == ["Name a color.", "Translate\n\nbonjour"]
    assert a[0]["dataset"] == "helpful_base"
    h = text.load_prompts(str(arena))
    assert [(p["id"], p["instruction"]) for p in h] == [("q1", "Write a haiku."), ("u2", "Explain FFT.")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no known field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: row 0: no prompt field"):
        text.load_prompts(str(bad))
    multi = tmp_path / "multi.jsonl"
    multi.write_text(json.dumps({"turns": [{"content": "a"}, {"content": "b"}]}) + "\n")
    with pytest.raises(ValueError, match="2 turns"):
        text.load_prompts(str(multi))


def test_prompt_files_plain_text_and_duplicates_kept(tmp_path):
    lines = tmp_path / "mine.txt"
    lines.write_text("reverse abc\n\nreverse xy\nreverse abc\n")
    rows = text.load_prompts(str(lines))
    assert [r["instruction"] for r in rows] == ["reverse abc", "reverse xy", "reverse abc"]  # blank line skipped
    bare = tmp_path / "prompts"  # no extension: sniffed
    bare.write_text("sort 31\nsort 42\n")
    assert [r["instruction"] for r in text.load_prompts(str(bare))] == ["sort 31", "sort 42"]
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps({"instruction": q}) + "\n" for q in ["a", "b", "a"]))
    assert [r["instruction"] for r in text.load_prompts(str(dup))] == ["a", "b", "a"]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        text.load_prompts(str(tmp_path / "missing.json"))


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
                   "--baseline", str(tmp_path / "base.json"), "--judge", "oracle:sorting", "--num_bootstrap", "100"])
    outputs = json.loads((tmp_path / "out.json").read_text())
    assert [o["instruction"] for o in outputs] == questions and outputs[0]["generator"] == "m"
    # a random model never beats the exact answers: win rate 0 (ties only if it also sorts correctly)
    assert rows[0][1].win_rate == 0.0 and rows[0][1].n_base == 3
    assert "adjusted win rate vs oracle-answers" in capsys.readouterr().out


def test_cli_keeps_duplicate_prompts_and_names_models_by_run(tmp_path, capsys):
    prompts = [{"instruction": q} for q in ["a", "b", "a", "a"]]
    # the candidate answers "a" three times; the baseline twice: the third is paired with its last answer
    E.write_outputs(str(tmp_path / "cand.json"), prompts, ["xxxx", "x", "x", "xxxx"], "hf")
    E.write_outputs(str(tmp_path / "base.json"), [{"instruction": q} for q in ["a", "b", "a"]], ["xx", "xx", "xxx"],
                    "sft")
    out = E.main(["--candidate", str(tmp_path / "cand.json"), "--baseline", str(tmp_path / "base.json"),
                  "--judge", "reward:tests.test_evaluate:_length", "--num_bootstrap", "50"])
    name, r = out[0]
    # pairs: (xxxx, xx) win, (x, xx) loss, (x, xxx) loss, (xxxx, xxx) win: 4 verdicts, none dropped
    assert r.verdicts == ["A", "B", "B", "A"] and r.prompts == ["a", "b", "a", "a"]
    assert name == "cand"  # an answer file written as "hf" is named by its file, not "hf"
    assert "adjusted win rate vs sft" in capsys.readouterr().out
    assert E.model_name(str(tmp_path / "runs" / "demo" / "hf")) == "demo"
    assert E.model_name(str(tmp_path / "runs" / "demo" / "hf") + "/") == "demo"
    assert E.model_name(str(tmp_path / "models" / "llama-1b")) == "llama-1b"


@pytest.fixture(scope="module")
def sorting_models():
    """The synthetic tokenizer and two tiny random models (the policy and the baseline)."""
    from mcpo_jax.data import synthetic
    from tests._online_fixtures import tiny_model

    tok = synthetic.make_tokenizer()
    kw = dict(vocab_size=len(tok), std=0.1, eos_token_id=tok.eos_token_id)
    return tok, tiny_model(seed=0, **kw), tiny_model(seed=1, **kw)


def _block(**overrides):
    """A final_eval block: the config's defaults (its one schema) with the test's values."""
    from mcpo_jax.training.config import base_config

    block = {**base_config().final_eval.to_dict(), "judge": "oracle:sorting", "prompts": "task:sorting",
             "num_prompts": 6, "seed": 1, "max_new_tokens": 6, "batch_size": 4}
    return {**block, **overrides}


def _spec(**overrides):
    return E.FinalEvalSpec.from_block(_block(**overrides))


def test_final_eval_spec_is_the_config_block_less_the_pipeline_keys():
    """One schema: the config's final_eval block is the spec's fields and the pipeline's two keys; a key either
    lacks, or a misspelt one, is an error naming it."""
    import dataclasses

    from mcpo_jax.training.config import base_config

    block = base_config().final_eval.to_dict()
    assert set(block) == {f.name for f in dataclasses.fields(E.FinalEvalSpec)} | {"baseline_path", "redo"}
    spec = _spec(num_prompts="7", tie_margin=1)
    assert spec.num_prompts == 7 and spec.tie_margin == 1.0 and isinstance(spec.tie_margin, float)
    with pytest.raises(E.EvalConfigError, match=r"final_eval: missing seed; unknown typo"):
        E.FinalEvalSpec.from_block({k: v for k, v in _block(typo=1).items() if k != "seed"})


def test_evaluate_models_judges_greedy_answers(sorting_models):
    from mcpo_jax.data import synthetic, tasks
    from mcpo_jax.judges import make_judge

    tok, policy, baseline = sorting_models
    prompts = synthetic.prompts(5, seed=2)
    judge = make_judge("oracle:sorting")
    same = E.evaluate_models(policy, policy, tok, prompts, judge, max_new_tokens=6, batch_size=4,
                             task=tasks.get("sorting"), num_bootstrap=50)
    assert (same.n_tie, same.win_rate) == (5, 0.5) and same.candidate == same.baseline
    r = E.evaluate_models(policy, baseline, tok, prompts, judge, max_new_tokens=6, batch_size=4,
                          task=tasks.get("sorting"), num_bootstrap=50)
    want = E.generate_outputs(policy, tok, prompts, max_new_tokens=6, batch_size=4)
    assert r.candidate == [a.strip() for a in want] and len(r.baseline) == 5
    expected = judge.compare_many(list(zip(prompts, r.candidate, r.baseline)))
    assert r.verdicts == expected and r.n_cand + r.n_base + r.n_tie == 5
    assert r.scores["policy_score"] == pytest.approx(np.mean([synthetic.oracle_score(p, a)
                                                              for p, a in zip(prompts, r.candidate)]))
    assert r.summary()["num_prompts"] == 5 and "policy_exact" in r.summary()


def test_final_evaluation_of_a_task_writes_its_verdicts(sorting_models, tmp_path, capsys):
    from mcpo_jax.data import synthetic

    tok, policy, baseline = sorting_models
    out = E.final_evaluation(_spec(), policy, tok, baseline=baseline, baseline_name="the starting policy",
                             workdir=str(tmp_path))
    assert out["num_prompts"] == 6 and out["n_cand"] + out["n_base"] + out["n_tie"] + out["n_invalid"] == 6
    assert 0.0 <= out["win_rate"] <= 1.0 and {"policy_exact", "baseline_score"} <= set(out)
    printed = capsys.readouterr().out
    assert "oracle win rate of the trained policy vs the starting policy" in printed
    assert f"({out['n_cand']} wins / {out['n_tie']} ties / {out['n_base']} losses on 6 held-out sorting" in printed
    saved = json.loads((tmp_path / "final_eval.json").read_text())
    assert [r["prompt"] for r in saved["rows"]] == synthetic.prompts(6, 1)
    assert [r["verdict"] for r in saved["rows"]].count("A") == out["n_cand"]
    # the user's own file of sorting prompts (a text file) is the sorting task's: accepted, duplicates kept
    mine = tmp_path / "mine.txt"
    mine.write_text("sort 312\nsort 312\nsort 9081\n")
    again = E.final_evaluation(_spec(prompts=str(mine), num_prompts=0), policy, tok, baseline=policy,
                               baseline_name="itself")
    assert again["num_prompts"] == 3 and again["n_tie"] == 3


def test_final_evaluation_refuses_what_it_cannot_score(sorting_models, tmp_path):
    """A user's own task must not be scored with the built-in sorting prompts and oracle, silently."""
    tok, policy, baseline = sorting_models
    mine = tmp_path / "reverse.jsonl"
    mine.write_text("".join(json.dumps({"instruction": f"reverse {w}"}) + "\n" for w in ["abc", "hello", "xy"]))
    cases = [
        (_spec(prompts=str(mine)), r"judge 'oracle:sorting' scores task 'sorting', but 3 of 3 prompts in .*"
                                   r"reverse.jsonl are not 'sorting' prompts \(e.g. 'reverse abc'\)"),
        (_spec(prompts="task:reverse"), r"unknown task 'reverse'; registered tasks: .*sorting"),
        (_spec(judge="oracle:reverse", prompts=str(mine)), r"final_eval.judge='oracle:reverse': unknown task"),
        (_spec(judge="oracle"), r"names no task"),
        (_spec(prompts="synthetic"), r"neither 'task:NAME' .* nor an existing prompt file"),
        (_spec(prompts=str(tmp_path / "nope.jsonl")), r"nor an existing prompt file"),
    ]
    for spec, match in cases:
        with pytest.raises(E.EvalConfigError, match=match):
            E.final_evaluation(spec, policy, tok, baseline=baseline, baseline_name="b")
    # a prompt file with a judge that scores any prompt (a reward function) is fine
    out = E.final_evaluation(_spec(prompts=str(mine), judge="reward:tests.test_evaluate:_length"), policy, tok,
                             baseline=policy, baseline_name="itself")
    assert out["n_tie"] == 3 and "policy_score" not in out
