"""Metric sinks: JSONL + TensorBoard event files in the workdir, a tqdm bar, a PNG of the curves.

Only the primary process writes; the others get a writer whose methods do nothing.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from mcpo_jax.training import files

log = logging.getLogger(__name__)

# The step's metric names (TRL's): rewards/accuracies is the fraction of examples whose y0 out-rewards every
# selected negative, rewards/margins the mean reward gap r(y0) - r(negatives).
PLOT_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "kernel/entropy", "grad_norm", "lr")
PANEL_TITLES = {"rewards/accuracies": "reward accuracy", "rewards/margins": "reward margin"}


def to_python(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        if a.ndim == 0:
            out[k] = bool(a) if a.dtype == bool else float(a)
        else:
            out[k] = a.tolist()
    return out


class MetricsWriter:
    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.fspath(files.workdir_path(workdir) / "metrics.jsonl")
        self._tb = None
        self._file = None
        if not enabled:
            return
        self._file = files.AppendFile(self.path)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except Exception as e:  # TensorBoard is a convenience, never a reason to stop training
                log.warning("TensorBoard disabled: %s", e)

    def write(self, step: int, metrics: Mapping[str, Any], *, split: str = "train"):
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self._tb.add_scalar(f"{split}/{k}", v, step)
                elif isinstance(v, list) and k.endswith("rank_hist"):
                    counts = np.asarray(v, np.float64)
                    if counts.sum() > 0:
                        values = np.repeat(np.arange(len(counts)), counts.astype(np.int64))
                        self._tb.add_histogram(f"{split}/{k}", values, step, bins=np.arange(len(counts) + 1) - 0.5)

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def drop_after(path, step: int) -> None:
    """Remove the records of steps after `step` (a resumed run redoes them: each step is logged once)."""
    path = epath.Path(path)
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len([line for line in lines if line.strip()]):
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_jsonl(path: str, split: str | None = "train") -> list[dict]:
    path = epath.Path(path)
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if split is None or r.get("split") == split]


def run_name(workdir) -> str:
    """The run's `name` from workdir/config.json (what the trainer saved), else the workdir's base name."""
    run_dir = files.workdir_path(workdir)
    name = ""
    try:
        name = str(json.loads((run_dir / "config.json").read_text()).get("name") or "")
    except (OSError, ValueError, AttributeError):
        pass
    base = os.path.basename(os.fspath(run_dir).rstrip("/"))
    return f"{name} ({base})" if name and name != base else (name or base)


def curves_figure(rows: list[dict], title: str):
    """A matplotlib figure with one panel per PLOT_KEYS metric present in `rows`, train lines and eval dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in PLOT_KEYS if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(3.2 * max(len(keys), 1), 3.1), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for split, style in (("train", "-"), ("eval", "o-")):
            by_step = {r["step"]: r[key] for r in rows if r.get("split") == split and key in r}
            if by_step:
                steps = sorted(by_step)
                ax.plot(steps, [by_step[s] for s in steps], style, label=split, markersize=3)
        ax.set_title(PANEL_TITLES.get(key, key), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if key == "loss":
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_curves(workdir: str, out_name: str = "curves.png", *, title: str | None = None) -> str | None:
    """PNG of the main training (and eval) curves, titled with the run name; the last record of each step
    wins (resumes)."""
    run_dir = files.workdir_path(workdir)
    rows = read_jsonl(run_dir / "metrics.jsonl", split=None)
    if not rows:
        return None
    import matplotlib.pyplot as plt

    fig = curves_figure(rows, run_name(workdir) if title is None else title)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    path = run_dir / out_name
    path.write_bytes(png.getvalue())
    return os.fspath(path)
