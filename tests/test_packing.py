"""Packing: several examples per row with no attention across their borders; properties of collation."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tunesmith.data.collate import collate
from tunesmith.data.packing import pack, pack_examples
from tunesmith.data.tokenize import IGNORE, Encoded, encode
from tunesmith.models import load_model
from tunesmith.training.loss import label_loss_sum, model_inputs


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    from tunesmith.data.demo import make_splits

    rows = make_splits(7, seed=11, validation_size=0, test_size=0)["train"]
    return [encode(tiny_tokenizer, r["messages"]) for r in rows]


def alone_logits(model, example):
    with torch.no_grad():
        return model(input_ids=torch.tensor([example.input_ids])).logits[0]


def packing_model(model_dir, attention: str):
    """The tiny model with transformers' SDPA or eager attention, or as training runs it on the CPU
    ("training"): LoRA made trainable and the fast paths applied as api.train does, which puts the
    CPU attention of accel/cpu/attention.py in place of SDPA."""
    from transformers import AutoModelForCausalLM

    from helpers import trainable
    from tunesmith.accel.cpu import attention as training_attention
    from tunesmith.config import AdapterConfig

    implementation = "sdpa" if attention == "training" else attention
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=implementation)
    if attention == "training":
        torch.manual_seed(0)
        model = trainable(model, AdapterConfig(r=4, alpha=8))
        with torch.no_grad():  # B non-zero: the adapters take part in the output
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        assert model.config._attn_implementation == training_attention.NAME
    return model.eval()


@pytest.mark.parametrize("train_on_inputs", [False, True])
@pytest.mark.parametrize("attention", ["sdpa", "eager", "training"])
def test_packed_logits_and_loss_equal_each_example_alone(tiny_model_dir, tiny_tokenizer, attention, train_on_inputs):
    """Packed rows give every example the logits and the loss it has alone, through transformers'
    attention and through the training path (the CPU attention training installs, label_loss_sum);
    with train_on_inputs too, where every token of an example has a label, its first one included."""
    from tunesmith.data.demo import make_splits

    rows = make_splits(7, seed=11, validation_size=0, test_size=0)["train"]
    examples = [encode(tiny_tokenizer, r["messages"], train_on_inputs) for r in rows]
    assert all((e.labels[0] != IGNORE) == train_on_inputs for e in examples)
    model = packing_model(tiny_model_dir, attention)
    capacity = max(len(e.input_ids) for e in examples) * 2 + 5
    rows, groups = pack_examples(examples, capacity)
    assert any(len(g) > 1 for g in groups) and len(rows) < len(examples)
    batch = collate(rows, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(**model_inputs(model.config, batch, torch.float32)).logits
    for row, group in enumerate(groups):
        start = 0
        for index in group:
            n = len(examples[index].input_ids)
            assert torch.allclose(packed[row, start:start + n], alone_logits(model, examples[index]), atol=1e-5)
            start += n
    with torch.no_grad():
        packed_loss, packed_count = label_loss_sum(model, batch)
        alone = [label_loss_sum(model, collate([e], tiny_tokenizer.pad_token_id)) for e in examples]
    assert packed_count == sum(c for _, c in alone)
    assert torch.allclose(packed_loss, sum(l for l, _ in alone), rtol=1e-5)


def test_position_ids_alone_do_not_isolate_packed_examples(tiny_model_dir, tiny_tokenizer, examples):
    """Why the block-diagonal mask is needed: without it the second example sees the first."""
    model = load_model(str(tiny_model_dir))
    rows, groups = pack_examples(examples[:2], 10_000)
    batch = collate(rows, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    first, second = groups[0]
    n = len(examples[first].input_ids)
    assert not torch.allclose(leaky[0, n:n + len(examples[second].input_ids)], alone_logits(model, examples[second]),
                              atol=1e-3)


@pytest.mark.slow
def test_training_with_packing_runs_and_learns(tiny_config):
    import tunesmith

    tiny_config["data"]["packing"] = True
    tiny_config["eval"]["generate"] = False
    results = tunesmith.train(tiny_config)
    assert results["steps"] == 12 and results["final_loss"] < results["first_loss"]


lengths_strategy = st.lists(st.integers(1, 40), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_strategy, extra=st.integers(0, 30))
def test_pack_places_every_example_once_within_capacity(lengths, extra):
    capacity = max(lengths) + extra
    rows = pack(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    assert pack(lengths, capacity) == rows  # deterministic
    # Best fit: no two rows could be merged into one.
    sizes = sorted(sum(lengths[i] for i in row) for row in rows)
    assert len(sizes) < 2 or sizes[0] + sizes[1] > capacity


def random_examples(draw_lengths, data):
    examples = []
    for n in draw_lengths:
        ids = data.draw(st.lists(st.integers(3, 500), min_size=n, max_size=n))
        labels = [t if data.draw(st.booleans()) else IGNORE for t in ids]
        examples.append(Encoded(ids, labels))
    return examples


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_strategy, extra=st.integers(0, 30), data=st.data())
def test_packed_collation_keeps_labels_aligned_and_examples_apart(lengths, extra, data):
    examples = random_examples(lengths, data)
    rows, groups = pack_examples(examples, max(lengths) + extra)
    batch = collate(rows, pad_id=2)
    ids, labels, mask, positions = batch["input_ids"], batch["labels"], batch["attention_mask"][:, 0], batch["position_ids"]
    # An example's first token is never predicted from within it: its label would be learned from
    # the previous example's last token, so it is dropped (as a padded batch never predicts it).
    kept = [[IGNORE] + e.labels[1:] for e in examples]
    assert int((labels != IGNORE).sum()) == sum(sum(t != IGNORE for t in k) for k in kept)
    for row, group in enumerate(groups):
        owner = torch.full((ids.shape[1],), -1)
        start = 0
        for index in group:
            e, n = examples[index], len(examples[index].input_ids)
            assert ids[row, start:start + n].tolist() == e.input_ids
            assert labels[row, start:start + n].tolist() == kept[index]
            assert positions[row, start:start + n].tolist() == list(range(n))
            owner[start:start + n] = index
            start += n
        assert (labels[row, start:] == IGNORE).all()
        real = owner >= 0
        q, k = torch.meshgrid(torch.arange(len(owner)), torch.arange(len(owner)), indexing="ij")
        allowed = (owner[:, None] == owner[None, :]) & (k <= q) & real[:, None]
        # A real token attends exactly to the earlier tokens of its own example: nothing leaks across.
        assert torch.equal(mask[row][real], allowed[real])
        assert mask[row].any(dim=1).all()  # padding attends to itself: no all-masked row (NaN)


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_strategy, data=st.data())
def test_plain_collation_pads_on_the_right_without_labels(lengths, data):
    examples = random_examples(lengths, data)
    batch = collate(examples, pad_id=2)
    assert "position_ids" not in batch and batch["attention_mask"].ndim == 2
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch["input_ids"][row, :n].tolist() == e.input_ids and batch["labels"][row, :n].tolist() == e.labels
        assert batch["attention_mask"][row].sum() == n and (batch["labels"][row, n:] == IGNORE).all()
