#!/usr/bin/env bash
# The Dagster UI (webserver + daemon) on the pipeline's own state: NANOCHAT_HOME, default .nanochat-dagster/ in the
# repository. Runs launched from it write the artifacts, workspace and eval history that scripts/pipeline.sh,
# `nanochat-evals` and `python -m app` use (store/home.py derives every path from that one root), and its
# DAGSTER_HOME (runs, event log) is $NANOCHAT_HOME/home, created with a dagster.yaml on first use.
#
#   scripts/ui.sh            http://127.0.0.1:3000 (listens on loopback only)
#   scripts/ui.sh 3001       another port (or NANOCHAT_UI_PORT)
#
# NANOCHAT_ARTIFACTS / NANOCHAT_WORKSPACE / NANOCHAT_DUCKDB / DAGSTER_HOME still override one path each, as in
# pipeline.sh; PYTHON picks the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-.venv/bin/python}
port=${1:-${NANOCHAT_UI_PORT:-3000}}
eval "$("$python" -m store.home)"  # exports NANOCHAT_HOME and DAGSTER_HOME (creating it if needed)
echo "Dagster UI on $NANOCHAT_HOME: http://127.0.0.1:$port" >&2
exec "$python" -m dagster dev -m orchestration.definitions -h 127.0.0.1 -p "$port"
