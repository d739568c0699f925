"""The artifact store against a real file system and a real S3 server (SeaweedFS, see tests/s3server.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest
from artifact_files import MB, make_tree, write_random
from s3server import raw_keys, s3_store_like

from orchestration.defs import resources
from store.artifact_store import (
    MANIFEST_NAME,
    ArtifactFileError,
    ArtifactIntegrityError,
    ArtifactStore,
    LocalArtifactStore,
    artifact_store_from_url,
)
from store.s3_store import S3ArtifactStore


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "local":
        return LocalArtifactStore(root=str(tmp_path / "store"))
    return request.getfixturevalue("s3_store")


def count_calls(store: S3ArtifactStore, event: str = "after-call.s3") -> Counter:
    """Count the S3 API calls this store's client makes (a boto3 event hook on the real client)."""
    calls: Counter = Counter()
    store.client.meta.events.register(event, lambda model, **_: calls.update([model.name]))
    return calls


# --- files ---------------------------------------------------------------------------------------------------------


def test_put_get_file_round_trip(store, tmp_path):
    data = write_random(tmp_path / "src" / "model.pt", 200_000)
    info = store.put_file(tmp_path / "src" / "model.pt", "ckpt/d4/model.pt")

    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert (info.key, info.size, info.uri) == ("ckpt/d4/model.pt", len(data), store.uri("ckpt/d4/model.pt"))
    if isinstance(store, LocalArtifactStore):
        assert info.uri == (Path(store.root) / "ckpt/d4/model.pt").resolve().as_uri()
        assert not any((Path(store.root) / ".staging").iterdir()), "staging must be empty after a publish"
    else:
        assert info.uri == f"s3://{store.bucket}/runs/ckpt/d4/model.pt"
        assert raw_keys(store) == ["runs/ckpt/d4/model.pt"], "staging object must be gone after a publish"
    assert store.exists("ckpt/d4/model.pt") and not store.exists("ckpt/d4/other.pt")
    assert store.list_keys("ckpt") == ["ckpt/d4/model.pt"] == store.list_keys("")
    assert store.list_keys("ckp") == [], "prefixes are directories, not string prefixes"

    out = store.get_file("ckpt/d4/model.pt", tmp_path / "out" / "model.pt")
    assert out.read_bytes() == data
    assert [p.name for p in out.parent.iterdir()] == ["model.pt"], "no temp file left next to the download"


