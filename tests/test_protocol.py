"""The paper's protocol (mcpo_jax.experiments.protocol): grid, selection on validation prompts, reruns on seeds,
paired tests and tables. A stand-in task (no training: each policy's answers are a known function of its method
and learning rate) pins the selection logic and every number in the tables."""

import math
import os

import numpy as np
import pytest

from mcpo_jax.experiments import protocol, stats

N = 8
VAL = [f"v{i}" for i in range(N)]
TEST = [f"t{i}" for i in range(N)]
# fraction of prompts a policy gets right, by (objective, lr); the start policy is in between (0.5)
QUALITY = {("dpo", 1e-4): 0.25, ("dpo", 2e-4): 0.5, ("dpo", 5e-4): 0.5,
           ("mcpo", 1e-4): 0.75, ("mcpo", 2e-4): 0.5, ("mcpo", 5e-4): 0.25}


class ScoreJudge:
    def compare_many(self, triples):
        return ["A" if float(a) > float(b) else "B" if float(a) < float(b) else "tie" for _, a, b in triples]


def _answers(policy, prompts):
    if policy.startswith("start"):
        return ["0.5"] * len(prompts)
    objective, lr, _seed = policy.split("|")
    good = round(QUALITY.get((objective, float(lr)), 0.5) * len(prompts))
    return ["1" if i < good else "0" for i in range(len(prompts))]


def _fake(calls):
    def train(config, workdir):
        calls.append((config.objective, config.sampler, config.optimizer.learning_rate, config.seed,
                      config.model.path, config.warm_start, config.final_eval.judge))
        return {"status": "completed", "hf_export": f"{config.objective}|{config.optimizer.learning_rate}|{config.seed}"}

    return train


def _task():
    return protocol.Task("fake", "configs/demo.py", "", lambda seed: f"start{seed}", _answers, ScoreJudge(), VAL, TEST)


def test_lr_grid_is_the_papers_scaled_to_the_base_lr():
    assert protocol.PAPER_LRS == (8e-7, 1e-6, 2e-6, 5e-6, 8e-6, 1e-5, 2e-5)
    assert protocol.lr_grid(5e-6) == protocol.PAPER_LRS
    assert protocol.lr_grid(5e-4) == (8e-5, 1e-4, 2e-4, 5e-4, 8e-4, 1e-3, 2e-3)
    assert protocol.lr_grid(5e-4, 3) == (2e-4, 5e-4, 8e-4)
    assert protocol.lr_grid(5e-4, 1) == (5e-4,)
    assert protocol.lr_grid(5e-4, (0, 6)) == (8e-5, 2e-3)
    with pytest.raises(ValueError):
        protocol.lr_grid(5e-4, 8)


def test_select_lr_best_validation_ties_to_the_smaller_nan_last():
    assert protocol.select_lr({1e-4: 0.4, 2e-4: 0.6, 5e-4: 0.5}) == 2e-4
    assert protocol.select_lr({5e-4: 0.6, 1e-4: 0.6, 2e-4: 0.5}) == 1e-4
    assert protocol.select_lr({1e-4: float("nan"), 2e-4: 0.1}) == 2e-4
    with pytest.raises(ValueError):
        protocol.select_lr({})


def test_sign_test_exact_binomial_p_values():
    assert stats.sign_test(9, 1) == pytest.approx(2 * 11 / 1024)  # P(X <= 1) = (1 + 10) / 2^10, two-sided
    assert stats.sign_test(1, 9) == stats.sign_test(9, 1)
    assert stats.sign_test(3, 0) == pytest.approx(0.25)
    assert stats.sign_test(6, 0) == pytest.approx(2 / 64)
    assert stats.sign_test(5, 5) == 1.0 and stats.sign_test(0, 0) == 1.0
    assert stats.sign_test(29, 27) == pytest.approx(0.894, abs=1e-3)  # the 29/27 -> p = 0.89
    assert stats.sign_test(18, 6) == pytest.approx(0.0227, abs=1e-4)  # and 18/6 -> 0.02
    scipy_stats = pytest.importorskip("scipy.stats")
    for w, l in ((39, 23), (12, 3), (7, 7), (0, 5)):
        assert stats.sign_test(w, l) == pytest.approx(scipy_stats.binomtest(w, w + l).pvalue, rel=1e-9)


