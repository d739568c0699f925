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
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
import requests
import yaml
from browser import artifact_dir, chromium_page  # tests/ is on sys.path (rootless)
from dagster import DagsterRunStatus
from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError
from playwright.sync_api import Locator, Page

from orchestration.profiles import PROFILES

REPO = Path(__file__).resolve().parents[1]
ASSET_JOB = "__ASSET_JOB"  # the implicit job the UI's "Materialize" button launches assets with
# The tiny profile, shrunk: the shared sample corpus and a 512-token vocabulary train in a few seconds.
FAST_PROFILE = {"name": "tiny", "corpus": "shared", "vocab_size": 512, "tok_max_chars": 2_000_000}
# Steps in the run's own process, as the launchpad allows, for the test that only needs a failing run: the default
# executor starts one more Python per step, and each start imports torch (~5 s apiece on a busy 2-core machine).
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}
TERMINAL = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),  # a hung server must not hang CI; the fixture's finalizer still stops it
    # dagster_graphql's client calls gql with arguments gql has deprecated: not this project's concern.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:gql"),
]

# The mutation of the UI's launchpad and "Materialize" button, copied from dagster-webserver 1.13's bundle
# (plus __typename so the test can tell the outcomes apart).
LAUNCH_MUTATION = """
mutation LaunchPipelineExecution($executionParams: ExecutionParams!) {
  launchPipelineExecution(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { id runId pipelineName } }
    ... on PipelineNotFoundError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message path } }
    ... on PythonError { message stack }
  }
}
"""

WORKSPACE_QUERY = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on RepositoryLocation { name repositories { name pipelines { name } } }
          ... on PythonError { message }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""

RUN_EVENTS_QUERY = """
query RunEvents($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run {
      status
      eventConnection(limit: 1000) {
        events {
          __typename
          ... on MessageEvent { message level stepKey }
          ... on ErrorEvent { error { message causes { message } } }
        }
      }
    }
  }
}
"""

LATEST_MATERIALIZATION_QUERY = """
query LatestMaterialization($assetKey: AssetKeyInput!) {
  assetOrError(assetKey: $assetKey) {
    __typename
    ... on Asset {
      assetMaterializations(limit: 1) {
        runId
        metadataEntries {
          __typename
          label
          ... on TextMetadataEntry { text }
          ... on IntMetadataEntry { intValue }
          ... on FloatMetadataEntry { floatValue }
          ... on MarkdownMetadataEntry { mdStr }
        }
      }
    }
  }
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DagsterDev:
    """`dagster dev -m orchestration.definitions` (webserver, daemon, code server) in its own process group."""

    def __init__(self, home: Path, env: dict[str, str], cmd: list[str] | None = None) -> None:
        self.home = home
        self.env = env
        self.cmd = cmd  # default: dagster dev on the port; {port} in a given command is replaced by it
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / "dagster-dev.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.location = ""  # filled by start(): the code location and repository holding the asset job
        self.repository = ""

    def start(self, timeout: float = 120.0) -> None:
        cmd = [str(Path(sys.executable).parent / "dagster"), "dev", "-m", "orchestration.definitions",
               "-h", "127.0.0.1", "-p", str(self.port)]
        if self.cmd:
            cmd = [part.replace("{port}", str(self.port)) for part in self.cmd]
        # A new session: a Ctrl-C in the test runner does not reach it, and stop() can signal the whole group
        # (webserver, daemon, code servers and run workers) at once.
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        self._wait_for(lambda: requests.get(f"{self.url}/server_info", timeout=2).ok, deadline, "/server_info")
        self._wait_for(self._find_asset_job, deadline, "the code location to load")

    def _wait_for(self, ready, deadline: float, what: str) -> None:
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"dagster dev exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                if ready():
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"dagster dev: timed out waiting for {what}; log:\n{self.log_tail()}")

    def _find_asset_job(self) -> bool:
        """True once a loaded repository has the asset job; a code location that failed to load is an error."""
        workspace = self.graphql(WORKSPACE_QUERY)["workspaceOrError"]
        for entry in workspace.get("locationEntries", []):
            location = entry["locationOrLoadError"] or {}
            if location.get("__typename") == "PythonError":
                raise RuntimeError(f"code location {entry['name']} failed to load: {location['message']}")
            for repo in location.get("repositories", []):
                if any(p["name"] == ASSET_JOB for p in repo["pipelines"]):
                    self.location, self.repository = location["name"], repo["name"]
                    return True
        return False

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT to the group (dagster dev's clean shutdown, ~3 s), SIGKILL if it hangs, then sweep the group so
        no straggler (a run worker, a code server) outlives the test."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the leader's pid is the group id
        if self.proc.poll() is None:
            os.killpg(pgid, signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.proc.wait(timeout)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:  # the usual case: the whole group is gone already
            pass

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        resp = requests.post(f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=60)
        resp.raise_for_status()
        body = resp.json()
        if body.get("errors"):
            raise AssertionError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def client(self) -> DagsterGraphQLClient:
        return DagsterGraphQLClient("127.0.0.1", port_number=self.port)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


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


def launch(server: DagsterDev, assets: list[str], run_config: dict, partition: str = "tiny") -> dict[str, Any]:
    """Launch `assets` as the UI does: the asset job with an asset selection, run config as launchpad YAML, the
    profile partition picked in the Materialize dialog as the run's partition tag."""
    params = {
        "runConfigData": yaml.safe_dump(run_config),
        "mode": "default",
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]},
        "selector": {
            "repositoryLocationName": server.location,
            "repositoryName": server.repository,
            "jobName": ASSET_JOB,
            "assetSelection": [{"path": [asset]} for asset in assets],
            "assetCheckSelection": [],
        },
    }
    return server.graphql(LAUNCH_MUTATION, {"executionParams": params})["launchPipelineExecution"]


