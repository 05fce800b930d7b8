"""data/collate.py: padded, padding-free and budget-cut micro-batches, and host-side label positions."""
import torch

from tunesmith.data.collate import collate
from tunesmith.data.tokenize import IGNORE, Encoded


def test_collate_pads_like_row_by_row(tiny_tokenizer):
    examples = [Encoded([5, 6, 7], [IGNORE, 6, 7]), Encoded([8], [8]), Encoded([1, 2, 3, 4, 5], [IGNORE] * 4 + [5])]
    batch = collate(examples, pad_id=0, step=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, IGNORE], [8] + [IGNORE] * 4, [IGNORE] * 4 + [5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "labels", "attention_mask"))
    # where the loss reads its targets, found on the host: next-token positions of the [3, 4] grid
    assert batch["label_positions"].tolist() == [0, 1, 11] and batch["label_targets"].tolist() == [6, 7, 5]
    assert batch["label_count"] == 3


def test_flat_batch_puts_examples_end_to_end():
    from tunesmith.data.collate import flat_batch

    batch = flat_batch([Encoded([5, 6, 7], [IGNORE, 6, 7]), Encoded([8, 9], [8, 9]), Encoded([1], [1])])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1]]
    # each example's first label is dropped: in the row it would be predicted from the previous example
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9, IGNORE]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5, 6] and "attention_mask" not in batch


def test_budget_cut_fills_few_micro_batches():
    from tunesmith.data.collate import budget_cut

    lengths = [300, 120, 500, 90, 410, 260, 700, 30]
    batches = budget_cut(list(range(8)), lengths, 1024)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in batches)
    assert len(batches) == 3  # 2410 tokens need at least 3 micro-batches of 1024
    assert budget_cut([0, 1], [2000, 10], 1024) == [[0], [1]]  # a longer example goes alone
    assert budget_cut([0, 1, 2], [512, 512, 300], 1024) == [[0, 1], [2]]  # an exact fit fills a micro-batch


def test_rows_are_rounded_up_with_a_padding_segment_that_carries_no_label():
    """Row lengths from a small set (16 a power of two): new shapes grow the CPU kernels' caches."""
    from tunesmith.data.collate import flat_batch, rounded_up

    assert [rounded_up(n) for n in (1, 16, 17, 300, 512, 513, 1000, 2049)] == [16, 16, 32, 304, 512, 544, 1024, 2176]
    examples = [Encoded([5, 6, 7], [IGNORE, 6, 7]), Encoded([8, 9], [8, 9])]
    flat = collate(examples, pad_id=0, flat=True)
    assert flat["input_ids"].shape == (1, 16) and flat["input_ids"][0, 5:].eq(0).all()
    assert flat["cu_seq_lens"].tolist() == [0, 3, 5, 16]  # the padding is a segment of its own
    assert flat["position_ids"][0, 5:].tolist() == list(range(11)) and flat["max_length"] == 11
    exact = flat_batch(examples)
    assert flat["label_positions"].tolist() == collate(examples, 0, flat=True, step=1)["label_positions"].tolist()
    assert flat["labels"][0, :5].tolist() == exact["labels"][0].tolist() and flat["labels"][0, 5:].eq(IGNORE).all()
    padded = collate(examples, pad_id=0)
    assert padded["input_ids"].shape == (2, 16) and padded["attention_mask"].sum() == 5
    assert collate([Encoded([1] * 32, [1] * 32)], 0, flat=True)["cu_seq_lens"].tolist() == [0, 32]  # no empty segment


def test_every_epoch_is_shuffled_anew():
    """Each epoch covers every example once, in an order of its own: steps that held the same examples
    in every epoch would repeat the same updates."""
    from tunesmith.data.collate import step_batches

    stream = step_batches([10] * 12, batch_size=2, grad_accum=2, seed=3)
    epochs = [[frozenset(i for batch in next(stream) for i in batch) for _ in range(3)] for _ in range(2)]
    assert all(sorted(i for step in epoch for i in step) == list(range(12)) for epoch in epochs)
    assert set(epochs[0]) != set(epochs[1])
