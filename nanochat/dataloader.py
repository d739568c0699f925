"""
Stream (B, T) token batches from parquet shards: tokenize documents in batches, prepend BOS to each, pack
them into one token stream, and cut B*T+1 tokens per batch (inputs and targets shifted by one).

DDP: rank r reads row groups r, r+W, r+2W, ... of every shard, so ranks never see the same document.
Resume: `state_dict()` names the row group at the head of the buffer and how many of its tokens were already
consumed. A loader given that state re-tokenizes the row group, skips those tokens, and yields exactly the
batch that would have come next. (The original resumed one row group later and skipped some documents.)
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator

import torch

from nanochat.dataset import open_shard, split_files


class DistributedTokenLoader:
    def __init__(
        self,
        tokenizer,
        B: int,
        T: int,
        split: str,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        data_dir: str | os.PathLike | None = None,
        state: dict | None = None,
        tokenizer_threads: int = 4,
        tokenizer_batch_size: int = 128,
    ):
        self.tokenizer, self.B, self.T, self.split = tokenizer, B, T, split
        self.device = torch.device(device)
        self.rank, self.world_size, self.data_dir = rank, world_size, data_dir
        self.tokenizer_threads, self.tokenizer_batch_size = tokenizer_threads, tokenizer_batch_size
        self.bos = tokenizer.get_bos_token_id()
        self.files = split_files(split, data_dir)
        self.load_state_dict(state or {"epoch": 0, "pq_idx": 0, "rg_idx": rank, "offset": 0})

    def state_dict(self) -> dict:
        """Where the next batch starts: {epoch, pq_idx, rg_idx, offset (tokens of that row group consumed)}."""
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._state = {k: int(state[k]) for k in ("epoch", "pq_idx", "rg_idx", "offset")}
        # Each chunk is [epoch, pq_idx, rg_idx, tokens, consumed]; the head chunk is where the next batch starts.
        self._chunks: deque[list] = deque()
        self._available = 0
        self._source = self._row_groups(self._state["epoch"], self._state["pq_idx"], self._state["rg_idx"])
        self._skip = self._state["offset"]

    def _row_groups(self, epoch: int, pq_start: int, rg_start: int) -> Iterator[tuple[int, int, int, list[str]]]:
        """Yield (epoch, pq_idx, rg_idx, texts) forever (multi-epoch), from the given position on."""
        while True:
            yielded = False
            for pq_idx in range(pq_start, len(self.files)):
                pf = open_shard(self.files[pq_idx])
                first = rg_start if pq_idx == pq_start else self.rank
                for rg_idx in range(first, pf.num_row_groups, self.world_size):
                    texts = pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
                    yielded = True
                    yield epoch, pq_idx, rg_idx, texts
            if not yielded and (pq_start, rg_start) == (0, self.rank):
                # A whole epoch from the start gave this rank nothing: it would spin forever.
                raise ValueError(
                    f"rank {self.rank} of {self.world_size} has no row groups in the {self.split} split "
                    f"({len(self.files)} shard(s)); use fewer processes or shards with more row groups"
                )
            epoch, pq_start, rg_start = epoch + 1, 0, self.rank

    def _fill(self, needed: int) -> None:
        while self._available < needed:
            epoch, pq_idx, rg_idx, texts = next(self._source)
            tokens: list[int] = []
            for i in range(0, len(texts), self.tokenizer_batch_size):
                docs = self.tokenizer.encode(texts[i : i + self.tokenizer_batch_size], prepend=self.bos,
                                             num_threads=self.tokenizer_threads)
                for doc in docs:
                    tokens.extend(doc)
            self._chunks.append([epoch, pq_idx, rg_idx, tokens, self._skip])
            self._available += len(tokens) - self._skip
            self._skip = 0

    def __iter__(self) -> DistributedTokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        needed = self.B * self.T + 1
        self._fill(needed)
        batch: list[int] = []
        while len(batch) < needed:
            chunk = self._chunks[0]
            take = min(needed - len(batch), len(chunk[3]) - chunk[4])
            batch.extend(chunk[3][chunk[4] : chunk[4] + take])
            chunk[4] += take
            if chunk[4] == len(chunk[3]):
                last = self._chunks.popleft()
        self._available -= needed
        if self._chunks:
            head = self._chunks[0]
            self._state = {"epoch": head[0], "pq_idx": head[1], "rg_idx": head[2], "offset": head[4]}
        else:
            # Buffer empty: the next batch starts at this rank's row group after the last one consumed
            # (past the end of a shard, _row_groups simply moves on to the next shard or epoch).
            self._state = {"epoch": last[0], "pq_idx": last[1], "rg_idx": last[2] + self.world_size, "offset": 0}

        use_cuda = self.device.type == "cuda"
        buf = torch.tensor(batch, dtype=torch.long, pin_memory=use_cuda)
        inputs = buf[:-1].view(self.B, self.T).to(self.device, non_blocking=use_cuda)
        targets = buf[1:].view(self.B, self.T).to(self.device, non_blocking=use_cuda)
        return inputs, targets
