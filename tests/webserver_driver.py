"""Driving a real `dagster dev` as the UI does: the server in its own process group, the GraphQL the UI sends
(launchpad mutation, run events, materializations, partitions), and Chromium screenshots of its pages.

Used by tests/test_webserver.py; the queries are copied from dagster-webserver's bundle so the tests exercise what the
UI exercises.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
import yaml
from browser import chromium_page  # tests/ is on sys.path (rootless)
from dagster import DagsterRunStatus
from dagster_graphql import DagsterGraphQLClient
from playwright.sync_api import Locator, Page

REPO = Path(__file__).resolve().parents[1]
ASSET_JOB = "__ASSET_JOB"  # the implicit job the UI's "Materialize" button launches assets with
TERMINAL = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}

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

