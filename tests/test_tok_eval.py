"""tok_eval end to end: a real small tokenizer on disk, the real shards and shared data, one row per source."""

from __future__ import annotations

import pyarrow.parquet as pq

from nanochat import tok_eval
from nanochat.tokenizer import save_token_bytes

SOURCES = ["pretrain-train", "pretrain-val", "gsm8k-questions", "chat", "humaneval-code", "core-lambada_openai",
           "core-arc_easy", "core-winograd_wsc", "core-bigbench_dyck_languages", "fixed-news", "fixed-code",
           "fixed-math", "fixed-korean-emoji"]

PROSE = ["pretrain-train", "pretrain-val", "gsm8k-questions", "chat", "core-lambada_openai", "core-arc_easy",
         "core-winograd_wsc", "fixed-news"]


def test_tok_eval_reports_compression_for_every_source(small_tokenizer, shared_data, tmp_path, monkeypatch, capsys):
    small_tokenizer.save(tmp_path / "tokenizer")
    save_token_bytes(small_tokenizer, tmp_path / "tokenizer")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(shared_data / "pretrain"))
    monkeypatch.setenv("NANOCHAT_SHARED_DATA", str(shared_data))

    rows = tok_eval.main(["--max-docs", "64", "--threads", "2"])

    by_source = {r["source"]: r for r in rows}
    assert list(by_source) == SOURCES
    for r in rows:
        assert r["docs"] == (1 if r["source"].startswith("fixed-") else 64), r
        assert r["tokens"] > 0 and abs(r["tokens_per_doc"] * r["docs"] - r["tokens"]) <= r["docs"], r
        # A 512-token BPE trained on English prose compresses English clearly better than raw bytes (~1.9);
        # code, brackets, LaTeX and Korean/emoji fall back towards single bytes (1.0 is the floor).
        low = 1.5 if r["source"] in PROSE else 1.0
        assert low < r["bytes_per_token"] < 6.0, r
    assert by_source["fixed-korean-emoji"]["bytes_per_token"] < 1.2 < by_source["fixed-news"]["bytes_per_token"]
    val = pq.read_table(shared_data / "pretrain/shard_00003.parquet")["text"].to_pylist()[:64]
    assert by_source["pretrain-val"]["bytes"] == sum(len(t.encode()) for t in val)
    out = capsys.readouterr().out
    assert "| source | docs | bytes | tokens | bytes/token | tokens/doc |" in out
    assert "| gsm8k-questions | 64 |" in out