def launch_run(server: DagsterDev, assets: list[str], run_config: dict) -> str:
    result = launch(server, assets, run_config)
    assert result["__typename"] == "LaunchRunSuccess", f"launch refused: {result}"
    assert result["run"]["pipelineName"] == ASSET_JOB
    return result["run"]["runId"]


def run_errors(server: DagsterDev, run_id: str) -> list[str]:
    """The error messages of a run's event log (step failures, resource init failures, run failure)."""
    run = server.graphql(RUN_EVENTS_QUERY, {"runId": run_id})["runOrError"]
    messages = []
    for event in run.get("eventConnection", {}).get("events", []):
        if event.get("error"):
            error = event["error"]
            messages.append("\n".join([error["message"], *(c["message"] for c in error["causes"])]))
        elif event.get("level") == "ERROR":
            messages.append(event["message"])
    return messages


def wait_for_run(server: DagsterDev, run_id: str, timeout: float = 180.0) -> DagsterRunStatus:
    """Poll the run's status with the official GraphQL client until the daemon has finished it."""
    client = server.client()
    deadline, status = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        status = client.get_run_status(run_id)
        if status in TERMINAL:
            return status
        time.sleep(1.0)
    raise AssertionError(f"run {run_id} still {status} after {timeout:.0f} s; errors so far: "
                         f"{run_errors(server, run_id)}\nserver log:\n{server.log_tail()}")


def latest_materialization(server: DagsterDev, asset: str) -> tuple[str, dict[str, Any]]:
    """(run id, {label: value}) of the asset's latest materialization, read as the asset page reads it."""
    result = server.graphql(LATEST_MATERIALIZATION_QUERY, {"assetKey": {"path": [asset]}})["assetOrError"]
    assert result["__typename"] == "Asset", result
    assert result["assetMaterializations"], f"{asset} has no materialization"
    (mat,) = result["assetMaterializations"]
    values = {}
    for entry in mat["metadataEntries"]:
        value_keys = [k for k in entry if k not in ("__typename", "label")]
        values[entry["label"]] = entry[value_keys[0]] if value_keys else None
    return mat["runId"], values


