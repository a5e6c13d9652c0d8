"""The reproduction experiments (mcpo_jax.experiments): tables, win rates, seeds, run sharing.

Most tests replace the trainer by a stand-in that validates the config and exports the starting model
unchanged, so every experiment runs end to end in miniature (generation, oracle judging, tables) in seconds;
then every trained policy answers exactly like its SFT model and every win rate must be exactly 50%.
One test trains for real (SFT + one MC-PO cell, a few steps).
"""

import json
import os
import shutil

import numpy as np
import pytest

from mcpo_jax.data import synthetic
from mcpo_jax.experiments import (common, cost, fig2_sampling, online, sensitivity, table1_baselines,
                                  table2_noise, table3_negatives)

EXPERIMENTS = {
    "table1_baselines": (table1_baselines.EXPERIMENT, ["SFT (start)"] + [r for r, _, _ in table1_baselines.METHODS],
                         [m[0] for m in common.METRICS]),
    "fig2_sampling": (fig2_sampling.EXPERIMENT, ["MC", "Max", "Min", "Random"],
                      ["5 negs", "4 negs", "3 negs", "2 negs", "1 neg"]),
    "table2_noise": (table2_noise.EXPERIMENT, ["SFT (start)", "DPO(-)", "DPO", "MC-PO"],
                     [m[0] for m in common.METRICS]),
    "table3_negatives": (table3_negatives.EXPERIMENT, ["RNCE", "MC-PO"], ["M = 1", "M = 2", "M = 3"]),
    "online": (online.EXPERIMENT, ["SFT (start)", "OnMC-PO (π_ref = SFT)", "Online DPO (π_ref = SFT)",
                                   "OnMC-PO (π_ref = segment start)", "Online DPO (π_ref = segment start)",
                                   "MC-PO (offline)"],
               [m[0] for m in common.METRICS] + ["steps"]),
    "cost": (cost.EXPERIMENT, None, None),
    "sensitivity": (sensitivity.EXPERIMENT, ["DPO", "MC-PO", "MC-PO Max", "MC-PO Min", "OnMC-PO (π_ref = SFT)",
                                             "Online DPO (π_ref = SFT)"],
                    ["lr 2e-3, β 0.1 (main)", "lr 2e-4, β 0.1", "lr 2e-3, β 0.01"]),
}


# --------------------------------------------------------------------------------------- pure functions


def test_oracle_win_rate_is_the_adjusted_win_rate():
    prompts = synthetic.prompts(4, seed=3)
    right = [synthetic.answer(p) for p in prompts]
    wrong = [a[::-1] for a in right]  # descending: a different, worse answer
    policy = [right[0], right[1], right[2], wrong[3]]
    baseline = [wrong[0], wrong[1], right[2], right[3]]  # 2 wins, 1 tie, 1 loss
    r = common.oracle_win_rate(prompts, policy, baseline)
    assert (r["n_cand"], r["n_tie"], r["n_base"]) == (2, 1, 1)
    assert r["win_rate"] == pytest.approx((2 + 0.5) / 4)
    assert r["policy_exact"] == 0.75 and r["baseline_exact"] == 0.5
    assert r["ci_low"] <= r["win_rate"] <= r["ci_high"]
    same = common.oracle_win_rate(prompts, policy, policy)
    assert same["win_rate"] == 0.5 and same["n_tie"] == 4


def test_mean_std_and_cells():
    m, s, n = common.mean_std([0.5, 0.6, 0.7])
    assert (round(m, 6), round(s, 6), n) == (0.6, 0.1, 3)  # sample std (ddof = 1)
    assert common.format_cell([0.5, 0.6, 0.7]) == "60.0 ± 10.0"
    assert common.format_cell([0.25]) == "25.0 ± 0.0 (n=1)"
    assert common.format_cell([]) == "—"
    assert common.mean_std([0.5, None, float("nan")])[2] == 1


def test_seed_handling(tmp_path):
    assert common.parse_seeds("0,1,2") == (0, 1, 2)
    assert common.parse_seeds([4]) == (4,)
    with pytest.raises(ValueError):
        common.parse_seeds("1,1")
    a, b = common.sft_config("tiny", 0), common.sft_config("tiny", 1)
    assert (a.seed, a.model.seed, b.seed, b.model.seed) == (0, 0, 1, 1)
    p0, p1 = common.po_config("tiny", 0, "/sft0"), common.po_config("tiny", 1, "/sft1")
    assert (p0.seed, p1.seed, p0.model.path, p1.model.path) == (0, 1, "/sft0", "/sft1")
    # the seed changes the data the trainer generates (its split seed is config.seed) ...
    assert synthetic.generate_rows(4, seed=0) != synthetic.generate_rows(4, seed=1)
    assert synthetic.sft_rows(4, seed=0) != synthetic.sft_rows(4, seed=1)
    # ... but not the evaluation prompts (a fixed held-out benchmark)
    assert common.eval_prompts("tiny") == common.eval_prompts("tiny")
    runner = common.Runner(str(tmp_path), "tiny")
    cell = common.po_cell("MC-PO", "offline", "mcpo", "mc")
    assert runner.run_dir(cell, 0) != runner.run_dir(cell, 1)
    assert runner.sft_dir(0) != runner.sft_dir(1)


