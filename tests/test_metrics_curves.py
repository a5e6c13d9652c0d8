"""curves.png: reward-accuracy and margin panels (the step's metric names), the run name in the title."""

import json

from mcpo_jax.training import metrics as metrics_lib


def _write_run(run, name="my-run"):
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({"name": name}))
    writer = metrics_lib.MetricsWriter(str(run), tensorboard=False)
    for step in range(1, 6):
        writer.write(step, {"loss": 1.0 / step, "rewards/accuracies": step / 5, "rewards/margins": 0.1 * step,
                            "grad_norm": 1.0, "lr": 1e-3})
    writer.write(5, {"loss": 0.3, "rewards/accuracies": 0.8}, split="eval")
    writer.close()


def test_curves_have_accuracy_and_margin_panels_and_run_name(tmp_path):
    run = tmp_path / "workdir"
    _write_run(run)
    rows = metrics_lib.read_jsonl(run / "metrics.jsonl", split=None)
    fig = metrics_lib.curves_figure(rows, metrics_lib.run_name(str(run)))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "reward accuracy", "reward margin", "grad_norm", "lr"]
    assert fig._suptitle.get_text() == "my-run (workdir)"
    acc_ax = fig.axes[1]
    train_line, eval_line = acc_ax.get_lines()
    assert list(train_line.get_ydata()) == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert list(eval_line.get_ydata()) == [0.8]
    path = metrics_lib.plot_curves(str(run))
    assert path == str(run / "curves.png") and (run / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_run_name_falls_back_to_the_workdir(tmp_path):
    assert metrics_lib.run_name(str(tmp_path / "abc")) == "abc"
    (tmp_path / "same").mkdir()
    (tmp_path / "same" / "config.json").write_text(json.dumps({"name": "same"}))
    assert metrics_lib.run_name(str(tmp_path / "same")) == "same"
