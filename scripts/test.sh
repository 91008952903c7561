#!/usr/bin/env bash
# Install if needed, then run the default test suite (excludes @pytest.mark.slow).
#   bash scripts/test.sh            default suite (~10 min on 2 cores)
#   bash scripts/test.sh --slow     the slow tests too
#   extra arguments go to pytest (e.g. -k config)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
marker="not slow"
if [ "${1:-}" = "--slow" ]; then marker=""; shift; fi
exec python -m pytest -q ${marker:+-m "$marker"} "$@"
