"""
The container image, built and run for real: scripts/build_image.sh builds infra/Dockerfile with buildah, then the
image's own processes run in it (`buildah run --isolation=chroot`: no Docker daemon or OCI runtime, which these
machines refuse) as its non-root user: the code location validates, the code server answers its gRPC health check,
the chat app's CLI starts, and the first two assets materialize with infra/dagster.yaml (the one in the image) on a
real Postgres and a SeaweedFS S3 on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from test_infra import free_port, postgres, query  # noqa: F401  (postgres: the fixture of a throwaway server)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TAG = "nanochat-dagster:local"
SHARED = "/mnt/shared-data"  # where the shared data is bound in the container


def buildah() -> str:
    found = shutil.which("buildah")
    if found and os.geteuid() == 0:
        return found
    if os.geteuid() != 0:
        pytest.skip("buildah's chroot isolation needs root: run the image tests as root")
    if not shutil.which("apt-get"):
        pytest.skip("buildah is not installed and not installable here (no apt-get): install buildah and debootstrap")
    pytest.fail("buildah not found: install it with scripts/system-deps.sh (apt-get install buildah debootstrap)")


@pytest.fixture(scope="module")
def image() -> str:
    """The image, built by scripts/build_image.sh from the working tree (layers cached between builds)."""
    buildah()
    t0 = time.monotonic()
    result = subprocess.run(["bash", str(REPO / "scripts" / "build_image.sh")], capture_output=True, text=True,
                            cwd=REPO, timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    summary = [line for line in result.stdout.splitlines() if line.startswith("== built")]
    assert summary, result.stdout[-3000:]
    print(f"\n{summary[-1]} (test's clock: {time.monotonic() - t0:.0f} s)")
    return TAG


@pytest.fixture(scope="module")
def container(image):
    """A working container of the image; yields a function that runs a command in it (as the image's user)."""
    name = f"nanochat-test-{uuid.uuid4().hex[:8]}"
    subprocess.run([buildah(), "from", "--pull-never", "--name", name, image], check=True, capture_output=True)

    def run(*cmd: str, env: dict[str, str] | None = None, volumes: list[str] = (), timeout: float = 300,
            popen: bool = False, check: bool = True):
        args = [buildah(), "run", "--isolation=chroot"]
        args += [a for k, v in (env or {}).items() for a in ("--env", f"{k}={v}")]
        args += [a for v in volumes for a in ("--volume", v)]
        args += [name, "--", *cmd]
        if popen:  # its own session, so the test can stop the whole process tree
            return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, f"{cmd}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
        return result

    run.name = name
    yield run
    subprocess.run([buildah(), "rm", name], capture_output=True)


def test_image_runs_as_its_user_with_cpu_torch_and_nothing_left_over(container):
    assert container("id", "-un").stdout.strip() == "nanochat"
    assert container("id", "-u").stdout.strip() == "1000"
    # CPU torch: no CUDA build, no NVIDIA wheels, no triton (which only comes with CUDA builds).
    torch = container("python", "-c", "import torch; print(torch.__version__, torch.version.cuda)").stdout.split()
    assert torch[0].startswith("2.13.0") and torch[1] == "None", torch
    packages = container("pip", "list", "--format=freeze").stdout.lower().splitlines()
    assert not [p for p in packages if p.startswith(("nvidia-", "triton"))], packages
    assert any(p.startswith("nanochat-dagster==") for p in packages)
    # What the build used and must not ship: pip's configuration and CA (build secrets), pip's download cache,
    # apt's package lists, a compiler.
    mount = subprocess.run([buildah(), "mount", container.name], check=True, capture_output=True, text=True)
    root = Path(mount.stdout.strip())
    try:
        assert not (root / "run" / "secrets" / "pip.conf").exists()
        assert not list((root / "root").glob(".cache/pip/*"))
        assert not list((root / "var" / "lib" / "apt" / "lists").glob("*_Packages"))
        for compiler in ("gcc", "cc", "g++", "make"):
            assert not (root / "usr" / "bin" / compiler).exists(), compiler
    finally:
        subprocess.run([buildah(), "umount", container.name], capture_output=True)


def test_code_location_validates_and_the_app_cli_runs(container, postgres):  # noqa: F811
    # The image's DAGSTER_HOME holds infra/dagster.yaml: every dagster command opens that instance (Postgres).
    validate = container("dagster", "definitions", "validate", "-m", "orchestration.definitions",
                         env=postgres.dagster_env, timeout=600)
    assert "Validation successful" in validate.stdout + validate.stderr, validate.stdout + validate.stderr
    usage = container("python", "-m", "app", "--help").stdout
    assert "--port" in usage and "--host" in usage


def test_code_server_answers_its_health_check(container, postgres):  # noqa: F811
    port = free_port()
    server = container("dagster", "code-server", "start", "-m", "orchestration.definitions", "-h", "127.0.0.1",
                       "-p", str(port), env=postgres.dagster_env, popen=True)
    try:
        deadline, last = time.monotonic() + 300, None
        while time.monotonic() < deadline:
            assert server.poll() is None, f"the code server exited: {server.stdout.read()[-3000:]}"
            # The compose service's own health check, run in the image.
            last = container("dagster", "api", "grpc-health-check", "-p", str(port), check=False, timeout=60)
            if last.returncode == 0:
                break
            time.sleep(2)
        assert last is not None and last.returncode == 0, last.stdout + last.stderr
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)