def test_paired_bootstrap_on_constructed_scores():
    same = stats.paired_bootstrap([1, 0, 0.5, 1], [1, 0, 0.5, 1])
    assert same["diff"] == 0 and same["p"] == 1.0
    always = stats.paired_bootstrap(np.ones(20), np.zeros(20))
    assert always["diff"] == 1 and always["p"] == 0.0 and always["ci_low"] == always["ci_high"] == 1
    # 12 prompts +1, 8 prompts -1: mean 0.2. A resample has k ~ Bin(20, 0.6) positives and mean (2k - 20) / 20;
    # it is at least 0.2 from the observed mean iff |k - 12| >= 2: p = 1 - P(k in {11, 12, 13}) = 0.49.
    d = stats.paired_bootstrap([1] * 12 + [0] * 8, [0] * 12 + [1] * 8, num_samples=20_000)
    exact = 1 - sum(math.comb(20, k) * 0.6 ** k * 0.4 ** (20 - k) for k in (11, 12, 13))
    assert d["diff"] == pytest.approx(0.2)
    assert d["p"] == pytest.approx(exact, abs=0.015) and d["ci_low"] < 0 < d["ci_high"]
    # 17 of 20 prompts +1: clearly significant
    assert stats.paired_bootstrap([1] * 17 + [0] * 3, [0] * 17 + [1] * 3)["p"] < 0.001
    with pytest.raises(ValueError):
        stats.paired_bootstrap([1, 2], [1])


def test_protocol_selects_on_validation_reruns_seeds_and_compares(tmp_path):
    calls = []
    proto = protocol.Protocol(_task(), str(tmp_path), seeds=(0, 1, 2), grid=(1e-4, 2e-4, 5e-4), train=_fake(calls))
    dpo, mcpo = protocol.Method.of("DPO", "dpo", "random"), protocol.Method.of("MC-PO", "mcpo", "mc")
    ev_dpo, ev_mc = proto.evaluate(dpo), proto.evaluate(mcpo)
    assert ev_dpo["grid"] == {1e-4: 0.25, 2e-4: 0.5, 5e-4: 0.5} and ev_dpo["selected_lr"] == 2e-4  # tie -> smaller
    assert ev_mc["grid"] == {1e-4: 0.75, 2e-4: 0.5, 5e-4: 0.25} and ev_mc["selected_lr"] == 1e-4
    assert ev_dpo["test_win_rates"] == [0.5] * 3 and ev_mc["test_win_rates"] == [0.75] * 3
    # 3 grid points on seed 0, then seeds 1 and 2 at the selected lr: the seed-0 run is reused
    assert len(calls) == 2 * (3 + 2)
    assert {c[3] for c in calls if c[2] != ev_mc["selected_lr"] and c[0] == "mcpo"} == {0}
    # every run starts from its seed's start policy, without a warm start or final evaluation of its own
    assert all(c[4] == f"start{c[3]}" and c[5] is None and c[6] == "" for c in calls)
    assert {(c[0], c[1]) for c in calls} == {("dpo", "random"), ("mcpo", "mc")}
    cmp = proto.compare(ev_mc, ev_dpo)
    # MC-PO right on 6 of 8 test prompts, DPO on 4, nested: 2 wins, 6 ties per seed
    assert (cmp["wins"], cmp["losses"], cmp["ties"]) == (6, 0, 18)
    assert cmp["sign_p"] == pytest.approx(2 / 64)
    assert [s["p"] for s in cmp["per_seed"]] == [0.5] * 3  # 2 wins, 0 losses: 2 * 2^-2
    assert cmp["bootstrap"]["diff"] == pytest.approx(0.25)
    # results are cached on disk: a new protocol over the same folder trains nothing
    again = []
    proto2 = protocol.Protocol(_task(), str(tmp_path), seeds=(0, 1, 2), grid=(1e-4, 2e-4, 5e-4), train=_fake(again))
    assert proto2.evaluate(mcpo)["test_win_rates"] == [0.75] * 3 and again == []


