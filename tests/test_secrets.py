"""Security basics: data is loaded as data, credentials never reach an output, servers listen on loopback only.

- Every deserializer in the code (torch.load, pickle, marshal, yaml, numpy) is a weights-only / safe one.
- A planted credential (the S3 secret of a real SeaweedFS server, plus tokens in the environment) appears in none of
  the outputs of a real Dagster flow: stdout/stderr, Python logs, the Dagster event log and run record, asset
  metadata, the rendered report, the artifact store's objects, and every file the run wrote (workspace, cache,
  DAGSTER_HOME with its SQLite event log and compute logs, the DuckDB file).
- The chat app and Dagster's webserver listen on 127.0.0.1 unless told otherwise, everywhere we document them;
  containers publish their ports on 127.0.0.1 only; the app takes --auth.
"""

from __future__ import annotations

import ast
import os
import re
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CODE = [p for d in ("nanochat", "store", "importer", "orchestration", "app") for p in sorted((REPO / d).rglob("*.py"))]


# --- deserialization ------------------------------------------------------------------------------------------


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                yield f"{func.value.id}.{func.attr}", node
            elif isinstance(func, ast.Name):
                yield func.id, node


def keyword(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_every_load_of_untrusted_bytes_is_a_safe_one():
    torch_loads, problems = 0, []
    for path in CODE:
        tree = parse(path)
        where = str(path.relative_to(REPO))
        for node in ast.walk(tree):
            # Aliases would hide a load from the checks below.
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "marshal", "dill", "joblib"):
                problems += [f"{where}:{node.lineno}: from {node.module} import {a.name}" for a in node.names
                             if a.name in ("load", "loads", "Unpickler")]  # fmt: skip
        for name, call in calls(tree):
            if name == "torch.load":
                torch_loads += 1
                if not is_true(keyword(call, "weights_only")):
                    problems.append(f"{where}:{call.lineno}: torch.load without weights_only=True")
            elif name in ("pickle.load", "pickle.loads", "marshal.load", "marshal.loads", "dill.load", "dill.loads",
                          "joblib.load", "torch.serialization.load"):  # fmt: skip
                problems.append(f"{where}:{call.lineno}: {name} executes code from the data")
            elif name == "yaml.load" and "Safe" not in ast.unparse(keyword(call, "Loader") or ast.Constant(None)):
                problems.append(f"{where}:{call.lineno}: yaml.load without a SafeLoader")
            elif name in ("np.load", "numpy.load") and is_true(keyword(call, "allow_pickle")):
                problems.append(f"{where}:{call.lineno}: np.load(allow_pickle=True)")
    assert torch_loads >= 1, "found no torch.load at all: the search is broken"
    assert problems == []


def parse(path: Path) -> ast.AST:
    """ast.parse, immune to CPython 3.11's stale AST recursion counter: after a RecursionError elsewhere in the
    same process (the fuzz and sandbox suites provoke some), ast.parse can raise "AST constructor recursion depth
    mismatch" on valid code. The source is then parsed in a fresh interpreter and the tree rebuilt from a dump."""
    try:
        return ast.parse(path.read_text(), str(path))
    except SystemError:
        import subprocess
        import sys

        code = "import ast, sys; print(ast.dump(ast.parse(open(sys.argv[1]).read())))"
        dump = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
        return eval(dump.stdout, vars(ast))  # noqa: S307 - an ast.dump of our own source files


def test_the_one_pickle_reader_admits_only_the_tokenizer_class():
    # tokenizer.pkl is a pickle by format (the original nanochat's); its reader overrides find_class.
    readers = [(path, node) for path in CODE for node in ast.walk(parse(path))
               if isinstance(node, ast.ClassDef) and "pickle.Unpickler" in map(ast.unparse, node.bases)]
    assert [p.name for p, _ in readers] == ["tokenizer_pickle.py"]
    assert any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in readers[0][1].body)


