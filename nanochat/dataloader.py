"""
Stream (B, T) token batches from parquet shards: tokenize documents in batches, prepend BOS to each, pack
them into one token stream, and cut B*T+1 tokens per batch (inputs and targets shifted by one).

DDP: rank r reads row groups r, r+W, r+2W, ... of every shard, so ranks never see the same document.
Resume: the state after each batch names the row group at the head of the buffer and how many of its tokens
were already consumed; a resumed loader re-tokenizes that row group, skips those tokens, and continues on
exactly the next batch.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator

import torch

from nanochat.dataset import open_shard, split_files


def _row_groups(split, rank, world_size, data_dir, resume: dict | None) -> Iterator[tuple[int, int, int, list]]:
    """Yield (epoch, pq_idx, rg_idx, texts) forever (multi-epoch), starting at `resume` if given."""
    epoch = resume["epoch"] if resume else 0
    start = (resume["pq_idx"], resume["rg_idx"]) if resume else (0, 0)
    files = split_files(split, data_dir)
    while True:
        for pq_idx, path in enumerate(files):
            if pq_idx < start[0]:
                continue
            pf = open_shard(path)
            first = start[1] if pq_idx == start[0] else rank
            for rg_idx in range(first, pf.num_row_groups, world_size):
                yield epoch, pq_idx, rg_idx, pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
        epoch, start = epoch + 1, (0, rank)


def tokenizing_distributed_data_loader(
    tokenizer,
    B: int,
    T: int,
    split: str,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    resume_state: dict | None = None,
    data_dir: str | os.PathLike | None = None,
    tokenizer_threads: int = 4,
    tokenizer_batch_size: int = 128,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """Yield (inputs, targets, state) forever; pass `state` back as resume_state to continue after it."""
    needed = B * T + 1
    bos = tokenizer.get_bos_token_id()
    device = torch.device(device)
    use_cuda = device.type == "cuda"
    # Each chunk is [epoch, pq_idx, rg_idx, tokens, offset]: offset = tokens of it already consumed.
    chunks: deque[list] = deque()
    available = 0
    source = _row_groups(split, rank, world_size, data_dir, resume_state)
    skip = resume_state["offset"] if resume_state else 0

    while True:
        while available < needed:
            epoch, pq_idx, rg_idx, texts = next(source)
            tokens: list[int] = []
            for i in range(0, len(texts), tokenizer_batch_size):
                docs = tokenizer.encode(texts[i : i + tokenizer_batch_size], prepend=bos, num_threads=tokenizer_threads)
                for doc in docs:
                    tokens.extend(doc)
            chunks.append([epoch, pq_idx, rg_idx, tokens, skip])
            available += len(tokens) - skip
            skip = 0

        batch: list[int] = []
        while len(batch) < needed:
            chunk = chunks[0]
            take = min(needed - len(batch), len(chunk[3]) - chunk[4])
            batch.extend(chunk[3][chunk[4] : chunk[4] + take])
            chunk[4] += take
            if chunk[4] == len(chunk[3]):
                chunks.popleft()
        available -= needed

        if chunks:
            head = chunks[0]
            state = {"epoch": head[0], "pq_idx": head[1], "rg_idx": head[2], "offset": head[4]}
        else:
            # Buffer empty: the next batch starts at the row group after the last one consumed.
            state = {"epoch": epoch, "pq_idx": pq_idx, "rg_idx": rg_idx + world_size, "offset": 0}
            # (If that row group is past the end of the shard, _row_groups simply moves to the next shard.)

        buf = torch.tensor(batch, dtype=torch.long, pin_memory=use_cuda)
        inputs = buf[:-1].view(B, T).to(device, non_blocking=use_cuda)
        targets = buf[1:].view(B, T).to(device, non_blocking=use_cuda)
        yield inputs, targets, state
