#!/usr/bin/env bash
# The per-target tables of docs/performance.md and docs/scaling.md, compiled on this CPU host for GPUs and TPU pods
# without them (pip install -e ".[aot-tpu,aot-gpu]"): the anchor's steps (bench --compile-only --target) and the
# shipped configs (train --compile-only --target). About 20 minutes on a 2-core machine; 1-3 GB of RAM.
#
#   scripts/aot_targets.sh [OUT_DIR]        (default: aot-report/)
#
# Writes OUT_DIR/bench-<model>-<target>.json and OUT_DIR/<config>-<target>.txt, and prints one line per step.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-aot-report}"
mkdir -p "${out}"
python="${PYTHON:-python}"
export JAX_PLATFORMS=cpu

bench() {  # model prompts target [extra bench flags]
  local model="$1" prompts="$2" target="$3"
  shift 3
  local tag
  tag="$(printf '%s' "$*" | tr -c 'a-zA-Z0-9' '_' | sed 's/_*$//')"
  "${python}" -m mcpo_jax.bench --model "${model}" --prompts "${prompts}" --compile-only --target "${target}" \
    --json "${out}/bench-${model}-${prompts}p-${target}${tag:+-${tag}}.json" "$@" | grep -E "^(llama|mistral)" || true
}

config() {  # config target [train flags]
  local cfg="$1" target="$2"
  shift 2
  local name
  name="$(basename "${cfg%%:*}" .py)"
  echo "== ${cfg} on ${target}"
  "${python}" -m mcpo_jax.train --config "${cfg}" --compile-only --target "${target}" "$@" \
    > "${out}/${name}-${target}.txt" 2>&1 || true
  grep -vE "^(WARNING|E0000|I[0-9]{4}|=== Source|learning/)" "${out}/${name}-${target}.txt" | tail -n 12
}

# 1B: 8 prompts x (1 + 5) x (256 + 768) tokens, bf16, remat minimal, shared prompt (the anchor's shapes)
for t in h100 h100x8 tpu-v5e-4 tpu-v5e-8 tpu-v5p-8 tpu-v6e-8; do
  bench llama-1b 8 "${t}" --variants mcpo,dpo
done
# 8B
bench llama-8b 2 h200 --variants mcpo
bench llama-8b 2 h200 --variants mcpo --remat auto
bench llama-8b 2 h200 --variants mcpo --remat auto --memory-budget-gb 90
bench llama-8b 2 h200 --variants mcpo --remat true
bench llama-8b 8 h100x8 --variants mcpo
bench llama-8b 8 tpu-v5p-16 --variants mcpo
bench llama-8b 4 tpu-v4-8 --variants mcpo

# The shipped configs, as they are (the hub model's shapes: Llama-3.1-8B = the llama-8b preset)
llama8b=(--config.model.path= --config.model.preset=llama-8b)
for t in h100x8 tpu-v5p-8 tpu-v6e-8; do
  config configs/nectar.py "${t}" "${llama8b[@]}"
done
for t in h100x8 tpu-v5p-8; do
  config configs/online_ultrafeedback.py "${t}" "${llama8b[@]}"
done
