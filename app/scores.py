"""
The Scores tab's data: the eval history's series by group (store.eval_queries.SCORE_GROUPS: the CORE and
ChatCORE aggregates, CORE's tasks apart from ChatCORE's, loss and bpb), and one series as a table and a plot.

DuckDB lets one process write or many read, never both: each refresh is one short read-only connection that
says "busy" instead of failing while the pipeline writes (store.eval_queries.read_history).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timezone
from pathlib import Path

import pandas as pd
from matplotlib.dates import DateFormatter
from matplotlib.figure import Figure

from app import TIME_FORMAT
from store import eval_queries

SEPARATOR = " · "  # between task and metric in a series name: "all · CORE", "arc_easy · accuracy"
TABLE_COLUMNS = ["recorded at (UTC)", "profile", "depth", "run_id", "stage", "step", "checkpoint", "task", "metric",
                 "value", "change", "tokens_seen"]
MAX_RUNS = 200


@dataclass
class Scores:
    groups: dict[str, list[str]] = field(default_factory=dict)  # group -> its "task · metric" series
    group: str | None = None
    selected: str | None = None
    table: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=TABLE_COLUMNS))
    message: str = ""  # what to tell the user: empty, busy, unreadable, ...

    def plot(self) -> Figure:
        """One line per profile, depth and stage over time; the legend beside the axes, so it never covers or
        clips a line, and times in TIME_FORMAT (UTC: the recorded times are naive UTC, shown as they are)."""
        fig = Figure(figsize=(12, 3.8), layout="constrained")
        ax = fig.add_subplot()
        df = self.table.assign(at=pd.to_datetime(self.table[TABLE_COLUMNS[0]]))
        for name, rows in df.groupby(df["profile"].astype(str) + " d" + df["depth"].astype(str) + " " + df["stage"]):
            ax.plot(rows["at"], rows["value"], marker="o", label=name)
        if df["at"].nunique() == 1:  # one run: an hour around it (matplotlib would span years)
            ax.set_xlim(df["at"].iloc[0] - pd.Timedelta(minutes=30), df["at"].iloc[0] + pd.Timedelta(minutes=30))
        ax.xaxis.set_major_formatter(DateFormatter(TIME_FORMAT, tz=timezone.utc))
        ax.tick_params(axis="x", labelrotation=20)
        ax.set(xlabel="recorded at (UTC)", ylabel=self.selected or "value")
        ax.grid(alpha=0.3)
        if len(df):
            ax.legend(title="profile, depth, stage", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return fig


def series_name(task: str, metric: str) -> str:
    return f"{task}{SEPARATOR}{metric}"


def pick(groups: dict[str, list[str]], group: str | None, selected: str | None) -> tuple[str, str]:
    """The (group, series) to show: the one asked for where it exists, else the group's (or the history's)
    ChatCORE, else its CORE, else its first series."""
    for name, names in groups.items():
        if selected in names:
            return name, selected
    pool = groups[group] if group in groups else [s for names in groups.values() for s in names]
    aggregates = [s for s in pool if s.startswith(series_name(eval_queries.AGGREGATE_TASK, ""))]
    selected = next((s for prefix in ("ChatCORE", "CORE") for s in aggregates
                     if s.split(SEPARATOR, 1)[1].startswith(prefix)), pool[0])
    return next(name for name, names in groups.items() if selected in names), selected


def read_scores(db_path: str | Path, group: str | None = None, selected: str | None = None,
                retries: int = 3) -> Scores:
    """The grouped series in the history and the rows of the one picked (see pick)."""
    def query(conn) -> Scores:
        groups = {name: [series_name(*pair) for pair in pairs]
                  for name, pairs in eval_queries.series_groups(conn).items()}
        if not groups:
            return Scores(message="The eval history is empty: no run has recorded a score yet.")
        scores = Scores(groups, *pick(groups, group, selected))
        task, metric = scores.selected.split(SEPARATOR, 1)
        rows = eval_queries.history(conn, metric=metric, task=task, last_n=MAX_RUNS)
        scores.table = _table(rows)
        scores.message = f"{len(rows)} results for **{scores.selected}** (the latest {MAX_RUNS} runs at most)."
        return scores

    try:
        return eval_queries.read_history(db_path, query, retries)
    except eval_queries.HistoryUnavailable as e:
        hint = "Retry in a moment." if e.busy else "Run the pipeline's evals, or pass --duckdb."
        return Scores(message=f"{'⏳' if e.busy else '⚠️'} {str(e)[0].upper()}{str(e)[1:]}. {hint}")


def _table(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    df[TABLE_COLUMNS[0]] = pd.to_datetime(df["recorded_at"]).dt.strftime(TIME_FORMAT)  # sorts as text too
    df["checkpoint"] = df["checkpoint_id"].str.slice(0, 12)
    df["value"] = df["value"].round(4)
    df["change"] = df["change"].astype(float).round(4)
    return df[TABLE_COLUMNS]