def partition_args(asset: str) -> list[str]:
    """`--partition tiny` when the stage assets are partitioned by profile (the image holds this tree's code)."""
    from orchestration.definitions import defs

    partitions = defs().get_assets_def(asset).partitions_def
    if partitions is None:
        return []
    keys = partitions.get_partition_keys()
    return ["--partition", "tiny" if "tiny" in keys else keys[0]]


def test_first_assets_materialize_on_postgres_and_s3(container, postgres, s3_server, shared_data, tmp_path):  # noqa: F811
    import boto3

    bucket = f"image-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    s3.create_bucket(Bucket=bucket)
    config = tmp_path / "run_config.yaml"
    config.write_text(yaml.safe_dump({"resources": {"profile": {"config": {
        "corpus": "shared", "vocab_size": 512, "tok_max_chars": 2_000_000}}}}))
    os.chmod(tmp_path, 0o755)
    env = {**postgres.dagster_env, "NANOCHAT_ARTIFACTS": f"s3://{bucket}/runs",
           "NANOCHAT_S3_ENDPOINT_URL": s3_server.endpoint_url, "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
           "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"], "AWS_DEFAULT_REGION": "us-east-1",
           "NANOCHAT_SHARED_DATA": SHARED, "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    # DAGSTER_HOME is the image's: its dagster.yaml is infra/dagster.yaml, as copied by the Dockerfile.
    result = container("dagster", "asset", "materialize", "-m", "orchestration.definitions",
                       "--select", "raw_shards,tokenizer", *partition_args("raw_shards"),
                       "-c", f"/mnt/config/{config.name}", env=env,
                       volumes=[f"{shared_data}:{SHARED}:ro", f"{tmp_path}:/mnt/config:ro"], timeout=600,
                       check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ((run_id, status),) = query(postgres, "SELECT run_id, status FROM runs")
    assert status == "SUCCESS"
    materialized = query(postgres, "SELECT DISTINCT asset_key FROM event_logs "
                                   "WHERE dagster_event_type = 'ASSET_MATERIALIZATION' ORDER BY asset_key")
    assert [key for (key,) in materialized] == ['["raw_shards"]', '["tokenizer"]']
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    assert any(re.match(r"runs/tokenizer/", k) for k in keys), keys
    print(f"materialized raw_shards and tokenizer in the image in {time.monotonic() - t0:.1f}s (run {run_id})")
