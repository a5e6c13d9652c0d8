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
    # App. B.1 prints 8e-7 twice: 6 distinct rates, one copy shared by the protocol and configs/nectar.py
    from mcpo_jax.training.config import PAPER_LR_GRID

    assert protocol.PAPER_LRS == PAPER_LR_GRID == (8e-7, 1e-6, 2e-6, 5e-6, 1e-5, 2e-5)
    nectar = protocol.load_config("configs/nectar.py")
    assert nectar.optimizer.learning_rate in PAPER_LR_GRID
    import importlib.util

    spec = importlib.util.spec_from_file_location("_nectar_cfg", "configs/nectar.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.LR_GRID is PAPER_LR_GRID
    assert protocol.lr_grid(5e-6) == protocol.PAPER_LRS
    assert protocol.lr_grid(5e-4) == (8e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3)
    assert protocol.lr_grid(5e-4, 3) == (2e-4, 5e-4, 1e-3)
    assert protocol.lr_grid(5e-4, 1) == (5e-4,)
    assert protocol.lr_grid(5e-4, (0, 5)) == (8e-5, 2e-3)
    with pytest.raises(ValueError):
        protocol.lr_grid(5e-4, 7)


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
    # MC-PO's best lr is the grid's lowest: flagged (no extension asked for)
    assert "| MC-PO | 75.0 ± 0.0 (lr 1e-4) | 1e-4 (⚠ low edge of the grid) | 1e-4: 75.0, 2e-4: 50.0, 5e-4: 25.0 |" in md
    assert "| DPO | 50.0 ± 0.0 (lr 2e-4) | 2e-4 |" in md
    # pooled over seeds against the start policy: MC-PO 6 wins / 2 losses per seed -> 18/6, p = 0.023
    assert "| — | — | — | 18/6 (0.023) |" in md
    # seed level: +25 pp on each of 3 seeds; 1 of the 8 sign flips reaches |+25| on each side -> p = 2/8;
    # no spread over seeds -> a t CI of width 0, but resampling the prompts of a seed (2 of 8 differ) widens the
    # bootstrap's; the pooled head-to-head 6/0/18 (sign p 0.031) comes after, as a description
    assert "| MC-PO (lr 1e-4) vs DPO (lr 2e-4) | +25.0 [+25.0, +25.0] | 0.25 | < 0.001 | +25.0 [+" in md
    assert "| 6 / 0 / 18 (0.031) | s0: +25.0, s1: +25.0, s2: +25.0 |" in md
    comp = section["comparisons"][0]["seed_level"]["bootstrap"]
    assert 0 < comp["ci_low"] < 0.25 < comp["ci_high"] < 0.5
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
    assert ("on 8 validation prompts with seed 0 — the selection seed is also reported (the old protocol: its "
            "validation optimum inflates its test score), reported on 8 test prompts over seeds 0, 1") in md


def test_cli_method_lists_and_grid_points():
    from mcpo_jax.experiments import run_protocol

    ms = run_protocol._methods("DPO@dpo:random:1,MC-PO Min@mcpo:min,RNCE (M = 2)@rnce:random:2")
    assert [(m.name, dict(m.overrides)["sampler"], dict(m.overrides)["num_negatives"]) for m in ms] == [
        ("DPO", "random", 1), ("MC-PO Min", "min", 1), ("RNCE (M = 2)", "random", 2)]
    assert ms[0].key == protocol.table1_methods()[0].key  # the same run as Table 1's DPO
    with pytest.raises(SystemExit):
        run_protocol._methods("no-objective")
    assert run_protocol._baselines("winning") == protocol.WINNING_BASELINES
    args = run_protocol.parser().parse_args(["--experiments", "prereg", "--selection-seeds", "100,101"])
    assert int(args.grid_points) == len(protocol.PAPER_LRS) and args.max_extensions == 0  # the paper's whole grid
    assert run_protocol._baselines("SPPO=sppo") == (("SPPO", "sppo"),)


def test_binomial_exact_for_any_n():
    """2.0 ** n overflowed at n >= 1024 non-tied pairs (10 seeds, or --scale gpu): the tail is exact integers."""
    scipy_stats = pytest.importorskip("scipy.stats")
    for w, l in ((600, 424), (520, 504), (5000, 5200), (12000, 12000)):
        assert stats.sign_test(w, l) == pytest.approx(scipy_stats.binomtest(w, w + l).pvalue, rel=1e-9)
    assert 0.0 <= stats.sign_test(30000, 10000) < 1e-300 or stats.sign_test(30000, 10000) == 0.0


def test_seed_level_tests_on_constructed_differences():
    # 6 seeds all positive: exactly 1 of the 64 sign flips reaches the observed mean
    assert stats.sign_flip_p([0.01, 0.02, 0.03, 0.04, 0.05, 0.06], alternative="greater") == 1 / 64
    assert stats.sign_flip_p([0.01, 0.02, 0.03, 0.04, 0.05, 0.06]) == 2 / 64
    # one negative seed: flips whose mean >= observed: enumerate by hand with itertools
    d = [0.05, -0.01, 0.02, 0.03]
    import itertools

    means = [np.mean(np.multiply(s, d)) for s in itertools.product((1, -1), repeat=4)]
    assert stats.sign_flip_p(d, alternative="greater") == pytest.approx(np.mean(np.asarray(means) >= np.mean(d) - 1e-15))
    scipy_stats = pytest.importorskip("scipy.stats")
    t = stats.paired_t(d, alternative="greater")
    ref = scipy_stats.ttest_1samp(d, 0.0, alternative="greater")
    assert t["p"] == pytest.approx(ref.pvalue, rel=1e-9) and t["t"] == pytest.approx(ref.statistic)
    assert t["ci_low"] < np.mean(d) < t["ci_high"]
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.2, 0.01]) == pytest.approx([0.2, 0.02])
    # bootstrap over seeds then prompts: a matrix whose seeds differ in mean has a wider CI than its prompts alone
    rng = np.random.default_rng(0)
    D = rng.normal(0, 0.1, (6, 200)) + np.asarray([-0.2, -0.1, 0.0, 0.1, 0.2, 0.3])[:, None]
    h = stats.hierarchical_bootstrap(D, num_samples=2000)
    pooled = stats.paired_bootstrap(D.mean(axis=0), np.zeros(200), num_samples=2000)
    assert h["diff"] == pytest.approx(D.mean()) and (h["ci_high"] - h["ci_low"]) > 5 * (pooled["ci_high"] - pooled["ci_low"])


