"""
Shard download against a real HTTP server on 127.0.0.1 that serves copies of the shared shards and injects
faults (500s, bodies cut off mid-transfer, Range ignored, 404s); local-source shard building; --verify.
"""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.dataset import (
    DownloadError,
    ShardError,
    build_shards_from_local,
    download_shards,
    iter_texts,
    list_parquet_files,
    shard_name,
    split_files,
)


class FaultyHandler(BaseHTTPRequestHandler):
    """GET /shard_XXXXX.parquet with Range support; server.faults[name] is a queue of faults for its requests."""

    def do_GET(self):
        srv = self.server
        name = self.path.lstrip("/")
        rng = self.headers.get("Range")
        with srv.lock:
            fault = srv.faults.get(name, []).pop(0) if srv.faults.get(name) else None
        path = srv.root / name
        if fault == "500" or not path.is_file():
            status = 500 if fault == "500" else 404
            srv.log.append((name, rng, status))
            self.send_error(status)
            return
        data = path.read_bytes()
        start = 0
        if rng and not srv.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
        if start >= len(data):
            srv.log.append((name, rng, 416))
            self.send_error(416)
            return
        status = 206 if start else 200
        srv.log.append((name, rng, status))
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if fault == "cut":  # promise the whole body, send a third of it, hang up
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def source_shards(shared_data, tmp_path_factory) -> Path:
    """Copies of the 4 real shards (tests never write under shared/)."""
    root = tmp_path_factory.mktemp("served")
    for p in sorted((shared_data / "pretrain").glob("shard_*.parquet")):
        shutil.copyfile(p, root / p.name)
    return root


@pytest.fixture
def server(source_shards):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FaultyHandler)
    srv.root, srv.faults, srv.ignore_range, srv.log, srv.lock = source_shards, {}, False, [], threading.Lock()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def requests_for(srv, name):
    return [(rng, status) for n, rng, status in srv.log if n == name]


def assert_identical(out: Path, source: Path, n: int):
    for i in range(n):
        assert (out / shard_name(i)).read_bytes() == (source / shard_name(i)).read_bytes(), shard_name(i)
    assert not list(out.glob("*.partial"))


def test_download_retries_500_and_resumes_cut_transfer_with_range(server, source_shards, tmp_path):
    s0, s1 = shard_name(0), shard_name(1)
    server.faults = {s0: ["500"], s1: ["cut"]}
    summary = download_shards(4, tmp_path, workers=2, base_url=server.url, backoff=0.01)
    assert summary.downloaded == [shard_name(i) for i in range(4)]
    assert summary.failed == {} and summary.retries == 2
    assert_identical(tmp_path, source_shards, 4)
    assert [s for _, s in requests_for(server, s0)] == [500, 200]
    cut_at = ((source_shards / s1).stat().st_size) // 3
    assert requests_for(server, s1) == [(None, 200), (f"bytes={cut_at}-", 206)]  # resumed, not restarted


def test_download_restarts_when_server_ignores_range(server, source_shards, tmp_path):
    server.ignore_range = True
    server.faults = {shard_name(2): ["cut", "cut"]}
    summary = download_shards(3, tmp_path, workers=3, base_url=server.url, backoff=0.01)
    assert summary.retries == 2
    assert_identical(tmp_path, source_shards, 3)
    log = requests_for(server, shard_name(2))
    assert [s for _, s in log] == [200, 200, 200] and log[0][0] is None and log[1][0] and log[2][0]


def test_partial_files_left_by_a_crash_are_resumed(server, source_shards, tmp_path):
    s0, whole = (source_shards / shard_name(0)).read_bytes(), (source_shards / shard_name(1)).read_bytes()
    (tmp_path / (shard_name(0) + ".partial")).write_bytes(s0[:1000])
    (tmp_path / (shard_name(1) + ".partial")).write_bytes(whole)  # crashed between download and rename
    summary = download_shards(2, tmp_path, base_url=server.url)
    assert summary.downloaded == [shard_name(0), shard_name(1)] and summary.retries == 0
    assert requests_for(server, shard_name(0)) == [("bytes=1000-", 206)]
    assert requests_for(server, shard_name(1)) == [(f"bytes={len(whole)}-", 416)]
    assert_identical(tmp_path, source_shards, 2)


def test_permanently_failing_shards_are_all_named(server, tmp_path):
    server.faults = {shard_name(1): ["500"] * 3}
    with pytest.raises(DownloadError) as e:
        download_shards(6, tmp_path, workers=2, base_url=server.url, max_attempts=3, backoff=0.01)
    msg = str(e.value)
    assert "shard_00001.parquet" in msg and "after 3 attempts" in msg
    assert "shard_00004.parquet" in msg and "shard_00005.parquet" in msg and "404" in msg
    assert e.value.summary.downloaded == [shard_name(0), shard_name(2), shard_name(3)]
    assert len(requests_for(server, shard_name(4))) == 1  # a 404 is not retried
    assert not (tmp_path / shard_name(4)).exists() and not list(tmp_path.glob("*.partial"))


