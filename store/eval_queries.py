"""
Reading the eval history (store/eval_store.py owns the schema and the writers): what `nanochat-evals`
prints and what the chat app shows (its Scores tab, grouped by `series_groups`, and the scores in its model
picker). Plain functions over a duckdb connection opened with `eval_store.connect_ro` (the app opens its short
ones through `read_history`, which turns a missing, busy or unreadable file into a message); lists of dicts, no
pandas; no Dagster.

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

import difflib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from store import eval_store
from store.eval_store import AGGREGATE_TASK, LOSS_TASKS

T = TypeVar("T")

BEST_BY = ("depth", "profile", "stage", "task")

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
        FROM picked e JOIN recent_runs USING (run_id) LEFT JOIN checkpoints c USING (run_id, stage, checkpoint_id)
        ORDER BY e.recorded_at, e.run_id, e.stage, e.task, e.checkpoint_id
    """
    return _rows(conn, sql, {"metric": metric, "task": task, "stage": stage, "last_n": last_n})


def by_step(conn: duckdb.DuckDBPyConnection, metric: str = "CORE", task: str = "all", stage: str | None = None,
            run_id: str | None = None) -> list[dict[str, Any]]:
    """One run's results of a metric by training step, with the tokens seen at each (the latest run by default).

    Base training with core_every records CORE for each published intermediate step (orchestration/resume.py):
    this is that curve, followed by the final checkpoint's score.
    """
    sql = f"""
        WITH picked AS (
            SELECT * FROM eval_results
            WHERE metric = $metric AND task = $task AND ($stage IS NULL OR stage = $stage)
        ),
        run AS (
            SELECT coalesce($run_id, (SELECT run_id FROM picked ORDER BY recorded_at DESC, run_id DESC LIMIT 1))
                AS run_id
        )
        SELECT {_RESULT_COLUMNS}
        FROM picked e JOIN run USING (run_id) LEFT JOIN checkpoints c USING (run_id, stage, checkpoint_id)
        ORDER BY e.stage, c.step, e.tokens_seen, e.recorded_at
    """
    return _rows(conn, sql, {"metric": metric, "task": task, "stage": stage, "run_id": run_id})


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
        FROM eval_results e LEFT JOIN checkpoints c USING (run_id, stage, checkpoint_id)
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
        LEFT JOIN checkpoints c USING (run_id, stage, checkpoint_id)
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


# The groups the app's Scores tab lists series under: the aggregates, CORE's per-task results (measured on base
# checkpoints) apart from ChatCORE's (mid and SFT checkpoints), and loss / bits per byte.
SCORE_GROUPS = ("Headline", "CORE tasks", "ChatCORE tasks", "Loss and bpb")


def series_groups(conn: duckdb.DuckDBPyConnection) -> dict[str, list[tuple[str, str]]]:
    """Every (task, metric) recorded, under its group (SCORE_GROUPS order; empty groups left out)."""
    rows = conn.execute("SELECT task, metric, bool_or(stage = 'base') FROM eval_results GROUP BY task, metric")
    groups: dict[str, list[tuple[str, str]]] = {group: [] for group in SCORE_GROUPS}
    for task, metric, on_base in sorted(rows.fetchall()):
        group = ("Headline" if task == AGGREGATE_TASK else "Loss and bpb" if task in LOSS_TASKS
                 else "CORE tasks" if on_base else "ChatCORE tasks")
        groups[group].append((task, metric))
    return {group: pairs for group, pairs in groups.items() if pairs}


class HistoryUnavailable(RuntimeError):
    """The eval history cannot be read now; the message says why, in words for a person. busy: a writer holds it."""

    def __init__(self, message: str, busy: bool = False):
        super().__init__(message)
        self.busy = busy


def read_history(db_path: str | os.PathLike, query: Callable[[duckdb.DuckDBPyConnection], T], retries: int = 3) -> T:
    """query(conn) on a short read-only connection, for a reader that must keep going (the chat app): a missing,
    busy (retried briefly) or unreadable file is a HistoryUnavailable, never a crash."""
    path = Path(db_path)
    if not path.exists():
        raise HistoryUnavailable(f"no eval history at `{path}` yet")
    try:
        with eval_store.connect_ro(path, retries=retries, backoff=0.1, max_backoff=0.5) as conn:
            eval_store.check_schema(conn)
            return query(conn)
    except eval_store.DatabaseLockedError as e:
        raise HistoryUnavailable("the eval history is busy (a pipeline run is writing to it)", busy=True) from e
    except (duckdb.Error, eval_store.SchemaVersionError, OSError) as e:
        raise HistoryUnavailable(f"cannot read the eval history at `{path}`: {type(e).__name__}: {e}") from e


def resolve_run(conn: duckdb.DuckDBPyConnection, run: str) -> str:
    """The full run id for `run`: itself, or the one run whose id starts with it (8 characters, as the Dagster UI
    shows them, are plenty). LookupError naming the candidates when it matches none or several."""
    runs = "SELECT run_id FROM runs UNION SELECT run_id FROM eval_results"
    if _rows(conn, f"SELECT run_id FROM ({runs}) WHERE run_id = $run", {"run": run}):
        return run
    found = [r["run_id"] for r in _rows(conn, f"SELECT run_id FROM ({runs}) WHERE starts_with(run_id, $run) "
                                              "ORDER BY run_id LIMIT 6", {"run": run})]
    if len(found) == 1:
        return found[0]
    if found:
        raise LookupError(f"run id prefix {run!r} is ambiguous: it matches {', '.join(found[:5])}"
                          f"{', ...' if len(found) > 5 else ''}; give more characters")
    recent = [r["run_id"][:8] for r in _rows(conn, "SELECT run_id FROM eval_results GROUP BY run_id "
                                                   "ORDER BY max(recorded_at) DESC LIMIT 5", {})]
    raise LookupError(f"no run id starts with {run!r}" + (f"; recent runs: {', '.join(recent)}" if recent else ""))


def metrics(conn: duckdb.DuckDBPyConnection) -> list[str]:
    """Every metric name recorded, aggregates first (CORE[18/22], ChatCORE, ...)."""
    return list(dict.fromkeys(metric for _, metric in series(conn)))


def unknown_metric_message(conn: duckdb.DuckDBPyConnection, metric: str) -> str | None:
    """None when `metric` has rows; else a message listing the metrics that exist, the likeliest first
    (`CORE` suggests `CORE[18/22]`: a partial suite is recorded under its coverage label)."""
    known = metrics(conn)
    if metric in known:
        return None
    if not known:
        return f"no results for metric {metric!r}: the eval history is empty"
    close = [m for m in known if m.split("[")[0].lower() == metric.split("[")[0].lower()]
    close += [m for m in difflib.get_close_matches(metric, known, n=3, cutoff=0.6) if m not in close]
    hint = f"did you mean {' or '.join(repr(m) for m in close)}? " if close else ""
    return f"no results for metric {metric!r}; {hint}metrics recorded: {', '.join(known)}"


def _rows(conn: duckdb.DuckDBPyConnection, sql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    cursor = conn.execute(sql, dict(params))  # DuckDB insists every parameter passed is used in the statement
    columns = [d[0] for d in cursor.description]
    return [dict(zip(columns, row)) for row in cursor.fetchall()]