def test_selection_seeds_are_averaged_never_reported_and_edges_extend(tmp_path):
    calls = []
    with pytest.raises(ValueError, match="must not be reported"):
        protocol.Protocol(_task(), str(tmp_path), seeds=(0, 1), selection_seeds=(1, 2), grid=(1e-4,))
    proto = protocol.Protocol(_task(), str(tmp_path), seeds=(0, 1), selection_seeds=(100, 101),
                              grid=(1e-4, 2e-4, 5e-4), max_extensions=2, train=_fake(calls))
    ev = proto.evaluate(protocol.Method.of("MC-PO", "mcpo", "mc"))
    # MC-PO is best at the low edge (1e-4): the grid grows by 5e-5 (0.5 here), and 1e-4 is inside it
    assert ev["extended"] == [5e-5] and sorted(ev["grid"]) == [5e-5, 1e-4, 2e-4, 5e-4]
    assert ev["selected_lr"] == 1e-4 and ev["edge"] is None
    assert ev["per_seed_grid"][1e-4] == [0.75, 0.75] and ev["grid"][1e-4] == 0.75  # mean over selection seeds
    assert {c[3] for c in calls if c[2] != 1e-4} == {100, 101}  # grid points run on the selection seeds only
    assert [r["seed"] for r in ev["runs"]] == [0, 1] and ev["selection_seeds"] == [100, 101]
    dpo = protocol.Protocol(_task(), str(tmp_path), seeds=(0, 1), selection_seeds=(100, 101),
                            grid=(1e-4, 2e-4), train=_fake(calls)).evaluate(protocol.Method.of("DPO", "dpo", "random"))
    assert dpo["selected_lr"] == 2e-4 and dpo["edge"] == "high"  # no extension asked: flagged only


