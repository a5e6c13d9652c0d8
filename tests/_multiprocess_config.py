"""The demo task (configs/demo.py: tiny Llama, synthetic sorting data) cut to a few MC-PO steps for the
multi-process tests: no warm start, no final evaluation, and every number the comparisons depend on
pinned here, so a retuned demo config never changes a test mid-run.

    --config tests/_multiprocess_config.py[:steps]   (default 3 steps)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))

import demo  # noqa: E402


def get_config(arg=None):
    c = demo.get_config("smoke")
    c.warm_start = None
    c.final_eval.judge = ""
    c.seed = 0
    c.model.seed = 0
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.data.synthetic_rows = 160
    c.data.synthetic_candidates = 6
    c.data.eval_fraction = 0.0
    c.objective = "mcpo"
    c.sampler = "mc"
    c.num_candidates = 5
    c.num_negatives = 1
    c.beta = 0.1
    c.reference = "online"  # no separate reference pass to compile
    c.num_epochs = 1
    c.max_steps = int(arg or 3)
    c.batch_size = 16
    c.micro_batch_size = 8  # 2 accumulation steps (NO_ACCUMULATION in the tests sets 16)
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_ratio = 0.1
    c.optimizer.decay = "linear"
    c.optimizer.weight_decay = 0.0
    c.optimizer.max_grad_norm = 1.0
    c.eval_every = 0
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
