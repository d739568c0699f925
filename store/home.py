"""
One state root: every default path of the pipeline, the UI, the CLI and the app derives from NANOCHAT_HOME
(default `.nanochat-dagster/` in the working directory), so a UI-launched run, `nanochat-evals` and `python -m app`
read and write the same files with no other variable set.

    $NANOCHAT_HOME/artifacts       the artifact store            (NANOCHAT_ARTIFACTS: a path or s3://bucket/prefix)
    $NANOCHAT_HOME/work            scratch space of runs         (NANOCHAT_WORKSPACE)
    $NANOCHAT_HOME/evals.duckdb    the eval history              (NANOCHAT_DUCKDB)
    $NANOCHAT_HOME/home            DAGSTER_HOME: runs, event log (DAGSTER_HOME)

The variable in brackets overrides one path (e.g. artifacts on S3, the rest local). Dagster-free: the app uses it.
`python -m store.home` creates DAGSTER_HOME with its dagster.yaml if missing and prints the resolved paths as
shell exports (scripts/ui.sh and scripts/pipeline.sh eval it).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

DEFAULT_HOME = ".nanochat-dagster"

# The instance settings of a local DAGSTER_HOME. One op at a time per pool: the training and eval assets share the
# pool "gpu", so two runs never train at once. No telemetry: the pipeline must work offline.
DAGSTER_YAML = """\
concurrency:
  pools:
    default_limit: 1
telemetry:
  enabled: false
"""


def home() -> Path:
    """$NANOCHAT_HOME, else .nanochat-dagster in the working directory (absolute)."""
    return Path(os.environ.get("NANOCHAT_HOME") or DEFAULT_HOME).expanduser().resolve()


def artifacts_url() -> str:
    """The artifact store: $NANOCHAT_ARTIFACTS (a path or s3://bucket/prefix), else <home>/artifacts."""
    return os.environ.get("NANOCHAT_ARTIFACTS") or str(home() / "artifacts")


def workspace_dir() -> Path:
    return _path("NANOCHAT_WORKSPACE", "work")


def duckdb_path() -> Path:
    return _path("NANOCHAT_DUCKDB", "evals.duckdb")


def dagster_home() -> Path:
    return _path("DAGSTER_HOME", "home")


def ensure_dagster_home() -> Path:
    """DAGSTER_HOME, created with DAGSTER_YAML unless it already holds a dagster.yaml (a user's is kept)."""
    path = dagster_home()
    path.mkdir(parents=True, exist_ok=True)
    config = path / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    return path


def _path(variable: str, name: str) -> Path:
    value = os.environ.get(variable)
    return Path(value).expanduser().resolve() if value else home() / name


def git_sha() -> str:
    """The code's git revision (12 hex digits), recorded with every run; 'unknown' outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main() -> int:
    paths = {"NANOCHAT_HOME": home(), "DAGSTER_HOME": ensure_dagster_home(), "NANOCHAT_ARTIFACTS": artifacts_url(),
             "NANOCHAT_WORKSPACE": workspace_dir(), "NANOCHAT_DUCKDB": duckdb_path()}
    for name, value in paths.items():
        print(f"export {name}={shlex.quote(str(value))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
