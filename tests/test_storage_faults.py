"""Storage faults lose no data: a real S3 server (SeaweedFS) stopped at random points of uploads and downloads, a
real proxy failing a fraction of its requests, a Dagster asset riding out an outage, and 4 processes writing one
DuckDB file at once.

Quick by default (2 trials per fault class); the full trial counts with one command:

    NANOCHAT_FAULT_TRIALS=10 .venv/bin/pytest tests/test_storage_faults.py

Every trial is seeded by its index, so a failing one replays exactly (the stop point, the proxy's fault sequence).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faultproxy import FaultProxy
from s3server import SeaweedS3Server, raw_keys, s3_store_like

from orchestration.defs.data import raw_shards
from orchestration.profiles import RunProfile
from orchestration.workspace import Workspace
from store import eval_store as es
from store.artifact_store import (
    MANIFEST_NAME,
    ArtifactStoreError,
    sha256_file,
)
from store.s3_store import S3ArtifactStore

pytestmark = pytest.mark.slow

TRIALS = int(os.environ.get("NANOCHAT_FAULT_TRIALS", "0"))
STOP_TRIALS = TRIALS or 2  # per direction: server stopped mid-upload, and mid-download
PROXY_TRIALS = TRIALS or 2  # round trips through a proxy failing 30% of requests
DB_WRITES = 5 * (TRIALS or 1)  # keys per writer process (4 processes), each recorded twice
MB = 1 << 20


def make_tree(rng: random.Random) -> dict[str, bytes]:
    """A checkpoint-like directory: a small json, a model big enough for multipart (5 MB parts), a small file."""
    return {
        "meta.json": json.dumps({"step": rng.randint(1, 10_000)}).encode(),
        "model.pt": rng.randbytes(rng.randint(6 * MB, 14 * MB)),
        "tokenizer/vocab.bin": rng.randbytes(rng.randint(1, 300_000)),
    }


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def multipart(store: S3ArtifactStore) -> S3ArtifactStore:
    """The store with 5 MB multipart parts, so every model file is uploaded, copied and downloaded in parts."""
    return s3_store_like(store, multipart_threshold_mb=5, multipart_chunksize_mb=5)


def assert_nothing_partial_visible(store: S3ArtifactStore, prefix: str, versions: list[dict[str, bytes]]) -> None:
    """Whatever a reader can see under prefix/ is complete: each visible file is byte-identical to one version of
    it, and a visible manifest lists a whole version whose files are all there and match it."""
    visible = store.list_keys(prefix)
    for key in visible:
        rel = key.removeprefix(f"{prefix}/")
        data = store.client.get_object(Bucket=store.bucket, Key=store._full(key))["Body"].read()
        if rel == MANIFEST_NAME:
            entries = {e["path"]: e for e in json.loads(data)["files"]}
            matching = [v for v in versions if set(v) == set(entries)]
            assert matching, f"manifest of {prefix} lists {sorted(entries)}: no version has exactly these files"
            for path, entry in entries.items():
                assert f"{prefix}/{path}" in visible, f"{prefix}: manifest published before {path} was"
                stored = store.client.get_object(Bucket=store.bucket, Key=store._full(f"{prefix}/{path}"))
                body = stored["Body"].read()
                assert (len(body), hashlib.sha256(body).hexdigest()) == (entry["size"], entry["sha256"]), path
            continue
        assert any(v.get(rel) == data for v in versions), f"{key} is visible but partial ({len(data)} bytes)"


class StopAtCall:
    """Stops the server inside the n-th S3 API call a client makes: before the call is sent, or right after its
    response headers arrive, before the body is read (a download cut mid-body). Hooks on the real boto3 client
    only choose the moment; the fault itself is the real server going away (SIGTERM or SIGKILL)."""

    def __init__(self, server: SeaweedS3Server, store: S3ArtifactStore, n: int, after: bool, how: str) -> None:
        self.server, self.n, self.after, self.how = server, n, after, how
        self.calls, self.lock = 0, threading.Lock()
        self.stopped_in: str | None = None  # "<when> <operation>", for the failure message
        store.client.meta.events.register("before-call.s3", self._before)
        store.client.meta.events.register("after-call.s3", self._after)

    def _before(self, model, context, **_) -> None:
        with self.lock:
            self.calls += 1
            hit = self.calls == self.n
        if hit and self.after:
            context["stop_after_this_call"] = True
        elif hit:
            self._stop(f"before {model.name}")

    def _after(self, model, context, **_) -> None:
        if context.get("stop_after_this_call"):
            self._stop(f"after the headers of {model.name}")

    def _stop(self, where: str) -> None:
        self.stopped_in = where
        self.server.kill() if self.how == "kill" else self.server.stop()


def record_calls(store: S3ArtifactStore) -> list[str]:
    """A live list of the S3 API calls this store's client makes, by operation name."""
    names: list[str] = []
    store.client.meta.events.register("before-call.s3", lambda model, **_: names.append(model.name))
    return names


