#!/usr/bin/env bash
# Create (once) and reuse the pinned virtual environment for ringpar.
#
# The environment lives outside the checkout, keyed by a hash of ci/requirements.lock and the
# Python version, so a fresh clone on the same machine reuses it in seconds; a changed lock
# builds a new one. Prints the venv path on the last line of stdout.
#
# Env: RINGPAR_VENV (override the venv path), RINGPAR_PYTHON (interpreter, default python3).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
lock="$here/requirements.lock"
py="${RINGPAR_PYTHON:-python3}"
pyver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
key="$( (cat "$lock"; echo "$pyver") | sha256sum | cut -c1-16)"
venv="${RINGPAR_VENV:-$HOME/.cache/ringpar/venv-$key}"
marker="$venv/.ringpar-ready"

# The venv's bytecode is compiled once at build: with PYTHONDONTWRITEBYTECODE set (as on the CI
# machine) Python would otherwise recompile torch, torch_xla, JAX and transformers from source in
# every process (measured: their import took 15-17 s without .pyc files, 8-9 s with them).
compile_bytecode() {
  echo "ringpar: compiling the environment's bytecode" >&2
  "$venv/bin/python" -m compileall -q -j 0 "$venv/lib" >/dev/null 2>&1 || true
  echo "$key bytecode" > "$marker"
}

if [ -f "$marker" ] && [ "$(cat "$marker")" = "$key bytecode" ]; then
  echo "ringpar: reusing environment $venv" >&2
elif [ -f "$marker" ] && [ "$(cat "$marker")" = "$key" ]; then
  compile_bytecode  # built by an earlier setup.sh, before bytecode was compiled
else
  echo "ringpar: building environment $venv (first time on this machine: a few minutes, ~7 GB)" >&2
  start=$(date +%s)
  if command -v uv >/dev/null 2>&1; then
    uv=(uv)
  else
    "$py" -m pip install --quiet --disable-pip-version-check uv >&2
    uv=("$py" -m uv)
  fi
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  "${uv[@]}" venv --quiet --python "$py" "$venv" >&2
  "${uv[@]}" pip sync --quiet --python "$venv/bin/python" "$lock" >&2
  compile_bytecode
  echo "ringpar: environment ready in $(( $(date +%s) - start )) s" >&2
fi
echo "$venv"