def test_the_same_method_is_the_same_run_across_experiments():
    key = {c.key for c in table1_baselines.cells("tiny") if c.row == "MC-PO"}
    assert key == {c.key for c in fig2_sampling.cells("tiny") if c.row == "MC" and c.col == "5 negs"}
    assert key == {c.key for c in table3_negatives.cells("tiny") if c.row == "MC-PO" and c.col == "M = 1"}
    assert key == {c.key for c in online.cells("tiny") if c.row == "MC-PO (offline)"}
    rnce = {c.key for c in table1_baselines.cells("tiny") if c.row == "RNCE"}
    assert rnce == {c.key for c in table3_negatives.cells("tiny") if c.row == "RNCE" and c.col == "M = 1"}
    one_neg = {c.key for c in fig2_sampling.cells("tiny") if c.col == "1 neg"}
    assert len(one_neg) == 1  # with one candidate every sampler is the same run
    keys = [c.key for c in table1_baselines.cells("tiny")]
    assert len(set(keys)) == len(keys)


def test_overrides_reach_the_trainer_config():
    cell = [c for c in table2_noise.cells("tiny") if c.row == "DPO(-)"][0]
    c = common.po_config("tiny", 0, "/sft", cell.overrides)
    assert (c.objective, c.sampler, c.num_candidates, c.num_negatives) == ("dpo", "fixed", 5, 1)
    assert c.data.options.inject_noise is True
    cell = [c for c in fig2_sampling.cells("tiny") if c.row == "Min" and c.col == "3 negs"][0]
    c = common.po_config("tiny", 0, "/sft", cell.overrides)
    assert (c.objective, c.sampler, c.num_candidates) == ("mcpo", "min", 3)
    cell = [c for c in online.cells("tiny") if c.row == "Online DPO (π_ref = SFT)"][0]
    c = common.online_config("tiny", 2, "/sft", cell.overrides)
    assert (c.objective, c.sampler, c.online.seed, c.online.num_segments, c.online.judge, c.online.reference) == (
        "dpo", "random", 2, 3, "oracle:sorting", "initial")


# ------------------------------------------------------------------------------ miniature experiments


@pytest.fixture()
def fake_trainer(monkeypatch):
    """pipeline.run replaced: validates the config, exports the starting model unchanged, logs 3 steps (and, for an
    online run, writes the segments' stats)."""
    from mcpo_jax import models, pipeline
    from mcpo_jax.training.config import validate

    calls = []

    def fake_train(config, workdir):
        validate(config, device_count=1, process_count=1)
        calls.append(config)
        if config.online.enabled:
            for s in range(int(config.online.num_segments)):
                os.makedirs(os.path.join(workdir, "online", f"segment_{s}"), exist_ok=True)
                with open(os.path.join(workdir, "online", f"segment_{s}", "stats.json"), "w") as f:
                    json.dump({"sample_seconds": 0.1, "judge_seconds": 0.1, "rows": 8}, f)
        hf = os.path.join(workdir, "hf")
        os.makedirs(workdir, exist_ok=True)
        if config.model.path:
            shutil.copytree(config.model.path, hf, dirs_exist_ok=True)
        else:
            overrides = dict(config.model.overrides)
            model = models.init_random(models.preset_config(config.model.preset, **overrides),
                                       seed=int(config.model.seed))
            models.save_pretrained(model, hf)
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            for step in range(1, 4):
                f.write(json.dumps({"step": step, "split": "train", "loss": 1.0 / step, "step_time": 0.01 * step,
                                    "tokens": 100.0, "rewards/accuracies": 0.5}) + "\n")
        summary = {"status": "completed", "hf_export": hf, "final_policy": hf, "total_steps": 3,
                   "final_metrics": {"loss": 1 / 3, "rewards/accuracies": 0.5}}
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f)
        return summary

    monkeypatch.setattr(pipeline, "run", fake_train)
    return calls


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_miniature_experiment_tables(name, tmp_path, fake_trainer):
    exp, rows, cols = EXPERIMENTS[name]
    record = common.run_experiment(exp, scale="tiny", seeds=(0,), out=str(tmp_path))
    assert not record["failures"]
    cells = exp.cells("tiny")
    runs = {c.key: c.kind for c in cells}
    assert len(fake_trainer) == 1 + len(runs)  # SFT + one pipeline run per cell (online: one trajectory)
    table = record["tables"][0]
    if rows is not None:
        assert table["rows"] == rows and table["cols"] == cols
    planned = {c.row for c in cells} if table["metric"] != "win_rate" else {(c.row, c.col) for c in cells}
    for cell in table["cells"]:
        if name == "cost":
            expected = 1
        elif cell["row"] == common.SFT_ROW:  # the SFT policy's own numbers (it takes no steps)
            expected = 0 if cell["col"] == "steps" else 1
        else:
            expected = int((cell["row"] if table["metric"] != "win_rate" else (cell["row"], cell["col"])) in planned)
        assert len(cell["values"]) == expected, cell
    # the stand-in trainer leaves every policy equal to its SFT model: all ties, win rate exactly 50%
    for run in record["runs"]:
        assert run["win_rate"] == 0.5 and run["n_tie"] == len(common.eval_prompts("tiny"))
        assert run["step_time_median"] == pytest.approx(0.025)  # steps 2 and 3 of each run (first one left out)
    md = open(os.path.join(tmp_path, "tiny", name, "table.md")).read()
    assert md.count("\n|") >= len(table["rows"]) + 1
    if name == "cost":
        ratio = [c for c in table["cells"] if c["col"].startswith("ratio")]
        assert all(c["values"] == [pytest.approx(1.0)] for c in ratio)
    if name == "online":
        run = [r for r in record["runs"] if r["row"] == "OnMC-PO (π_ref = SFT)"][0]
        assert len(run["segments"]) == 3 and run["steps"] == 3  # the stand-in: one trajectory of 3 steps