def test_corrupt_local_shard_is_named_and_downloaded_again(server, source_shards, tmp_path, capsys):
    download_shards(2, tmp_path, base_url=server.url)
    victim = tmp_path / shard_name(1)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(ShardError, match="shard_00001.parquet"):
        split_files("val", tmp_path)  # the reader refuses it too (split_files checks footers)
    server.log.clear()
    summary = download_shards(2, tmp_path, base_url=server.url)
    assert summary.skipped == [shard_name(0)] and summary.corrupt == [shard_name(1)] and not summary.downloaded
    assert "shard_00001.parquet: existing file is corrupt" in capsys.readouterr().out
    assert [n for n, _, _ in server.log] == [shard_name(1)]
    assert_identical(tmp_path, source_shards, 2)


def test_cli_downloads_via_env_url_and_verify_names_corrupt_shard(server, source_shards, tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setenv("NANOCHAT_DATASET_URL", server.url)
    assert dataset.main(["-n", "3", "-w", "2", "--data-dir", str(tmp_path)]) == 0
    assert_identical(tmp_path, source_shards, 3)
    assert dataset.main(["--verify", "--data-dir", str(tmp_path)]) == 0
    victim = tmp_path / shard_name(2)
    victim.write_bytes(victim.read_bytes()[:-100])
    capsys.readouterr()
    assert dataset.main(["--verify", "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT shard_00002.parquet" in out and "shard_00000" not in out and "2 of 3 shards" in out


# ---------------------------------------------------------------------------------------------------------
# Local source


def make_source(root: Path, source_shards: Path) -> list[str]:
    """A parquet file (with an extra column), a jsonl file and two txt files; returns the expected documents."""
    texts = pq.read_table(source_shards / shard_name(0), columns=["text"])["text"].to_pylist()[:1200]
    root.mkdir()
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), root / "a_web.parquet")
    jsonl = [f"Question {i}: what is {i} + {i}? Answer: {2 * i}." for i in range(40)]
    with open(root / "b_qa.jsonl", "w") as f:
        for i, t in enumerate(jsonl):
            f.write(json.dumps({"text": t, "id": i}) + "\n")
        f.write("\n" + json.dumps({"text": "  \n"}) + "\n")  # blank lines and empty documents are dropped
    (root / "c_notes").mkdir()
    txt = ["First paragraph of an essay.\n\nSecond paragraph, same document.\n", "한국어 문서 👋\n"]
    (root / "c_notes" / "one.txt").write_text(txt[0])
    (root / "c_notes" / "two.txt").write_text(txt[1])
    (root / "ignored.csv").write_text("text\nnot a source\n")
    return texts + jsonl + txt


def test_build_shards_from_local_round_trips_documents(source_shards, tmp_path):
    expected = make_source(tmp_path / "src", source_shards)
    out = tmp_path / "shards"
    shards = build_shards_from_local(tmp_path / "src", out, docs_per_shard=1100)
    assert [p.name for p in shards] == [shard_name(0), shard_name(1)] == [p.name for p in list_parquet_files(out)]
    first = pq.ParquetFile(shards[0])
    assert first.schema_arrow.names == ["text"] and first.metadata.num_rows == 1100
    assert [first.metadata.row_group(i).num_rows for i in range(first.num_row_groups)] == [1024, 76]
    assert first.metadata.row_group(0).column(0).compression == "ZSTD"
    assert pq.ParquetFile(shards[1]).metadata.num_rows == len(expected) - 1100
    assert split_files("val", out) == [shards[-1]]  # the last shard is validation
    assert list(iter_texts("train", out)) + list(iter_texts("val", out)) == expected
    with pytest.raises(FileExistsError, match="already holds 2"):
        build_shards_from_local(tmp_path / "src", out)


def test_small_local_source_gets_a_val_shard_and_cli_works(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    docs = [f"document number {i}" for i in range(30)]
    (src / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert dataset.main(["--from-local", str(src), "--data-dir", str(tmp_path / "out")]) == 0
    assert list(iter_texts("train", tmp_path / "out")) == docs[:27]
    assert list(iter_texts("val", tmp_path / "out")) == docs[27:]


@pytest.mark.parametrize("line, why", [('{"text": "ok"', "JSONDecodeError"), ('{"title": "x"}', "KeyError"),
                                        ('{"text": 3}', "not a string")])
def test_bad_jsonl_line_is_named_by_file_and_line(tmp_path, line, why):
    src = tmp_path / "src"
    src.mkdir()
    (src / "bad.jsonl").write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{why}"):
        build_shards_from_local(src, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*"))
