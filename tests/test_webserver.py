"""The real Dagster webserver + daemon (`dagster dev`), driven through GraphQL as the UI drives it.

One `dagster dev` per module, on a free port, with DAGSTER_HOME, artifacts, workspace and eval history in tmp
dirs. Runs are launched with the UI's own `launchPipelineExecution` mutation on the implicit asset job, executed
by the daemon in a run process of its own, and their results read back through GraphQL; the asset graph page is then
rendered by a real headless Chromium (tests/browser.py) and saved as a screenshot for humans.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml
from browser import artifact_dir  # tests/ is on sys.path (rootless)
from dagster import DagsterRunStatus
from dagster_graphql import DagsterGraphQLClientError
from webserver_driver import (
    ASSET_JOB,
    REPO,
    DagsterDev,
    latest_materialization,
    launch,
    launch_run,
    materialized_partitions,
    run_errors,
    screenshot_asset_graph,
    screenshot_asset_pages,
    wait_for_run,
)

from orchestration.profiles import PROFILES

# The tiny profile, shrunk: the shared sample corpus and a 512-token vocabulary train in a few seconds.
FAST_PROFILE = {"name": "tiny", "corpus": "shared", "vocab_size": 512, "tok_max_chars": 2_000_000}
# Steps in the run's own process, as the launchpad allows, for the test that only needs a failing run: the default
# executor starts one more Python per step, and each start imports torch (~5 s apiece on a busy 2-core machine).
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),  # a hung server must not hang CI; the fixture's finalizer still stops it
    # dagster_graphql's client calls gql with arguments gql has deprecated: not this project's concern.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:gql"),
]


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory, shared_data) -> Iterator[DagsterDev]:
    root = tmp_path_factory.mktemp("dagster-dev")
    home = root / "home"
    home.mkdir()
    # The pool limit as scripts/pipeline.sh writes it. Telemetry off: the machine is offline. The "join the
    # community" dialog off: it would cover the asset graph in the screenshot.
    (home / "dagster.yaml").write_text(yaml.safe_dump({
        "concurrency": {"pools": {"default_limit": 1}},
        "telemetry": {"enabled": False},
        "nux": {"enabled": False},
    }))
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "NANOCHAT_ARTIFACTS": str(root / "artifacts"),
        "NANOCHAT_WORKSPACE": str(root / "work"),
        "NANOCHAT_DUCKDB": str(root / "evals.duckdb"),
        "NANOCHAT_ARTIFACT_CACHE": str(root / "cache"),  # never the user's ~/.cache
        "NANOCHAT_SHARED_DATA": str(shared_data),
    }
    server = DagsterDev(home, env)
    try:
        server.start()
        yield server
    finally:
        server.stop()



def test_materialize_through_graphql_then_see_it_in_the_asset_graph(dagster_dev, tmp_path):
    # The default (multiprocess) executor, exactly what the UI's Materialize button runs.
    run_config = {"resources": {"profile": {"config": FAST_PROFILE}}}
    run_id = launch_run(dagster_dev, ["raw_shards", "tokenizer"], run_config)
    status = wait_for_run(dagster_dev, run_id)
    assert status == DagsterRunStatus.SUCCESS, (
        f"run {run_id} ended {status.value}:\n" + "\n---\n".join(run_errors(dagster_dev, run_id))
        + f"\nserver log:\n{dagster_dev.log_tail()}")

    # The tokenizer's metadata, as the asset page shows it: real values from this run.
    mat_run, meta = latest_materialization(dagster_dev, "tokenizer")
    assert mat_run == run_id
    assert re.fullmatch(r"[0-9a-f]{64}", meta["sha256"]), meta
    assert meta["vocab_size"] == "512" and meta["max_chars"] == "2000000"  # counts as text: not plotted
    assert int(meta["bytes"]) > 0
    # The artifact is where the metadata says, under NANOCHAT_ARTIFACTS, and its manifest is what sha256 hashes.
    artifacts = Path(dagster_dev.env["NANOCHAT_ARTIFACTS"]).resolve()
    published = Path(unquote(urlparse(meta["uri"]).path))
    assert published == artifacts / meta["key"], (meta["uri"], meta["key"])
    assert {"tokenizer.pkl", "token_bytes.pt", "manifest.json"} <= {p.name for p in published.iterdir()}
    assert hashlib.sha256((published / "manifest.json").read_bytes()).hexdigest() == meta["sha256"]
    _, shards = latest_materialization(dagster_dev, "raw_shards")
    assert meta["raw_shards_sha256"] == shards["sha256"] and int(shards["num_shards"]) >= 2

    # Materialized for the run's profile partition only: the lineage of one profile.
    for asset in ("raw_shards", "tokenizer"):
        assert materialized_partitions(dagster_dev, asset) == (["tiny"], len(PROFILES)), asset

    out = artifact_dir() / "dagster_asset_graph.png"
    out.unlink(missing_ok=True)
    screenshot_asset_graph(dagster_dev, tmp_path / "chromium-profile", out, ["raw_shards", "tokenizer"])
    assert out.is_file() and out.stat().st_size > 10_000, out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_invalid_profile_errors_reach_the_graphql_client(dagster_dev):
    # An unknown profile name: config validation refuses the launch itself, naming the field and the value.
    bad_name = {"resources": {"profile": {"config": {"name": "d99"}}}}
    result = launch(dagster_dev, ["raw_shards"], bad_name)
    assert result["__typename"] == "RunConfigValidationInvalid", result
    messages = " ".join(e["message"] for e in result["errors"])
    assert "root:resources:profile:config:name" in messages and "d99" in messages
    # The official Python client surfaces the same error.
    with pytest.raises(DagsterGraphQLClientError, match="not in enum type ProfileName got d99"):
        dagster_dev.client().submit_job_execution(
            ASSET_JOB, repository_location_name=dagster_dev.location, repository_name=dagster_dev.repository,
            run_config=bad_name, asset_selection=["raw_shards"])

    # A well-typed but invalid override passes the config schema; RunProfile's validator fails the run, and its
    # message is in the run's event log.
    bad_depth = {"resources": {"profile": {"config": {"depth": -1}}}, **IN_PROCESS}
    run_id = launch_run(dagster_dev, ["raw_shards"], bad_depth)
    assert wait_for_run(dagster_dev, run_id) == DagsterRunStatus.FAILURE
    errors = run_errors(dagster_dev, run_id)
    assert any("depth=-1 is out of range" in e for e in errors), errors


# --- one state: the UI started as scripts/ui.sh starts it, the CLI and the app see the same files -----------------

PATH_VARIABLES = ("DAGSTER_HOME", "NANOCHAT_ARTIFACTS", "NANOCHAT_WORKSPACE", "NANOCHAT_DUCKDB", "NANOCHAT_BASE_DIR")

APP_SCORES = """
from app.__main__ import parse_args
from app.scores import read_scores
from store import home
from store.artifact_store import artifact_store_from_url