def fault_point(rng: random.Random, calls: list[str], mid_body: bool = False) -> tuple[int, bool, str]:
    """A seeded random moment among an operation's calls: (call number, after its headers?, how to stop).
    mid_body: right after the headers of a GetObject, so its body is cut off. A stop after the headers needs
    SIGKILL (a graceful stop would wait for the response the stalled client is not reading)."""
    if mid_body:
        return 1 + rng.choice([i for i, name in enumerate(calls) if name == "GetObject"]), True, "kill"
    n, after = rng.randint(1, len(calls)), rng.random() < 0.5
    return n, after, "kill" if after else rng.choice(["term", "kill"])


def check_clear_error(error: BaseException | None, prefix: str, endpoint: str) -> None:
    """The error a fault surfaces: the store's own, naming the key, the endpoint and what to check."""
    assert isinstance(error, ArtifactStoreError), repr(error)
    message = str(error)
    assert f"'{prefix}/" in message and endpoint in message and "Check that" in message, message
    assert "testsecret" not in message


# --- the server stopped mid-upload / mid-download ----------------------------------------------------------------


@pytest.mark.parametrize("trial", range(STOP_TRIALS))
def test_server_stopped_mid_put_dir_publishes_nothing_partial(s3_server, s3_store, tmp_path, trial):
    rng = random.Random(f"upload-{trial}")
    old, new = make_tree(rng), make_tree(rng)
    prefix = f"ckpt/trial{trial}"
    store = multipart(s3_store)
    calls = record_calls(store)
    store.put_dir(write_tree(tmp_path / "old", old), prefix)  # the version a reader may be using
    n, after, how = fault_point(rng, calls)  # a republish makes as many calls as the first publish

    faulty = multipart(s3_store)
    stop = StopAtCall(s3_server, faulty, n, after, how)
    try:
        faulty.put_dir(write_tree(tmp_path / "new", new), prefix)
        error = None
    except ArtifactStoreError as exc:
        error = exc
    finally:
        s3_server.start()  # same data dir and ports
        s3_server.wait_serving(s3_store.bucket)

    where = f"trial {trial}: {how} {stop.stopped_in} (call {n} of {len(calls)})"
    print(f"put_dir {where}: {'failed: ' + type(error).__name__ if error else 'completed'}")  # shown with -s
    if error is not None:  # the last calls (tidying staging objects) may fail without failing the publish
        check_clear_error(error, prefix, s3_server.endpoint_url)
    store = multipart(s3_store)
    assert_nothing_partial_visible(store, prefix, [old, new])

    # The server is back: the same call publishes, and a reader gets exactly the new version.
    info = store.put_dir(tmp_path / "new", prefix)
    got = store.get_dir(prefix, cache_dir=tmp_path / "cache")
    assert got.name == info.sha256[:16]
    assert {rel: (got / rel).read_bytes() for rel in new} == new, where
    assert stop.stopped_in, f"{where}: the fault never fired"


@pytest.mark.parametrize("trial", range(STOP_TRIALS))
def test_server_stopped_mid_get_dir_never_leaves_a_bad_cache_file(s3_server, s3_store, tmp_path, trial):
    rng = random.Random(f"download-{trial}")
    files = make_tree(rng)
    prefix = f"ckpt/trial{trial}"
    store = multipart(s3_store)
    info = store.put_dir(write_tree(tmp_path / "src", files), prefix)
    calls = record_calls(store)
    store.get_dir(prefix, cache_dir=tmp_path / "count")  # a clean read, to list its calls
    n, after, how = fault_point(rng, calls, mid_body=trial % 2 == 1)  # every other trial cuts a body
    cache = tmp_path / "cache"
    target = cache / info.sha256[:16]
    # Half the trials start from a cache holding a same-size file of garbage (a disk error, an older crash).
    planted = rng.random() < 0.5
    if planted:
        write_tree(target, {"model.pt": b"\0" * len(files["model.pt"])})

    faulty = multipart(s3_store)
    stop = StopAtCall(s3_server, faulty, n, after, how)
    try:
        faulty.get_dir(prefix, cache_dir=cache)
        error = None
    except ArtifactStoreError as exc:
        error = exc
    finally:
        s3_server.start()
        s3_server.wait_serving(s3_store.bucket)

    where = f"trial {trial}: {how} {stop.stopped_in} (call {n} of {len(calls)}, garbage planted: {planted})"
    print(f"get_dir {where}: {'failed: ' + type(error).__name__ if error else 'completed'}")  # shown with -s
    if error is not None:  # a stop after the last body arrived cannot hurt the read
        check_clear_error(error, prefix, s3_server.endpoint_url)
    left = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert not [p for p in left if ".tmp-" in p], f"{where}: temp files left in the cache: {left}"
    for rel in left:  # what sits under a final name is complete, or is the garbage we planted (never served)
        if rel != MANIFEST_NAME and not (planted and rel == "model.pt"):
            assert (target / rel).read_bytes() == files[rel], f"{where}: a partial {rel} sits in the cache"
    if error is not None:
        assert MANIFEST_NAME not in left, f"{where}: an incomplete cache entry looks complete"

    # The server is back: the read completes, and every file it serves matches the manifest.
    got = s3_store_like(faulty).get_dir(prefix, cache_dir=cache)
    assert {rel: (got / rel).read_bytes() for rel in files} == files, where
    manifest = json.loads((got / MANIFEST_NAME).read_bytes())
    assert all(sha256_file(got / e["path"]) == e["sha256"] for e in manifest["files"])
    assert stop.stopped_in, f"{where}: the fault never fired"


