"""Cost: wall time per optimiser step of each method, read from the same runs as the other tables.

The step of this trainer computes the no-gradient log-probs of all C = 1 + L sequences for every sampler
(the kernel needs them; the random sampler does not, but shares the step), then the gradient through y0 and
the M selected rows. So "DPO" here costs what MC-PO costs. The paper's +30% compares MC-PO with TRL's DPO,
which only ever sees the pair; "DPO (pairs, C = 2)" is that protocol: the random negative drawn once when the
data is built (`@pairs` data), only two sequences per prompt in the step. Medians over the steps of a run
(first step left out), then mean ± std over seeds; the ratio is per seed against that seed's DPO (pairs) run.
Times on a shared CPU are noisy: read the ratios, not the absolute numbers.

    python -m mcpo_jax.experiments.cost [--scale small|gpu] [--seeds 0,1,2] [--out DIR]
    python -m mcpo_jax.experiments.cost --controlled [--scale small] [--rounds 20]   # interleaved timing
"""

from mcpo_jax.experiments import common, table1_baselines, table3_negatives

PAIRS = "DPO (pairs, C = 2)"


def cells(scale: str):
    out = [common.po_cell(PAIRS, "offline", "dpo", "fixed", L=1, data__source="@pairs", data__format="pairs")]
    out += table1_baselines.cells(scale)
    out += [c for c in table3_negatives.cells(scale) if c.col != "M = 1"]
    return out


def tables(cells, results):
    rows, values = [], {}
    base = {r["seed"]: r["step_time_median"] for r in results.get((PAIRS, "offline"), [])}
    cols = ("ms / step", f"ratio to {PAIRS}", "tokens / step", "train + export wall (s)")
    for c in cells:
        row = c.row if c.col in ("offline", "noise injected") else f"{c.row} ({c.col})"
        if row in rows:
            continue
        rows.append(row)
        rs = results.get((c.row, c.col), [])
        values[(row, cols[0])] = [1000.0 * r["step_time_median"] for r in rs]
        values[(row, cols[1])] = [r["step_time_median"] / base[r["seed"]] for r in rs if r["seed"] in base]
        values[(row, cols[2])] = [r["tokens_per_step"] for r in rs]
        values[(row, cols[3])] = [r["train_seconds"] for r in rs]
    return [common.Table("Cost per optimiser step (median over steps; mean ± std over seeds)", rows, list(cols),
                         values, metric="step_time_median", scale=1.0, digits=2)]


CONTROLLED = (  # (label, objective, sampler, columns C, negatives M)
    (PAIRS, "dpo", "fixed", 2, 1),
    ("DPO (random of C = 6)", "dpo", "random", 6, 1),
    ("MC-PO (C = 6, M = 1)", "mcpo", "mc", 6, 1),
    ("MC-PO (C = 6, M = 3)", "mcpo", "mc", 6, 3),
)


