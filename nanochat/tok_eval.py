"""
How well does the trained tokenizer compress each kind of text? Bytes per token (higher is better: more text
fits in the context and each training token carries more data) and tokens per document, for the pretraining
shards, the local evaluation/chat data it will later see, and a few fixed strings.

    python -m nanochat.tok_eval

Prints a markdown table; main() returns the rows so the orchestration layer can store them. (The original also
compares with the GPT-2 and GPT-4 tokenizers; those need a download, so they are left out here.)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from nanochat.common import get_shared_data_dir
from nanochat.dataset import ShardError, iter_texts
from nanochat.tokenizer import Tokenizer, get_tokenizer

NEWS = """(Reuters) - The city council voted 7-2 on Tuesday to approve a $1.2 billion budget for the 2025 fiscal
year, including new funding for public transit and a 3% raise for municipal workers. "This is a budget that
invests in people," Mayor Jane Ortiz told reporters after the vote. Critics said the plan relies on optimistic
revenue forecasts and could force cuts next year if tax receipts fall short."""

CODE = '''def merge_sorted(a: list[int], b: list[int]) -> list[int]:
    """Merge two sorted lists in O(len(a) + len(b))."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out + a[i:] + b[j:]
'''

MATH = r"""Let $f(x) = 3x^2 - 12x + 7$. Completing the square, $f(x) = 3(x - 2)^2 - 5$, so the minimum is
$f(2) = -5$. The roots satisfy $x = 2 \pm \sqrt{5/3} \approx 3.291, 0.709$, and
$\int_0^1 f(x)\,dx = 1 - 6 + 7 = 2$."""

KOREAN_EMOJI = "안녕하세요! 오늘 날씨가 정말 좋네요 ☀️ 같이 산책할까요? 🚶‍♀️🌳 저녁에는 김치찌개를 먹을 거예요 🍲😋"


def _strings(obj: object) -> Iterator[str]:
    """Every string inside a JSON record (eval rows keep their text in differently named fields)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _jsonl(path: Path) -> Iterator[dict]:
    with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


# (name, files under the shared data dir, record -> document). The CORE rows keep their text in task-specific
# fields (query/choices, context/continuation, context_options), so all of a row's strings make the document.
SHARED_SOURCES = [
    ("gsm8k-questions", "gsm8k/test.jsonl", lambda r: r["question"]),
    ("chat", "chat/*.jsonl", lambda r: "\n".join(m["content"] for m in r["messages"])),
    ("humaneval-code", "humaneval/HumanEval.jsonl.gz", lambda r: r["prompt"] + r["canonical_solution"]),
] + [
    (f"core-{task.split('/')[1]}", f"eval_bundle/eval_data/{task}.jsonl", lambda r: "\n".join(_strings(r)))
    for task in ("language_understanding/lambada_openai", "world_knowledge/arc_easy",
                 "language_understanding/winograd_wsc", "symbolic_problem_solving/bigbench_dyck_languages")
]


def gather_sources(max_docs: int = 256, data_dir: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """{source name: up to max_docs documents}; sources that are not on this machine are skipped with a note."""
    sources: dict[str, list[str]] = {}
    for split in ("train", "val"):
        try:
            sources[f"pretrain-{split}"] = list(islice(iter_texts(split, data_dir), max_docs))
        except (FileNotFoundError, ShardError) as e:
            print(f"skipping pretrain-{split}: {e}")
    try:
        shared = get_shared_data_dir()
    except FileNotFoundError as e:
        print(f"skipping shared data sources: {e}")
        shared = None
    if shared is not None:
        for name, pattern, text_of in SHARED_SOURCES:
            paths = sorted(shared.glob(pattern))
            if not paths:
                print(f"skipping {name}: no {shared / pattern}")
                continue
            # An even share from each file, so "chat" mixes all three chat sets instead of only the first.
            records = (r for p in paths for r in islice(_jsonl(p), -(-max_docs // len(paths))))
            sources[name] = [text_of(r) for r in islice(records, max_docs)]
    sources.update({"fixed-news": [NEWS], "fixed-code": [CODE], "fixed-math": [MATH],
                    "fixed-korean-emoji": [KOREAN_EMOJI]})
    return sources


def evaluate(tokenizer: Tokenizer, sources: dict[str, list[str]], num_threads: int = 4) -> list[dict]:
    rows = []
    for name, docs in sources.items():
        num_bytes = sum(len(d.encode("utf-8")) for d in docs)
        num_tokens = sum(len(ids) for ids in tokenizer.encode(docs, num_threads=num_threads))
        rows.append({"source": name, "docs": len(docs), "bytes": num_bytes, "tokens": num_tokens,
                     "bytes_per_token": round(num_bytes / max(num_tokens, 1), 3),
                     "tokens_per_doc": round(num_tokens / max(len(docs), 1), 1)})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| source | docs | bytes | tokens | bytes/token | tokens/doc |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['source']} | {r['docs']:,} | {r['bytes']:,} | {r['tokens']:,} | {r['bytes_per_token']:.2f} "
              f"| {r['tokens_per_doc']:,.1f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description="Tokenizer compression per data source")
    parser.add_argument("--max-docs", type=int, default=256, help="documents per source")
    parser.add_argument("--data-dir", default=None, help="shard directory (default: $NANOCHAT_DATA_DIR)")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="tokenizer threads")
    parser.add_argument("--base-dir", default=None, help="read <base-dir>/tokenizer (default: $NANOCHAT_BASE_DIR)")
    args = parser.parse_args(argv)
    tokenizer = get_tokenizer(args.base_dir)
    rows = evaluate(tokenizer, gather_sources(args.max_docs, args.data_dir), args.threads)
    print(f"tokenizer: vocab {tokenizer.get_vocab_size():,}\n")
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
