#!/usr/bin/env bash
# Set up the environment, lint, and run the whole test suite. Extra arguments go to pytest.
# Two pytest-xdist workers, a test file each at a time: the queue's fault tests spend most of their time waiting
# (a 90 s outage, a frozen worker), so the other files run beside them (FERVID_TEST_WORKERS=0: one process).
# Files start in the order tests/conftest.py gives them (the longest first), not re-sorted by their number of tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
VENV=${FERVID_VENV:-.venv}
"$VENV/bin/ruff" check .
exec "$VENV/bin/python" -m pytest -n "${FERVID_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