def test_json_and_missing_keys(store, tmp_path):
    store.write_json("reports/run1.json", {"core": 0.21, "steps": [1, 2]})
    assert store.read_json("reports/run1.json") == {"core": 0.21, "steps": [1, 2]}
    store.write_json("reports/run1.json", {"core": 0.25})  # overwrite in place
    assert store.read_json("reports/run1.json") == {"core": 0.25}

    with pytest.raises(FileNotFoundError, match="reports/missing.json"):
        store.read_json("reports/missing.json")
    with pytest.raises(FileNotFoundError, match="reports/missing.json"):
        store.get_file("reports/missing.json", tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_large_file_goes_multipart_and_round_trips(s3_store, tmp_path):
    store = s3_store_like(s3_store, multipart_threshold_mb=8, multipart_chunksize_mb=8)
    data = write_random(tmp_path / "big.bin", 40 * MB)
    calls = count_calls(store)

    start = time.monotonic()
    info = store.put_file(tmp_path / "big.bin", "ckpt/big.bin")
    upload_s = time.monotonic() - start

    assert calls["UploadPart"] == 5, calls
    head = store.client.head_object(Bucket=store.bucket, Key="runs/ckpt/big.bin")
    assert head["ETag"].strip('"').endswith("-5"), head["ETag"]  # a multipart object (copied part by part)
    assert head["Metadata"]["sha256"] == info.sha256 == hashlib.sha256(data).hexdigest()
    out = store.get_file("ckpt/big.bin", tmp_path / "back.bin")
    assert out.read_bytes() == data
    assert upload_s < 20, f"40 MB upload took {upload_s:.1f} s"


# --- directories ---------------------------------------------------------------------------------------------------


def test_put_dir_writes_manifest_last_and_get_dir_reuses_cache(store, tmp_path):
    files = make_tree(tmp_path / "tok")
    calls = count_calls(store) if isinstance(store, S3ArtifactStore) else None
    published: list[str] = []
    if isinstance(store, S3ArtifactStore):  # the final keys appear through server-side copies, in this order
        store.client.meta.events.register(
            "before-parameter-build.s3.CopyObject", lambda params, **_: published.append(params["Key"])
        )

    info = store.put_dir(tmp_path / "tok", "tokenizer/run1")

    manifest_key = f"tokenizer/run1/{MANIFEST_NAME}"
    raw_manifest = store.get_file(manifest_key, tmp_path / "m.json").read_bytes()
    assert info.sha256 == hashlib.sha256(raw_manifest).hexdigest()
    assert (info.key, info.uri, info.size) == (
        "tokenizer/run1",
        store.uri("tokenizer/run1"),
        sum(map(len, files.values())),
    )
    manifest = json.loads(raw_manifest)
    assert {e["path"]: (e["size"], e["sha256"]) for e in manifest["files"]} == {
        rel: (len(data), hashlib.sha256(data).hexdigest()) for rel, data in files.items()
    }
    if isinstance(store, S3ArtifactStore):
        assert len(published) == len(files) + 1 and published[-1] == f"runs/{manifest_key}", published
    else:
        stored = Path(store.root) / "tokenizer/run1"
        newest_file = max((stored / rel).stat().st_mtime_ns for rel in files)
        assert (stored / MANIFEST_NAME).stat().st_mtime_ns >= newest_file
    assert store.is_published("tokenizer/run1")

    cache = tmp_path / "cache"
    first = store.get_dir("tokenizer/run1", cache_dir=cache)
    assert first == cache / info.sha256[:16]
    assert {rel: (first / rel).read_bytes() for rel in files} == files
    assert (first / MANIFEST_NAME).read_bytes() == raw_manifest

    stamps = {rel: ((first / rel).stat().st_ino, (first / rel).stat().st_mtime_ns) for rel in files}
    if calls is not None:
        calls.clear()
    assert store.get_dir("tokenizer/run1", cache_dir=cache) == first
    assert stamps == {rel: ((first / rel).stat().st_ino, (first / rel).stat().st_mtime_ns) for rel in files}
    if calls is not None:
        assert calls["GetObject"] == 1, calls  # the manifest only: no file was downloaded again

    # Republishing different content gives a different manifest, hence a different cache entry.
    (tmp_path / "tok" / "config.json").write_bytes(b'{"n_layer": 6}\n')
    info2 = store.put_dir(tmp_path / "tok", "tokenizer/run1")
    second = store.get_dir("tokenizer/run1", cache_dir=cache)
    assert info2.sha256 != info.sha256 and second != first
    assert (second / "config.json").read_bytes() == b'{"n_layer": 6}\n'


def test_directory_without_manifest_does_not_exist(store, tmp_path):
    write_random(tmp_path / "f.bin", 1000)
    store.put_file(tmp_path / "f.bin", "half/f.bin")  # as if put_dir died before its manifest
    assert not store.is_published("half")
    with pytest.raises(FileNotFoundError, match=MANIFEST_NAME):
        store.get_dir("half", cache_dir=tmp_path / "cache")


def test_failed_local_put_dir_leaves_nothing_published(tmp_path):
    """A real write failure midway (a directory squats on one file's path): no manifest, old version unpublished."""
    store = LocalArtifactStore(root=str(tmp_path / "store"))
    make_tree(tmp_path / "d")
    store.put_dir(tmp_path / "d", "ckpt/c")
    (tmp_path / "store/ckpt/c/sub/model.bin").unlink()
    (tmp_path / "store/ckpt/c/sub/model.bin").mkdir()  # os.replace onto it fails: files before it are done

    with pytest.raises(OSError):
        store.put_dir(tmp_path / "d", "ckpt/c")
    assert store.exists("ckpt/c/config.json")
    assert not store.is_published("ckpt/c"), "a republish that failed must not leave the old manifest behind"
    with pytest.raises(FileNotFoundError):
        store.get_dir("ckpt/c", cache_dir=tmp_path / "cache")


def test_default_cache_dir_comes_from_env(tmp_path, monkeypatch):
    store = LocalArtifactStore(root=str(tmp_path / "store"))
    make_tree(tmp_path / "d")
    info = store.put_dir(tmp_path / "d", "x")
    monkeypatch.setenv("NANOCHAT_ARTIFACT_CACHE", str(tmp_path / "envcache"))
    assert store.get_dir("x") == tmp_path / "envcache" / info.sha256[:16]


def test_corrupt_cached_file_is_downloaded_again(store, tmp_path):
    files = make_tree(tmp_path / "d")
    store.put_dir(tmp_path / "d", "ckpt/a")
    cached = store.get_dir("ckpt/a", cache_dir=tmp_path / "cache")
    model = cached / "sub/model.bin"
    model.write_bytes(b"\0" * len(files["sub/model.bin"]))  # same size, wrong content: only sha256 can tell

    assert store.get_dir("ckpt/a", cache_dir=tmp_path / "cache") == cached
    assert model.read_bytes() == files["sub/model.bin"]


def test_corrupt_stored_file_raises_naming_it(store, tmp_path):
    files = make_tree(tmp_path / "d")
    store.put_dir(tmp_path / "d", "ckpt/b")
    garbage = b"\1" * len(files["sub/model.bin"])
    if isinstance(store, S3ArtifactStore):  # bit rot (or a rogue writer) behind the store's back
        store.client.put_object(Bucket=store.bucket, Key="runs/ckpt/b/sub/model.bin", Body=garbage)
    else:
        (Path(store.root) / "ckpt/b/sub/model.bin").write_bytes(garbage)

    with pytest.raises(ArtifactIntegrityError, match="ckpt/b/sub/model.bin"):
        store.get_dir("ckpt/b", cache_dir=tmp_path / "cache")
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if "model.bin" in p.name]
    assert leftovers == [], "a corrupt download must not stay in the cache"


