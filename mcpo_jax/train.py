"""CLI: python -m mcpo_jax.train --config configs/X.py[:variant] --workdir DIR [--config.a.b=value ...]
     python -m mcpo_jax.train --config configs/X.py[:variant] --compile-only --target T [--config.a.b=value ...]

Parses the config and calls `mcpo_jax.pipeline.run` (or, with --compile-only, `mcpo_jax.compile_only.check`:
the run's programs compiled for target T from this host, no weights read, nothing written); nothing else lives here.
Exit status: 0 when the run completed, or was interrupted by SIGTERM/SIGINT (after saving; the message says how
to resume), or every compiled program fits; 2 for a problem the user can fix (config, data, missing model or
tokenizer, a changed config on an existing workdir, a program that does not fit the target), reported as one
message before anything compiles where it can be checked; 3 when the loss became NaN/Inf; 130 on a second Ctrl-C
(exits at once).
"""

from __future__ import annotations

import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/X.py[:variant]; keys: --config.KEY=value "
                                          "(python -m mcpo_jax.train --config configs/demo.py --helpconfig lists "
                                          "every key with its value)", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, export; reused to resume.")
_HELPCONFIG = flags.DEFINE_bool("helpconfig", False, "Print every config key with its value and exit.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
_COMPILE_ONLY = flags.DEFINE_bool("compile-only", False, "Compile the run's programs for --target from this host "
                                  "(no weights read, no workdir) and report per-device memory against the target's "
                                  "HBM, FLOPs and collectives; exit 0 when every program fits, 2 when one does not.")
_TARGET = flags.DEFINE_string("target", "cpu", "--compile-only: h100, h200, h100x8, h200x8, tpu-v5e-4, tpu-v5e-8, "
                              "tpu-v4-8, tpu-v5p-8, tpu-v5p-16, tpu-v5p-64, tpu-v6e-4, tpu-v6e-8, or cpu (this host; "
                              "TPU targets need pip install -e '.[aot-tpu]', GPU targets '.[aot-gpu]').")


def _user_errors():
    """The exception types whose message is the whole story (no traceback): exit 2."""
    from mcpo_jax.data.example import DataError
    from mcpo_jax.evaluate import EvalConfigError
    from mcpo_jax.hub import LocationError
    from mcpo_jax.training.config import ConfigError

    return (ConfigError, DataError, EvalConfigError, LocationError, FileNotFoundError)


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _HELPCONFIG.value:
        from mcpo_jax.training.config import base_config

        print(_CONFIG.value or base_config())
        return 0
    if _CONFIG.value is not None and _COMPILE_ONLY.value:
        return _compile_only(_CONFIG.value, _TARGET.value)
    if _CONFIG.value is None or not _WORKDIR.value:
        print("error: --config and --workdir are required (python -m mcpo_jax.train --config configs/demo.py "
              "--workdir /tmp/demo)", file=sys.stderr)
        return 2
    import logging

    # "Unable to initialize backend 'tpu'" (INFO, through absl) on every machine without TPUs: not news.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from mcpo_jax import pipeline, sharding
    from mcpo_jax.training.loop import TrainingDiverged

    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    import jax

    try:
        summary = pipeline.run(_CONFIG.value, _WORKDIR.value, problems=tuple(_UNKNOWN_OVERRIDES))
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return _exit(2)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return _exit(3)
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


def _compile_only(config, target_name: str) -> int:
    """--compile-only --target T: every program of the run compiled for T; 0 when all fit, 2 when one does not."""
    import logging

    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    logging.getLogger("mcpo_jax").setLevel(logging.WARNING)  # the report below says what the programs' logs would
    from mcpo_jax import compile_only, targets

    try:
        target = targets.get(target_name)
        targets.prepare_environment(target)
        print(compile_only.header(target, config), flush=True)
        print(compile_only.COLUMNS, flush=True)
        checks = compile_only.check(config, target, log_fn=lambda msg: print(msg, flush=True)
                                    if not msg.startswith("compiling ") else None)
    except _user_errors() + (targets.TargetError,) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for c in checks:
        print(compile_only.format_collectives(c))
        if c.note:
            print(f"{c.name}: {c.note}")
    status, line = compile_only.summary(checks, target)
    print(line if status == 0 else f"error: {line}", file=sys.stdout if status == 0 else sys.stderr, flush=True)
    return status


def _exit(code: int) -> int:
    import jax

    if jax.process_count() > 1:  # peers may wait in a collective for this process: do not block in shutdown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


_UNKNOWN_OVERRIDES: list[str] = []


def _parse_flags(argv):
    """absl's parser, with a config error (an unknown key in an override, a wrong type) as one line, exit 2.
    Overrides of keys the schema lacks are set aside and reported with every other problem of the config."""
    from mcpo_jax.training.config import unknown_key_problem

    kept = []
    for arg in argv:
        key = arg[len("--config."):].split("=", 1)[0] if arg.startswith("--config.") else None
        problem = key and unknown_key_problem(key)
        if problem:
            _UNKNOWN_OVERRIDES.append(problem)
        else:
            kept.append(arg)
    sys.argv[:] = kept  # config_flags reads the overrides from sys.argv itself
    try:
        return flags.FLAGS(kept)
    except SystemExit as e:  # absl exits 1 after printing the help it was asked for: asked-for help is no error
        if any(a.split("=", 1)[0] in ("--help", "-?", "--helpshort", "--helpfull", "--helpxml") for a in kept[1:]):
            sys.exit(0)
        raise
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # the config file raised (an unknown variant, a typo in the file)
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)


def main():
    """Console entry point (`mcpo-train`, `python -m mcpo_jax.train`)."""
    app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
    main()