args = parse_args([])  # the app's defaults, as `python -m app` takes them
scores = read_scores(home.duckdb_path(), selected="validation \u00b7 val_bpb")
print(scores.message)
print(sorted(set(scores.table["run_id"])))
print(artifact_store_from_url(args.artifacts).is_published(sys.argv[1]))
"""


@pytest.mark.timeout(600)  # four stages, base_eval's CORE included, on a shared 2-core machine
def test_ui_cli_and_app_share_one_state(tmp_path, shared_data):
    """A run launched in the UI that scripts/ui.sh starts (only NANOCHAT_HOME set) lands where `nanochat-evals`
    and the app look by default: the same DuckDB rows, the same artifact store. The asset pages of that run, in
    Chromium, show the CORE table inline and the loss curves as an image (screenshots for docs/orchestration.md)."""
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k not in PATH_VARIABLES}
    env.update(NANOCHAT_HOME=str(state), PYTHON=sys.executable, NANOCHAT_SHARED_DATA=str(shared_data),
               NANOCHAT_ARTIFACT_CACHE=str(tmp_path / "cache"))
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    server = DagsterDev(log_dir, env, cmd=["bash", str(REPO / "scripts" / "ui.sh"), "{port}"])
    try:
        server.start()
        assert (state / "home" / "dagster.yaml").is_file()  # ui.sh created DAGSTER_HOME under NANOCHAT_HOME
        # The cheapest assets that write eval rows: the base checkpoint records its validation bpb, base_eval CORE.
        profile = {**FAST_PROFILE, "depth": 2, "max_seq_len": 64, "device_batch_size": 8, "total_batch_size": 1024,
                   "base_iterations": 6, "eval_every": 3, "eval_tokens": 2048, "core_max_per_task": 4}
        run_config = {"resources": {"profile": {"config": profile}}, **IN_PROCESS}
        stages = ["raw_shards", "tokenizer", "base_checkpoint", "base_eval"]
        run_id = launch_run(server, stages, run_config)
        status = wait_for_run(server, run_id, timeout=480)
        assert status == DagsterRunStatus.SUCCESS, "\n---\n".join(run_errors(server, run_id)) + server.log_tail()
        _, meta = latest_materialization(server, "base_checkpoint")
        assert meta["loss_curve"].startswith("![loss](data:image/png;base64,") and meta["step"] == "6"

        out = artifact_dir()
        # The UI's one-time "Join the Dagster community" dialog would cover the pages (ui.sh leaves it on): mark it
        # seen, as its Skip button does (a file under this test's DAGSTER_HOME).
        assert server.graphql("mutation { setNuxSeen }")["setNuxSeen"] is True
        assert screenshot_asset_pages(server, tmp_path / "chromium-pages", out) > 300  # the PNG decoded in Chromium
        screenshot_asset_graph(server, tmp_path / "chromium-graph", out / "dagster_lineage_after_run.png", stages)
        for name in ("dagster_eval_tables.png", "dagster_loss_plot.png", "dagster_lineage_after_run.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    finally:
        server.stop()
    assert (state / "evals.duckdb").is_file() and (state / "artifacts" / meta["key"]).is_dir()

    clean = {k: v for k, v in env.items() if k != "PYTHON"}  # the CLI and the app get NANOCHAT_HOME and nothing else
    cli = subprocess.run([sys.executable, "-m", "store.evals_cli", "latest", "--run", run_id[:8]],
                         cwd=REPO, env=clean, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert f"{run_id[:8]}  base" in cli.stdout and "val_bpb" in cli.stdout, cli.stdout

    app = subprocess.run([sys.executable, "-c", "import sys\n" + APP_SCORES, meta["key"]], cwd=REPO, env=clean,
                         capture_output=True, text=True, timeout=300)
    assert app.returncode == 0, app.stderr
    message, runs, published = app.stdout.splitlines()[-3:]
    assert "results for **validation · val_bpb**" in message
    assert runs == str([run_id]) and published == "True"