def test_sorting_metrics_and_the_sft_gate(monkeypatch):
    from mcpo_jax.experiments import common

    prompts = ["sort 3313", "sort 521", "sort 9009"]
    m = protocol.sorting_metrics(prompts, ["1333", "125", "09"])
    assert m == {"exact": pytest.approx(2 / 3), "exact_repeat": 0.5, "dedup_repeat": 0.5}
    order = {"dedup": -0.8, "correct": -3.0, "desc": -5.0, "copy": -12.0, "sub1": -8.0}
    monkeypatch.setattr(common, "sequence_logps",
                        lambda path, ps, texts: np.asarray([order[_kind(p, t)] for p, t in zip(ps, texts)]))
    ok = common.sft_gate("m", prompts, ["13", "125", "09"])
    assert ok["passed"] and ok["greedy_dedup"] == 1.0 and ok["order"][:2] == ["dedup", "correct"]
    assert ok["repeat_prompts"] == 2 and ok["correct_runner_up_per_prompt"] == 1.0
    low = common.sft_gate("m", prompts, ["13", "125", "0099"])  # dedup on 1 of 2 repeat prompts: < 70 %
    assert not low["passed"] and low["greedy_dedup"] == 0.5
    order["desc"] = -1.0  # the correct answer no longer the runner-up
    assert not common.sft_gate("m", prompts, ["13", "125", "09"])["passed"]


def _kind(prompt, text):
    from mcpo_jax.data import synthetic

    d = synthetic.parse_prompt(prompt)
    for k in ("correct", "dedup", "desc", "copy"):
        if text == synthetic.completion_of_kind(np.random.default_rng(0), d, k):
            return k
    return "sub1"


def test_preregistered_design_runs_primaries_first_and_tests_them(tmp_path):
    """The pre-registered design on a stand-in task: MC right on 6/8 prompts at L = 5 on every seed (win rate 75 % vs the start),
    random 4/8 (50 %), Min 2/8 (25 %); at L = 2 MC and random tie: P1, P2, P3 all positive on every seed (p = 1/64 each with 6 seeds)."""
    from mcpo_jax.experiments import preregistered

    quality = {("mc", 5): 0.75, ("random", 5): 0.5, ("min", 5): 0.25, ("max", 5): 0.5}
    calls = []

    def train(config, workdir):
        calls.append((config.sampler, config.num_candidates, config.seed, config.optimizer.learning_rate))
        q = quality.get((config.sampler, int(config.num_candidates)), 0.5)
        q = q if config.optimizer.learning_rate == 2e-4 or config.seed < 100 else q - 0.25  # 2e-4 best on validation
        return {"status": "completed", "hf_export": f"q{q}|{config.seed}"}

    def answers(policy, prompts):
        if policy.startswith("start"):
            return ["0.5"] * len(prompts)
        good = round(float(policy.split("|")[0][1:]) * len(prompts))
        return ["1" if i < good else "0" for i in range(len(prompts))]

    task = protocol.Task("fake", "configs/demo.py", "", lambda seed: f"start{seed}", answers, ScoreJudge(), VAL, TEST)
    seeds = (0, 1, 2, 3, 4, 5)
    proto = protocol.Protocol(task, str(tmp_path), seeds=seeds, selection_seeds=(100, 101),
                              grid=(1e-4, 2e-4, 5e-4), max_extensions=2, train=train)
    phases = []
    record = preregistered.run(proto, extra_seeds=(), on_progress=lambda r: phases.append(r["phases"][-1]["name"]))
    assert phases == ["selection", "P1, P2", "P3", "secondary"]
    assert {s: x["lr"] for s, x in record["selection"].items()} == {"mc": 2e-4, "random": 2e-4, "min": 2e-4,
                                                                     "max": 2e-4}
    # selection runs on seeds 100, 101 only; every evaluated cell on seeds 0-5
    assert {c[2] for c in calls if c[3] != 2e-4} == {100, 101}
    p1, p2, p3 = record["primary"]
    assert (p1["estimate"], p2["estimate"], p3["estimate"]) == (pytest.approx(0.25), pytest.approx(0.5),
                                                                pytest.approx(0.25))
    assert p1["p"] == p2["p"] == p3["p"] == pytest.approx(1 / 64)
    assert [p["holm_p"] for p in (p1, p2, p3)] == pytest.approx([3 / 64] * 3)
    assert [s["name"] for s in record["secondary"]][:1] == ["Max vs MC (L = 5)"]
    md = preregistered.markdown(record)
    assert "| P1 | tuned MC > tuned random (= DPO) at L = 5 | +25.0 |" in md and "| 0.016 | 0.047 |" in md
    assert "| MC (L = 5) | 2e-4 | 75.0 ± 0.0 |" in md and "MC, y0 excluded (L = 5)" in md
