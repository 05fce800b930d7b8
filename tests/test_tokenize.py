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


def test_openai_fine_tuning_records_weight_and_content_parts(tiny_tokenizer, tmp_path):
    """OpenAI's fine-tuning JSONL: `weight: 0` keeps an assistant turn as context without a loss on it,
    and content given as text parts reads as their text; an image part or weight 2 is a reported problem."""
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"][:3]},
                                             {"type": "text", "text": m["content"][3:]}]} for m in CONVERSATION]
    parts[2]["weight"] = 0
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
             {"role": "assistant", "content": "A cat."}]
    silent = [dict(m, weight=0) if m["role"] == "assistant" else m for m in CONVERSATION]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": parts}, {"messages": image}, {"messages": silent},
                                              {"messages": [CONVERSATION[1], dict(CONVERSATION[2], weight=2)]}])
    held = write_jsonl(tmp_path / "v.jsonl", [{"messages": CONVERSATION}])
    prepared = prepare(DataConfig(train=str(path), validation=str(held), cache=False), tiny_tokenizer)
    [encoded] = prepared.splits["train"].encoded
    assert labelled_text(tiny_tokenizer, encoded) == ["You are welcome.<|im_end|>"]
    assert "Hello!" in tiny_tokenizer.decode(encoded.input_ids)  # still there, as context
    assert [(p.line, p.reason.split(":")[0]) for p in prepared.problems] == \
        [(2, "not text"), (3, "no assistant turn"), (4, "wrong type")]


# --- templates, truncation, validation by the template -------------------------------------------

import copy  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tunesmith.config import DataConfig  # noqa: E402
from tunesmith.data.prepare import prepare  # noqa: E402
from tunesmith.data.templates import FALLBACK_TEMPLATE, use_template  # noqa: E402
from tunesmith.data.tokenize import TemplateError  # noqa: E402
from tunesmith.errors import UserError  # noqa: E402

from helpers import write_jsonl  # noqa: E402

ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
               "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("turns", [3, 5])
def test_every_prompt_part_equals_the_generation_prompt(tiny_tokenizer, turns):
    """Token parity for each assistant turn of a multi-turn conversation."""
    messages = CONVERSATION[:turns]
    encoded = encode(tiny_tokenizer, messages)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        expected = tiny_tokenizer.apply_chat_template(messages[:index], tokenize=True, add_generation_prompt=True,
                                                      return_dict=False)
        assert encoded.input_ids[:len(expected)] == list(expected)
        assert encoded.labels[len(expected) - 1] == IGNORE and encoded.labels[len(expected)] != IGNORE


def test_base_model_without_template_gets_the_fallback_and_learns_eos(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    assert use_template(tokenizer, None).startswith("fallback")
    assert tokenizer.chat_template == FALLBACK_TEMPLATE
    encoded = encode(tokenizer, CONVERSATION)
    assert labelled_text(tokenizer, encoded) == ["Hello!<|im_end|>", "You are welcome.<|im_end|>"]
    assert tokenizer.decode(prompt_ids(tokenizer, CONVERSATION[:2])).endswith("### User:\nHi there\n\n### Assistant:\n")


def test_configured_template_is_saved_with_the_tokenizer(tiny_tokenizer, tmp_path):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    template_file = tmp_path / "t.jinja"
    template_file.write_text(ALTERNATING)
    assert use_template(tokenizer, str(template_file)) == str(template_file)
    tokenizer.save_pretrained(tmp_path / "saved")
    from tunesmith.models import load_tokenizer

    assert load_tokenizer(str(tmp_path / "saved")).chat_template == ALTERNATING
    with pytest.raises(UserError, match="neither a template name"):
        use_template(tokenizer, "no-such-template")


# ChatML, but an answer before the last user turn loses its <think>...</think>, as Qwen3's template does
HISTORY_DROPS_THINKING = (
    "{%- set ns = namespace(last=0) -%}{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
    "{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}{%- for m in messages -%}{%- set c = m['content'] -%}"
    "{%- if m['role'] == 'assistant' and loop.index0 < ns.last and '</think>' in c -%}"
    "{%- set c = c.split('</think>')[-1].lstrip() -%}{%- endif -%}"
    "{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}")


def test_a_weight_0_answer_between_others_leaves_each_example_its_own_conversation(tiny_tokenizer, tmp_path):
    """Where the template renders history unlike a live turn, each answer is an example with its own
    history; one with weight 0 in the middle makes none, and the others keep their conversations (the
    first was paired with the weight-0 answer, so a test split asked its prompt and scored that)."""
    conversation = [{"role": "user", "content": "first question"},
                    {"role": "assistant", "content": "<think>hmm</think>FIRST ANSWER"},
                    {"role": "user", "content": "second question"},
                    {"role": "assistant", "content": "SECOND ANSWER", "weight": 0},
                    {"role": "user", "content": "third question"},
                    {"role": "assistant", "content": "<think>ok</think>THIRD ANSWER"}]
    test = write_jsonl(tmp_path / "test.jsonl", [{"messages": conversation}])
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(4)])
    split = prepare(DataConfig(train=str(train), test=str(test), chat_template=HISTORY_DROPS_THINKING, cache=False),
                    copy.deepcopy(tiny_tokenizer)).splits["test"]
    assert [labelled_text(tiny_tokenizer, e) for e in split.encoded] == [
        ["<think>hmm</think>FIRST ANSWER<|im_end|>"], ["<think>ok</think>THIRD ANSWER<|im_end|>"]]
    assert [c[-1]["content"] for c in split.conversations] == [conversation[1]["content"], conversation[5]["content"]]


