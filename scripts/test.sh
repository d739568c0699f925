#!/usr/bin/env bash
# Set up and run the whole test suite (the README's test command; .ci/run calls it too).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/system-deps.sh
export NANOCHAT_SHARED_DATA=${NANOCHAT_SHARED_DATA:-$(cd .. && pwd)/shared/data}
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a failure here, never a pass.
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
