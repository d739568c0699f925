#!/usr/bin/env bash
# The README's main command: the whole tiny pipeline as Dagster assets (raw_shards -> tokenizer -> base checkpoint
# -> base_eval -> mid -> SFT checkpoints -> chat_eval -> promoted_model -> report, with their checks), materialized
# from the command line on CPU against the local artifact store and a local DuckDB eval history (no server needed).
# Everything lands in $NANOCHAT_HOME (default .nanochat-dagster/); open the UI afterwards (scripts/ui.sh) to see it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh

# One state root (store/home.py): artifacts, workspace, eval history and DAGSTER_HOME (with its dagster.yaml:
# one op per pool, so training never runs twice at once) under $NANOCHAT_HOME, the same files the UI, CLI and app use.
eval "$(.venv/bin/python -m store.home)"
export NANOCHAT_SHARED_DATA=${NANOCHAT_SHARED_DATA:-$(cd .. && pwd)/shared/data}

start=$(date +%s)
# Steps run one after another in the run's process (on CPU they would anyway: training and evals share the "gpu"
# pool); the default executor would start a fresh Python, importing torch, for each of the 14 steps.
# NANOCHAT_EXECUTOR=multiprocess gives the UI's default instead. NANOCHAT_PROFILE_OVERRIDES='{"depth": 2}' (a JSON
# object of profile fields) overrides the profile for this run, as the launchpad's resources.profile.config does.
config=$(.venv/bin/python - <<'EOF'
import json, os
in_process = os.environ.get("NANOCHAT_EXECUTOR", "in_process") == "in_process"
config = {"execution": {"config": {"in_process": {}}}} if in_process else {}
try:
    overrides = json.loads(os.environ.get("NANOCHAT_PROFILE_OVERRIDES") or "{}")
except ValueError as e:
    raise SystemExit(f"NANOCHAT_PROFILE_OVERRIDES is not JSON ({e}); write e.g. '{{\"depth\": 2}}'")
if not isinstance(overrides, dict):
    raise SystemExit("NANOCHAT_PROFILE_OVERRIDES must be a JSON object of profile fields, e.g. '{\"depth\": 2}'")
if overrides:
    config["resources"] = {"profile": {"config": overrides}}
print(json.dumps(config))
EOF
)
# Every stage is partitioned by profile: this materializes the `tiny` partition (NANOCHAT_PROFILE picks another);
# imported checkpoints (group imports) have partitions of their own and are not part of the pipeline.
profile=${NANOCHAT_PROFILE:-tiny}
.venv/bin/dagster asset materialize -m orchestration.definitions --select 'not group:imports' --partition "$profile" --config-json "$config"
echo "== done in $(( $(date +%s) - start ))s"
.venv/bin/python -m orchestration.run_summary
echo
echo "artifacts:      $NANOCHAT_ARTIFACTS"
echo "promoted model: $NANOCHAT_ARTIFACTS/promoted/latest.json (this profile's: promoted/$profile/)"
case $NANOCHAT_ARTIFACTS in
    s3://*) echo "report card:    $NANOCHAT_ARTIFACTS/report/$profile/<tag>/<run id>/report.md" ;;
    *) echo "report card:    $(ls -t "$NANOCHAT_ARTIFACTS"/report/"$profile"/*/*/report.md 2>/dev/null | head -1)" ;;
esac
echo "eval history:   $NANOCHAT_DUCKDB"
.venv/bin/nanochat-evals --db "$NANOCHAT_DUCKDB" latest
echo
# The same state with no variable to set (run them from this directory; NANOCHAT_HOME if you moved it):
echo "UI:     scripts/ui.sh   (http://127.0.0.1:3000)"
echo "query:  .venv/bin/nanochat-evals history --metric 'CORE[18/22]'"
echo "chat:   .venv/bin/python -m app"
