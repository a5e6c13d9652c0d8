#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (v5e / v5p / v6e, single- or multi-host) with `gcloud compute tpus tpu-vm`.
#
#   launch/tpu_pod.sh up --name mcpo-8b --zone us-east5-b --accelerator-type v6e-16 \
#       --config configs/nectar.py --workdir gs://my-bucket/mcpo/nectar-8b -- --config.mesh.fsdp=-1
#   launch/tpu_pod.sh logs --name mcpo-8b --zone us-east5-b          # follow worker 0's log
#   launch/tpu_pod.sh teardown --name mcpo-8b --zone us-east5-b      # delete the slice (stops billing)
#
# Commands (run in this order by `up`):
#   check     here, before anything is paid for: compile the run's programs for the slice without it
#             (`python -m mcpo_jax.train ... --compile-only --target tpu-TYPE`, needs `pip install -e '.[aot-tpu]'`
#             in this checkout's python, $MCPO_LOCAL_PYTHON or python3); a run that would not fit the chips stops
#             here in seconds, not after the slice boots. `up` and `train` run it first; --skip-check skips it.
#   create    create the slice, or reuse it when one with that name already exists (must be READY)
#   push      copy this checkout (tracked + untracked-not-ignored files) to every worker, or with
#             --git URL clone/fetch --ref on every worker instead
#   setup     python venv at ~/mcpo-venv and `pip install -e '.[tpu]' gcsfs` on every worker (gcsfs: the
#             gs:// backend of etils.epath, which orbax uses for checkpoint metadata)
#   train     run `python -m mcpo_jax.train --config CONFIG --workdir WORKDIR [args after --]` on every
#             worker at once (--worker=all); in the background with --detach (log: ~/mcpo-train.log)
# and also: up (all four), logs [--worker N], stop (kill a --detach run), status, ssh, teardown.
#
# Every worker runs the same program; JAX's multi-controller runtime makes them one job. The script
# passes MCPO_COORDINATOR (worker 0's internal IP), MCPO_NUM_PROCESSES (the number of workers) and
# MCPO_PROCESS_ID (the worker's number, from the GCE metadata server) so that
# `mcpo_jax.sharding.initialize_distributed` starts `jax.distributed` the same way on every slice.
# Checkpoints, metrics and the HF export go to WORKDIR, which must be a gs:// path on a multi-host
# slice (each worker has its own disk; orbax and grain read and write gs:// directly). The workers'
# service account needs write access to the bucket (`--scopes` below keeps the default full scope).
#
# Flags (each also read from the environment variable in brackets):
#   --name NAME               TPU name                                [TPU_NAME, default mcpo-$USER]
#   --zone ZONE               e.g. us-east5-b (v6e), us-east5-a (v5p), us-west4-a (v5e)   [TPU_ZONE]
#   --project PROJECT         GCP project (default: gcloud config)     [TPU_PROJECT]
#   --accelerator-type TYPE   v5litepod-16, v5p-32, v6e-16, ...        [TPU_TYPE, default v6e-8]
#   --version VERSION         TPU software version; default from the type:
#                             v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5,
#                             v5litepod -> v2-alpha-tpuv5-lite, older -> tpu-ubuntu2204-base   [TPU_VERSION]
#   --spot                    create a Spot slice (cheaper, can be preempted; resume from WORKDIR)
#   --config PATH[:ARG]       trainer config                          [MCPO_CONFIG, default configs/nectar.py]
#   --workdir gs://...        run directory                           [MCPO_WORKDIR]
#   --git URL / --ref REF     push by git instead of copying this checkout    [MCPO_GIT, MCPO_REF=main]
#   --port PORT               jax.distributed coordinator port         [MCPO_PORT, default 8476]
#   --worker N                worker for `logs` / `ssh`                 [default 0]
#   --detach                  `train` returns at once; the run survives the SSH session
#   --skip-check              do not compile for the slice before `up` / `train`   [MCPO_SKIP_CHECK=1]
#   --dry-run                 print the gcloud commands (and the check) instead of running them
# Everything after `--` is passed to `python -m mcpo_jax.train` (e.g. --config.mesh.fsdp=-1).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

cmd="${1:-}"
[[ -n "${cmd}" ]] || { usage; exit 2; }
shift

