#!/usr/bin/env bash
# Set up (or reuse) the pinned environment and run the main job, `python -m parity`, on 8 virtual
# CPU devices. Extra arguments go to the parity CLI, e.g. `bash ci/parity.sh -k tpdense --json r.json`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/ci/setup.sh" | tail -n 1)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$venv/bin/python" -m parity "$@"