def test_template_variables_reach_preference_and_prompt_data(tiny_tokenizer, tmp_path):
    """data.template_variables ({enable_thinking: false}) render DPO, KTO and GRPO data as they do SFT data."""
    from tunesmith.data.preference import PAIRS, prepare_preference
    from tunesmith.data.prompts import prepare_prompts

    template = ("{%- if enable_thinking is defined and enable_thinking is false -%}[no_think]{%- endif -%}"
                "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
                                                   for i in range(6)])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"p{i}"} for i in range(6)])
    for prepared_with in (lambda t, c: prepare_preference(c.model_copy(update={"train": str(pairs)}), t, PAIRS),
                          lambda t, c: prepare_prompts(c.model_copy(update={"train": str(prompts)}), t)):
        tokenizer = copy.deepcopy(tiny_tokenizer)
        cfg = DataConfig(train="x", chat_template=template, template_variables={"enable_thinking": False}, cache=False)
        example = prepared_with(tokenizer, cfg).splits["train"].encoded[0]
        assert tokenizer.decode(example.input_ids).startswith("[no_think]<|im_start|>user")


def test_template_that_forbids_two_user_turns_reports_the_line(tiny_tokenizer, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                          {"role": "assistant", "content": "c"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    tokenizer = copy.deepcopy(tiny_tokenizer)
    prepared = prepare(DataConfig(train=str(path), chat_template=ALTERNATING, cache=False), tokenizer)
    assert [(p.line, p.kind) for p in prepared.problems] == [(1, "template refused")]
    assert "roles must alternate" in prepared.problems[0].reason
    with pytest.raises(TemplateError):
        encode(tokenizer, rows[0]["messages"])


def long_rows():
    answer = " ".join(f"word{i}" for i in range(60))
    return [{"prompt": "short question", "completion": "short answer"},
            {"prompt": "long answer please", "completion": answer},
            {"prompt": " ".join(f"context{i}" for i in range(80)), "completion": "cut away"}]


@pytest.mark.parametrize("policy", ["drop", "truncate", "error"])
def test_overlong_examples_follow_the_policy(tiny_tokenizer, tmp_path, policy):
    path = write_jsonl(tmp_path / "d.jsonl", long_rows())
    val = write_jsonl(tmp_path / "v.jsonl", [{"prompt": "v", "completion": "w"}])
    cfg = DataConfig(train=str(path), validation=str(val), max_seq_len=40, overlong=policy, cache=False)
    if policy == "error":
        with pytest.raises(UserError, match=r"d.jsonl:2: example has \d+ tokens, more than data.max_seq_len=40"):
            prepare(cfg, tiny_tokenizer)
        return
    prepared = prepare(cfg, tiny_tokenizer)
    train = prepared.splits["train"]
    assert all(len(e.input_ids) <= 40 for e in train.encoded)
    if policy == "drop":
        assert prepared.dropped == {"longer than max_seq_len": 2} and [o[1] for o in train.origins] == [1]
    else:
        assert prepared.dropped == {"answer cut away by truncation": 1} and prepared.truncated == 1
        assert [o[1] for o in train.origins] == [1, 2]
        cut = train.encoded[1]
        assert len(cut.input_ids) == 40 and cut.label_count > 0 and cut.labels[-1] == cut.input_ids[-1]


@pytest.mark.parametrize("policy", ["drop", "truncate", "error"])
def test_test_examples_are_kept_whole_whatever_their_length(tiny_tokenizer, tmp_path, policy):
    """The test split is scored whole, as `compare` scores a file: a long reference answer is
    neither dropped, cut nor refused; an example with no answer token still is dropped."""
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "completion": "a"}] * 3)
    rows = long_rows() + [{"prompt": "empty answer", "completion": ""}]
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    cfg = DataConfig(train=str(train), test=str(test), max_seq_len=40, overlong=policy, cache=False, dedup=False)
    prepared = prepare(cfg, tiny_tokenizer)
    split = prepared.splits["test"]
    assert [o[1] for o in split.origins] == [1, 2, 3]
    assert max(len(e.input_ids) for e in split.encoded) > 40
    assert [c[-1]["content"] for c in split.conversations] == [r["completion"] for r in rows[:3]]
    assert prepared.truncated == 0 and prepared.too_long == []


MEDQUAD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medquad"


@pytest.mark.skipif(not MEDQUAD.is_dir(), reason="MedQuAD data set not present")
def test_real_medical_answers_are_labelled_whole(tiny_tokenizer, tmp_path):
    lines = (MEDQUAD / "9_CDC_QA.jsonl").read_text(encoding="utf-8").splitlines()[:60]
    path = tmp_path / "cdc.jsonl"
    path.write_text("\n".join(lines) + "\n")
    prepared = prepare(DataConfig(train=str(path), max_seq_len=100_000, cache=False), tiny_tokenizer)
    split = prepared.splits["train"]
    assert set(prepared.formats) == {"question_answer"} and len(split) > 40
    for messages, encoded in zip(split.conversations[:10], split.encoded[:10]):
        assert tiny_tokenizer.decode([t for t in encoded.labels if t != IGNORE]) == messages[-1]["content"] + "<|im_end|>"
