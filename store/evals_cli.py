"""
nanochat-evals: read the eval history (see store/eval_store.py) from the command line.

    nanochat-evals history [--metric CORE] [--task T] [--stage S] [-n 10]
    nanochat-evals history --by-step [--run RUN]        one run's metric against its step and tokens seen
    nanochat-evals compare RUN_A RUN_B [--stage S]
    nanochat-evals best [--metric ChatCORE] [--by depth]
    nanochat-evals latest [--stage S] [--run RUN]
    nanochat-evals sql "SELECT ..."

--db PATH (default $NANOCHAT_DUCKDB, else $NANOCHAT_HOME/evals.duckdb; see store/home.py), --json and
--wide go before or after the subcommand. Run ids may be given by a prefix (the 8 characters the Dagster UI
shows). Tables fit a 120-column terminal: run ids are shown by their first 8 characters, checkpoint ids (sha256)
by 12, and long text is cut with "…"; --wide prints everything in full, --json too. A metric with no rows lists
the metrics that exist (a partial CORE suite is recorded as e.g. CORE[18/22]).

The database is always opened read-only with file access disabled, so this tool can run beside a writer's short
transactions (retrying while one holds the lock) and `sql` cannot change anything, on disk or elsewhere.
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

from store import eval_queries as eq
from store import eval_store as es
from store import home

WIDTH = 120  # the terminal the table must fit without --wide
SHORT_IDS = {"run_id": 8, "checkpoint_id": 12}  # as the Dagster UI shows run ids; 12 hex digits of a sha256
MIN_TEXT = 8  # a text column is never cut below this many characters


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
        print(_table(_headers(columns, args), rows, wide=getattr(args, "wide", False)))
    return 0


def _parser() -> argparse.ArgumentParser:
    # SUPPRESS lets the shared options sit before or after the subcommand without one default hiding the other.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", type=Path, default=argparse.SUPPRESS, help="the eval DuckDB file")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON, not a table")
    common.add_argument("--wide", action="store_true", default=argparse.SUPPRESS,
                        help="full ids and text (the table may then be wider than 120 columns)")

    parser = argparse.ArgumentParser(prog="nanochat-evals", description=__doc__.split("\n")[1], parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("history", parents=[common], help="a metric over the last N runs, oldest first")
    p.add_argument("--metric", default="CORE")
    p.add_argument("--task")
    p.add_argument("--stage", choices=es.STAGES)
    p.add_argument("-n", "--last", type=int, default=10, help="how many runs (default 10)")
    p.add_argument("--by-step", action="store_true",
                   help="one run (--run, default the latest) by training step, with tokens seen (core_every)")
    p.add_argument("--run", dest="run_id", help="with --by-step: the run (an id or its prefix)")
    p.set_defaults(run=_history)

    p = sub.add_parser("compare", parents=[common], help="two runs side by side, with b - a")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--stage", choices=es.STAGES)
    p.set_defaults(run=_compare)

    p = sub.add_parser("best", parents=[common], help="the best value of a metric per depth (or profile, ...)")
    p.add_argument("--metric", default="ChatCORE")
    p.add_argument("--by", default="depth", choices=eq.BEST_BY)
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
    _known_metric(conn, args.metric)
    if args.by_step:
        run_id = eq.resolve_run(conn, args.run_id) if args.run_id else None
        return _columns(eq.by_step(conn, metric=args.metric, task=args.task or es.AGGREGATE_TASK, stage=args.stage,
                                   run_id=run_id))
    if args.run_id:
        raise ValueError("--run goes with --by-step (history without it spans the last N runs)")
    return _columns(eq.history(conn, metric=args.metric, task=args.task, stage=args.stage, last_n=args.last))


def _compare(conn: duckdb.DuckDBPyConnection, args: argparse.Namespace) -> Result:
    args.run_a, args.run_b = eq.resolve_run(conn, args.run_a), eq.resolve_run(conn, args.run_b)
    return _columns(eq.compare(conn, args.run_a, args.run_b, stage=args.stage))


def _best(conn: duckdb.DuckDBPyConnection, args: argparse.Namespace) -> Result:
    _known_metric(conn, args.metric)
    higher = not args.lower_is_better
    return _columns(
        eq.best(conn, metric=args.metric, by=args.by, task=args.task, stage=args.stage, higher_is_better=higher)
    )


def _latest(conn: duckdb.DuckDBPyConnection, args: argparse.Namespace) -> Result:
    run_id = eq.resolve_run(conn, args.run_id) if args.run_id else None
    return _columns(eq.latest(conn, stage=args.stage, run_id=run_id))


def _known_metric(conn: duckdb.DuckDBPyConnection, metric: str) -> None:
    message = eq.unknown_metric_message(conn, metric)
    if message:
        raise LookupError(message)


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
        short = getattr(args, "wide", False) is False
        names = {"a": args.run_a, "b": args.run_b}
        return [names[c][:SHORT_IDS["run_id"]] if c in names and short else names.get(c, c) for c in columns]
    return columns


def _table(columns: list[str], rows: list[tuple], wide: bool = False) -> str:
    if not rows:
        return "(no rows)"
    cells = [[_cell(v, c, wide) for c, v in zip(columns, row)] for row in rows]
    if not wide:  # "checkpoint_id" over a 12-character column would be cut
        columns = ["checkpoint" if c == "checkpoint_id" else c for c in columns]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    # Numbers right-aligned so their decimal points line up; everything else left-aligned.
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) for i in range(len(columns))]
    if not wide:  # ids, text and labels may be cut; numbers and times never are
        fixed = [n or all(isinstance(r[i], (date, datetime)) or r[i] is None for r in rows)
                 for i, n in enumerate(numeric)]
        widths = _fit(widths, [len(c) for c in columns], fixed)
    clip = [_clip(c, w) for c, w in zip(columns, widths)]

    def line(values: Sequence[str]) -> str:
        values = [_clip(v, w) for v, w in zip(values, widths)]
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(clip), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _fit(widths: list[int], headers: list[int], fixed: list[bool]) -> list[int]:
    """Narrow the widest text column, one character at a time, until the table fits WIDTH."""
    widths = list(widths)
    while sum(widths) + 2 * (len(widths) - 1) > WIDTH:
        text = [i for i, f in enumerate(fixed) if not f and widths[i] > max(MIN_TEXT, min(headers[i], 12))]
        if not text:
            break  # nothing left to cut: better a wide table than one without its numbers
        widths[max(text, key=lambda i: widths[i])] -= 1
    return widths


def _clip(value: str, width: int) -> str:
    return value if len(value) <= width else value[:width - 1] + "…"


def _cell(value: Any, column: str, wide: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:+.4f}" if column in ("delta", "change") else f"{value:.4f}"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds" if wide else "minutes")
    if column == "tokens_seen" and isinstance(value, int) and not wide:
        return _si(value)
    if column in SHORT_IDS and not wide:
        return str(value)[:SHORT_IDS[column]]
    return str(value)


def _si(n: int) -> str:
    """11200000000 -> 11.2B: token counts at a glance (--wide and --json give the exact number)."""
    for factor, unit in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.3g}{unit}"
    return str(n)


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, (date, datetime)) else str(value)


def _fail(error: Exception) -> int:
    print(f"nanochat-evals: error: {error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
