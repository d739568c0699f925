"""
Train the BPE tokenizer on the first --max-chars characters of the training shards and save it, with
token_bytes.pt (for bits-per-byte), in <base_dir>/tokenizer/.

    python -m nanochat.tok_train --max-chars=2000000000 --vocab-size=65536
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

from nanochat.common import get_base_dir, print0
from nanochat.dataset import get_data_dir, iter_texts
from nanochat.tokenizer import RustBPETokenizer, save_token_bytes


def text_iterator(max_chars: int, doc_cap: int, data_dir=None) -> Iterator[str]:
    """Training documents, each cropped to doc_cap characters, until max_chars have been produced."""
    seen = 0
    for text in iter_texts("train", data_dir):
        text = text[:doc_cap]
        yield text
        seen += len(text)
        if seen >= max_chars:
            return


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Train a BPE tokenizer on the pretraining shards")
    parser.add_argument("--max-chars", type=int, default=10_000_000_000, help="characters to train on")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many chars")
    parser.add_argument("--vocab-size", type=int, default=65536, help="vocabulary size incl. special tokens")
    parser.add_argument("--data-dir", default=None, help="shard directory (default: $NANOCHAT_DATA_DIR)")
    parser.add_argument("--out-dir", default=None, help="output directory (default: <base_dir>/tokenizer)")
    args = parser.parse_args(argv)
    if args.vocab_size < 256 + 9 + 1:
        parser.error(f"--vocab-size must exceed 265 (256 bytes + 9 special tokens), got {args.vocab_size}")

    t0 = time.time()
    chars = 0

    def counted() -> Iterator[str]:
        nonlocal chars
        for text in text_iterator(args.max_chars, args.doc_cap, args.data_dir):
            chars += len(text)
            yield text

    tokenizer = RustBPETokenizer.train_from_iterator(counted(), args.vocab_size)
    dt = time.time() - t0
    out_dir = Path(args.out_dir) if args.out_dir else get_base_dir() / "tokenizer"
    if chars == 0:
        # Empty shards train a bytes-only vocabulary without complaint; saving it would replace a good tokenizer.
        raise ValueError(f"the train shards in {args.data_dir or get_data_dir()} hold no text, so there is nothing to "
                         f"train on; nothing was saved to {out_dir}. Download or build shards with documents "
                         "(python -m nanochat.dataset)")
    tokenizer.save(out_dir)
    save_token_bytes(tokenizer, out_dir)
    print0(f"trained vocab {tokenizer.get_vocab_size()} on {chars:,} chars in {dt:.1f}s "
           f"({chars / max(dt, 1e-9):,.0f} chars/s); saved to {out_dir}")
    sample = "Hello world! The year 2025 had 365 days. 你好 👋"
    ids = tokenizer.encode(sample)
    ok = tokenizer.decode(ids) == sample
    print0(f"sample: {len(sample.encode())} bytes -> {len(ids)} tokens; round-trip ok: {ok}")
    return out_dir


if __name__ == "__main__":
    main()
