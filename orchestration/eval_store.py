"""
Eval history in DuckDB: one row per (run, stage, checkpoint, task, metric).

Everything here is a plain function over a duckdb connection and imports no Dagster, so the assets (through the
`EvalHistory` resource in orchestration/defs/resources.py, whose `record` calls `record` here), the
`nanochat-evals` CLI and the chat app (its Scores tab and model picker) share one code path.

DuckDB admits one read-write process or many read-only ones, never both at once. So:
- writers (`record_*`) are serialized by a Dagster pool and each write is one short transaction;
- readers open short read-only connections (`connect_ro`) that retry while a writer holds the file.

Conventions: stages are base, mid and sft. Aggregate scores (CORE, ChatCORE) are recorded under the
pseudo-task `AGGREGATE_TASK` ("all"), per-task numbers under the task's name (metrics `accuracy` and
`centered`). An aggregate over part of its suite carries its coverage in the metric name: `CORE[18/22]` when
4 of the 22 CORE tasks had no data, `ChatCORE[5/6]`; such a score is a different metric and is never compared
with a full `CORE`. Times are naive UTC.

Documented SQL (run it with `nanochat-evals sql "..."` or any DuckDB client opened read-only):

How did CORE move over the last 10 runs? One row per run (its latest CORE), oldest first, with the change
from the run before (with the offline eval bundle, write 'CORE[18/22]' for 'CORE'):

```sql
SELECT run_id, profile, depth, tokens_seen, value AS core,
       value - lag(value) OVER (ORDER BY recorded_at) AS change, recorded_at
FROM (
    SELECT * FROM eval_results
    WHERE metric = 'CORE'
    QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY recorded_at DESC) = 1
    ORDER BY recorded_at DESC
    LIMIT 10
)
ORDER BY recorded_at;
```

Best ChatCORE per depth, with the run and checkpoint that reached it:

```sql
SELECT depth, value AS chatcore, run_id, stage, checkpoint_id, recorded_at
FROM eval_results
WHERE metric = 'ChatCORE'
QUALIFY row_number() OVER (PARTITION BY depth ORDER BY value DESC, recorded_at DESC) = 1
ORDER BY depth;
```
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb

STAGES = ("base", "mid", "sft")
AGGREGATE_TASK = "all"
BEST_BY = ("depth", "profile", "stage", "task")

# Ordered and append-only: MIGRATIONS[i] takes the database from version i to i + 1. Never edit a shipped entry.
# No foreign keys on purpose: assets record in whatever order they run (results may land before their run or
# checkpoint row, or without one for an ad hoc eval), and DuckDB forbids deleting a row a foreign key points at,
# which would make cleaning up a botched run painful. Readers LEFT JOIN instead.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE runs (
        run_id         VARCHAR PRIMARY KEY,
        started_at     TIMESTAMP NOT NULL,
        profile        VARCHAR NOT NULL,
        depth          INTEGER NOT NULL,
        git_sha        VARCHAR,
        config         JSON,
        dagster_run_id VARCHAR
    );
    CREATE TABLE checkpoints (
        checkpoint_id VARCHAR PRIMARY KEY,  -- e.g. the sha256 of the checkpoint artifact
        run_id        VARCHAR NOT NULL,
        stage         VARCHAR NOT NULL CHECK (stage IN ('base', 'mid', 'sft')),
        step          BIGINT NOT NULL,
        uri           VARCHAR NOT NULL,
        tokens_seen   BIGINT,
        created_at    TIMESTAMP NOT NULL
    );
    -- profile, depth and tokens_seen are copied in so the common questions need no joins.
    CREATE TABLE eval_results (
        run_id        VARCHAR NOT NULL,
        stage         VARCHAR NOT NULL CHECK (stage IN ('base', 'mid', 'sft')),
        checkpoint_id VARCHAR NOT NULL,
        task          VARCHAR NOT NULL,
        metric        VARCHAR NOT NULL,
        value         DOUBLE NOT NULL,
        recorded_at   TIMESTAMP NOT NULL,
        profile       VARCHAR NOT NULL,
        depth         INTEGER NOT NULL,
        tokens_seen   BIGINT,
        PRIMARY KEY (run_id, stage, checkpoint_id, task, metric)
    );
    """,
    # Imported checkpoints (orchestration/importer.py): where the weights came from and at which revision.
    """
    ALTER TABLE runs ADD COLUMN source VARCHAR;
    ALTER TABLE runs ADD COLUMN revision VARCHAR;
    """,
]


