"""CLI of the paper's protocol (mcpo_jax.experiments.protocol): grid, validation selection, seeds, paired tests.

Synthetic sorting task (SFT start per seed built by common.Runner at `--scale`, oracle judge):

    python -m mcpo_jax.experiments.run_protocol --task synthetic --base configs/demo.py --scale small \\
        --seeds 0,1,2 --experiments table1,fig2,table3 --out runs/protocol --doc docs/results.md

A real model (every seed starts from MODEL_DIR; prompts from a JSON/JSONL file; any judges.make_judge spec):

    python -m mcpo_jax.experiments.run_protocol --task config --base configs/smollm2.py:gpu \\
        --online-base configs/smollm2.py:online --model-dir MODEL_DIR --prompts prompts.jsonl --judge JUDGE ...

`--set key=value` (repeatable) overrides every run's config (Python literals; e.g. data.synthetic_rows=64).

The pre-registered experiment (mcpo_jax/experiments/preregistered.py; docs/results.md):

    python -m mcpo_jax.experiments.run_protocol --experiments prereg --scale medium \
        --selection-seeds 100,101 --seeds 0,1,2,3,4,5 --max-extensions 2 --out runs/prereg --doc docs/results.md
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import sys
from collections.abc import Sequence

from mcpo_jax.experiments import common, protocol


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip()) if text else ()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mcpo_jax.experiments.run_protocol", description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("synthetic", "config"), default="synthetic")
    p.add_argument("--base", default="configs/demo.py", help="config spec of the offline runs")
    p.add_argument("--online-base", default="", help="config spec of the online runs (default: none / synthetic: "
                   "configs/demo.py:online)")
    p.add_argument("--scale", default="small", choices=sorted(common.SCALES), help="synthetic: the SFT start recipe")
    p.add_argument("--model-dir", default="", help="config task: the start model (HF folder)")
    p.add_argument("--prompts", default="", help="config task: JSON/JSONL prompt file (split into validation/test)")
    p.add_argument("--judge", default="", help="config task: a judges.make_judge spec")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--generation-batch", type=int, default=64)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--selection-seed", type=int, default=None, help="(old protocol) one selection seed, reported "
                   "too; prefer --selection-seeds")
    p.add_argument("--selection-seeds", default="", help="seeds the lr is selected on (mean validation win rate), "
                   "never reported; must not overlap --seeds")
    p.add_argument("--max-extensions", type=int, default=0, help="extend the lr grid past an edge the selection "
                   "lands on, up to this many points per method (x2 / /2)")
    p.add_argument("--extra-seeds", default="6,7,8,9", help="prereg: seeds added if P1's estimate is in [1, 2] pp")
    p.add_argument("--time-one", action="store_true", help="prereg: time one SFT start and one run, print the "
                   "estimate for the whole design, stop (the runs are cached for the design)")
    p.add_argument("--grid-points", default="6", help="k (k grid values centred on the base lr) or indices 0..5 "
                   "of the paper's 6")
    p.add_argument("--lrs", default="", help="explicit learning rates (overrides --grid-points)")
    p.add_argument("--num-validation", type=int, default=256)
    p.add_argument("--num-test", type=int, default=512)
    p.add_argument("--experiments", default="table1,fig2,table3", help="comma list of table1, fig2, table3, online; "
                   "or prereg (the pre-registered design, alone)")
    p.add_argument("--baselines", default="winning", help="'winning' (those that beat SFT in docs/results.md), "
                   "'none', or a comma list of NAME=objective")
    p.add_argument("--fig2", default="5,3,1", help="numbers of candidates L for Fig. 2")
    p.add_argument("--table3", default="1,2,3", help="numbers of negatives M for Table 3")
    p.add_argument("--methods", default="", help="a table of offline methods, comma list of NAME@objective:sampler:M "
                   "(MC-PO, if listed, is compared with each of the others)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--set-online", action="append", default=[], metavar="KEY=VALUE", help="online runs only")
    p.add_argument("--out", default="runs/protocol")
    p.add_argument("--report-only", action="store_true", help="train nothing: tables from the cached runs")
    p.add_argument("--doc", default="", help="write the tables into this markdown file (between markers)")
    p.add_argument("--doc-name", default="", help="marker name in --doc (default: the task name)")
    return p


def _baselines(text: str):
    if text == "winning":
        return protocol.WINNING_BASELINES
    if text in ("", "none"):
        return ()
    return tuple(tuple(x.split("=", 1)) for x in text.split(","))


def _methods(text: str):
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, spec = item.rpartition("@")
        objective, sampler, m = (spec.split(":") + ["", "", ""])[:3]
        if not name or not objective:
            raise SystemExit(f"--methods: {item!r} is not NAME@objective[:sampler[:M]]")
        out.append(protocol.Method.of(name, objective, sampler or "random", M=int(m or 1)))
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("absl", "orbax", "grain", "jax._src"):
        logging.getLogger(name).setLevel(logging.WARNING)
    common.setup_jax(args.out)
    overrides = [(k, _literal(v)) for k, _, v in (s.partition("=") for s in args.set)]
    online_overrides = [(k, _literal(v)) for k, _, v in (s.partition("=") for s in args.set_online)]
    experiments = set(filter(None, args.experiments.split(",")))
    unknown = experiments - {"table1", "fig2", "table3", "online", "prereg"}
    if unknown:
        raise SystemExit(f"unknown experiments {sorted(unknown)}")
    if "prereg" in experiments and len(experiments) > 1:
        raise SystemExit("--experiments prereg runs alone")
    if args.task == "synthetic":
        task = protocol.synthetic_task(args.out, args.scale, base=args.base,
                                       online_base=args.online_base or "configs/demo.py:online",
                                       num_validation=args.num_validation, num_test=args.num_test,
                                       overrides=overrides, online_overrides=online_overrides)
    else:
        if not (args.judge and args.prompts):  # the base config's final evaluation: its judge, its held-out prompts
            fe = protocol.load_config(args.base).final_eval
            args.judge = args.judge or fe.judge
            args.prompts = args.prompts or fe.prompts
        missing = [f for f in ("model_dir", "prompts", "judge") if not getattr(args, f)]
        if missing:
            raise SystemExit(f"--task config needs --{', --'.join(m.replace('_', '-') for m in missing)}")
        task = protocol.config_task(args.base, args.online_base, args.model_dir, args.prompts, args.judge,
                                    num_validation=args.num_validation, num_test=args.num_test,
                                    max_new_tokens=args.max_new_tokens, batch_size=args.generation_batch,
                                    overrides=overrides, online_overrides=online_overrides)
    points = _ints(args.grid_points)
    points = points[0] if len(points) == 1 else points
    grid = tuple(float(x) for x in args.lrs.split(",")) if args.lrs else protocol.lr_grid(task.base_lr(), points)
    online_grid = protocol.lr_grid(task.base_lr("online"), points) if "online" in experiments else ()
    proto = protocol.Protocol(task, os.path.join(args.out, task.name), seeds=_ints(args.seeds), grid=grid,
                              online_grid=online_grid, selection_seed=args.selection_seed,
                              selection_seeds=_ints(args.selection_seeds), max_extensions=args.max_extensions,
                              report_only=args.report_only)
    if "prereg" in experiments:
        return _prereg(args, proto, argv)
    record = protocol.run_all(proto, table1="table1" in experiments, baselines=_baselines(args.baselines),
                              fig2=_ints(args.fig2) if "fig2" in experiments else (),
                              table3=_ints(args.table3) if "table3" in experiments else (),
                              online="online" in experiments, extra=_methods(args.methods))
    record["argv"] = list(sys.argv[1:] if argv is None else argv)
    record["host"] = common.host_info()
    os.makedirs(proto.out, exist_ok=True)
    with open(os.path.join(proto.out, "protocol.json"), "w") as f:
        json.dump(record, f, indent=1, default=str)
    text = protocol.markdown(record)
    with open(os.path.join(proto.out, "protocol.md"), "w") as f:
        f.write(text)
    print(text, flush=True)
    if args.doc:
        protocol.write_into(args.doc, args.doc_name or task.name, text)
    return record


def _prereg(args, proto, argv) -> dict:
    from mcpo_jax.experiments import preregistered

    if not args.selection_seeds:
        raise SystemExit("--experiments prereg needs --selection-seeds (seeds that are never reported)")
    all_seeds = tuple(proto.selection_seeds) + tuple(proto.seeds) + _ints(args.extra_seeds)

    def save(record):
        record["argv"] = list(sys.argv[1:] if argv is None else argv)
        gates = preregistered.gates_of(args.out, args.scale, all_seeds) if args.task == "synthetic" else None
        text = preregistered.write(record, proto.out, gates=gates, doc=args.doc)
        print(text, flush=True)

    if args.time_one:
        timing = preregistered.time_one(proto)
        print(json.dumps(timing), flush=True)
        return timing
    record = preregistered.run(proto, extra_seeds=_ints(args.extra_seeds), on_progress=save)
    save(record)
    return record


if __name__ == "__main__":
    main()
