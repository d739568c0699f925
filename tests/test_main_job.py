"""The README's main command, `bash scripts/pipeline.sh`, run as a user runs it (with the profile shrunk through
NANOCHAT_PROFILE_OVERRIDES so it takes about a minute): every pipeline asset of the partition materializes from the
CLI, and what it prints (the paths, the scores, the UI / query / chat commands) is true."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_pipeline import FAST

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run_pipeline(home: Path, shared_data: Path, overrides: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NANOCHAT_ARTIFACTS", "NANOCHAT_WORKSPACE", "NANOCHAT_DUCKDB", "DAGSTER_HOME")}
    env.update(NANOCHAT_HOME=str(home), NANOCHAT_SHARED_DATA=str(shared_data), NANOCHAT_PROFILE_OVERRIDES=overrides)
    return subprocess.run(["bash", "scripts/pipeline.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_main_job_materializes_the_partition_and_prints_the_truth(tmp_path, shared_data):
    home = tmp_path / "state"
    out = run_pipeline(home, shared_data, json.dumps(FAST))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    text = out.stdout
    assert "== done in" in text
    assert f"artifacts:      {home / 'artifacts'}" in text
    pointer = json.loads((home / "artifacts" / "promoted" / "latest.json").read_text())
    assert pointer["profile"] == "tiny"
    report = next(line for line in text.splitlines() if line.startswith("report card:")).split(":", 1)[1].strip()
    assert report and Path(report).is_file() and "/report/tiny/" in report
    assert "UI:     scripts/ui.sh" in text and "chat:   .venv/bin/python -m app" in text
    # The latest scorecard printed by the job is the history's: the SFT checkpoint's ChatCORE row is in it.
    assert "ChatCORE" in text
    # The printed query command, run from the repository with no variable but NANOCHAT_HOME, reads the same file.
    env = {**os.environ, "NANOCHAT_HOME": str(home)}
    env.pop("NANOCHAT_DUCKDB", None)
    query = subprocess.run([str(REPO / ".venv/bin/nanochat-evals"), "latest", "--json"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert query.returncode == 0, query.stderr
    assert json.loads(query.stdout), "nanochat-evals latest printed no rows"


def test_bad_overrides_are_named_before_anything_runs(tmp_path, shared_data):
    out = run_pipeline(tmp_path / "state", shared_data, "[1, 2]", timeout=600)
    assert out.returncode != 0
    assert "NANOCHAT_PROFILE_OVERRIDES must be a JSON object" in out.stderr
    assert not (tmp_path / "state" / "artifacts").exists()
