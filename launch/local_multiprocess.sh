#!/usr/bin/env bash
# N JAX processes x D CPU devices on this machine, as one multi-host job (development and tests).
#
#   launch/local_multiprocess.sh -n 2 -d 2 -- python -m mcpo_jax.train --config configs/demo.py --workdir /tmp/mp
#
# A thin wrapper: launch/local_multiprocess.py does the work (see its --help). Uses $PYTHON, else
# the repository's .venv, else python3.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [[ -z "${python}" ]]; then
  if [[ -x "${here}/../.venv/bin/python" ]]; then python="${here}/../.venv/bin/python"; else python=python3; fi
fi
exec "${python}" "${here}/local_multiprocess.py" "$@"