# --- errors on a fraction of requests ------------------------------------------------------------------------------


@pytest.mark.parametrize("trial", range(PROXY_TRIALS))
def test_round_trips_survive_a_proxy_failing_30_percent_of_requests(s3_server, s3_store, tmp_path, trial):
    """500s, 503s, dropped connections, lost responses and bodies cut in half on 30% of requests: every round trip
    is byte-identical (the store's retries absorb the faults) and nothing partial is ever visible."""
    rng = random.Random(f"proxy-{trial}")
    files = make_tree(rng)
    write_tree(tmp_path / "src", files)
    direct = multipart(s3_store)  # the server itself, to check what really got stored
    with FaultProxy(s3_server.endpoint_url, fraction=0.3, seed=trial) as proxy:
        # Production retry settings (botocore standard mode, 5 attempts; 2 retries of a whole operation).
        store = S3ArtifactStore(
            bucket=s3_store.bucket,
            prefix=s3_store.prefix,
            endpoint_url=proxy.endpoint_url,
            region_name=s3_store.region_name,
            multipart_threshold_mb=5,
            multipart_chunksize_mb=5,
        )
        prefix = f"proxy/trial{trial}"
        big = store.put_file(tmp_path / "src/model.pt", f"{prefix}/file/model.pt")  # multipart
        small = store.put_file(tmp_path / "src/meta.json", f"{prefix}/file/meta.json")  # one PUT
        tree = store.put_dir(tmp_path / "src", f"{prefix}/dir")
        store.write_json(f"{prefix}/report.json", {"trial": trial})

        assert store.get_file(big.key, tmp_path / "back.pt").read_bytes() == files["model.pt"]
        assert store.get_file(small.key, tmp_path / "back.json").read_bytes() == files["meta.json"]
        got = store.get_dir(tree.key, cache_dir=tmp_path / "cache")
        assert {rel: (got / rel).read_bytes() for rel in files} == files
        assert store.read_json(f"{prefix}/report.json") == {"trial": trial}
    print(f"proxy trial {trial}: {dict(proxy.counts)}")  # shown with -s
    faults = sum(n for fate, n in proxy.counts.items() if fate != "ok")
    assert faults >= 5, f"the proxy injected too few faults to prove anything: {dict(proxy.counts)}"

    assert_nothing_partial_visible(direct, f"{prefix}/dir", [files])
    assert_nothing_partial_visible(direct, f"{prefix}/file", [files])
    for key in (big.key, small.key):  # the sha256 recorded at upload matches what the server holds
        head = direct.client.head_object(Bucket=direct.bucket, Key=direct._full(key))
        assert head["Metadata"]["sha256"] == hashlib.sha256(files[key.rsplit("/", 1)[-1]]).hexdigest()


def test_a_proxy_failing_every_request_gives_a_clear_error_and_stores_nothing(s3_server, s3_store, tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x" * 1000)
    with FaultProxy(s3_server.endpoint_url, fraction=1.0, seed=0, faults=("503", "lost")) as proxy:
        store = S3ArtifactStore(
            bucket=s3_store.bucket,
            prefix=s3_store.prefix,
            endpoint_url=proxy.endpoint_url,
            region_name=s3_store.region_name,
            max_attempts=2,
            operation_retries=1,
        )
        start = time.monotonic()
        with pytest.raises(ArtifactStoreError) as info:
            store.put_file(tmp_path / "f.bin", "doomed/f.bin")
    check_clear_error(info.value, "doomed", proxy.endpoint_url)
    assert "2 attempt(s)" in str(info.value)
    assert time.monotonic() - start < 15
    # "lost" requests reached the server: a staging object may be left over (invisible), never the key itself.
    assert not [k for k in raw_keys(s3_store) if "doomed/f.bin" in k and ".staging" not in k]
    assert not s3_store.exists("doomed/f.bin")


# --- a Dagster asset rides out an outage ---------------------------------------------------------------------------


def store_inbox(store: S3ArtifactStore, tmp_path: Path) -> dict[str, bytes]:
    """Two small real parquet shards in the store's inbox (the corpus `store:inbox` reads them)."""
    shards = {}
    for i in range(2):
        path = tmp_path / "inbox" / f"shard_{i:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": [f"document {j} of shard {i}" for j in range(20)]}), path)
        store.put_file(path, f"inbox/{path.name}")
        shards[path.name] = path.read_bytes()
    return shards