class SchemaVersionError(RuntimeError):
    """The database's schema is not the one this code speaks."""


class DatabaseLockedError(RuntimeError):
    """Another process holds the DuckDB file in a mode that excludes ours, and kept it through every retry."""


# ---------------------------------------------------------------------------------------------------------------
# Connections


def connect_rw(
    path: str | os.PathLike, *, retries: int = 10, backoff: float = 0.2, max_backoff: float = 5.0
) -> duckdb.DuckDBPyConnection:
    """A read-write connection (creating the file), retrying while another process holds the lock."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return _connect(path, read_only=False, retries=retries, backoff=backoff, max_backoff=max_backoff, config={})


def connect_ro(
    path: str | os.PathLike,
    *,
    retries: int = 10,
    backoff: float = 0.2,
    max_backoff: float = 5.0,
    config: Mapping[str, Any] | None = None,
) -> duckdb.DuckDBPyConnection:
    """A read-only connection, retrying while a writer holds the lock. Readers never create the file."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no eval history at {path}: nothing has been recorded yet, or pass another --db")
    return _connect(path, read_only=True, retries=retries, backoff=backoff, max_backoff=max_backoff, config=config)


def _connect(
    path: str | os.PathLike,
    *,
    read_only: bool,
    retries: int,
    backoff: float,
    max_backoff: float,
    config: Mapping[str, Any] | None,
) -> duckdb.DuckDBPyConnection:
    started, delay = time.monotonic(), backoff
    for attempt in range(retries + 1):
        try:
            return duckdb.connect(str(path), read_only=read_only, config=dict(config or {}))
        except duckdb.IOException as e:
            # Only the lock conflict is worth waiting for; anything else (corrupt file, permissions) is final.
            if "Could not set lock" not in str(e) and "Conflicting lock" not in str(e):
                raise
            if attempt == retries:
                raise DatabaseLockedError(_lock_message(path, str(e), read_only, attempt + 1, started)) from e
            time.sleep(delay)
            delay = min(delay * 2, max_backoff)
    raise AssertionError("unreachable")


def _lock_message(path: str | os.PathLike, error: str, read_only: bool, attempts: int, started: float) -> str:
    # DuckDB names the holder: 'Conflicting lock is held in /usr/bin/python3.11 (PID 25545)'.
    holder = re.search(r"held in (.*?) \(PID (\d+)\)", error)
    who = f"{holder.group(1)} (PID {holder.group(2)})" if holder else "another process"
    mode = "read-only" if read_only else "read-write"
    return (
        f"cannot open {path} {mode}: it is locked by {who}; gave up after {attempts} attempts over "
        f"{time.monotonic() - started:.1f}s. DuckDB allows one writer or many readers, never both. "
        "If the holder is `dagster dev` or a run materializing evals, wait for it to finish (eval writes are "
        "short) or stop that materialization; if it is a forgotten Python/DuckDB shell, close it. "
        f"DuckDB said: {error}"
    )


@contextmanager
def _transaction(conn: duckdb.DuckDBPyConnection) -> Iterator[None]:
    conn.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# ---------------------------------------------------------------------------------------------------------------
# Schema


def schema_version(conn: duckdb.DuckDBPyConnection) -> int:
    """The version the database is at; 0 for a database this module never touched."""
    exists = conn.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
    ).fetchone()[0]
    if not exists:
        return 0
    return conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]


def migrate(conn: duckdb.DuckDBPyConnection) -> int:
    """Apply the missing migrations in one transaction and return the version now current. Idempotent."""
    with _transaction(conn):
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at TIMESTAMP)")
        current = schema_version(conn)
        _refuse_newer(conn, current)
        for version in range(current + 1, len(MIGRATIONS) + 1):
            conn.execute(MIGRATIONS[version - 1])
            conn.execute("INSERT INTO schema_version VALUES (?, ?)", [version, _now()])
    return len(MIGRATIONS)


def check_schema(conn: duckdb.DuckDBPyConnection) -> None:
    """For readers, who cannot migrate: fail clearly unless the database is at this code's version."""
    current = schema_version(conn)
    _refuse_newer(conn, current)
    if current < len(MIGRATIONS):
        raise SchemaVersionError(
            f"eval database {_db_path(conn)} is at schema version {current}, this code expects "
            f"{len(MIGRATIONS)}; "
            "the next eval write (any record_* call) upgrades it"
        )