name="${TPU_NAME:-mcpo-${USER:-user}}"
zone="${TPU_ZONE:-}"
project="${TPU_PROJECT:-}"
accel="${TPU_TYPE:-v6e-8}"
version="${TPU_VERSION:-}"
config="${MCPO_CONFIG:-configs/nectar.py}"
workdir="${MCPO_WORKDIR:-}"
git_url="${MCPO_GIT:-}"
git_ref="${MCPO_REF:-main}"
port="${MCPO_PORT:-8476}"
worker=0
spot=0
detach=0
dry_run=0
skip_check="${MCPO_SKIP_CHECK:-0}"
train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --accelerator-type) accel="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --git) git_url="$2"; shift 2 ;;
    --ref) git_ref="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --worker) worker="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --detach) detach=1; shift ;;
    --skip-check) skip_check=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    *) die "unknown flag $1 (see --help)" ;;
  esac
done

if [[ -z "${version}" ]]; then
  case "${accel}" in
    v6e-*) version=v2-alpha-tpuv6e ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi

gflags=()
[[ -n "${zone}" ]] && gflags+=(--zone="${zone}")
[[ -n "${project}" ]] && gflags+=(--project="${project}")

# Run (or, with --dry-run, print) a command.
run() {
  if [[ "${dry_run}" == 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}
tpu() { run gcloud compute tpus tpu-vm "$@"; }
on_all() { tpu ssh "${name}" "${gflags[@]}" --worker=all --command="$1"; }

exists() {
  [[ "${dry_run}" == 1 ]] && return 1
  gcloud compute tpus tpu-vm describe "${name}" "${gflags[@]}" --format='value(state)' >/dev/null 2>&1
}

# "IP COUNT": worker 0's internal IP and the number of workers (hosts) in the slice.
endpoints() {
  if [[ "${dry_run}" == 1 ]]; then echo "WORKER0_IP NUM_WORKERS"; return; fi
  gcloud compute tpus tpu-vm describe "${name}" "${gflags[@]}" --format=json \
    | python3 -c 'import json, sys; e = json.load(sys.stdin)["networkEndpoints"]; print(e[0]["ipAddress"], len(e))'
}

# The run's programs compiled here for the slice (v5litepod-16 -> target tpu-v5litepod-16, i.e. tpu-v5e-16):
# exit 2 with "does not fit on ... by X GB" before a slice is created or a run started.
do_check() {
  [[ "${skip_check}" == 1 ]] && { echo "tpu_pod.sh: --skip-check: not compiling for tpu-${accel} first"; return; }
  local python="${MCPO_LOCAL_PYTHON:-python3}"
  local repo
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if [[ "${dry_run}" == 1 ]]; then
    printf '+'; printf ' %q' "${python}" -m mcpo_jax.train --config "${config}" "${train_args[@]}" --compile-only \
      --target "tpu-${accel}"; printf '\n'
    return
  fi
  echo "tpu_pod.sh: compiling the run for tpu-${accel} here first (--skip-check to skip)"
  (cd "${repo}" && JAX_PLATFORMS=cpu "${python}" -m mcpo_jax.train --config "${config}" "${train_args[@]}" \
    --compile-only --target "tpu-${accel}") \
    || die "the run does not compile or fit on ${accel} (above); nothing was created or started"
}

do_create() {
  if exists; then
    local state
    state="$(gcloud compute tpus tpu-vm describe "${name}" "${gflags[@]}" --format='value(state)')"
    [[ "${state}" == READY ]] || die "TPU ${name} exists but is ${state}, not READY (teardown and create again)"
    echo "tpu_pod.sh: reusing TPU ${name} (${state})"
    return
  fi
  local extra=()
  [[ "${spot}" == 1 ]] && extra+=(--spot)
  tpu create "${name}" "${gflags[@]}" --accelerator-type="${accel}" --version="${version}" \
    --scopes=https://www.googleapis.com/auth/cloud-platform "${extra[@]}"
}

do_push() {
  if [[ -n "${git_url}" ]]; then
    on_all "set -e; if [ -d ~/mcpo-jax/.git ]; then git -C ~/mcpo-jax fetch --quiet origin; \
else git clone --quiet $(printf '%q' "${git_url}") ~/mcpo-jax; fi; \
git -C ~/mcpo-jax checkout --quiet --detach $(printf '%q' "origin/${git_ref}") 2>/dev/null \
|| git -C ~/mcpo-jax checkout --quiet --detach $(printf '%q' "${git_ref}")"
    return
  fi
  local repo tarball
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  tarball="$(mktemp -t mcpo-jax.XXXXXX).tgz"
  # shellcheck disable=SC2064  # expand now: the path is fixed
  trap "rm -f '${tarball}'" EXIT
  # Tracked and untracked-but-not-ignored files (no .git, .venv, caches); files deleted in the
  # working tree are skipped.
  (cd "${repo}" && git ls-files -z --cached --others --exclude-standard | python3 -c '
import os, sys, tarfile
with tarfile.open(sys.argv[1], "w:gz") as tar:
    for path in sorted(set(sys.stdin.buffer.read().decode().split("\0")) - {""}):
        if os.path.isfile(path):
            tar.add(path)
' "${tarball}")
  tpu scp "${tarball}" "${name}:~/mcpo-jax.tgz" "${gflags[@]}" --worker=all
  on_all "set -e; rm -rf ~/mcpo-jax && mkdir -p ~/mcpo-jax && tar xzf ~/mcpo-jax.tgz -C ~/mcpo-jax && rm ~/mcpo-jax.tgz"
}

do_setup() {
  on_all "set -e; (python3 -m venv ~/mcpo-venv || (sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv \
&& python3 -m venv ~/mcpo-venv)) >/dev/null; ~/mcpo-venv/bin/pip install -q --upgrade pip; \
~/mcpo-venv/bin/pip install -q -e ~/mcpo-jax'[tpu]' gcsfs; \
~/mcpo-venv/bin/python -c 'import jax, mcpo_jax; print(\"jax\", jax.__version__)'"
}

do_train() {
  [[ -n "${workdir}" ]] || die "--workdir is required (a gs:// path on a multi-host slice)"
  local ip count
  read -r ip count < <(endpoints)
  if [[ "${count}" != 1 && "${count}" != NUM_WORKERS && "${workdir}" != gs://* ]]; then
    die "the slice has ${count} workers: --workdir must be a gs:// path all of them can reach, not ${workdir}"
  fi
  local args
  args="$(printf ' %q' --config "${config}" --workdir "${workdir}" "${train_args[@]}")"
  # Expanded on each worker: its number in the slice, from the GCE metadata server.
  # shellcheck disable=SC2016
  local worker_id='$(curl -s -H "Metadata-Flavor: Google" http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)'
  local env="MCPO_COORDINATOR=${ip}:${port} MCPO_NUM_PROCESSES=${count} MCPO_PROCESS_ID=${worker_id}"
  # shellcheck disable=SC2088  # the ~ is expanded on the worker
  local program="~/mcpo-venv/bin/python -u -m mcpo_jax.train${args}"
  if [[ "${detach}" == 1 ]]; then
    # setsid: the run gets its own process group (killed as a whole by `stop`) and survives the SSH session.
    on_all "cd ~/mcpo-jax && (${env} setsid nohup ${program} > ~/mcpo-train.log 2>&1 < /dev/null & \
echo \$! > ~/mcpo-train.pid) && echo \"worker \$(hostname): pid \$(cat ~/mcpo-train.pid), log ~/mcpo-train.log\""
  else
    on_all "cd ~/mcpo-jax && ${env} ${program} 2>&1 | tee ~/mcpo-train.log; exit \${PIPESTATUS[0]}"
  fi
}

case "${cmd}" in
  create) do_create ;;
  push) do_push ;;
  setup) do_setup ;;
  check) do_check ;;
  train) do_check; do_train ;;
  up) do_check; do_create; do_push; do_setup; do_train ;;
  logs) tpu ssh "${name}" "${gflags[@]}" --worker="${worker}" --command="tail -n 200 -f ~/mcpo-train.log" ;;
  stop) on_all "if [ -f ~/mcpo-train.pid ]; then kill -- -\$(cat ~/mcpo-train.pid) 2>/dev/null; rm -f ~/mcpo-train.pid; fi; true" ;;
  status) tpu describe "${name}" "${gflags[@]}" ;;
  ssh) tpu ssh "${name}" "${gflags[@]}" --worker="${worker}" ;;
  teardown) tpu delete "${name}" "${gflags[@]}" --quiet ;;
  -h|--help|help) usage ;;
  *) die "unknown command ${cmd} (check|create|push|setup|train|up|logs|stop|status|ssh|teardown)" ;;
esac
