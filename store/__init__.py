"""
The pipeline's state, without Dagster: the artifact store (local directory or S3), the artifact keys, the promotion
pointer, the DuckDB eval history and its CLI, and the one state root they derive from (NANOCHAT_HOME).

`orchestration/` wraps these in thin Dagster resources; the app and `nanochat-evals` use them directly, so serving a
model or querying the history never imports Dagster.
"""
