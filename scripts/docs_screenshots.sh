#!/usr/bin/env bash
# Refresh the Dagster screenshots in docs/ (docs/orchestration.md shows them): run the webserver tests, which drive
# the real `dagster dev` with a headless Chromium and save PNGs to $NANOCHAT_TEST_ARTIFACTS (never into the
# repository), then copy those PNGs here as 256-colour PNGs (UI screenshots lose nothing visible; < 300 KB each).
#
#   bash scripts/docs_screenshots.sh        (a few minutes on 2 cores; PYTHON picks the interpreter)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-.venv/bin/python}
shots=$(mktemp -d)
trap 'rm -rf "$shots"' EXIT
NANOCHAT_TEST_ARTIFACTS=$shots "$python" -m pytest -q -p no:cacheprovider tests/test_webserver.py -k share_one_state
"$python" - "$shots" <<'PY'
import sys
from pathlib import Path
from PIL import Image

shots = Path(sys.argv[1])
for src, dest in (("dagster_lineage_after_run.png", "dagster_asset_graph.png"),
                  ("dagster_loss_plot.png", "dagster_loss_plot.png"),
                  ("dagster_eval_tables.png", "dagster_eval_tables.png")):
    out = Path("docs") / dest
    Image.open(shots / src).convert("RGB").quantize(256).save(out, optimize=True)
    print(f"{out}: {out.stat().st_size // 1024} KB")
PY
