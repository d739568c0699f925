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

from store import eval_queries as eq
from store import eval_store as es
from store.evals_cli import main

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


# A file as schema version 1 wrote it (the DDL and rows exactly as shipped, kept here rather than taken from
# es.MIGRATIONS so the test still holds the old format if someone edits a shipped migration): two runs that trained
# identical weights, where v1's checkpoint key (the sha alone) kept only the second run's checkpoint row.
V1_DDL = """
CREATE TABLE schema_version("version" INTEGER PRIMARY KEY, applied_at TIMESTAMP);
CREATE TABLE runs(run_id VARCHAR PRIMARY KEY, started_at TIMESTAMP NOT NULL, profile VARCHAR NOT NULL,
    depth INTEGER NOT NULL, git_sha VARCHAR, config JSON, dagster_run_id VARCHAR);
CREATE TABLE checkpoints(checkpoint_id VARCHAR PRIMARY KEY, run_id VARCHAR NOT NULL, stage VARCHAR NOT NULL,
    step BIGINT NOT NULL, uri VARCHAR NOT NULL, tokens_seen BIGINT, created_at TIMESTAMP NOT NULL,
    CHECK((stage IN ('base', 'mid', 'sft'))));
CREATE TABLE eval_results(run_id VARCHAR, stage VARCHAR, checkpoint_id VARCHAR, task VARCHAR, metric VARCHAR,
    "value" DOUBLE NOT NULL, recorded_at TIMESTAMP NOT NULL, profile VARCHAR NOT NULL, depth INTEGER NOT NULL,
    tokens_seen BIGINT, CHECK((stage IN ('base', 'mid', 'sft'))),
    PRIMARY KEY(run_id, stage, checkpoint_id, task, metric));
INSERT INTO schema_version VALUES (1, TIMESTAMP '2025-01-01 00:00:00');
INSERT INTO runs VALUES ('runA', TIMESTAMP '2025-01-01 00:00:00', 'tiny', 4, 'abc', '{"depth": 4}', 'runA'),
                        ('runB', TIMESTAMP '2025-01-01 01:00:00', 'tiny', 4, 'abc', '{"depth": 4}', 'runB');
INSERT INTO checkpoints VALUES ('same-sha', 'runB', 'base', 100, 'file:///b', 6400, TIMESTAMP '2025-01-01 01:10:00');
INSERT INTO eval_results VALUES
    ('runA', 'base', 'same-sha', 'all', 'CORE[18/22]', 0.11, TIMESTAMP '2025-01-01 00:20:00', 'tiny', 4, 6400),
    ('runB', 'base', 'same-sha', 'all', 'CORE[18/22]', 0.12, TIMESTAMP '2025-01-01 01:20:00', 'tiny', 4, 6400);
"""


# Version 2 (the importer's source and revision columns) on top of the same rows: the schema this change upgrades.
V2_DDL = V1_DDL + """
ALTER TABLE runs ADD COLUMN source VARCHAR;
ALTER TABLE runs ADD COLUMN revision VARCHAR;
INSERT INTO schema_version VALUES (2, TIMESTAMP '2025-01-02 00:00:00');
"""


@pytest.mark.parametrize("version, ddl", [(1, V1_DDL), (2, V2_DDL)])
def test_an_older_file_is_upgraded_in_place_and_keeps_its_rows(db, version, ddl):
    with duckdb.connect(str(db)) as c:
        c.execute(ddl)
    with es.connect_ro(db) as c:
        with pytest.raises(es.SchemaVersionError, match=f"{db}.*version {version}, this code expects 3"):
            es.check_schema(c)
    with es.connect_rw(db) as c:  # the next write upgrades it: here runA's checkpoint row, which v1 had lost
        es.record_checkpoint(c, "same-sha", run_id="runA", stage="base", step=100, uri="file:///a", tokens_seen=6400)
    with es.connect_ro(db) as c:
        es.check_schema(c)
        assert es.schema_version(c) == len(es.MIGRATIONS) == 3
        assert c.execute("SELECT run_id, step, uri FROM checkpoints ORDER BY run_id").fetchall() == [
            ("runA", 100, "file:///a"), ("runB", 100, "file:///b")]
        assert count(c, "SELECT count(*) FROM eval_results") == 2 and count(c, "SELECT count(*) FROM runs") == 2
        rows = eq.history(c, metric="CORE[18/22]")
        assert [(r["run_id"], r["step"], r["value"]) for r in rows] == [("runA", 100, 0.11), ("runB", 100, 0.12)]
        constraints = c.execute("SELECT constraint_column_names FROM duckdb_constraints() WHERE "
                                "table_name = 'checkpoints' AND constraint_type = 'PRIMARY KEY'").fetchall()
        assert constraints == [(["run_id", "stage", "checkpoint_id"],)]


