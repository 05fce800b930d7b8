from tunesmith.data.tokenize import IGNORE, encode, prompt_ids

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You are welcome."},
]


def labelled_text(tokenizer, encoded) -> list[str]:
    """The label runs as text, one string per contiguous run."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_loss_only_on_each_assistant_turn_with_its_end_of_turn(tiny_tokenizer):
    encoded = encode(tiny_tokenizer, CONVERSATION)
    assert labelled_text(tiny_tokenizer, encoded) == ["Hello!<|im_end|>", "You are welcome.<|im_end|>"]


def test_eos_is_labelled_although_pad_equals_eos(tiny_tokenizer):
    assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id
    encoded = encode(tiny_tokenizer, CONVERSATION[:3])
    eos = tiny_tokenizer.eos_token_id
    labelled_eos = [i for i, (t, l) in enumerate(zip(encoded.input_ids, encoded.labels)) if t == eos and l == eos]
    assert len(labelled_eos) == 1


def test_prompt_part_equals_generation_prompt_tokens(tiny_tokenizer):
    encoded = encode(tiny_tokenizer, CONVERSATION[:3])
    first_label = next(i for i, l in enumerate(encoded.labels) if l != IGNORE)
    rendered = tiny_tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    expected = tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert encoded.input_ids[:first_label] == expected
    assert prompt_ids(tiny_tokenizer, CONVERSATION[:3]) == expected


def test_train_on_inputs_labels_everything(tiny_tokenizer):
    encoded = encode(tiny_tokenizer, CONVERSATION, train_on_inputs=True)
    assert encoded.labels == encoded.input_ids
