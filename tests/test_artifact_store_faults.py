"""The S3 artifact store when the server fails: SeaweedFS (tests/s3server.py) stopped in the middle of a multipart
upload or a put_dir, and an endpoint where nothing listens. Nothing partial may become visible, and the error must
name the key, the endpoint and what to check, quickly and without secrets.
"""

from __future__ import annotations

import threading
import time

import pytest
from artifact_files import MB, write_random
from s3server import free_port, raw_keys, s3_store_like

from store.artifact_store import ArtifactStoreError
from store.s3_store import S3ArtifactStore


class PartGate:
    """Lets the first `let_through` parts of a multipart upload go, holds the others until `release()`.

    Hooks on the real boto3 client only order events: the test stops the real server between the first parts and
    the rest, so the fault always lands in the middle of the upload however fast the machine is.
    """

    def __init__(self, store: S3ArtifactStore, let_through: int = 2) -> None:
        self.let_through, self.done = let_through, 0
        self.first_parts_done, self.released = threading.Event(), threading.Event()
        self.lock = threading.Lock()
        store.client.meta.events.register("before-parameter-build.s3.UploadPart", self._before)
        store.client.meta.events.register("after-call.s3.UploadPart", self._after)

    def _before(self, params, **_):
        if params["PartNumber"] > self.let_through:
            self.released.wait(60)

    def _after(self, http_response, **_):
        with self.lock:
            self.done += http_response.status_code == 200
            if self.done >= self.let_through:
                self.first_parts_done.set()

    def release(self) -> None:
        self.released.set()


def upload_while_server_stops(server, store: S3ArtifactStore, upload) -> tuple[BaseException | None, float]:
    """Run upload() in a thread, stop the server after its first parts; the error and seconds from stop to error."""
    gate = PartGate(store)
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            upload()
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        assert gate.first_parts_done.wait(30), "the first parts never completed"
        server.stop()
        stopped = time.monotonic()
        gate.release()
        worker.join(60)
        assert not worker.is_alive(), "the upload hangs after the server stopped"
        return outcome.get("error"), time.monotonic() - stopped
    finally:
        gate.release()
        server.start()  # same data dir and ports: later tests keep their server


def test_server_stopping_mid_multipart_upload_leaves_no_partial_object(s3_server, s3_store, tmp_path):
    store = s3_store_like(s3_store, multipart_threshold_mb=5, multipart_chunksize_mb=5)
    write_random(tmp_path / "big.bin", 30 * MB)

    error, seconds = upload_while_server_stops(
        s3_server, store, lambda: store.put_file(tmp_path / "big.bin", "ckpt/big.bin")
    )

    assert isinstance(error, ArtifactStoreError), repr(error)
    message = str(error)
    assert "ckpt/big.bin" in message and s3_server.endpoint_url in message and "Check that" in message
    assert "testsecret" not in message
    assert seconds < 30, f"the failure took {seconds:.1f} s to surface"
    # Restarted: the final key never became visible.
    assert not store.exists("ckpt/big.bin")
    assert "runs/ckpt/big.bin" not in raw_keys(store)
    assert store.list_keys("") == []


def test_server_stopping_mid_put_dir_publishes_no_manifest(s3_server, s3_store, tmp_path):
    store = s3_store_like(s3_store, multipart_threshold_mb=5, multipart_chunksize_mb=5)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "meta.json").write_text('{"step": 20}')  # sorts first: uploaded before the fault
    write_random(tmp_path / "ckpt" / "model.pt", 30 * MB)

    error, seconds = upload_while_server_stops(s3_server, store, lambda: store.put_dir(tmp_path / "ckpt", "base/run7"))

    assert isinstance(error, ArtifactStoreError) and "base/run7/model.pt" in str(error), repr(error)
    assert seconds < 30
    assert not store.is_published("base/run7")
    assert not store.exists("base/run7/model.pt")
    with pytest.raises(FileNotFoundError):
        store.get_dir("base/run7", cache_dir=tmp_path / "cache")


def test_unreachable_endpoint_fails_quickly_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testsecret")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3ArtifactStore(
        bucket="nowhere", endpoint_url=endpoint, region_name="us-east-1", max_attempts=3, operation_retries=1
    )
    write_random(tmp_path / "f", 10)

    start = time.monotonic()
    with pytest.raises(ArtifactStoreError) as info:
        store.put_file(tmp_path / "f", "reports/r.json")
    seconds = time.monotonic() - start

    message = str(info.value)
    assert "reports/r.json" in message and endpoint in message and "2 attempt(s)" in message
    assert "testsecret" not in message
    assert seconds < 15, f"took {seconds:.1f} s"
