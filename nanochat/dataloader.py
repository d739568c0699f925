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

from nanochat.dataset import open_shard, read_texts, split_files


class TokenPacker:
    """
    Pack a stream of token chunks (documents, row groups, conversations) into (B, T) batches.

    `chunks_from(position)` yields (position, tokens) forever, starting at `position` (a dict). The state is the
    position of the chunk at the head of the buffer plus how many of its tokens were consumed, so a packer
    built from that state yields exactly the batch that would have come next.
    """

    def __init__(self, chunks_from, B: int, T: int, device: str | torch.device, state: dict):
        self.chunks_from, self.B, self.T = chunks_from, B, T
        self.device = torch.device(device)
        self.load_state_dict(state)

    def state_dict(self) -> dict:
        """Where the next batch starts: the head chunk's position and `offset`, its tokens already consumed."""
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._state = dict(state)
        position = {k: v for k, v in state.items() if k != "offset"}
        self._source = self.chunks_from(position)
        self._chunks: deque[list] = deque()  # [position, tokens, consumed]
        self._available = 0
        self._fill(1)
        self._chunks[0][2] = state.get("offset", 0)
        self._available -= self._chunks[0][2]

    def _fill(self, needed: int) -> None:
        while self._available < needed:
            position, tokens = next(self._source)
            self._chunks.append([position, tokens, 0])
            self._available += len(tokens)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        needed = self.B * self.T + 1
        self._fill(needed)
        batch: list[int] = []
        while len(batch) < needed:
            chunk = self._chunks[0]
            take = min(needed - len(batch), len(chunk[1]) - chunk[2])
            batch.extend(chunk[1][chunk[2] : chunk[2] + take])
            chunk[2] += take
            if chunk[2] == len(chunk[1]):
                self._chunks.popleft()
        self._available -= needed
        self._fill(1)  # keep a head chunk, so the state always names where the next batch starts
        head = self._chunks[0]
        self._state = {**head[0], "offset": head[2]}

        use_cuda = self.device.type == "cuda"
        buf = torch.tensor(batch, dtype=torch.long, pin_memory=use_cuda)
        inputs = buf[:-1].view(self.B, self.T).to(self.device, non_blocking=use_cuda)
        targets = buf[1:].view(self.B, self.T).to(self.device, non_blocking=use_cuda)
        return inputs, targets


class DistributedTokenLoader(TokenPacker):
    """Pretraining batches from parquet shards: rank r tokenizes row groups r, r+W, ... of every shard."""

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
        self.tokenizer, self.split = tokenizer, split
        self.rank, self.world_size = rank, world_size
        self.tokenizer_threads, self.tokenizer_batch_size = tokenizer_threads, tokenizer_batch_size
        self.bos = tokenizer.get_bos_token_id()
        self.files = split_files(split, data_dir)
        # A state from the original nanochat has only {pq_idx, rg_idx}: resume at that row group, from its start.
        start = {"epoch": 0, "pq_idx": 0, "rg_idx": rank, "offset": 0, **(state or {})}
        super().__init__(self._row_groups, B, T, device, start)

    def _row_groups(self, position: dict) -> Iterator[tuple[dict, list[int]]]:
        """Yield ({epoch, pq_idx, rg_idx}, tokens) forever (multi-epoch), from `position` on."""
        epoch, pq_start, rg_start = position["epoch"], position["pq_idx"], position["rg_idx"]
        while True:
            yielded = False
            for pq_idx in range(pq_start, len(self.files)):
                pf = open_shard(self.files[pq_idx])
                first = rg_start if pq_idx == pq_start else self.rank
                for rg_idx in range(first, pf.num_row_groups, self.world_size):
                    tokens = self._tokenize(read_texts(pf, self.files[pq_idx], rg_idx))
                    yielded = yielded or bool(tokens)  # a row group of zero rows gives no tokens
                    yield {"epoch": epoch, "pq_idx": pq_idx, "rg_idx": rg_idx}, tokens
            if not yielded and (pq_start, rg_start) == (0, self.rank):
                # A whole epoch from the start gave this rank nothing: it would spin forever.
                raise ValueError(
                    f"rank {self.rank} of {self.world_size} found no documents in its row groups of the {self.split} "
                    f"split ({', '.join(p.name for p in self.files)} in {self.files[0].parent}): the shards are "
                    "empty or have too few row groups; rebuild them with documents, or use fewer processes"
                )
            epoch, pq_start, rg_start = epoch + 1, 0, self.rank

    def _tokenize(self, texts: list[str]) -> list[int]:
        tokens: list[int] = []
        for i in range(0, len(texts), self.tokenizer_batch_size):
            docs = self.tokenizer.encode(texts[i : i + self.tokenizer_batch_size], prepend=self.bos,
                                         num_threads=self.tokenizer_threads)
            for doc in docs:
                tokens.extend(doc)
        return tokens


