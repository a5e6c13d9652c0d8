#!/usr/bin/env bash
# One command on one GPU: the PyTorch anchor and mcpo_jax.bench side by side, then the comparison table.
#
#   bash scripts/gpu_bench.sh            # from the repository root, on the GPU machine
#
# The PyTorch anchor is scripts/anchor/torch_dpo_anchor.py. With "anchor" left out of
# STAGES the comparison uses scripts/anchor/torch_anchor_h200.json, the anchor's stored H200 numbers, when
# that file is there.
#
# Environment:
#   OUT       where the JSON and logs go (default runs/gpu_bench); the device tool sets it.
#   STAGES    which parts run, in order (default "anchor jax-1b jax-8b"; optional: jax-8b-remat,
#             jax-1b-f32 for a second run).
#   STEPS     timed steps per variant (default 5; the median is reported), WARMUP (default 2).
#   PYTHON    interpreter (default python3).
#   ANCHOR_SCRIPT  the anchor's path (default scripts/anchor/torch_dpo_anchor.py).
#   DRY=1     a CPU rehearsal of this script: tiny model, short sequences, the anchor with TINY=1.
# A bf16 bench row whose compiled program has no cuDNN attention call is reported as an error (attention
# fell back to XLA; the reason is in the log: models.decoder.attention_fallbacks()).
# Budget: about 6 minutes expected, at most 8 (stage timeouts 120 + 220 + 140 s; a stage that
# overruns is cut and the table is printed from what it had written).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_bench}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGES=${STAGES:-anchor jax-1b jax-8b}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-2}
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # JAX must not take 75% of the GPU before torch runs
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/mcpo_jax_compile_cache}  # reruns on a warm machine
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
T0=$(date +%s)
stamp() { echo "[gpu_bench +$(( $(date +%s) - T0 ))s] $*"; }

{ nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw --format=csv || true
  $PY -c "import jax, sys; print('jax', jax.__version__, jax.devices(), 'python', sys.version.split()[0])" || true
} 2>&1 | tee "$OUT/machine.txt"

# The issue's shapes: 256 prompt + 768 completion tokens, L = 5 candidates, M = 1 negative, bf16.
SHAPES="--candidates 5 --negatives 1 --prompt-len 256 --completion-len 768 --dtype bf16 --steps $STEPS --warmup $WARMUP"
M1B=llama-1b; M8B=llama-8b; GEN="--gen-batch 48 --gen-new-tokens 128"
ANCHOR_SCRIPT=${ANCHOR_SCRIPT:-scripts/anchor/torch_dpo_anchor.py}
if [ "${DRY:-0}" = 1 ]; then
  export TINY=1 JAX_PLATFORMS=cpu
  SHAPES="--candidates 5 --negatives 1 --prompt-len 8 --completion-len 24 --dtype f32 --steps 2 --warmup 0"
  M1B=tiny; M8B=tiny; GEN="--gen-batch 4 --gen-new-tokens 4"
fi

for stage in $STAGES; do
  case $stage in
    anchor)
      if [ -f "$ANCHOR_SCRIPT" ]; then
        stamp "PyTorch anchor (llama-1b, llama-8b)"
        OUT="$OUT" timeout -k 10 120 $PY "$ANCHOR_SCRIPT" 2>&1 | tee "$OUT/anchor.log" | grep -v '^{'
        stamp "anchor rc=${PIPESTATUS[0]}"
        if [ ! -s "$OUT/torch_anchor.json" ]; then  # cut short: keep the measurements it printed
          $PY - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/anchor.log") if l.startswith('{"model"')]
peak = [json.loads(l) for l in open(f"{out}/anchor.log") if l.startswith('{"torch_bf16')]
if rows:
    json.dump({"peak": peak[0] if peak else {}, "runs": rows, "partial": True}, open(f"{out}/torch_anchor.json", "w"), indent=1)
    print(f"anchor: kept {len(rows)} measurements from its log")
