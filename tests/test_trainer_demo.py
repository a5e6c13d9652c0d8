"""`python -m mcpo_jax.train --config configs/demo.py:smoke` end to end: SFT warm start, MC-PO, oracle win
rate, and a Hugging Face export that transformers loads with the same logits."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_smoke_end_to_end(tmp_path):
    workdir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "mcpo_jax.train", "--config", "configs/demo.py:smoke",
                           "--workdir", str(workdir)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "oracle win rate of the trained policy vs" in proc.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "completed"
    fe = summary["final_eval"]
    assert fe["num_prompts"] == 32 and fe["n_cand"] + fe["n_base"] + fe["n_tie"] + fe["n_invalid"] == 32
    assert fe["judge"] == "oracle:sorting" and fe["prompts"] == "task:sorting"
    assert f"({fe['n_cand']} wins / {fe['n_tie']} ties / {fe['n_base']} losses on 32 held-out" in proc.stdout
    assert 0.0 <= fe["win_rate"] <= 1.0
    sft = json.loads((workdir / "sft" / "summary.json").read_text())
    assert sft["status"] == "completed" and sft["final_metrics"]["loss"] < 4.0  # char-level NLL fell from ~4.8

    torch = pytest.importorskip("torch")
    import transformers

    from mcpo_jax import models

    hf = str(workdir / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    ids = tok.apply_chat_template([{"role": "user", "content": "sort 3141"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    pt = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad():
        want = pt(torch.tensor([ids])).logits.numpy()
    ours = models.from_pretrained(hf)
    got = np.asarray(ours(np.asarray([ids], np.int32)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
