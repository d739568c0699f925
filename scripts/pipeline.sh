#!/usr/bin/env bash
# The README's main command: the whole tiny pipeline as Dagster assets (raw_shards -> tokenizer -> base checkpoint
# -> base_eval -> mid -> SFT checkpoints -> chat_eval -> promoted_model -> report, with their checks), materialized
# from the command line on CPU against the local artifact store and a local DuckDB eval history (no server needed).
# Everything lands in .nanochat-dagster/ (override with the variables below); open the UI afterwards to see it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh

state=$PWD/.nanochat-dagster
export DAGSTER_HOME=${DAGSTER_HOME:-$state/home}
export NANOCHAT_ARTIFACTS=${NANOCHAT_ARTIFACTS:-$state/artifacts}
export NANOCHAT_WORKSPACE=${NANOCHAT_WORKSPACE:-$state/work}
export NANOCHAT_DUCKDB=${NANOCHAT_DUCKDB:-$state/evals.duckdb}
export NANOCHAT_SHARED_DATA=${NANOCHAT_SHARED_DATA:-$(cd .. && pwd)/shared/data}
mkdir -p "$DAGSTER_HOME"
if [ ! -f "$DAGSTER_HOME/dagster.yaml" ]; then
    # One op at a time per pool: the training assets share pool "gpu", so runs never train concurrently.
    printf 'concurrency:\n  pools:\n    default_limit: 1\n' > "$DAGSTER_HOME/dagster.yaml"
fi

start=$(date +%s)
# Steps run one after another in the run's process (on CPU they would anyway: training and evals share the "gpu"
# pool); the default executor would start a fresh Python, importing torch, for each of the 14 steps.
# NANOCHAT_EXECUTOR=multiprocess gives the UI's default instead.
if [ "${NANOCHAT_EXECUTOR:-in_process}" = "in_process" ]; then
    config='{"execution": {"config": {"in_process": {}}}}'
else
    config='{}'
fi
.venv/bin/dagster asset materialize -m orchestration.definitions --select '*' --config-json "$config"
echo "== done in $(( $(date +%s) - start ))s"
.venv/bin/python -m orchestration.run_summary
echo
echo "artifacts:      $NANOCHAT_ARTIFACTS"
echo "promoted model: $NANOCHAT_ARTIFACTS/promoted/latest.json"
echo "report card:    $(ls -t "$NANOCHAT_ARTIFACTS"/report/*/*/*/report.md 2>/dev/null | head -1)"
echo "eval history:   $NANOCHAT_DUCKDB"
.venv/bin/nanochat-evals --db "$NANOCHAT_DUCKDB" latest
echo
echo "UI:     DAGSTER_HOME=$DAGSTER_HOME .venv/bin/dagster dev -m orchestration.definitions -h 127.0.0.1 -p 3000"
echo "query:  .venv/bin/nanochat-evals --db $NANOCHAT_DUCKDB history --metric 'CORE[18/22]'"
echo "chat:   .venv/bin/python -m app --artifacts $NANOCHAT_ARTIFACTS --duckdb $NANOCHAT_DUCKDB"