def test_tables_name_the_selected_lr_and_the_p_values(tmp_path):
    proto = protocol.Protocol(_task(), str(tmp_path), seeds=(0, 1, 2), grid=(1e-4, 2e-4, 5e-4), train=_fake([]))
    record = protocol.run_all(proto, baselines=(), fig2=(), table3=())
    (section,) = record["sections"]
    md = section["markdown"]
    assert "| MC-PO | 75.0 ± 0.0 (lr 1e-4) | 1e-4 | 1e-4: 75.0, 2e-4: 50.0, 5e-4: 25.0 |" in md
    assert "| DPO | 50.0 ± 0.0 (lr 2e-4) | 2e-4 |" in md
    # pooled over seeds against the start policy: MC-PO 6 wins / 2 losses per seed -> 18/6, p = 0.023
    assert "| — | — | — | 18/6 (0.023) |" in md
    assert "| MC-PO (lr 1e-4) vs DPO (lr 2e-4) | 6 | 0 | 18 | 0.031 | +25.0 [" in md
    assert "s0: 2/0, 0.5; s1: 2/0, 0.5; s2: 2/0, 0.5 |" in md
    assert protocol.cell({"test_win_rates": [0.5, 0.6], "selected_lr": 2e-3}) == "55.0 ± 7.1 (lr 2e-3, n=2)"
    assert protocol.cell(None) == "—"
    doc = tmp_path / "results.md"
    doc.write_text("# title\n\nkept\n")
    protocol.write_into(str(doc), "synthetic", "first")
    protocol.write_into(str(doc), "synthetic", protocol.markdown(record))
    text = doc.read_text()
    assert text.startswith("# title\n\nkept\n") and "first" not in text and text.count("protocol:synthetic:begin") == 1
    assert "(lr 1e-4)" in text and "seeds 0, 1, 2" in text


def test_run_config_applies_method_lr_seed_and_task_overrides():
    task = _task()
    task.overrides = (("data.synthetic_rows", 48),)
    m = protocol.Method.of("MC-PO Min (L = 3)", "mcpo", "min", L=3, M=2)
    c = task.run_config(m, 2e-4, 7, "/start", "/wd")
    assert (c.objective, c.sampler, c.num_candidates, c.num_negatives) == ("mcpo", "min", 3, 2)
    assert (c.optimizer.learning_rate, c.seed, c.model.path, c.model.preset) == (2e-4, 7, "/start", "")
    assert c.data.synthetic_rows == 48 and c.beta == 2.0  # beta: the base config's, the same for every method
    assert task.base_lr() == 5e-4


def test_report_only_trains_nothing_and_marks_what_did_not_run(tmp_path):
    calls = []
    full = protocol.Protocol(_task(), str(tmp_path), seeds=(0, 1), grid=(1e-4, 2e-4), train=_fake(calls))
    full.evaluate(protocol.Method.of("DPO", "dpo", "random"))
    n = len(calls)
    report = protocol.Protocol(_task(), str(tmp_path), seeds=(0, 1), grid=(1e-4, 2e-4), train=_fake(calls),
                               report_only=True)
    record = protocol.run_all(report, baselines=(), fig2=(), table3=())
    assert len(calls) == n
    assert [f["method"] for f in record["failures"]] == ["RNCE", "MC-PO"]
    md = protocol.markdown(record)
    assert "| DPO | 50.0 ± 0.0 (lr 2e-4, n=2) |" in md and "| MC-PO | — |" in md
    assert "on 8 validation prompts with seed 0, reported on 8 test prompts over seeds 0, 1" in md


def test_cli_method_lists_and_grid_points():
    from mcpo_jax.experiments import run_protocol

    ms = run_protocol._methods("DPO@dpo:random:1,MC-PO Min@mcpo:min,RNCE (M = 2)@rnce:random:2")
    assert [(m.name, dict(m.overrides)["sampler"], dict(m.overrides)["num_negatives"]) for m in ms] == [
        ("DPO", "random", 1), ("MC-PO Min", "min", 1), ("RNCE (M = 2)", "random", 2)]
    assert ms[0].key == protocol.table1_methods()[0].key  # the same run as Table 1's DPO
    with pytest.raises(SystemExit):
        run_protocol._methods("no-objective")
    assert run_protocol._baselines("winning") == protocol.WINNING_BASELINES
    assert run_protocol._baselines("SPPO=sppo") == (("SPPO", "sppo"),)