PARTITIONS_QUERY = """
query Partitions($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    __typename
    ... on AssetNode {
      partitionStats { numMaterialized numPartitions }
      assetPartitionStatuses { ... on DefaultPartitionStatuses { materializedPartitions } }
    }
  }
}
"""


def materialized_partitions(server: DagsterDev, asset: str) -> tuple[list[str], int]:
    """(the asset's materialized profile partitions, its number of partitions), as the asset's Partitions tab shows."""
    node = server.graphql(PARTITIONS_QUERY, {"assetKey": {"path": [asset]}})["assetNodeOrError"]
    assert node["__typename"] == "AssetNode", node
    return sorted(node["assetPartitionStatuses"]["materializedPartitions"]), node["partitionStats"]["numPartitions"]


def screenshot_asset_graph(server: DagsterDev, profile_dir: Path, out: Path, materialized: list[str]) -> None:
    """Open the global asset lineage graph, expand every group, wait until the `materialized` assets' nodes carry
    their live status colour, and save a full-page screenshot."""
    with chromium_page(profile_dir) as page:
        page.goto(f"{server.url}/asset-groups", wait_until="load")
        # With several groups the graph starts with every group collapsed; ⌥E is the UI's "Expand all groups".
        page.locator('[class*="CollapsedGroupNode"]').first.wait_for(state="visible")
        page.keyboard.press("Alt+KeyE")
        # Zoomed out to fit the whole graph, each asset is a "minimal" node: a box (class names are CSS modules,
        # "AssetNode_minimalAssetNodeBox__<hash>", hence the prefix match) around the asset's name. Its border
        # colour arrives with the live asset data a moment after the layout. The stages are partitioned by profile:
        # with one of the profiles materialized a node is grey (green needs every partition), so the wait is for the
        # colour to be set at all; which partitions are materialized is checked through GraphQL (the Partitions tab).
        boxes = page.locator('[class*="AssetNode_minimalAssetNodeBox"]')
        boxes.filter(has_text=re.compile(r"^base_checkpoint$")).first.wait_for(state="visible")
        for asset in materialized:
            boxes.and_(page.locator('[style*="--minimal-border: var(--color-accent"]')).filter(
                has_text=re.compile(f"^{asset}$")).first.wait_for(state="visible")
        page.screenshot(path=str(out), full_page=True)


def metadata_row(page: Page, label: str) -> Locator:
    """The row of the asset page's metadata table whose key is `label`."""
    return page.locator("tr").filter(has=page.locator("td", has_text=re.compile(f"^{label}$")))


def screenshot_asset_pages(server: DagsterDev, profile_dir: Path, out: Path) -> int:
    """Save what a person sees first on two asset pages: base_eval's CORE table inline in its latest materialization
    (Events tab; dagster_eval_tables.png), and base_checkpoint's loss curves in the dialog "[Show Markdown]" opens
    (dagster_loss_plot.png). Returns the natural width of the curves' image as Chromium decoded it (0: not rendered)."""
    with chromium_page(profile_dir, viewport=(1280, 860)) as page:
        page.goto(f"{server.url}/assets/base_eval?view=events", wait_until="load")  # wider than the overview
        table = metadata_row(page, "core_tasks").locator("table")  # TableMetadataValue renders as a nested table
        table.first.wait_for(state="visible")
        assert "random baseline %" in table.first.inner_text()
        metadata_row(page, "core").first.evaluate("row => row.scrollIntoView({block: 'start'})")  # the table below
        page.screenshot(path=str(out / "dagster_eval_tables.png"))

        page.goto(f"{server.url}/assets/base_checkpoint", wait_until="load")
        metadata_row(page, "loss_curve").get_by_text("[Show Markdown]").click()
        image = page.locator('[role="dialog"] img[alt="loss"]')
        image.wait_for(state="visible")
        page.wait_for_function("img => img.complete", arg=image.element_handle())
        page.screenshot(path=str(out / "dagster_loss_plot.png"))
        return image.evaluate("img => img.naturalWidth")


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
