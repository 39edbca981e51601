#!/usr/bin/env bash
# Set up (or reuse) the pinned environment and run the test suite on 8 virtual CPU devices.
# Extra arguments go to pytest, e.g. `bash ci/test.sh -m jax` or `bash ci/test.sh tests/torch`.
# Tests run in RINGPAR_TEST_WORKERS pytest-xdist processes (default 2, one per core of the CI
# machine; 0 = in this process), whole files per worker so module-scoped compiles are shared.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/ci/setup.sh" | tail -n 1)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
workers="${RINGPAR_TEST_WORKERS:-2}"
parallel=()
if [ "$workers" != "0" ]; then
  parallel=(-n "$workers" --dist loadfile)
fi
exec "$venv/bin/python" -m pytest -p no:cacheprovider -ra --durations=20 "${parallel[@]}" "$@"