def test_delete_prefix_unpublishes_and_removes(store, tmp_path):
    files = make_tree(tmp_path / "d")
    store.put_dir(tmp_path / "d", "a/dir")
    write_random(tmp_path / "f", 10)
    for key in ("a/x", "a/y/z", "ab/w"):
        store.put_file(tmp_path / "f", key)

    assert store.delete_prefix("a") == 2 + len(files) + 1  # a/x, a/y/z, the tree, its manifest
    assert store.list_keys("") == ["ab/w"]
    assert not store.is_published("a/dir")
    with pytest.raises(ValueError):
        store.delete_prefix("")


# --- keys ----------------------------------------------------------------------------------------------------------

ODD_BUT_VALID = ["dir with space/ünïcode+plus=&?#%.bin", "a/b.c/d-e_f~g(1)", "x/.dotfile", "x/..ellipsis.."]
INVALID = [
    "../escape",
    "a/../../escape",
    "/etc/passwd",
    "a//b",
    "a/",
    "a\\b",
    "",
    ".",
    "a/./b",
    "nul\0byte",
    "line\nbreak",
    ".staging/sneaky",
    "k" * 1025,
]


def test_odd_keys_round_trip_and_bad_keys_are_refused(store, tmp_path):
    data = write_random(tmp_path / "f", 100)
    for key in ODD_BUT_VALID:
        store.put_file(tmp_path / "f", key)
        assert store.get_file(key, tmp_path / "out").read_bytes() == data
    assert store.list_keys("") == sorted(ODD_BUT_VALID)

    for key in INVALID:
        with pytest.raises(ValueError, match="invalid artifact key"):
            store.put_file(tmp_path / "f", key)
        with pytest.raises(ValueError, match="invalid artifact key"):
            store.get_file(key, tmp_path / "out2")
    with pytest.raises(ValueError, match="invalid artifact key"):
        store.put_dir(tmp_path, "../up")
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()
    assert store.list_keys("") == sorted(ODD_BUT_VALID)


def test_manifest_paths_cannot_escape_the_cache(tmp_path):
    store = LocalArtifactStore(root=str(tmp_path / "store"))
    evil = {"version": 1, "files": [{"path": "../../pwned", "size": 1, "sha256": "0" * 64}]}
    (tmp_path / "store/evil").mkdir(parents=True)
    (tmp_path / "store/evil" / MANIFEST_NAME).write_text(json.dumps(evil))
    with pytest.raises(ArtifactIntegrityError, match="malformed"):
        store.get_dir("evil", cache_dir=tmp_path / "cache")


# --- factory and Dagster -------------------------------------------------------------------------------------------