def test_identical_weights_from_two_runs_keep_two_sets_of_rows(conn):
    for run, value, at in (("runA", 0.11, T0), ("runB", 0.12, T0 + timedelta(hours=1))):
        es.record(conn, run_id=run, stage="base", checkpoint_id="same-sha", step=100, uri=f"file:///{run}",
                  profile="tiny", depth=4, scores={es.AGGREGATE_TASK: {"CORE": value}}, tokens_seen=6400,
                  started_at=at, recorded_at=at)
    assert conn.execute("SELECT run_id, uri FROM checkpoints ORDER BY run_id").fetchall() == [
        ("runA", "file:///runA"), ("runB", "file:///runB")]
    assert [(r["run_id"], r["value"]) for r in eq.history(conn, metric="CORE")] == [("runA", 0.11), ("runB", 0.12)]
    scores = {c["run_id"]: c["scores"] for c in eq.checkpoint_scores(conn)}
    assert scores == {"runA": {"CORE": 0.11}, "runB": {"CORE": 0.12}}


def test_a_run_keeps_its_start_and_what_it_wrote_itself(conn):
    start = T0 + timedelta(minutes=5)
    es.record(conn, run_id="r", stage="base", checkpoint_id="b", step=1, uri="u", profile="tiny", depth=4,
              git_sha="train-sha", config={"depth": 4}, started_at=start)
    # A later stage, then an eval in another run recording the run that trained its checkpoint (no sha, no config).
    es.record(conn, run_id="r", stage="mid", checkpoint_id="m", step=1, uri="u", profile="tiny", depth=4,
              git_sha="train-sha", config={"depth": 4}, started_at=start + timedelta(hours=1))
    es.record(conn, run_id="r", stage="mid", checkpoint_id="m", step=1, uri="u", profile="tiny", depth=4,
              scores={"all": {"ChatCORE": 0.2}})
    assert conn.execute("SELECT started_at, git_sha, config->>'depth' FROM runs").fetchall() == [
        (start, "train-sha", "4")]


def test_run_id_prefixes(conn):
    for run in ("4f2a9c1e-0000-0000-0000-000000000001", "4f2a9c1e-0000-0000-0000-000000000002",
                "9b7d3e20-aaaa-bbbb-cccc-dddddddddddd"):
        es.record(conn, run_id=run, stage="base", checkpoint_id=run[:4], step=1, uri="u", profile="tiny", depth=4,
                  scores={"all": {"CORE": 0.1}})
    assert eq.resolve_run(conn, "9b7d3e20") == "9b7d3e20-aaaa-bbbb-cccc-dddddddddddd"
    assert eq.resolve_run(conn, "4f2a9c1e-0000-0000-0000-000000000002").endswith("2")
    with pytest.raises(LookupError, match="'4f2a9c1e' is ambiguous: it matches 4f2a9c1e-.*01, 4f2a9c1e-.*02"):
        eq.resolve_run(conn, "4f2a9c1e")
    with pytest.raises(LookupError, match="no run id starts with 'zzz'; recent runs: .*9b7d3e20"):
        eq.resolve_run(conn, "zzz")
    with pytest.raises(LookupError, match="no run id starts with '%'"):  # a LIKE wildcard is just a character
        eq.resolve_run(conn, "%")


def test_a_missing_metric_lists_the_ones_that_exist(conn):
    es.record(conn, run_id="r", stage="base", checkpoint_id="b", step=1, uri="u", profile="tiny", depth=4,
              scores={"all": {"CORE[18/22]": 0.1}, "hellaswag": {"centered": 0.05}})
    message = eq.unknown_metric_message(conn, "CORE")
    assert message.startswith("no results for metric 'CORE'; did you mean 'CORE[18/22]'?")
    assert message.endswith("metrics recorded: CORE[18/22], centered")
    assert eq.unknown_metric_message(conn, "CORE[18/22]") is None


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
    rows = eq.history(conn, metric="CORE", last_n=2)
    assert [(r["run_id"], r["value"]) for r in rows] == [("run2", 0.15), ("run3", 0.18)]
    assert rows[0]["change"] == pytest.approx(0.03)  # measured from run1, outside the window
    assert rows[0]["step"] == 100 and rows[0]["tokens_seen"] == 3000
    everything = eq.history(conn, metric="CORE", last_n=100)
    assert [r["run_id"] for r in everything] == ["run0", "run1", "run2", "run3"]
    assert everything[0]["change"] is None
    assert [r["value"] for r in eq.history(conn, metric="centered", task="hellaswag", stage="base", last_n=1)] == [
        pytest.approx(0.09)
    ]
    assert eq.history(conn, metric="CORE", stage="sft") == []


