#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite; extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
    # pytest's "no tests collected": a suite that runs nothing must not pass as green.
    echo "test: no tests were collected; check the arguments and tests/ (pytest exit code 5)" >&2
    exit 1
fi
exit "$status"