def _db_path(conn: duckdb.DuckDBPyConnection) -> str:
    """The file behind a connection, so errors name it."""
    row = conn.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    return row[0] if row and row[0] else "(in memory)"


def _refuse_newer(conn: duckdb.DuckDBPyConnection, current: int) -> None:
    if current > len(MIGRATIONS):
        raise SchemaVersionError(
            f"eval database {_db_path(conn)} is at schema version {current}, newer than this code knows "
            f"({len(MIGRATIONS)}); "
            "upgrade nanochat-dagster (git pull / reinstall) rather than writing to it with old code"
        )


# ---------------------------------------------------------------------------------------------------------------
# Writers: each one migrates first (cheap when current), then writes in one short transaction. Re-recording
# the same key replaces the row, so a retried or re-materialized asset never duplicates history.


def record(
    conn: duckdb.DuckDBPyConnection,
    *,
    run_id: str,
    stage: str,
    checkpoint_id: str,
    step: int,
    uri: str,
    profile: str,
    depth: int,
    scores: Mapping[str, Mapping[str, float]] | None = None,
    tokens_seen: int | None = None,
    git_sha: str | None = None,
    config: Mapping[str, Any] | None = None,
    started_at: datetime | None = None,
    recorded_at: datetime | None = None,
) -> int:
    """A run, one of its checkpoints and that checkpoint's {task: {metric: value}} scores, in one transaction.

    What every asset calls (through the EvalHistory resource). Returns the number of score rows written.
    """
    _check_stage(stage)
    rows = _result_rows(run_id, stage, checkpoint_id, scores or {}, profile, depth, tokens_seen, recorded_at)
    migrate(conn)
    with _transaction(conn):
        _write_run(conn, run_id, profile, depth, git_sha, config, run_id, started_at)
        _write_checkpoint(conn, checkpoint_id, run_id, stage, step, uri, tokens_seen, None)
        if rows:
            _write_results(conn, rows)
    return len(rows)


def record_run(
    conn: duckdb.DuckDBPyConnection,
    run_id: str,
    *,
    profile: str,
    depth: int,
    git_sha: str | None = None,
    config: Mapping[str, Any] | None = None,
    dagster_run_id: str | None = None,
    started_at: datetime | None = None,
    source: str | None = None,
    revision: str | None = None,
) -> None:
    """source/revision: for an imported checkpoint, where it came from (hf:OWNER/REPO, a path, s3://...) and
    the commit it was read at; None for a run trained here."""
    migrate(conn)
    with _transaction(conn):
        _write_run(conn, run_id, profile, depth, git_sha, config, dagster_run_id, started_at, source, revision)


def record_checkpoint(
    conn: duckdb.DuckDBPyConnection,
    checkpoint_id: str,
    *,
    run_id: str,
    stage: str,
    step: int,
    uri: str,
    tokens_seen: int | None = None,
    created_at: datetime | None = None,
) -> None:
    _check_stage(stage)
    migrate(conn)
    with _transaction(conn):
        _write_checkpoint(conn, checkpoint_id, run_id, stage, step, uri, tokens_seen, created_at)


def record_eval_results(
    conn: duckdb.DuckDBPyConnection,
    run_id: str,
    stage: str,
    checkpoint_id: str,
    results: Mapping[str, Mapping[str, float]],
    *,
    profile: str,
    depth: int,
    tokens_seen: int | None = None,
    recorded_at: datetime | None = None,
) -> int:
    """Record {task: {metric: value}} for one checkpoint; returns the number of rows written."""
    _check_stage(stage)
    rows = _result_rows(run_id, stage, checkpoint_id, results, profile, depth, tokens_seen, recorded_at)
    if not rows:
        raise ValueError(f"no eval results to record for run {run_id!r}, checkpoint {checkpoint_id!r}")
    migrate(conn)
    with _transaction(conn):
        _write_results(conn, rows)
    return len(rows)


def _write_run(conn, run_id, profile, depth, git_sha, config, dagster_run_id, started_at, source=None,
               revision=None) -> None:
    row = [run_id, _utc(started_at), profile, depth, git_sha, _json(config), dagster_run_id, source, revision]
    conn.execute("INSERT OR REPLACE INTO runs (run_id, started_at, profile, depth, git_sha, config, dagster_run_id, "
                 "source, revision) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)


def _write_checkpoint(conn, checkpoint_id, run_id, stage, step, uri, tokens_seen, created_at) -> None:
    row = [checkpoint_id, run_id, stage, step, uri, tokens_seen, _utc(created_at)]
    conn.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?)", row)


