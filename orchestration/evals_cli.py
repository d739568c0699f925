"""
nanochat-evals: read the eval history (see orchestration/eval_store.py) from the command line.

    nanochat-evals history [--metric CORE] [--task T] [--stage S] [-n 10]
    nanochat-evals compare RUN_A RUN_B [--stage S]
    nanochat-evals best [--metric ChatCORE] [--by depth]
    nanochat-evals latest [--stage S] [--run RUN]
    nanochat-evals sql "SELECT ..."

--db PATH (default $NANOCHAT_DUCKDB, else $NANOCHAT_HOME/evals.duckdb; see orchestration/home.py) and --json
go before or after the subcommand. The database is always opened read-only with file access disabled, so this
tool can run beside a writer's short transactions (retrying while one holds the lock) and `sql` cannot change
anything, on disk or elsewhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

import duckdb

from orchestration import eval_store as es
from orchestration import home


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    db = getattr(args, "db", None) or home.duckdb_path()
    try:
        conn = es.connect_ro(db, config={"enable_external_access": False})
    except (FileNotFoundError, es.DatabaseLockedError) as e:
        return _fail(e)
    try:
        if args.command != "sql":  # raw SQL may well be aimed at an older or newer schema on purpose
            es.check_schema(conn)
        columns, rows = args.run(conn, args)
    except (duckdb.Error, es.SchemaVersionError, LookupError, ValueError) as e:
        return _fail(e)
    finally:
        conn.close()
    if getattr(args, "json", False):
        print(json.dumps([dict(zip(columns, row)) for row in rows], indent=2, default=_jsonable))
    else:
        print(_table(_headers(columns, args), rows))
    return 0


def _parser() -> argparse.ArgumentParser:
    # SUPPRESS lets the shared options sit before or after the subcommand without one default hiding the other.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", type=Path, default=argparse.SUPPRESS, help="the eval DuckDB file")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON, not a table")

    parser = argparse.ArgumentParser(prog="nanochat-evals", description=__doc__.split("\n")[1], parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("history", parents=[common], help="a metric over the last N runs, oldest first")
    p.add_argument("--metric", default="CORE")
    p.add_argument("--task")
    p.add_argument("--stage", choices=es.STAGES)
    p.add_argument("-n", "--last", type=int, default=10, help="how many runs (default 10)")
    p.set_defaults(run=_history)

    p = sub.add_parser("compare", parents=[common], help="two runs side by side, with b - a")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--stage", choices=es.STAGES)
    p.set_defaults(run=_compare)

    p = sub.add_parser("best", parents=[common], help="the best value of a metric per depth (or profile, ...)")
    p.add_argument("--metric", default="ChatCORE")
    p.add_argument("--by", default="depth", choices=es.BEST_BY)
    p.add_argument("--task")
    p.add_argument("--stage", choices=es.STAGES)
    p.add_argument("--lower-is-better", action="store_true", help="for losses such as bpb")
    p.set_defaults(run=_best)

    p = sub.add_parser("latest", parents=[common], help="every result of the most recently evaluated checkpoint")
    p.add_argument("--stage", choices=es.STAGES)
    p.add_argument("--run", dest="run_id")
    p.set_defaults(run=_latest)

    p = sub.add_parser("sql", parents=[common], help="any read-only SQL (tables: runs, checkpoints, eval_results)")
    p.add_argument("query")
    p.set_defaults(run=_sql)
    return parser


# Each subcommand returns (columns, rows); the same pair feeds both the table and the JSON.
Result = tuple[list[str], list[tuple]]


def _history(conn: duckdb.DuckDBPyConnection, args: argparse.Namespace) -> Result:
    return _columns(es.history(conn, metric=args.metric, task=args.task, stage=args.stage, last_n=args.last))


def _compare(conn: duckdb.DuckDBPyConnection, args: argparse.Namespace) -> Result:
    return _columns(es.compare(conn, args.run_a, args.run_b, stage=args.stage))


def _best(conn: duckdb.DuckDBPyConnection, args: argparse.Namespace) -> Result:
    higher = not args.lower_is_better
    return _columns(
        es.best(conn, metric=args.metric, by=args.by, task=args.task, stage=args.stage, higher_is_better=higher)
    )


def _latest(conn: duckdb.DuckDBPyConnection, args: argparse.Namespace) -> Result:
    return _columns(es.latest(conn, stage=args.stage, run_id=args.run_id))


def _sql(conn: duckdb.DuckDBPyConnection, args: argparse.Namespace) -> Result:
    cursor = conn.execute(args.query)
    if cursor.description is None:  # a statement without a result set
        return [], []
    return [d[0] for d in cursor.description], cursor.fetchall()


def _columns(rows: list[dict[str, Any]]) -> Result:
    columns = list(rows[0]) if rows else []
    return columns, [tuple(row.values()) for row in rows]


def _headers(columns: list[str], args: argparse.Namespace) -> list[str]:
    # compare's a/b columns read better under the run ids they stand for.
    if args.command == "compare":
        return [{"a": args.run_a, "b": args.run_b}.get(c, c) for c in columns]
    return columns


def _table(columns: list[str], rows: list[tuple]) -> str:
    if not rows:
        return "(no rows)"
    signed = [c in ("delta", "change") for c in columns]
    cells = [[_cell(v, signed[i]) for i, v in enumerate(row)] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    # Numbers right-aligned so their decimal points line up; everything else left-aligned.
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _cell(value: Any, signed: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:+.4f}" if signed else f"{value:.4f}"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    return str(value)


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, (date, datetime)) else str(value)


def _fail(error: Exception) -> int:
    print(f"nanochat-evals: error: {error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