def test_artifact_store_from_url(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_S3_ENDPOINT_URL", "http://127.0.0.1:8333")
    s3 = artifact_store_from_url("s3://models/nanochat/prod/")
    assert isinstance(s3, S3ArtifactStore)
    assert (s3.bucket, s3.prefix, s3.endpoint_url) == ("models", "nanochat/prod", "http://127.0.0.1:8333")
    assert s3.uri("a/b") == "s3://models/nanochat/prod/a/b"

    local = artifact_store_from_url(str(tmp_path / "arts"))
    assert isinstance(local, LocalArtifactStore) and local.uri("k") == (tmp_path / "arts" / "k").as_uri()
    assert artifact_store_from_url((tmp_path / "arts").as_uri()).uri("k") == local.uri("k")
    with pytest.raises(ValueError):
        artifact_store_from_url("gs://bucket/x")


@dg.asset
def report(artifacts: resources.ArtifactStore) -> dg.MaterializeResult:
    """Annotated with the store's resource type: either backend can be injected, as a plain object."""
    info = artifacts.write_json("reports/latest.json", {"core": 0.3})
    return dg.MaterializeResult(metadata=info.to_metadata())


def test_injected_into_a_dagster_asset(store):
    result = dg.materialize([report], resources={"artifacts": store})
    assert result.success
    metadata = result.asset_materializations_for_node("report")[0].metadata
    assert metadata["uri"].value == store.uri("reports/latest.json")
    assert store.read_json("reports/latest.json") == {"core": 0.3}


def test_the_resource_builds_the_store_from_its_url_config(tmp_path):
    """The code location's resource: a URL in the launchpad's config becomes the plain store object."""
    root = tmp_path / "from-config"
    result = dg.materialize([report], resources={"artifacts": resources.artifact_store},
                            run_config={"resources": {"artifacts": {"config": {"url": str(root)}}}})
    assert result.success
    assert LocalArtifactStore(root=str(root)).read_json("reports/latest.json") == {"core": 0.3}


# ---------------------------------------------------------------------------------------------------------------
# Symbolic links: never published, never followed out of the local store's root.


def test_put_dir_refuses_a_symlinked_file_or_directory(store, tmp_path):
    secret = tmp_path / "host" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("host secret")
    for kind in ("file", "dir"):
        src = tmp_path / f"checkpoint-{kind}"
        make_tree(src)
        link = src / "sub" / "link"
        link.symlink_to(secret if kind == "file" else secret.parent)
        with pytest.raises(ArtifactFileError, match=f"{link}.* is a symbolic link .*never follows links"):
            store.put_dir(src, f"runs/{kind}")
        assert not store.is_published(f"runs/{kind}") and store.list_keys(f"runs/{kind}") == []


def test_put_file_refuses_a_symlinked_host_file_and_special_files(store, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    (tmp_path / "link").symlink_to(secret)
    with pytest.raises(ArtifactFileError, match="is a symbolic link"):
        store.put_file(tmp_path / "link", "k/link")
    os.mkfifo(tmp_path / "fifo")  # reading it would block forever
    src = tmp_path / "dir-with-fifo"
    src.mkdir()
    (src / "model.pt").write_bytes(b"x")
    os.mkfifo(src / "pipe")
    with pytest.raises(ArtifactFileError, match="pipe is not a regular file"):
        store.put_dir(src, "k/fifo")
    assert store.list_keys("k") == []


def test_local_store_never_follows_a_link_planted_under_its_root(tmp_path):
    """A link planted in a published directory (a file, or a directory above it) is refused on every read."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.pt").write_text("not from the store")
    store = LocalArtifactStore(root=str(tmp_path / "store"))
    make_tree(tmp_path / "src")
    store.put_dir(tmp_path / "src", "runs/a")
    store.put_dir(tmp_path / "src", "runs/b")
    planted_file = store.root_path / "runs/a/sub/model.bin"
    planted_file.unlink()
    planted_file.symlink_to(outside / "model.pt")
    with pytest.raises(ArtifactFileError, match="model.bin.* is a symbolic link"):
        store.get_file("runs/a/sub/model.bin", tmp_path / "out.pt")
    with pytest.raises(ArtifactFileError, match="is a symbolic link"):
        store.get_dir("runs/a", cache_dir=tmp_path / "cache")
    shutil.rmtree(store.root_path / "runs/b")
    (store.root_path / "runs/b").symlink_to(outside)  # a whole directory replaced by a link
    for read in (lambda: store.read_json("runs/b/manifest.json"), lambda: store.exists("runs/b/config.json"),
                 lambda: store.is_published("runs/b"), lambda: store.list_keys("runs/b"),
                 lambda: store.delete_prefix("runs/b")):
        with pytest.raises(ArtifactFileError, match="runs/b is a symbolic link"):
            read()
    assert (outside / "model.pt").read_text() == "not from the store"  # nothing outside was touched
    assert all(not k.startswith("runs/b") for k in store.list_keys())  # a listing skips the link


def test_a_link_in_the_download_cache_is_replaced_not_trusted(store, tmp_path):
    files = make_tree(tmp_path / "src")
    store.put_dir(tmp_path / "src", "runs/c")
    cached = store.get_dir("runs/c", cache_dir=tmp_path / "cache")
    victim = tmp_path / "victim.bin"
    victim.write_bytes(files["sub/model.bin"])  # same content: a hash check alone would accept the link
    (cached / "sub/model.bin").unlink()
    (cached / "sub/model.bin").symlink_to(victim)
    again = store.get_dir("runs/c", cache_dir=tmp_path / "cache")
    model = again / "sub/model.bin"
    assert not model.is_symlink() and model.read_bytes() == files["sub/model.bin"]
    assert victim.read_bytes() == files["sub/model.bin"]  # the link was replaced, its target left alone
