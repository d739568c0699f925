"""The token loader: BOS per document, DDP-disjoint row groups, exact resume from state_dict()."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataloader import DistributedTokenLoader
from nanochat.dataset import ShardError


def make(tok, shared, **kw):
    kw.setdefault("B", 4)
    kw.setdefault("T", 64)
    return DistributedTokenLoader(tok, split=kw.pop("split", "train"), data_dir=shared / "pretrain", **kw)


def test_batches_are_shifted_and_documents_start_with_bos(small_tokenizer, shared_data):
    x, y = next(make(small_tokenizer, shared_data))
    assert x.shape == y.shape == (4, 64) and x.dtype == torch.long
    assert torch.equal(x.view(-1)[1:], y.view(-1)[:-1])
    bos = small_tokenizer.get_bos_token_id()
    assert x[0, 0].item() == bos  # the stream opens with the first document's BOS
    assert (x == bos).sum() >= 1


@pytest.mark.parametrize("B, T, after", [(4, 64, 3), (2, 512, 7), (8, 1024, 2)])
def test_resume_continues_on_exactly_the_next_batch(small_tokenizer, shared_data, B, T, after):
    loader = make(small_tokenizer, shared_data, B=B, T=T)
    for _ in range(after):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(3)]
    resumed = make(small_tokenizer, shared_data, B=B, T=T, state=state)
    for (x, y), (rx, ry) in zip(expected, (next(resumed) for _ in range(3))):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def small_row_group_shards(shared, out, docs=30, rows_per_group=8):
    """Real documents re-packed with tiny row groups, so batches cross row-group and shard boundaries."""
    texts = pq.read_table(shared / "pretrain" / "shard_00000.parquet")["text"].to_pylist()
    for i in range(3):
        table = pa.table({"text": [t[:1500] for t in texts[i * docs : (i + 1) * docs]]})
        pq.write_table(table, out / f"shard_{i:05d}.parquet", row_group_size=rows_per_group)
    return out


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_across_row_group_shard_and_epoch_boundaries(small_tokenizer, shared_data, tmp_path, world_size):
    data_dir = small_row_group_shards(shared_data, tmp_path)

    def loader(state=None):
        return DistributedTokenLoader(small_tokenizer, 4, 256, "train", rank=world_size - 1,
                                      world_size=world_size, data_dir=data_dir, state=state)

    first = loader()
    states, batches = [], []
    for _ in range(60):  # 2 train shards x 30 docs x <700 tokens: more than one epoch
        states.append(first.state_dict())
        batches.append(next(first))
    seen = {(s["epoch"], s["pq_idx"], s["rg_idx"]) for s in states}
    assert {s["pq_idx"] for s in states} == {0, 1} and max(s["epoch"] for s in states) >= 1
    assert any(s["offset"] == 0 for s in states[1:]) or len(seen) > 10
    assert all(s["rg_idx"] % world_size == world_size - 1 for s in states)
    for i in range(1, 60, 7):
        resumed = loader(states[i])
        for j in range(i, min(i + 3, 60)):
            x, y = next(resumed)
            assert torch.equal(x, batches[j][0]) and torch.equal(y, batches[j][1]), (i, j)


def test_ranks_read_disjoint_row_groups(small_tokenizer, shared_data):
    r0 = make(small_tokenizer, shared_data, rank=0, world_size=2)
    r1 = make(small_tokenizer, shared_data, rank=1, world_size=2)
    next(r0), next(r1)
    assert r0.state_dict()["rg_idx"] % 2 == 0 and r1.state_dict()["rg_idx"] % 2 == 1
    assert not torch.equal(next(r0)[0], next(r1)[0])


def test_val_split_is_the_last_shard(small_tokenizer, shared_data):
    val = make(small_tokenizer, shared_data, split="val")
    assert [p.name for p in val.files] == ["shard_00003.parquet"]
    assert [p.name for p in make(small_tokenizer, shared_data).files][-1] == "shard_00002.parquet"


def test_corrupt_shard_is_reported_by_name(small_tokenizer, shared_data, tmp_path):
    for i in range(3):
        name = f"shard_{i:05d}.parquet"
        (tmp_path / name).write_bytes((shared_data / "pretrain" / name).read_bytes())
    data = (tmp_path / "shard_00000.parquet").read_bytes()
    (tmp_path / "shard_00000.parquet").write_bytes(data[: len(data) // 3])
    with pytest.raises(ShardError, match="shard_00000.parquet"):
        next(DistributedTokenLoader(small_tokenizer, 2, 32, "train", data_dir=tmp_path))


def test_original_nanochat_loader_state_is_accepted(small_tokenizer, shared_data):
    # The original's meta holds {pq_idx, rg_idx} only: we resume at the start of that row group.
    loader = make(small_tokenizer, shared_data, state={"pq_idx": 1, "rg_idx": 0})
    assert loader.state_dict() == {"epoch": 0, "pq_idx": 1, "rg_idx": 0, "offset": 0}
    x, _ = next(loader)
    assert x[0, 0].item() == small_tokenizer.get_bos_token_id()
