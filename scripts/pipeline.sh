#!/usr/bin/env bash
# The tiny pipeline as Dagster assets: raw_shards -> tokenizer -> base -> mid -> SFT checkpoints, materialized
# from the command line against the local artifact store and a local DuckDB eval history (no server needed).
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
.venv/bin/dagster asset materialize -m orchestration.definitions \
    --select 'raw_shards,tokenizer,base_checkpoint,mid_checkpoint,sft_checkpoint'
echo "== done in $(( $(date +%s) - start ))s"
echo "artifacts:    $NANOCHAT_ARTIFACTS"
echo "eval history: $NANOCHAT_DUCKDB"
.venv/bin/nanochat-evals --db "$NANOCHAT_DUCKDB" history --metric val_bpb
echo
echo "UI:     DAGSTER_HOME=$DAGSTER_HOME .venv/bin/dagster dev -m orchestration.definitions -h 127.0.0.1 -p 3000"
echo "query:  .venv/bin/nanochat-evals --db $NANOCHAT_DUCKDB best --metric val_bpb --lower-is-better"