class ConversationTokenLoader(TokenPacker):
    """
    Mid-training batches: conversations rendered to tokens and packed into one stream, like documents.
    The loss covers every token (the model learns the chat format itself). Rank r takes conversations
    r, r+W, ...; the position {epoch, index} makes progress through the mixture easy to read off.
    """

    def __init__(self, tokenizer, dataset, B: int, T: int, device: str | torch.device = "cpu", rank: int = 0,
                 world_size: int = 1, state: dict | None = None, max_tokens: int = 4096):
        if len(dataset) <= rank:
            raise ValueError(f"dataset of {len(dataset)} conversations is too small for rank {rank}")
        self.tokenizer, self.dataset = tokenizer, dataset
        self.rank, self.world_size, self.max_tokens = rank, world_size, max_tokens
        super().__init__(self._conversations, B, T, device, state or {"epoch": 0, "index": rank, "offset": 0})

    def progress(self) -> float:
        """Epochs completed, fractional: 0.5 = halfway through the mixture."""
        return self._state["epoch"] + self._state["index"] / len(self.dataset)

    def _conversations(self, position: dict) -> Iterator[tuple[dict, list[int]]]:
        epoch, index = position["epoch"], position["index"]
        while True:
            for i in range(index, len(self.dataset), self.world_size):
                ids, _ = self.tokenizer.render_conversation(self.dataset[i], max_tokens=self.max_tokens)
                yield {"epoch": epoch, "index": i}, ids
            epoch, index = epoch + 1, self.rank


class SFTBatchLoader:
    """
    SFT batches: B whole conversations per batch, right-padded, with targets -1 wherever the render mask is 0
    (user turns, tool outputs, padding), so only the assistant's tokens are learned. Conversations longer than
    T+1 tokens are cropped. Rank r takes conversations r, r+W, ...; state = the next {epoch, index}.
    """

    def __init__(self, tokenizer, dataset, B: int, T: int, device: str | torch.device = "cpu", rank: int = 0,
                 world_size: int = 1, state: dict | None = None):
        if len(dataset) <= rank:
            raise ValueError(f"dataset of {len(dataset)} conversations is too small for rank {rank}")
        self.tokenizer, self.dataset, self.B, self.T = tokenizer, dataset, B, T
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.pad_id = tokenizer.encode_special("<|assistant_end|>")  # any id works: its targets are masked
        self.load_state_dict(state or {"epoch": 0, "index": rank})

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._state = {"epoch": int(state["epoch"]), "index": int(state["index"])}

    def progress(self) -> float:
        return self._state["epoch"] + self._state["index"] / len(self.dataset)

    def _next_conversation(self) -> dict:
        epoch, index = self._state["epoch"], self._state["index"]
        conversation = self.dataset[index]
        index += self.world_size
        if index >= len(self.dataset):
            epoch, index = epoch + 1, self.rank
        self._state = {"epoch": epoch, "index": index}
        return conversation

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.tokenizer.render_conversation(self._next_conversation(), max_tokens=self.T + 1)
                for _ in range(self.B)]
        self.batch_tokens = sum(len(ids) - 1 for ids, _ in rows)  # the examples' tokens, padding excluded
        width = max(len(ids) for ids, _ in rows) - 1
        inputs = torch.full((self.B, width), self.pad_id, dtype=torch.long)
        targets = torch.full((self.B, width), -1, dtype=torch.long)
        for i, (ids, mask) in enumerate(rows):
            n = len(ids) - 1
            inputs[i, :n] = torch.tensor(ids[:-1])
            row_targets = torch.tensor(ids[1:])
            row_targets[torch.tensor(mask[1:]) == 0] = -1
            targets[i, :n] = row_targets
        use_cuda = self.device.type == "cuda"
        return inputs.to(self.device, non_blocking=use_cuda), targets.to(self.device, non_blocking=use_cuda)
