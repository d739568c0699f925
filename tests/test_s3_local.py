"""scripts/s3_local.sh, as the README's quickstart runs it: SeaweedFS on loopback with the bucket created, env.sh for
the clients, the artifact store publishing through it, Ctrl-C stopping it, and a second start reusing data and keys."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from s3server import free_port

from store.artifact_store import artifact_store_from_url

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "s3_local.sh"


def free_base() -> int:
    """A base port B with B..B+8 and the admin server's B+8+10000 free (the script's layout)."""
    for _ in range(200):
        base = free_port()
        if base + 8 + 10000 > 65535:
            continue
        try:
            for p in [*range(base, base + 9), base + 8 + 10000]:
                free_port(p)
            return base
        except OSError:
            pass
    raise RuntimeError("no free block of 9 ports")


def read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        for item in line.removeprefix("export ").split():
            key, _, value = item.partition("=")
            env[key] = value
    return env


def start(home: Path, base: int) -> subprocess.Popen[str]:
    env = {**os.environ, "NANOCHAT_HOME": str(home), "NANOCHAT_S3_PORT": str(base), "PYTHON": sys.executable}
    return subprocess.Popen(["bash", str(SCRIPT)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_ready(proc: subprocess.Popen[str]) -> str:
    """The script's stderr up to its 'Ctrl-C stops the server.' line (printed once the bucket exists)."""
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C stops the server" in line:
            return "".join(lines)
    proc.kill()
    raise AssertionError("s3_local.sh never became ready:\n" + "".join(lines))


def stop(proc: subprocess.Popen[str], base: int) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends to the foreground group
    assert proc.wait(timeout=60) == 0
    with socket.socket() as s:  # the server is gone with the script: its S3 port is free again
        assert s.connect_ex(("127.0.0.1", base)) != 0


def test_local_s3_quickstart(tmp_path, monkeypatch):
    home, base = tmp_path / "home", free_base()
    proc = start(home, base)
    try:
        banner = wait_ready(proc)
        env_file = home / "s3" / "env.sh"
        assert f"source {env_file}" in banner
        env = read_env(env_file)
        assert env["NANOCHAT_ARTIFACTS"] == "s3://nanochat/artifacts"
        assert env["NANOCHAT_S3_ENDPOINT_URL"] == f"http://127.0.0.1:{base}"
        assert env["AWS_SECRET_ACCESS_KEY"] not in banner  # credentials stay in the files
        assert oct(env_file.stat().st_mode & 0o777) == "0o600"
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        src = tmp_path / "src"
        src.mkdir()
        (src / "weights.bin").write_bytes(os.urandom(4096))
        store = artifact_store_from_url(env["NANOCHAT_ARTIFACTS"])
        info = store.put_dir(src, "runs/quickstart")
        got = store.get_dir("runs/quickstart", cache_dir=tmp_path / "cache")
        assert (got / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()
        assert info.uri.startswith("s3://nanochat/artifacts/")
    finally:
        stop(proc, base)

    # Started again on the same home: same keys, the bucket already there, the published data still readable.
    proc = start(home, base)
    try:
        wait_ready(proc)
        assert read_env(home / "s3" / "env.sh") == env
        again = artifact_store_from_url(env["NANOCHAT_ARTIFACTS"])
        assert again.is_published("runs/quickstart")
    finally:
        stop(proc, base)


def test_a_taken_port_is_named(tmp_path):
    base = free_base()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base))
        taken.listen()
        proc = start(tmp_path / "home", base)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "NANOCHAT_S3_PORT" in err or "did not answer" in err, err
