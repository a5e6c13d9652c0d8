"""CLI: python -m mcpo_jax.train --config configs/X.py[:variant] --workdir DIR [--config.a.b=value ...]

Parses the config and calls `mcpo_jax.training.loop.train` (or, for configs with an `online` block,
`mcpo_jax.online.onmcpo.train_online`); nothing else lives here.
Exit status: 0 when training completed or was interrupted by SIGTERM/SIGINT (after saving),
2 for a config error (reported before anything compiles), 3 when the loss became NaN/Inf.
"""

from __future__ import annotations

import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/X.py[:variant]", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, export; reused to resume.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    from mcpo_jax import sharding
    from mcpo_jax.training import loop

    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    try:
        config = _CONFIG.value
        if config is not None and config.get("online"):  # OnMC-PO / online DPO: batched online segments
            from mcpo_jax.online import onmcpo

            summary = onmcpo.train_online(config, _WORKDIR.value)
        else:
            summary = loop.train(config, _WORKDIR.value)
    except loop.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except loop.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except BaseException:
        if jax.process_count() <= 1:
            raise
        # Fail fast: a normal exit runs jax.distributed.shutdown, whose barrier waits (up to 300 s) for
        # peers that are blocked in a collective waiting for this process. os._exit stops the heartbeats
        # instead: the coordination service declares this process dead and every peer aborts.
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    if summary.get("status") == "interrupted":
        print(summary["message"], flush=True)
    return 0


def main():
    """Console entry point (`mcpo-train`, `python -m mcpo_jax.train`)."""
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(_main)


if __name__ == "__main__":
    main()
