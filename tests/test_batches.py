"""Typed batches: shards have the same structure on every rank, padding rows carry weight 0, and
every real row lands on exactly one rank."""
import torch

from rlgen.batches import TextBucket, TextPairBucket, TextPairs, TextRollout


def bucket(rows, width=3, prompt=2):
    b = len(rows)
    return TextBucket(torch.arange(b * (prompt + width)).reshape(b, -1), torch.zeros(b, width, dtype=torch.long),
                      torch.zeros(b, width), torch.tensor(rows), prompt)


def test_text_shards_are_even_padded_and_cover_every_row_once():
    ro = TextRollout([f"p{i}" for i in range(8)], ["c"] * 8, torch.arange(8) // 2,
                     [bucket([0, 1, 2, 3, 4]), bucket([5, 6, 7], width=4, prompt=3)])
    shards = ro.shard(2)
    assert [[len(b) for b in s.buckets] for s in shards] == [[3, 2], [3, 2]]  # same passes on every rank
    assert all(s.global_size == 8 for s in shards)
    real = sorted(int(r) for s in shards for b in s.buckets for r, w in zip(b.rows, b.weight) if w > 0)
    assert real == list(range(8))
    pads = [(int(r), float(w)) for s in shards for b in s.buckets for r, w in zip(b.rows, b.weight) if w == 0]
    assert pads == [(0, 0.0), (5, 0.0)]  # the bucket's first row, weight 0
    assert torch.equal(shards[1].buckets[0].tokens[0], ro.buckets[0].tokens[3])  # rows keep their tensors


def test_keep_rows_drops_rows_and_empty_buckets():
    ro = TextRollout([f"p{i}" for i in range(8)], ["c"] * 8, torch.arange(8) // 2,
                     [bucket([0, 1, 2, 3, 4]), bucket([5, 6, 7], width=4, prompt=3)])
    kept = ro.keep_rows(torch.tensor([1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool))
    assert len(kept.buckets) == 1 and kept.buckets[0].rows.tolist() == [0, 1] and kept.global_size == 2


def test_pair_shards():
    b = TextPairBucket(torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 4, dtype=torch.long),
                       torch.ones(3, 4, dtype=torch.long), torch.arange(3))
    shards = TextPairs([b], seed=7).shard(2)
    assert [len(s) for s in shards] == [2, 2] and all(s.global_size == 3 and s.seed == 7 for s in shards)
    assert [w.tolist() for s in shards for w in [s.buckets[0].weight]] == [[1.0, 1.0], [1.0, 0.0]]