PYEOF
        fi
      else
        stamp "no $ANCHOR_SCRIPT: anchor skipped"
      fi ;;
    jax-1b)
      # Most wanted first: the JSON is rewritten after each variant, so a cut run keeps what it measured.
      stamp "mcpo_jax.bench llama-1b: 8 prompts, all four variants + sampler"
      # 1B: memory is not binding (37 GB audited), so the policy's prompt encoding is reused too (-1.4 % FLOPs)
      timeout -k 10 220 $PY -m mcpo_jax.bench --model $M1B --prompts 8 $SHAPES --reuse-prompt \
          --variants mcpo,dpo,mcpo_precomputed_ref,dpo_precomputed_ref \
          $GEN --json "$OUT/bench_llama-1b.json" 2>&1 | tee "$OUT/bench_llama-1b.log"
      stamp "jax-1b rc=${PIPESTATUS[0]}" ;;
    jax-8b)
      # The 8B target is MC-PO's: the anchor's work first (the CPU audit compiles it to 112 GB with the
      # bench's default remat=minimal, under the H200's 141), then the precomputed reference (96 GB audited).
      # DPO has no 8B target: left out.
      stamp "mcpo_jax.bench llama-8b: 2 prompts, MC-PO (ref in step, precomputed ref)"
      timeout -k 10 140 $PY -m mcpo_jax.bench --model $M8B --prompts 2 $SHAPES --no-generation \
          --variants mcpo,mcpo_precomputed_ref --json "$OUT/bench_llama-8b.json" 2>&1 | tee "$OUT/bench_llama-8b.log"
      stamp "jax-8b rc=${PIPESTATUS[0]}" ;;
    # Optional stages (not in the default STAGES: they do not fit the first run's budget).
    jax-8b-remat)  # lever 7: the 8B MC-PO step under 90 GB with the reference in the step?
      stamp "mcpo_jax.bench llama-8b, full remat: MC-PO"
      timeout -k 10 150 $PY -m mcpo_jax.bench --model $M8B --prompts 2 $SHAPES --no-generation --remat true \
          --variants mcpo --json "$OUT/bench_llama-8b-remat.json" 2>&1 | tee "$OUT/bench_llama-8b-remat.log"
      stamp "jax-8b-remat rc=${PIPESTATUS[0]}" ;;
    jax-1b-f32)  # the trainer's default storage: float32 weights and AdamW moments, bf16 compute
      stamp "mcpo_jax.bench llama-1b, float32 weights: MC-PO and DPO"
      timeout -k 10 150 $PY -m mcpo_jax.bench --model $M1B --prompts 8 $SHAPES --no-generation --param-dtype f32 \
          --variants mcpo,dpo --json "$OUT/bench_llama-1b-f32.json" 2>&1 | tee "$OUT/bench_llama-1b-f32.log"
      stamp "jax-1b-f32 rc=${PIPESTATUS[0]}" ;;
    *) stamp "unknown stage $stage (known: anchor jax-1b jax-8b jax-8b-remat jax-1b-f32)" ;;
  esac
done

ANCHOR_JSON="$OUT/torch_anchor.json"
if [ ! -s "$ANCHOR_JSON" ]; then
  ANCHOR_JSON=scripts/anchor/torch_anchor_h200.json
  [ -s "$ANCHOR_JSON" ] && stamp "using the stored anchor numbers $ANCHOR_JSON (not measured in this run)"
fi
BENCHES=()
for f in "$OUT"/bench_llama-1b.json "$OUT"/bench_llama-1b-f32.json "$OUT"/bench_llama-8b.json \
         "$OUT"/bench_llama-8b-remat.json; do [ -s "$f" ] && BENCHES+=("$f"); done
echo
stamp "side by side (same GPU, same FLOP accounting; speedup = torch s / jax s)"
if [ -s "$ANCHOR_JSON" ] && [ ${#BENCHES[@]} -gt 0 ]; then
  $PY -m mcpo_jax.bench --compare "$ANCHOR_JSON" "${BENCHES[@]}" | tee "$OUT/comparison.txt"
elif [ ${#BENCHES[@]} -gt 0 ]; then
  echo "(no anchor JSON: JAX numbers only)"; for f in "${BENCHES[@]}"; do tail -n 20 "${f%.json}.log"; done
else
  echo "no bench JSON was written: see $OUT/*.log"
fi
stamp "done; files in $OUT"
