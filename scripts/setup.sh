#!/usr/bin/env bash
# Create (or refresh) the virtual environment with fervid and its dependencies.
#   FERVID_VENV  where the environment lives (default: .venv in the checkout)
# The full install is redone only when pyproject.toml changes; otherwise only fervid itself is re-linked,
# so a cached environment can serve any checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FERVID_VENV:-.venv}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "setup: Python 3.11+ needed ($PY)" >&2; exit 1; }

stamp=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.fervid-deps" 2>/dev/null)" != "$stamp" ]; then
  echo "setup: installing dependencies into $VENV (first time: a few minutes)" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[dev]'
  echo "$stamp" > "$VENV/.fervid-deps"
else
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
fi