def test_runs_are_cached_and_seeds_kept_apart(tmp_path, fake_trainer):
    exp = table3_negatives.EXPERIMENT
    record = common.run_experiment(exp, scale="tiny", seeds=(0, 1), out=str(tmp_path))
    n = len(fake_trainer)
    assert n == 2 * (1 + 6)  # per seed: one SFT + 6 cells
    assert sorted({(r["seed"], r["row"], r["col"]) for r in record["runs"]}) == sorted(
        {(s, c.row, c.col) for s in (0, 1) for c in exp.cells("tiny")})
    sft_seeds = sorted(c.model.seed for c in fake_trainer if c.objective == "sft")
    assert sft_seeds == [0, 1]
    po = [c for c in fake_trainer if c.objective != "sft"]
    assert all(c.model.path.endswith(f"sft/seed{c.seed}/hf") for c in po)  # each seed starts from its own SFT
    again = common.run_experiment(exp, scale="tiny", seeds=(0, 1), out=str(tmp_path))
    assert len(fake_trainer) == n  # nothing retrained
    assert again["tables"][0]["cells"] == record["tables"][0]["cells"]
    for cell in record["tables"][0]["cells"]:
        assert len(cell["values"]) == 2


def test_report_writes_tables_and_figures(tmp_path, fake_trainer):
    from mcpo_jax.experiments import report

    for exp in (fig2_sampling.EXPERIMENT, table1_baselines.EXPERIMENT):
        common.run_experiment(exp, scale="tiny", seeds=(0,), out=str(tmp_path / "out"))
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text(f"# Results\n\nintro kept\n\n{report.BEGIN}\nold\n{report.END}\n\ndiscussion kept\n")
    report.main(["--scale", "tiny", "--out", str(tmp_path / "out"), "--doc", str(doc),
                 "--figures", str(tmp_path / "docs" / "figures")])
    text = doc.read_text()
    assert "intro kept" in text and "discussion kept" in text and "\nold\n" not in text
    assert "| MC | 50.0 ± 0.0 (n=1) |" in text
    assert (tmp_path / "docs" / "figures" / "fig2_sampling.png").stat().st_size > 1000
    assert (tmp_path / "docs" / "figures" / "curves_table1_baselines.png").exists()
    assert "_not run (no results.json)_" in text  # the experiments that did not run are named


# ------------------------------------------------------------------------------------------ real training


def test_real_miniature_run(tmp_path):
    """SFT then one MC-PO cell, trained for real in the tiny scale (a few steps): the result is evaluated."""
    runner = common.Runner(str(tmp_path), "tiny")
    cell = common.po_cell("MC-PO", "offline", "mcpo", "mc")
    r = runner.run(cell, 0)
    assert r["steps"] == 3 and r["steps_timed"] == 2  # 48 rows / 16 per step, first step not timed
    assert 0.0 <= r["win_rate"] <= 1.0 and r["n_cand"] + r["n_base"] + r["n_tie"] == 16
    assert np.isfinite(r["final_loss"]) and r["step_time_median"] > 0
    assert not os.path.exists(os.path.join(runner.run_dir(cell, 0), "checkpoints"))  # pruned
    assert runner.run(cell, 0) == r  # cached


def test_every_scale_makes_valid_trainer_configs(tmp_path):
    """The gpu scale cannot run here; at least its configs (and every experiment's cells) must validate."""
    from mcpo_jax.training.config import validate

    sft_path = str(tmp_path)  # validate only checks that the folder exists
    cells = [c for exp in (table1_baselines, fig2_sampling, table2_noise, table3_negatives, online, cost,
                           sensitivity) for c in exp.cells("gpu")]
    for scale in ("gpu", "small"):
        validate(common.sft_config(scale, 0), device_count=1, process_count=1)
        for cell in cells:
            if cell.kind == "online":
                config = common.online_config(scale, 0, sft_path, cell.overrides)
            else:
                config = common.po_config(scale, 0, sft_path, cell.overrides)
            if config.data.source == "@pairs":
                config.data.source = sft_path
            validate(config, device_count=1, process_count=1)
    assert common.SCALES["gpu"]["model"]["num_hidden_layers"] > common.SCALES["small"]["model"].get(
        "num_hidden_layers", 2)