def _result_rows(run_id, stage, checkpoint_id, results, profile, depth, tokens_seen, recorded_at) -> list[list]:
    # Validated before touching the database, so a bad value never leaves a partial eval behind.
    at = _utc(recorded_at)
    return [
        [run_id, stage, checkpoint_id, task, metric, _finite(task, metric, value), at, profile, depth, tokens_seen]
        for task, metrics in results.items()
        for metric, value in metrics.items()
    ]


def _write_results(conn, rows: list[list]) -> None:
    conn.executemany("INSERT OR REPLACE INTO eval_results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


def _finite(task: str, metric: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"eval result {task}/{metric} must be a number, got {type(value).__name__}: {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"eval result {task}/{metric} is {value}; only finite values can be recorded")
    return float(value)


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}; got {stage!r}")


def _json(config: Mapping[str, Any] | None) -> str | None:
    return None if config is None else json.dumps(config, sort_keys=True)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _utc(at: datetime | None) -> datetime:
    """Naive UTC, the one form stored (a naive input is taken to be UTC already)."""
    if at is None:
        return _now()
    return at.astimezone(timezone.utc).replace(tzinfo=None) if at.tzinfo else at


# ---------------------------------------------------------------------------------------------------------------
# Readers: lists of dicts, no pandas. Filters left as None match everything.

_RESULT_COLUMNS = "e.run_id, e.stage, e.checkpoint_id, c.step, e.task, e.metric, e.value, e.profile, e.depth, "
_RESULT_COLUMNS += "e.tokens_seen, e.recorded_at"


def history(
    conn: duckdb.DuckDBPyConnection,
    metric: str = "CORE",
    task: str | None = None,
    stage: str | None = None,
    last_n: int = 10,
) -> list[dict[str, Any]]:
    """Every matching result of the last_n most recently evaluated runs, oldest first.

    `change` is the difference from the previous result of the same (stage, task) series, looking across all
    history, so the oldest run shown still says how it moved from the one before it.
    """
    sql = f"""
        WITH picked AS (
            SELECT *, value - lag(value) OVER (PARTITION BY stage, task ORDER BY recorded_at, run_id) AS change
            FROM eval_results
            WHERE metric = $metric AND ($task IS NULL OR task = $task) AND ($stage IS NULL OR stage = $stage)
        ),
        recent_runs AS (
            SELECT run_id FROM picked GROUP BY run_id ORDER BY max(recorded_at) DESC, run_id DESC LIMIT $last_n
        )
        SELECT {_RESULT_COLUMNS}, e.change
        FROM picked e JOIN recent_runs USING (run_id) LEFT JOIN checkpoints c USING (checkpoint_id)
        ORDER BY e.recorded_at, e.run_id, e.stage, e.task, e.checkpoint_id
    """
    return _rows(conn, sql, {"metric": metric, "task": task, "stage": stage, "last_n": last_n})


def compare(conn: duckdb.DuckDBPyConnection, run_a: str, run_b: str, stage: str | None = None) -> list[dict[str, Any]]:
    """Each (stage, task, metric) of two runs side by side: a, b and delta = b - a (None where one is missing).

    Where a run evaluated several checkpoints of a stage, its latest result counts.
    """
    # A typo'd run id would otherwise show up as a silent column of blanks.
    exists = "SELECT 1 FROM eval_results WHERE run_id = $run AND ($stage IS NULL OR stage = $stage) LIMIT 1"
    for run in (run_a, run_b):
        if not _rows(conn, exists, {"run": run, "stage": stage}):
            where = f" at stage {stage!r}" if stage else ""
            raise LookupError(f"no eval results for run {run!r}{where}")
    sql = """
        WITH latest AS (
            SELECT * FROM eval_results
            WHERE run_id IN ($a, $b) AND ($stage IS NULL OR stage = $stage)
            QUALIFY row_number() OVER (PARTITION BY run_id, stage, task, metric ORDER BY recorded_at DESC) = 1
        )
        SELECT stage, task, metric,
               max(value) FILTER (WHERE run_id = $a) AS a,
               max(value) FILTER (WHERE run_id = $b) AS b,
               b - a AS delta
        FROM latest
        GROUP BY stage, task, metric
        ORDER BY stage, task, metric  -- alphabetical happens to be pipeline order: base, mid, sft
    """
    return _rows(conn, sql, {"a": run_a, "b": run_b, "stage": stage})


def best(
    conn: duckdb.DuckDBPyConnection,
    metric: str = "ChatCORE",
    by: str = "depth",
    task: str | None = None,
    stage: str | None = None,
    higher_is_better: bool = True,
) -> list[dict[str, Any]]:
    """The best value of a metric for each value of `by`, with the run and checkpoint that reached it."""
    if by not in BEST_BY:  # an identifier, so it cannot be a bound parameter: allow only known columns
        raise ValueError(f"by must be one of {', '.join(BEST_BY)}; got {by!r}")
    order = "DESC" if higher_is_better else "ASC"
    sql = f"""
        SELECT e.{by}, e.value, e.run_id, e.stage, e.checkpoint_id, c.step, e.task, e.tokens_seen, e.recorded_at
        FROM eval_results e LEFT JOIN checkpoints c USING (checkpoint_id)
        WHERE e.metric = $metric AND ($task IS NULL OR e.task = $task) AND ($stage IS NULL OR e.stage = $stage)
        QUALIFY row_number() OVER (PARTITION BY e.{by} ORDER BY e.value {order}, e.recorded_at DESC) = 1
        ORDER BY e.{by}
    """
    return _rows(conn, sql, {"metric": metric, "task": task, "stage": stage})


def latest(
    conn: duckdb.DuckDBPyConnection,
    stage: str | None = None,
    run_id: str | None = None,
    checkpoint_id: str | None = None,
) -> list[dict[str, Any]]:
    """All results of the most recently evaluated checkpoint matching the filters: one model's full scorecard."""
    sql = f"""
        WITH target AS (
            SELECT run_id, stage, checkpoint_id FROM eval_results
            WHERE ($stage IS NULL OR stage = $stage) AND ($run_id IS NULL OR run_id = $run_id)
              AND ($checkpoint_id IS NULL OR checkpoint_id = $checkpoint_id)
            ORDER BY recorded_at DESC, run_id DESC
            LIMIT 1
        )
        SELECT {_RESULT_COLUMNS}
        FROM eval_results e
        JOIN target USING (run_id, stage, checkpoint_id)
        LEFT JOIN checkpoints c USING (checkpoint_id)
        ORDER BY e.task, e.metric
    """
    return _rows(conn, sql, {"stage": stage, "run_id": run_id, "checkpoint_id": checkpoint_id})


def series(conn: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """Every (task, metric) pair recorded: the aggregates (task "all": CORE, ChatCORE, ...) first, then per task."""
    pairs = conn.execute("SELECT DISTINCT task, metric FROM eval_results").fetchall()
    return sorted(pairs, key=lambda p: (p[0] != AGGREGATE_TASK, p[0], p[1]))


def checkpoint_scores(conn: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Each recorded checkpoint with its aggregate scores ({metric: latest value}), for the app's model picker.

    A mid or SFT checkpoint also carries the CORE of its run's base checkpoint (CORE is measured on base models,
    ChatCORE on chat models), so one label shows both.
    """
    checkpoints = _rows(conn, "SELECT checkpoint_id, run_id, stage, step, uri, created_at FROM checkpoints", {})
    aggregates = _rows(conn, """
        SELECT run_id, stage, checkpoint_id, metric, value FROM eval_results
        WHERE task = $task
        QUALIFY row_number() OVER (PARTITION BY run_id, stage, checkpoint_id, metric ORDER BY recorded_at DESC) = 1
        ORDER BY metric
    """, {"task": AGGREGATE_TASK})
    own: dict[tuple, dict[str, float]] = {}
    base_core: dict[str, dict[str, float]] = {}  # run_id -> CORE of its base checkpoint
    for a in aggregates:
        own.setdefault((a["run_id"], a["stage"], a["checkpoint_id"]), {})[a["metric"]] = a["value"]
        if a["stage"] == "base" and a["metric"].startswith("CORE"):
            base_core.setdefault(a["run_id"], {})[a["metric"]] = a["value"]
    for c in checkpoints:
        inherited = base_core.get(c["run_id"], {}) if c["stage"] != "base" else {}
        c["scores"] = {**inherited, **own.get((c["run_id"], c["stage"], c["checkpoint_id"]), {})}
    return checkpoints


def _rows(conn: duckdb.DuckDBPyConnection, sql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    cursor = conn.execute(sql, dict(params))  # DuckDB insists every parameter passed is used in the statement
    columns = [d[0] for d in cursor.description]
    return [dict(zip(columns, row)) for row in cursor.fetchall()]