def test_compare_puts_runs_side_by_side_with_delta(conn):
    seed(conn)
    es.record_eval_results(conn, "run3", "sft", "sft3", {"gsm8k": {"accuracy": 0.05}}, profile="tiny", depth=6)
    rows = {(r["stage"], r["task"], r["metric"]): r for r in eq.compare(conn, "run0", "run3")}
    assert rows["base", "all", "CORE"]["delta"] == pytest.approx(0.08)
    assert rows["sft", "all", "ChatCORE"]["a"] == 0.20 and rows["sft", "all", "ChatCORE"]["b"] == 0.30
    assert rows["sft", "gsm8k", "accuracy"]["a"] is None and rows["sft", "gsm8k", "accuracy"]["delta"] is None
    assert {r["stage"] for r in eq.compare(conn, "run0", "run3", stage="base")} == {"base"}
    with pytest.raises(LookupError, match="nope"):
        eq.compare(conn, "run0", "nope")


def test_best_per_depth(conn):
    seed(conn)
    rows = eq.best(conn, metric="ChatCORE", by="depth")
    assert [(r["depth"], r["value"], r["run_id"], r["checkpoint_id"]) for r in rows] == [
        (4, 0.25, "run1", "sft1"),
        (6, 0.30, "run3", "sft3"),
    ]
    lowest = eq.best(conn, metric="CORE", by="depth", higher_is_better=False)
    assert [r["run_id"] for r in lowest] == ["run0", "run2"]
    with pytest.raises(ValueError, match="by must be one of"):
        eq.best(conn, by="depth; DROP TABLE runs")


def test_latest_is_one_checkpoints_scorecard(conn):
    seed(conn)
    assert [(r["checkpoint_id"], r["metric"]) for r in eq.latest(conn)] == [("sft3", "ChatCORE")]
    rows = eq.latest(conn, stage="base", run_id="run1")
    assert [(r["task"], r["metric"]) for r in rows] == [("all", "CORE"), ("hellaswag", "centered")]
    assert {r["checkpoint_id"] for r in rows} == {"base1"}


def test_documented_sql_answers_the_questions(conn):
    seed(conn)
    core_sql, best_sql = re.findall(r"```sql\n(.*?)```", eq.__doc__, re.S)
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
    assert lines[0].split()[:3] == ["run_id", "stage", "checkpoint"]
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
    assert "no run id starts with 'typo'; recent runs: run3, run2" in capsys.readouterr().err


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


def test_cli_takes_run_prefixes_and_fits_120_columns(db, capsys):
    """Real-sized ids (Dagster run UUIDs, sha256 checkpoint ids) and CORE's longest task names."""
    runs = ["6c1f0a7e-93d2-4b1c-8e55-0f6a2b9c4d11", "e2b4c6d8-1a3c-4e5f-9a7b-2c4d6e8f0a12"]
    with es.connect_rw(db) as c:
        for i, run in enumerate(runs):
            sha = f"{i}" * 64
            tasks = {"all": {"CORE[18/22]": 0.1 + i / 10}, "bigbench_language_identification": {"centered": 0.01},
                     "commonsense_qa": {"accuracy": 0.3}}
            es.record(c, run_id=run, stage="base", checkpoint_id=sha, step=123456, uri="file:///x", profile="d20",
                      depth=20, scores=tasks, tokens_seen=11_200_000_000, recorded_at=T0 + timedelta(hours=i))
    for argv in (["history", "--metric", "centered"], ["latest", "--run", "6c1f0a7e"],
                 ["best", "--metric", "CORE[18/22]"], ["compare", "6c1f", "e2b4"],
                 ["sql", "SELECT run_id, checkpoint_id, task, metric, value, tokens_seen FROM eval_results"]):
        assert main(["--db", str(db), *argv]) == 0, capsys.readouterr().err
        lines = capsys.readouterr().out.splitlines()
        assert max(len(line) for line in lines) <= 120, "\n".join(lines)
        assert runs[0] not in "\n".join(lines) and "0" * 13 not in "\n".join(lines)
    assert main(["--db", str(db), "latest", "--run", "6c1f0a7e"]) == 0
    out = capsys.readouterr().out
    assert "6c1f0a7e " in out and "000000000000 " in out and "11.2B" in out and "bigbench_lan…" in out
    assert main(["--db", str(db), "--wide", "latest", "--run", "6c1f0a7e"]) == 0
    out = capsys.readouterr().out
    assert runs[0] in out and "0" * 64 in out and "bigbench_language_identification" in out

    assert main(["--db", str(db), "history", "--metric", "CORE"]) == 1
    assert "did you mean 'CORE[18/22]'?" in capsys.readouterr().err


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
