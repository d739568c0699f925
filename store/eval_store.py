"""
Eval history in DuckDB: one row per (run, stage, checkpoint, task, metric).

Tables: `runs` (one per Dagster run that trained something; `started_at` is the run's start), `checkpoints` (one per
run, stage and checkpoint: `checkpoint_id` is the sha256 of the published checkpoint, so identical weights from
two runs are two rows, each with its own scores), `eval_results`. `tokens_seen` is the number of tokens the model
trained on in that stage: steps x batch tokens for base and mid, the tokens of the conversations seen for SFT.
The schema is versioned (`MIGRATIONS`); the next write upgrades an older file in place, in one transaction.

Everything here is a plain function over a duckdb connection and imports no Dagster, so the assets (through the
`EvalHistory` resource in orchestration/defs/resources.py, whose `record` calls `record` here), the
`nanochat-evals` CLI and the chat app (its Scores tab and model picker) share one code path.

DuckDB admits one read-write process or many read-only ones, never both at once. So:
- writers (`record_*`) are serialized by a Dagster pool and each write is one short transaction;
- readers open short read-only connections (`connect_ro`) that retry while a writer holds the file.

Conventions: stages are base, mid and sft. Aggregate scores (CORE, ChatCORE) are recorded under the
pseudo-task `AGGREGATE_TASK` ("all"), per-task numbers under the task's name (metrics `accuracy` and
`centered`), loss and bits per byte under `LOSS_TASKS` ("validation" from training, "bpb" from base_eval).
An aggregate over part of its suite carries its coverage in the metric name: `CORE[18/22]` when 4 of the 22
CORE tasks had no data, `ChatCORE[5/6]`; such a score is a different metric and is never compared with a full
`CORE`. Times are naive UTC.

The readers (history, compare, best, latest, the app's queries) and the documented SQL are in
store/eval_queries.py.
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
LOSS_TASKS = ("validation", "bpb")

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
    # Imported checkpoints (importer/cli.py): where the weights came from and at which revision.
    """
    ALTER TABLE runs ADD COLUMN source VARCHAR;
    ALTER TABLE runs ADD COLUMN revision VARCHAR;
    """,
    # v3: a checkpoint is keyed by the run and stage that produced it, not by its content: two runs that train
    # identical weights (same seed, same data) each keep their checkpoint row, and their scores join to it.
    # DuckDB cannot change a primary key in place: copy into the new table, then swap the names.
    """
    CREATE TABLE checkpoints_v3 (
        run_id        VARCHAR NOT NULL,
        stage         VARCHAR NOT NULL CHECK (stage IN ('base', 'mid', 'sft')),
        checkpoint_id VARCHAR NOT NULL,  -- the sha256 of the checkpoint artifact (its manifest)
        step          BIGINT NOT NULL,
        uri           VARCHAR NOT NULL,
        tokens_seen   BIGINT,
        created_at    TIMESTAMP NOT NULL,
        PRIMARY KEY (run_id, stage, checkpoint_id)
    );
    INSERT INTO checkpoints_v3
        SELECT run_id, stage, checkpoint_id, step, uri, tokens_seen, created_at FROM checkpoints;
    DROP TABLE checkpoints;
    ALTER TABLE checkpoints_v3 RENAME TO checkpoints;
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
    # Every stage of a run records it again: started_at keeps the earliest time given (the run's start), and a
    # field left None (an eval recording the run that trained its checkpoint) keeps what the run itself wrote.
    row = [run_id, _utc(started_at), profile, depth, git_sha, _json(config), dagster_run_id, source, revision]
    conn.execute("""
        INSERT INTO runs (run_id, started_at, profile, depth, git_sha, config, dagster_run_id, source, revision)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (run_id) DO UPDATE SET
            started_at = least(runs.started_at, excluded.started_at),
            profile = excluded.profile, depth = excluded.depth,
            git_sha = coalesce(excluded.git_sha, runs.git_sha),
            config = coalesce(excluded.config, runs.config),
            dagster_run_id = coalesce(excluded.dagster_run_id, runs.dagster_run_id),
            source = coalesce(excluded.source, runs.source),
            revision = coalesce(excluded.revision, runs.revision)
    """, row)


def _write_checkpoint(conn, checkpoint_id, run_id, stage, step, uri, tokens_seen, created_at) -> None:
    row = [run_id, stage, checkpoint_id, step, uri, tokens_seen, _utc(created_at)]
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