def asset_errors(result: dg.ExecuteInProcessResult) -> str:
    """Every error message of a run's events, causes included."""
    texts = []
    for event in result.all_events:
        error = getattr(event.event_specific_data, "error", None)
        while error is not None:
            texts.append(error.message)
            error = error.cause
    return "\n".join(texts)


def test_asset_retries_with_backoff_and_succeeds_when_the_server_is_back(s3_server, s3_store, tmp_path, monkeypatch):
    shards = store_inbox(s3_store, tmp_path)
    resources = {
        "artifacts": s3_store,
        "workspace": Workspace(root=str(tmp_path / "work")),
        "profile": RunProfile(corpus="store:inbox"),
    }

    # Down for good: the asset gives up after its retries, with the store's error in the step's failure.
    monkeypatch.setenv("NANOCHAT_STORE_RETRY_WAIT_S", "0.2")
    s3_server.stop()
    try:
        result = dg.materialize([raw_shards], resources=resources, raise_on_error=False, partition_key="tiny")
    finally:
        s3_server.start()
    assert not result.success
    retries = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
    assert len(retries) == 3, [e.message for e in retries]
    errors = asset_errors(result)
    assert "'inbox'" in errors and s3_server.endpoint_url in errors and "Check that" in errors, errors

    # Down when the run starts, back two seconds later (then warming up: reads fail for a few seconds): a retry
    # after a backoff of 1-2, 2-4 or 4-8 s succeeds.
    monkeypatch.setenv("NANOCHAT_STORE_RETRY_WAIT_S", "2")
    s3_server.stop()
    threading.Timer(2.0, s3_server.start).start()
    result = dg.materialize([raw_shards], resources=resources, raise_on_error=False, partition_key="tiny")
    assert result.success, asset_errors(result)
    retries = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
    assert 1 <= len(retries) <= 3
    metadata = result.asset_materializations_for_node("raw_shards")[0].metadata
    got = s3_store.get_dir(metadata["key"].value, cache_dir=tmp_path / "cache")
    assert {name: (got / name).read_bytes() for name in shards} == shards


# --- DuckDB: 4 writer processes at once ----------------------------------------------------------------------------

WRITER = """
import sys
from store import eval_store as es

db, writer, writes = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()  # all four start writing together
for attempt in (1, 2):  # the second pass re-records every key: it must replace, never add
    for i in range(writes):
        results = {"all": {"CORE": attempt + i / 1000}, "arc": {"accuracy": attempt * 10 + i / 1000}}
        with es.connect_rw(db) as conn:
            es.record_eval_results(conn, f"run-{writer}", "base", f"ck{i}", results, profile="tiny", depth=4)
    with es.connect_rw(db) as conn:  # one key every writer records: exactly one row must remain
        es.record_eval_results(conn, "shared", "sft", "ck", {"all": {"ChatCORE": float(writer)}}, profile="tiny",
                               depth=4)
"""


def test_four_writer_processes_lose_and_duplicate_no_eval_rows(tmp_path):
    db = tmp_path / "evals.duckdb"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), str(w), str(DB_WRITES)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(4)
    ]
    for proc in writers:
        assert proc.stdout.readline().strip() == "ready", proc.communicate()[1]
    for proc in writers:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in writers:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err

    with es.connect_ro(db) as conn:
        rows = conn.execute("SELECT run_id, checkpoint_id, task, metric, value FROM eval_results").fetchall()
    keys = [r[:4] for r in rows]
    assert len(keys) == len(set(keys)), "duplicated eval rows"
    expected = {
        (f"run-{w}", f"ck{i}", task, metric): base + i / 1000
        for w in range(4)
        for i in range(DB_WRITES)
        for task, metric, base in (("all", "CORE", 2), ("arc", "accuracy", 20))
    }
    got = {r[:4]: r[4] for r in rows if r[0] != "shared"}
    assert got.keys() == expected.keys(), f"{len(expected.keys() - got.keys())} rows lost"
    assert got == pytest.approx(expected), "a re-recorded key kept its first value"
    shared = [r for r in rows if r[0] == "shared"]
    assert len(shared) == 1 and shared[0][4] in {0.0, 1.0, 2.0, 3.0}, shared
