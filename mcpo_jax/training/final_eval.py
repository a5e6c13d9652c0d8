"""End-of-run evaluation for the synthetic demo: oracle win rate of the trained policy vs its start.

Greedy completions of held-out prompts (`data.synthetic.prompts`) from the trained policy and from the
baseline (the checkpoint training started from, i.e. the SFT model of the warm start), judged pairwise by
the synthetic oracle; win rate = (wins + ties / 2) / n, the paper's adjusted win rate (Sec. 5.1).
"""

from __future__ import annotations

import logging

import numpy as np

from mcpo_jax import models

log = logging.getLogger("mcpo_jax.train")


def _encode_prompts(tokenizer, prompts):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id or 0
    arr = np.full((len(ids), width), pad, np.int32)
    mask = np.zeros((len(ids), width), np.int32)
    for i, x in enumerate(ids):
        arr[i, : len(x)] = x
        mask[i, : len(x)] = 1
    return arr, mask


def greedy_completions(model, tokenizer, prompts, *, max_new_tokens: int, batch_size: int = 64) -> list[str]:
    from mcpo_jax.online import generate

    out = []
    eos = tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)  # one compiled shape for every chunk
        ids, mask = _encode_prompts(tokenizer, chunk)
        tokens = np.asarray(generate(model, ids, mask, max_new_tokens=max_new_tokens, temperature=0.0, eos_id=eos))
        for row in tokens[:real]:
            row = list(row)
            if eos in row:
                row = row[: row.index(eos)]
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


def synthetic_win_rate(policy, baseline, tokenizer, *, num_prompts: int, seed: int, max_new_tokens: int):
    from mcpo_jax.data import synthetic

    prompts = synthetic.prompts(num_prompts, seed)
    ours = greedy_completions(policy, tokenizer, prompts, max_new_tokens=max_new_tokens)
    base = greedy_completions(baseline, tokenizer, prompts, max_new_tokens=max_new_tokens)
    judge = synthetic.OracleJudge()
    verdicts = [judge.compare(p, a, b) for p, a, b in zip(prompts, ours, base)]
    wins, losses_, ties = verdicts.count("A"), verdicts.count("B"), verdicts.count("tie")
    score = lambda outs: float(np.mean([synthetic.oracle_score(p, o) for p, o in zip(prompts, outs)]))
    exact = lambda outs: float(np.mean([o == synthetic.answer(p) for p, o in zip(prompts, outs)]))
    return {
        "num_prompts": len(prompts),
        "win_rate": (wins + 0.5 * ties) / max(len(prompts), 1),
        "wins": wins, "losses": losses_, "ties": ties,
        "policy_oracle_score": score(ours), "baseline_oracle_score": score(base),
        "policy_exact": exact(ours), "baseline_exact": exact(base),
        "examples": [{"prompt": p, "policy": a, "baseline": b} for p, a, b in list(zip(prompts, ours, base))[:5]],
    }


def run(config, policy, tokenizer, mesh, rules) -> dict:
    fe = config.final_eval
    kind = fe.get("kind", "synthetic_win_rate")
    if kind != "synthetic_win_rate":
        raise ValueError(f"final_eval.kind={kind!r} is unknown (known: synthetic_win_rate)")
    baseline_path = fe.get("baseline_path") or config.model.path
    baseline = models.from_pretrained(baseline_path)
    result = synthetic_win_rate(policy, baseline, tokenizer, num_prompts=int(fe.get("num_prompts", 200)),
                                seed=int(fe.get("seed", 0)), max_new_tokens=int(fe.get("max_new_tokens", 8)))
    result["baseline"] = baseline_path
    msg = (f"oracle win rate of the trained policy vs {baseline_path}: {100 * result['win_rate']:.1f}% "
           f"({result['wins']} wins / {result['ties']} ties / {result['losses']} losses on "
           f"{result['num_prompts']} held-out prompts, greedy); exact answers {100 * result['policy_exact']:.1f}% "
           f"vs {100 * result['baseline_exact']:.1f}%, mean oracle score {result['policy_oracle_score']:.3f} vs "
           f"{result['baseline_oracle_score']:.3f}")
    log.info(msg)
    print(msg, flush=True)
    return result
