"""Eval history on a real DuckDB file: schema, idempotent writes, readers, the CLI and real cross-process locks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta

import duckdb
import pytest

from orchestration import eval_store as es
from orchestration.evals_cli import main

T0 = datetime(2025, 1, 1)


@pytest.fixture
def db(tmp_path):
    return tmp_path / "evals.duckdb"


@pytest.fixture
def conn(db):
    c = es.connect_rw(db)
    yield c
    c.close()


def seed(conn) -> None:
    """Four runs an hour apart: depths 4, 4, 6, 6 with rising CORE; ChatCORE on the sft checkpoints."""
    for i, (depth, core, chat) in enumerate([(4, 0.10, 0.20), (4, 0.12, 0.25), (6, 0.15, 0.22), (6, 0.18, 0.30)]):
        run, at = f"run{i}", T0 + timedelta(hours=i)
        es.record_run(conn, run, profile="tiny", depth=depth, git_sha="abc", config={"depth": depth}, started_at=at)
        es.record_checkpoint(conn, f"base{i}", run_id=run, stage="base", step=100, uri=f"file:///b{i}", created_at=at)
        es.record_checkpoint(conn, f"sft{i}", run_id=run, stage="sft", step=10, uri=f"file:///s{i}", created_at=at)
        common = {"profile": "tiny", "depth": depth, "tokens_seen": 1000 * (i + 1)}
        base_results = {es.AGGREGATE_TASK: {"CORE": core}, "hellaswag": {"centered": core / 2}}
        es.record_eval_results(conn, run, "base", f"base{i}", base_results, recorded_at=at, **common)
        sft_results = {es.AGGREGATE_TASK: {"ChatCORE": chat}}
        es.record_eval_results(
            conn, run, "sft", f"sft{i}", sft_results, recorded_at=at + timedelta(minutes=30), **common
        )


def count(conn, sql: str) -> int:
    return conn.execute(sql).fetchone()[0]


# --- schema -----------------------------------------------------------------------------------------------------


def test_migrate_empty_then_again_is_idempotent(conn):
    assert es.schema_version(conn) == 0
    assert es.migrate(conn) == len(es.MIGRATIONS)
    assert es.migrate(conn) == len(es.MIGRATIONS)
    assert count(conn, "SELECT count(*) FROM schema_version") == len(es.MIGRATIONS)
    tables = {r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert {"schema_version", "runs", "checkpoints", "eval_results"} <= tables


def test_newer_database_is_refused(conn):
    es.migrate(conn)
    conn.execute("INSERT INTO schema_version VALUES (?, ?)", [len(es.MIGRATIONS) + 1, T0])
    with pytest.raises(es.SchemaVersionError, match="newer than this code"):
        es.migrate(conn)
    with pytest.raises(es.SchemaVersionError, match="newer than this code"):
        es.record_run(conn, "r", profile="tiny", depth=4)
    with pytest.raises(es.SchemaVersionError, match="newer than this code"):
        es.check_schema(conn)


# --- writers ----------------------------------------------------------------------------------------------------


def test_rerecording_the_same_key_replaces(conn):
    for value in (0.1, 0.2):
        es.record_eval_results(conn, "r", "base", "ck", {"all": {"CORE": value}}, profile="tiny", depth=4)
        es.record_run(conn, "r", profile="tiny", depth=4, config={"v": value})
        es.record_checkpoint(conn, "ck", run_id="r", stage="base", step=int(value * 10), uri="file:///ck")
    assert conn.execute("SELECT value FROM eval_results").fetchall() == [(0.2,)]
    assert conn.execute("SELECT config->>'v' FROM runs").fetchall() == [("0.2",)]
    assert conn.execute("SELECT step FROM checkpoints").fetchall() == [(2,)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_rejected_and_nothing_is_written(conn, bad):
    results = {"arc": {"accuracy": 0.5}, "mmlu": {"accuracy": bad}}
    with pytest.raises(ValueError, match="mmlu/accuracy"):
        es.record_eval_results(conn, "r", "sft", "ck", results, profile="tiny", depth=4)
    es.migrate(conn)
    assert count(conn, "SELECT count(*) FROM eval_results") == 0


def test_bad_stage_and_non_numbers_are_rejected(conn):
    with pytest.raises(ValueError, match="stage must be one of"):
        es.record_eval_results(conn, "r", "rl", "ck", {"a": {"m": 1.0}}, profile="tiny", depth=4)
    with pytest.raises(TypeError, match="a/m must be a number"):
        es.record_eval_results(conn, "r", "base", "ck", {"a": {"m": "0.5"}}, profile="tiny", depth=4)


# --- readers ----------------------------------------------------------------------------------------------------


def test_history_is_ordered_and_limited_to_the_last_n_runs(conn):
    seed(conn)
    rows = es.history(conn, metric="CORE", last_n=2)
    assert [(r["run_id"], r["value"]) for r in rows] == [("run2", 0.15), ("run3", 0.18)]
    assert rows[0]["change"] == pytest.approx(0.03)  # measured from run1, outside the window
    assert rows[0]["step"] == 100 and rows[0]["tokens_seen"] == 3000
    everything = es.history(conn, metric="CORE", last_n=100)
    assert [r["run_id"] for r in everything] == ["run0", "run1", "run2", "run3"]
    assert everything[0]["change"] is None
    assert [r["value"] for r in es.history(conn, metric="centered", task="hellaswag", stage="base", last_n=1)] == [
        pytest.approx(0.09)
    ]
    assert es.history(conn, metric="CORE", stage="sft") == []


def test_compare_puts_runs_side_by_side_with_delta(conn):
    seed(conn)
    es.record_eval_results(conn, "run3", "sft", "sft3", {"gsm8k": {"accuracy": 0.05}}, profile="tiny", depth=6)
    rows = {(r["stage"], r["task"], r["metric"]): r for r in es.compare(conn, "run0", "run3")}
    assert rows["base", "all", "CORE"]["delta"] == pytest.approx(0.08)
    assert rows["sft", "all", "ChatCORE"]["a"] == 0.20 and rows["sft", "all", "ChatCORE"]["b"] == 0.30
    assert rows["sft", "gsm8k", "accuracy"]["a"] is None and rows["sft", "gsm8k", "accuracy"]["delta"] is None
    assert {r["stage"] for r in es.compare(conn, "run0", "run3", stage="base")} == {"base"}
    with pytest.raises(LookupError, match="nope"):
        es.compare(conn, "run0", "nope")


def test_best_per_depth(conn):
    seed(conn)
    rows = es.best(conn, metric="ChatCORE", by="depth")
    assert [(r["depth"], r["value"], r["run_id"], r["checkpoint_id"]) for r in rows] == [
        (4, 0.25, "run1", "sft1"),
        (6, 0.30, "run3", "sft3"),
    ]
    lowest = es.best(conn, metric="CORE", by="depth", higher_is_better=False)
    assert [r["run_id"] for r in lowest] == ["run0", "run2"]
    with pytest.raises(ValueError, match="by must be one of"):
        es.best(conn, by="depth; DROP TABLE runs")


def test_latest_is_one_checkpoints_scorecard(conn):
    seed(conn)
    assert [(r["checkpoint_id"], r["metric"]) for r in es.latest(conn)] == [("sft3", "ChatCORE")]
    rows = es.latest(conn, stage="base", run_id="run1")
    assert [(r["task"], r["metric"]) for r in rows] == [("all", "CORE"), ("hellaswag", "centered")]
    assert {r["checkpoint_id"] for r in rows} == {"base1"}


def test_documented_sql_answers_the_questions(conn):
    seed(conn)
    core_sql, best_sql = re.findall(r"```sql\n(.*?)```", es.__doc__, re.S)
    core = conn.execute(core_sql).fetchall()
    assert [(r[0], r[4]) for r in core] == [("run0", 0.10), ("run1", 0.12), ("run2", 0.15), ("run3", 0.18)]
    assert core[-1][5] == pytest.approx(0.03)
    assert [(r[0], r[1], r[2]) for r in conn.execute(best_sql).fetchall()] == [(4, 0.25, "run1"), (6, 0.30, "run3")]


# --- CLI --------------------------------------------------------------------------------------------------------


@pytest.fixture
def seeded(db):
    c = es.connect_rw(db)
    seed(c)
    c.close()  # the CLI opens read-only; one process cannot hold both modes
    return str(db)


def test_cli_history_table_and_json(seeded, capsys):
    assert main(["--db", seeded, "history", "-n", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["run_id", "stage", "checkpoint_id"]
    assert [line.split()[0] for line in lines[2:]] == ["run2", "run3"]
    assert "0.1800" in lines[3] and "+0.0300" in lines[3]

    assert main(["history", "--metric", "CORE", "-n", "2", "--db", seeded, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["run_id"], r["value"], r["recorded_at"]) for r in rows] == [
        ("run2", 0.15, "2025-01-01T02:00:00"),
        ("run3", 0.18, "2025-01-01T03:00:00"),
    ]


def test_cli_best_and_compare(seeded, capsys):
    assert main(["--db", seeded, "--json", "best"]) == 0
    assert [(r["depth"], r["value"]) for r in json.loads(capsys.readouterr().out)] == [(4, 0.25), (6, 0.30)]

    assert main(["--db", seeded, "compare", "run0", "run3", "--stage", "base"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["stage", "task", "metric", "run0", "run3", "delta"]
    assert lines[2].split() == ["base", "all", "CORE", "0.1000", "0.1800", "+0.0800"]

    assert main(["--db", seeded, "compare", "run0", "typo"]) == 1
    assert "no eval results for run 'typo'" in capsys.readouterr().err


def test_cli_sql_reads(seeded, capsys):
    assert main(["--db", seeded, "--json", "sql", "SELECT run_id, depth FROM runs ORDER BY run_id LIMIT 2"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"run_id": "run0", "depth": 4}, {"run_id": "run1", "depth": 4}]


@pytest.mark.parametrize(
    "statement, error",
    [
        ("DELETE FROM eval_results", "read-only"),
        ("CREATE TABLE x (a INT)", "read-only"),
        ("COPY eval_results TO 'leak.csv'", "disabled by configuration"),
    ],
)
def test_cli_sql_refuses_writes(seeded, capsys, statement, error, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--db", seeded, "sql", statement]) == 1
    assert error in capsys.readouterr().err
    assert not (tmp_path / "leak.csv").exists()
    with duckdb.connect(seeded, read_only=True) as c:
        assert count(c, "SELECT count(*) FROM eval_results") == 12


def test_cli_missing_database_says_so(tmp_path, capsys):
    assert main(["--db", str(tmp_path / "none.duckdb"), "history"]) == 1
    assert "no eval history at" in capsys.readouterr().err


# --- real locks across processes ------------------------------------------------------------------------------

HOLDER = """
import sys, duckdb
conn = duckdb.connect(sys.argv[1], read_only=sys.argv[2] == "ro")
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin
"""


@pytest.fixture
def hold_lock(db):
    """Start a separate process holding the database ('rw' or 'ro'); yields it, kills it at the end."""
    holders = []

    def start(mode: str) -> subprocess.Popen:
        if not db.exists():
            duckdb.connect(str(db)).close()
        command = [sys.executable, "-c", HOLDER, str(db), mode]
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        holders.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in holders:
        proc.kill()
        proc.wait()


def test_locked_by_a_writer_raises_a_clear_error_in_bounded_time(db, hold_lock):
    holder = hold_lock("rw")
    for connect in (es.connect_rw, es.connect_ro):
        started = time.monotonic()
        with pytest.raises(es.DatabaseLockedError) as info:
            connect(db, retries=3, backoff=0.05)
        assert time.monotonic() - started < 3
        message = str(info.value)
        assert f"(PID {holder.pid})" in message and "after 4 attempts" in message
        assert "dagster dev" in message and "Conflicting lock" in message


def test_writer_is_locked_out_by_a_reader_but_readers_share(db, hold_lock):
    hold_lock("ro")
    with pytest.raises(es.DatabaseLockedError, match="cannot open .* read-write"):
        es.connect_rw(db, retries=1, backoff=0.05)
    es.connect_ro(db, retries=0).close()


def test_connect_succeeds_when_the_holder_exits_during_the_retry_window(db, hold_lock):
    holder = hold_lock("rw")
    threading.Timer(0.5, holder.stdin.close).start()  # the holder exits half a second into our retries
    started = time.monotonic()
    conn = es.connect_rw(db, retries=40, backoff=0.05, max_backoff=0.1)
    waited = time.monotonic() - started
    conn.close()
    assert 0.4 < waited < 5
