#!/usr/bin/env bash
# Set up (or reuse) the pinned environment and run the test suite on 8 virtual CPU devices.
# Extra arguments go to pytest, e.g. `bash ci/test.sh -m jax` or `bash ci/test.sh tests/torch`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/ci/setup.sh" | tail -n 1)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
exec "$venv/bin/python" -m pytest -p no:cacheprovider -ra --durations=15 "$@"
