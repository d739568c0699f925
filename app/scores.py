"""
The Scores tab's data: the eval history in DuckDB as rows for a plot and a table.

DuckDB lets one process write or many read, never both. The pipeline writes in short transactions, so the app
opens a short read-only connection per refresh, retries briefly while a writer holds the file, and otherwise says
"busy" instead of failing (store.eval_store.connect_ro does the retrying).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from store import eval_queries, eval_store

SEPARATOR = " · "  # between task and metric in a series name: "all · CORE", "arc_easy · accuracy"
TABLE_COLUMNS = ["recorded_at", "profile", "depth", "run_id", "stage", "step", "checkpoint", "task", "metric",
                 "value", "change", "tokens_seen"]
MAX_RUNS = 200


@dataclass
class Scores:
    choices: list[str] = field(default_factory=list)  # "task · metric" series that exist in the history
    selected: str | None = None
    table: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=TABLE_COLUMNS))
    message: str = ""  # what to tell the user: empty, busy, unreadable, ...

    @property
    def plot(self) -> pd.DataFrame:
        """One line per profile, depth and stage, over time."""
        df = self.table[["recorded_at", "value", "stage", "profile", "depth"]].copy()
        df["recorded_at"] = pd.to_datetime(df["recorded_at"])
        df["series"] = df["profile"].astype(str) + " d" + df["depth"].astype(str) + " " + df["stage"].astype(str)
        return df[["recorded_at", "value", "series"]]


def series_name(task: str, metric: str) -> str:
    return f"{task}{SEPARATOR}{metric}"


def read_scores(db_path: str | Path, selected: str | None = None, retries: int = 3) -> Scores:
    """The series in the history and the rows of one of them (default: ChatCORE, else CORE, else the first)."""
    path = Path(db_path)
    if not path.exists():
        return Scores(message=f"No eval history at `{path}` yet: run the pipeline's evals (or pass --duckdb).")
    try:
        with eval_store.connect_ro(path, retries=retries, backoff=0.1, max_backoff=0.5) as conn:
            eval_store.check_schema(conn)
            pairs = eval_queries.series(conn)
            choices = [series_name(t, m) for t, m in pairs]
            aggregates = [series_name(t, m) for t, m in pairs if t == eval_store.AGGREGATE_TASK]
            if not choices:
                return Scores(message="The eval history is empty: no run has recorded a score yet.")
            if selected not in choices:  # ChatCORE, else CORE (full or partial suites), else the first series
                selected = next((c for prefix in ("ChatCORE", "CORE") for c in aggregates
                                 if c.split(SEPARATOR, 1)[1].startswith(prefix)), choices[0])
            task, metric = selected.split(SEPARATOR, 1)
            rows = eval_queries.history(conn, metric=metric, task=task, last_n=MAX_RUNS)
    except eval_store.DatabaseLockedError:
        return Scores(message="⏳ The eval history is busy (a pipeline run is writing to it). Retry in a moment.")
    except (duckdb.Error, eval_store.SchemaVersionError, OSError) as e:
        return Scores(message=f"⚠️ Cannot read the eval history at `{path}`: {type(e).__name__}: {e}")
    return Scores(choices, selected, _table(rows), f"{len(rows)} results for **{selected}** "
                                                   f"(the latest {MAX_RUNS} runs at most).")


def _table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    df["recorded_at"] = pd.to_datetime(df["recorded_at"]).dt.strftime("%Y-%m-%d %H:%M:%S")  # sorts as text too
    df["checkpoint"] = df["checkpoint_id"].str.slice(0, 12)
    df["value"] = df["value"].round(4)
    df["change"] = df["change"].astype(float).round(4)
    return df[TABLE_COLUMNS]