def test_a_checkpoint_that_runs_code_is_refused(tmp_path):
    import torch

    from nanochat.checkpoint_manager import CheckpointError, _torch_load

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "model_000001.pt"
    torch.save({"weights": torch.zeros(2), "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match="not a weights-only PyTorch checkpoint"):
        _torch_load(path, "cpu")
    assert not marker.exists()


# --- no secrets in any output ---------------------------------------------------------------------------------


@pytest.fixture
def canary_s3(tmp_path_factory, monkeypatch):
    """A SeaweedFS server of our own whose secret key is a canary, in the environment as boto3 reads it."""
    import s3server  # tests/ is on sys.path (rootless)

    secret = f"canary-{uuid.uuid4()}"
    monkeypatch.setattr(s3server, "SECRET_KEY", secret)  # the identity that start() writes
    server = s3server.SeaweedS3Server(tmp_path_factory.mktemp("canary-s3"))
    try:
        server.start()
    except Exception as exc:
        pytest.fail(f"SeaweedFS could not start: {exc}")
    for name, value in (("AWS_ACCESS_KEY_ID", s3server.ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", secret),
                        ("AWS_DEFAULT_REGION", s3server.REGION)):  # fmt: skip
        monkeypatch.setenv(name, value)
    yield server, secret
    server.stop()


def files_containing(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path.relative_to(root)}" for needle in needles if needle in data]
    return hits


@pytest.mark.slow
def test_no_secret_reaches_any_output(canary_s3, tmp_path, shared_data, monkeypatch, capfd, caplog):
    import boto3
    import dagster as dg
    from botocore.config import Config
    from s3server import REGION
    from test_orchestration import FAST

    from orchestration.defs.data import raw_shards
    from orchestration.defs.resources import EvalHistory
    from orchestration.defs.serving import render_report
    from orchestration.defs.tokenizer import tokenizer
    from orchestration.launcher import TorchrunLauncher
    from orchestration.profiles import RunProfile
    from orchestration.workspace import Workspace
    from store.s3_store import S3ArtifactStore

    server, s3_secret = canary_s3
    # More credentials a careless log line or an environment dump would carry along.
    planted = {"HF_TOKEN": f"hf_canary{uuid.uuid4().hex}", "WANDB_API_KEY": f"canary{uuid.uuid4().hex}",
               "NANOCHAT_APP_AUTH": f"alice:canary-{uuid.uuid4().hex}"}  # fmt: skip
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    secrets = [s3_secret, *planted.values(), planted["NANOCHAT_APP_AUTH"].split(":")[1]]

    bucket = f"canary-{uuid.uuid4().hex[:12]}"
    # A session of its own: boto3's default session keeps the credentials it first saw (another test's server).
    s3 = boto3.session.Session().client("s3", endpoint_url=server.endpoint_url, region_name=REGION,
                      config=Config(s3={"addressing_style": "path"}))  # fmt: skip
    s3.create_bucket(Bucket=bucket)
    store = S3ArtifactStore(bucket=bucket, prefix="runs", endpoint_url=server.endpoint_url, region_name=REGION,
                            max_attempts=2, operation_retries=1)  # fmt: skip
    monkeypatch.setenv("NANOCHAT_SHARED_DATA", str(shared_data))
    monkeypatch.setenv("NANOCHAT_ARTIFACT_CACHE", str(tmp_path / "cache"))
    profile = RunProfile(**FAST)
    resources = {"artifacts": store, "workspace": Workspace(root=str(tmp_path / "work")), "profile": profile,
                 "launcher": TorchrunLauncher(), "duckdb": EvalHistory(database=str(tmp_path / "evals.duckdb"))}
    (tmp_path / "dagster_home").mkdir()
    instance = dg.DagsterInstance.local_temp(tempdir=str(tmp_path / "dagster_home"))
    result = dg.materialize([raw_shards, tokenizer], resources=resources, instance=instance, partition_key="tiny")
    assert result.success

    outputs = {}
    captured = capfd.readouterr()
    outputs["stdout"], outputs["stderr"], outputs["logging"] = captured.out, captured.err, caplog.text
    outputs["event log"] = "\n".join(dg.serialize_value(e) for e in instance.all_logs(result.run_id))
    assert "raw_shards" in outputs["event log"], "the event log search found no events"
    outputs["run record"] = dg.serialize_value(instance.get_run_by_id(result.run_id))
    stages = {}
    for asset in ("raw_shards", "tokenizer"):
        (materialization,) = result.asset_materializations_for_node(asset)
        stages[asset] = {k: v.value for k, v in materialization.metadata.items()}
    outputs["metadata"] = repr(stages)
    outputs["report"] = render_report(stages, profile.for_partition("tiny"), result.run_id)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.endswith("manifest.json") for k in keys), keys
    outputs["s3 objects"] = b"".join(s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys)

    for secret in secrets:
        leaks = [name for name, text in outputs.items()
                 if secret.encode() in (text if isinstance(text, bytes) else text.encode())]  # fmt: skip
        assert leaks == [], f"a planted secret is in: {leaks}"
    # Every file the run wrote: workspace, artifact cache, DAGSTER_HOME (SQLite event log, compute logs), DuckDB.
    assert (tmp_path / "dagster_home").is_dir() and any((tmp_path / "cache").rglob("*"))
    assert files_containing(tmp_path, [s.encode() for s in secrets]) == []


# --- listening on loopback only -------------------------------------------------------------------------------


def test_the_app_listens_on_loopback_by_default_and_takes_auth(monkeypatch):
    from app.__main__ import parse_args

    monkeypatch.delenv("NANOCHAT_APP_AUTH", raising=False)
    args = parse_args([])
    assert args.host == "127.0.0.1" and args.auth is None and not args.share
    assert parse_args(["--auth", "alice:pw"]).auth == [("alice", "pw")]  # more in tests/test_app.py
    monkeypatch.setenv("NANOCHAT_APP_AUTH", "bob:secret")
    assert parse_args([]).auth == [("bob", "secret")]


def test_dagster_webserver_listens_on_loopback_by_default():
    # `dagster dev` passes --host on only when given one, so the webserver's own default applies.
    from dagster_webserver.cli import dagster_webserver

    assert {p.name: p.default for p in dagster_webserver.params}["host"] == "127.0.0.1"


def test_documented_commands_listen_on_loopback():
    """Every command we tell people to run: no 0.0.0.0, and `dagster dev` with `-h 127.0.0.1` when it names a host.
    (Inside the containers of infra/ 0.0.0.0 is right: they publish their ports on 127.0.0.1, checked below.)"""
    texts = [REPO / "README.md", *sorted((REPO / "scripts").glob("*.sh")), *sorted((REPO / "docs").glob("*.md"))]
    commands = [(path.name, line) for path in texts if path.exists() for line in path.read_text().splitlines()
                if re.search(r"dagster dev|dagster-webserver|python -m app|nanochat-chat", line)]  # fmt: skip
    assert any("dagster dev" in line for _, line in commands), "found no dagster dev command to check"
    for name, line in commands:
        assert "0.0.0.0" not in line, (name, line)
        host = re.search(r"(?:-h|--host)[ =]([^\s`'\",;)]+)", line)
        assert host is None or host.group(1) == "127.0.0.1", (name, line)


def test_containers_publish_ports_on_loopback_only():
    import yaml

    for compose in sorted((REPO / "infra").glob("docker-compose*.yml")):
        services = (yaml.safe_load(compose.read_text()) or {}).get("services") or {}
        for name, service in services.items():
            for port in service.get("ports") or []:
                spec = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}"
                assert spec.startswith(("127.0.0.1:", "${BIND_ADDRESS:-127.0.0.1}:")), (compose.name, name, port)
