"""configs/demo.py:smoke cut to a few MC-PO steps for the multi-process tests (no warm start, no final eval).

    --config tests/_multiprocess_config.py[:steps]   (default 3 steps)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))

import demo  # noqa: E402


def get_config(arg=None):
    c = demo.get_config("smoke")
    c.warm_start = None
    c.final_eval = None
    c.max_steps = int(arg or 3)
    c.batch_size = 16
    c.micro_batch_size = 8  # 2 accumulation steps (NO_ACCUMULATION in the tests sets 16)
    c.eval_every = 0
    c.data.eval_fraction = 0.0
    c.reference = "online"  # no separate reference pass to compile
    c.tensorboard = False
    c.progress_bar = False
    c.log_every = 1
    c.checkpoint.save_every = 2
    c.checkpoint.keep = 5
    c.checkpoint.async_save = False
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