def controlled_timing(scale: str = "small", *, rounds: int = 20, steps_per_round: int = 5, seed: int = 0) -> dict:
    """Step times of the trainer's jitted step for each variant in one process, interleaved: round after round,
    `steps_per_round` steps of each variant in turn, so that a change of machine load hits every variant alike
    (the per-run medians above come from runs minutes apart on a shared machine). Same model, batch size and
    sequence length as the runs; random weights and tokens; reference log-probs precomputed, as in the runs."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from mcpo_jax import bench, models, sharding
    from mcpo_jax import batch as batch_lib
    from mcpo_jax.data.synthetic import TOKEN_LIMITS
    from mcpo_jax.training import program as program_lib
    from mcpo_jax.training import refcache
    from mcpo_jax.training import state as state_lib
    from mcpo_jax.training import step as step_lib

    s = common.SCALES[scale]
    config = models.preset_config("tiny", **s["model"])
    mesh = sharding.make_mesh(1, -1, 1)
    model = models.init_random(config, seed=seed, mesh=mesh)
    graphdef, params, rest = state_lib.split_model(model)
    tx, schedule = step_lib.make_optimizer(learning_rate=1e-7, total_steps=10**6, warmup_ratio=0.0, decay="constant")
    prompt_len = TOKEN_LIMITS["max_prompt_length"]
    np_batch = bench.make_batch(prompts=int(s["batch"]), candidates=5, prompt_len=prompt_len,
                                completion_len=TOKEN_LIMITS["max_length"] - prompt_len,
                                vocab_size=config.vocab_size, seed=seed)
    logps_fn = refcache.make_logps_fn(graphdef, rest, mesh, 128)
    np_batch["ref_logps"] = np.asarray(logps_fn(params, np_batch["input_ids"], np_batch["attention_mask"],
                                                np_batch["loss_mask"]))
    states, steps = {}, {}
    for label, objective, sampler, c, m in CONTROLLED:
        host = bench.pair_batch(np_batch) if c == 2 else dict(np_batch)
        batch = sharding.global_batch({k: v[None] for k, v in batch_lib.step_arrays(host).items()}, mesh,
                                      batch_axis=1)
        cfg = step_lib.StepConfig(objective=objective, sampler=sampler, num_negatives=m, beta=common.BETA,
                                  reference="precomputed")
        program = program_lib.TrainProgram(model, cfg, tx, schedule, mesh=mesh)
        st = program.init_state(jax.tree.map(jnp.copy, params), seed)
        compiled = program.compiled(batch)
        for _ in range(3):  # warm-up
            st, _ = jax.block_until_ready(compiled(st, None, batch))
        states[label], steps[label] = st, (compiled, batch)
    times: dict[str, list[float]] = {label: [] for label, *_ in CONTROLLED}
    for _ in range(rounds):
        for label, *_ in CONTROLLED:
            compiled, batch = steps[label]
            for _ in range(steps_per_round):
                t0 = time.perf_counter()
                states[label], _ = jax.block_until_ready(compiled(states[label], None, batch))
                times[label].append(time.perf_counter() - t0)
    base = float(np.median(times[PAIRS]))
    return {"scale": scale, "rounds": rounds, "steps_per_round": steps_per_round, "batch": int(s["batch"]),
            "seq": TOKEN_LIMITS["max_length"], "host": common.host_info(),
            "variants": [{"label": label, "median_ms": 1000 * float(np.median(times[label])),
                          "p25_ms": 1000 * float(np.percentile(times[label], 25)),
                          "p75_ms": 1000 * float(np.percentile(times[label], 75)),
                          "ratio_to_pairs": float(np.median(times[label])) / base, "steps": len(times[label])}
                         for label, *_ in CONTROLLED]}


def controlled_markdown(rec: dict) -> str:
    lines = ["| step variant | median ms / step | IQR (ms) | ratio to " + PAIRS + " |", "|---|---|---|---|"]
    for v in rec["variants"]:
        lines.append(f"| {v['label']} | {v['median_ms']:.1f} | {v['p25_ms']:.1f}–{v['p75_ms']:.1f} | "
                     f"{v['ratio_to_pairs']:.2f} |")
    return "\n".join(lines)


def _controlled_main(argv):
    import argparse
    import json
    import os

    p = argparse.ArgumentParser(prog="python -m mcpo_jax.experiments.cost --controlled")
    p.add_argument("--controlled", action="store_true")
    p.add_argument("--scale", default="small", choices=sorted(common.SCALES))
    p.add_argument("--out", default=common.DEFAULT_OUT)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seeds", default="0")
    args = p.parse_args(argv)
    rec = controlled_timing(args.scale, rounds=args.rounds, seed=common.parse_seeds(args.seeds)[0])
    path = os.path.join(os.path.abspath(args.out), args.scale, "cost", "controlled.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)
    print(controlled_markdown(rec))


EXPERIMENT = common.Experiment(
    name="cost",
    title="Cost: wall time per step",
    cells=cells, tables=tables, description=__doc__.split("\n\n")[0])

if __name__ == "__main__":
    import sys

    if "--controlled" in sys.argv[1:]:
        _controlled_main(sys.argv[1:])
    else:
        common.main(EXPERIMENT)
