"""Today's families with their real tokenizers and chat templates: what is trained is what is served.

For every family, >= 50 probe conversations (system, multi-turn, tools, reasoning) are encoded as
training encodes them: the tokens before each answer equal `apply_chat_template(history,
add_generation_prompt=True, tools=...)`; masks are exact per role (answers and tool calls learned,
tool results and prompts never; reasoning trained, masked or dropped as data.reasoning says).
"""
from __future__ import annotations

import json

import pytest

import tunesmith
from helpers import write_jsonl
from families import FAMILIES, build_family_model, probe, probes
from tunesmith.config import DataConfig
from tunesmith.data.formats import to_example
from tunesmith.data.prepare import prepare
from tunesmith.data.templates import use_template
from tunesmith.data.tokenize import END_OF_TURN, IGNORE, TemplateError, encode_many
from tunesmith.data.tools import split_tools
from tunesmith.errors import UserError


def tokenizer_of(family_dirs, name: str):
    tokenizer = family_dirs(name)[1]
    use_template(tokenizer, None, FAMILIES[name].variables)
    return tokenizer


def label_runs(encoded) -> list[tuple[int, int]]:
    """(start, end) token indices of each run of labelled tokens."""
    runs, start = [], None
    for i, label in enumerate(encoded.labels + [IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def answered_histories(conversation: list[dict], examples: list) -> list[tuple[list[int], int, list[dict]]]:
    """(input ids, answer's first token, the messages before that answer) for every answer learned."""
    answers = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
    out = []
    if len(examples) == 1:
        for run, index in zip(label_runs(examples[0]), answers):
            out.append((examples[0].input_ids, run[0], conversation[:index]))
    else:
        for encoded, index in zip(examples, answers):
            out.append((encoded.input_ids, label_runs(encoded)[-1][0], conversation[:index]))
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_training_prompts_equal_the_served_prompts(family_dirs, name):
    tokenizer = tokenizer_of(family_dirs, name)
    conversations = [to_example(record)[1] for record in probes(name)]
    results = encode_many(tokenizer, conversations)
    refused = [r for r in results if isinstance(r, TemplateError)]
    assert not refused, refused[:1]
    checked = 0
    for conversation, examples in zip(conversations, results):
        tools, _ = split_tools(conversation)
        histories = answered_histories(conversation, examples)
        assert len(histories) == sum(m["role"] == "assistant" for m in conversation)
        for ids, first, history in histories:
            served = tokenizer.apply_chat_template(split_tools(history)[1], tools=tools, add_generation_prompt=True,
                                                   tokenize=True, return_dict=False, **FAMILIES[name].variables)
            assert ids[:first] == list(served), (name, conversation)
        checked += 1
    assert checked >= 50


def labelled_texts(tokenizer, encoded) -> list[str]:
    return [tokenizer.decode(encoded.input_ids[a:b]) for a, b in label_runs(encoded)]


def tool_chain(number: int = 3):
    import random

    return to_example(probe("tool_chain", random.Random(number), number))[1]


@pytest.mark.parametrize("name", ["qwen2.5", "qwen3", "llama3", "mistral"])
def test_tool_calls_are_learned_and_tool_results_never(family_dirs, name):
    tokenizer = tokenizer_of(family_dirs, name)
    conversation = tool_chain()
    examples = encode_many(tokenizer, [conversation])[0]
    texts = [t for e in examples for t in labelled_texts(tokenizer, e)]
    call, result, final = conversation[-3], conversation[-2], conversation[-1]
    arguments = call["tool_calls"][0]["function"]["arguments"]
    assert len(texts) == 2 and call["tool_calls"][0]["function"]["name"] in texts[0]
    assert json.dumps(arguments)[1:-1] in texts[0]  # the arguments, as the template writes them
    assert texts[1].rstrip().endswith(tokenizer.eos_token) or texts[1].rstrip().endswith("<|im_end|>")
    assert final["content"] in texts[1]
    whole = tokenizer.decode(examples[-1].input_ids)
    assert result["content"] in whole and not any(result["content"] in t for t in texts[:1])
    # Qwen3 serves each answer after the last query with its think block (empty here), as trained.
    expected = {"qwen3": ["<think>\n\n</think>\n\n<tool_call>\n" + json.dumps({"name": call["tool_calls"][0]["function"]["name"],
                                                       "arguments": arguments}) + "\n</tool_call><|im_end|>",
                          "<think>\n\n</think>\n\n" + final["content"] + "<|im_end|>"],
                "llama3": [json.dumps({"name": call["tool_calls"][0]["function"]["name"], "parameters": arguments})
                           + "<|eot_id|>", final["content"] + "<|eot_id|>"]}
    if name in expected:
        assert texts == expected[name]


def reasoning_conversation():
    return to_example({"messages": [
        {"role": "user", "content": "Is 91 prime?"},
        {"role": "assistant", "content": "No: 91 = 7 x 13.", "reasoning_content": "Try 7: 7 x 13 = 91."},
        {"role": "user", "content": "And 97?"},
        {"role": "assistant", "content": "Yes, 97 is prime.", "reasoning_content": "No divisor up to 9."}]})[1]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_conversation_opening_with_the_assistant_learns_its_answers_and_no_preamble(family_dirs, name):
    """Chat logs that start with the bot's greeting: the loss is on the greeting and the later answer, each
    with its end of turn, never on the template's header or default system prompt (it was: the answer
    then started at the render's first character, SmolLM2's "You are a helpful AI assistant ...")."""
    tokenizer = tokenizer_of(family_dirs, name)
    greeting = [{"role": "assistant", "content": "Hi, I am the Acme bot."}, {"role": "user", "content": "Reset it"},
                {"role": "assistant", "content": "Click Forgot password."}]
    [encoded] = encode_many(tokenizer, [greeting])
    if isinstance(encoded, TemplateError):  # Gemma's and Mistral's templates take a user turn first
        assert "alternate" in str(encoded)
        return
    learned = [tokenizer.decode(example.input_ids[a:b]) for example in encoded for a, b in label_runs(example)]
    answers = [text.replace("<think>\n\n</think>\n\n", "") for text in learned]  # Qwen3's empty reasoning
    ends = [next((e for e in END_OF_TURN + (tokenizer.eos_token,) if text.endswith(e)), None) for text in answers]
    assert [a[:-len(e)].strip() if e else a for a, e in zip(answers, ends)] == [m["content"] for m in greeting[::2]]


def test_qwen3_reasoning_trained_masked_or_dropped_and_earlier_reasoning_as_served(family_dirs):
    tokenizer = tokenizer_of(family_dirs, "qwen3")
    conversation = reasoning_conversation()
    trained = encode_many(tokenizer, [conversation], reasoning="train")[0]
    # Qwen3 renders earlier turns without their reasoning: one example per answer, each as served.
    assert len(trained) == 2
    assert "Try 7" not in tokenizer.decode(trained[1].input_ids)
    assert labelled_texts(tokenizer, trained[0]) == ["<think>\nTry 7: 7 x 13 = 91.\n</think>\n\nNo: 91 = 7 x 13.<|im_end|>"]
    assert labelled_texts(tokenizer, trained[1]) == ["<think>\nNo divisor up to 9.\n</think>\n\nYes, 97 is prime.<|im_end|>"]
    masked = encode_many(tokenizer, [conversation], reasoning="mask")[0]
    assert [labelled_texts(tokenizer, e) for e in masked] == [["No: 91 = 7 x 13.<|im_end|>"], ["Yes, 97 is prime.<|im_end|>"]]
    assert [e.input_ids for e in masked] == [e.input_ids for e in trained]  # same text, other labels
    dropped = encode_many(tokenizer, [conversation], reasoning="drop")[0]
    assert all("divisor" not in tokenizer.decode(e.input_ids) and "Try 7" not in tokenizer.decode(e.input_ids)
               for e in dropped)


def test_inline_think_blocks_are_masked_where_the_template_keeps_them(family_dirs):
    tokenizer = tokenizer_of(family_dirs, "llama3")
    conversation = to_example({"messages": [{"role": "user", "content": "2+2?"},
                                            {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}]})[1]
    assert labelled_texts(tokenizer, encode_many(tokenizer, [conversation], reasoning="train")[0][0]) == [
        "<think>\nadd\n</think>\n\n4<|eot_id|>"]
    assert labelled_texts(tokenizer, encode_many(tokenizer, [conversation], reasoning="mask")[0][0]) == ["4<|eot_id|>"]
    dropped = encode_many(tokenizer, [conversation], reasoning="drop")[0][0]
    assert "think" not in tokenizer.decode(dropped.input_ids) and labelled_texts(tokenizer, dropped) == ["4<|eot_id|>"]


@pytest.mark.parametrize("name,kind,reason", [
    ("gemma3", "tool_chain", "chat template refused the conversation (Conversation roles must alternate"),
    ("phi3", "tool_call", "does not render tool calls"),
    ("phi4", "tool_call", "does not render tool calls"),
    ("llama3", "reasoning_field", "does not render reasoning_content"),
])
def test_what_a_template_cannot_render_is_refused_with_the_reason(family_dirs, name, kind, reason):
    import random

    tokenizer = tokenizer_of(family_dirs, name)
    result = encode_many(tokenizer, [to_example(probe(kind, random.Random(1), 1))[1]])[0]
    assert isinstance(result, TemplateError)
    assert reason in str(result)


def test_data_with_tool_call_mistakes_is_reported_by_file_line_and_reason(family_dirs, tmp_path):
    folder, _ = family_dirs("qwen3")
    good = probe("tool_chain", __import__("random").Random(0), 0)
    unknown = json.loads(json.dumps(good))
    unknown["messages"][2]["tool_calls"][0]["function"]["name"] = "delete_everything"
    missing = json.loads(json.dumps(good))
    missing["messages"][2]["tool_calls"][0]["function"]["arguments"] = {}
    broken = json.loads(json.dumps(good))
    broken["messages"][2]["tool_calls"][0]["function"]["arguments"] = '{"city": "Oslo"'
    path = write_jsonl(tmp_path / "tools.jsonl", [good, unknown, missing, broken])
    from tunesmith.data.check import check_data

    report = check_data(str(path), str(folder), tmp_path / "check", ["cache=false", "validation_share=0.2"])
    dropped = report["dropped"]
    assert dropped["tool call: unknown function"]["first"] == [f"{path}:2"]
    assert dropped["tool call: missing required argument"]["first"] == [f"{path}:3"]
    assert dropped["tool call: arguments not valid JSON"]["first"] == [f"{path}:4"]


def test_a_data_set_without_answer_tokens_after_masking_is_refused(family_dirs, tmp_path):
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(str(family_dirs("smollm2")[0]))  # its own: prepare() sets the bare template on it
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"<think>r{i}</think>"}]}
            for i in range(4)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    bare = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    with pytest.raises(UserError, match="no training example has an answer token.*after masking: data.reasoning=mask"):
        prepare(DataConfig(train=str(path), chat_template=bare, reasoning="mask", cache=False), tokenizer)


# --- each family trains, through the public API ----------------------------------------------------

FAST_TRAIN = {("smollm2", "lora"), ("smollm2", "full")}
# Families whose attention, norm and MLP classes the fast paths know (tunesmith/accel/families.py); the
# others get only the generic ones, chosen automatically.
FAST_PATH_FAMILIES = {"llama3", "qwen2.5", "qwen3", "qwen3-nothink", "mistral", "smollm2"}


@pytest.mark.parametrize("name,method", [
    pytest.param(n, m, marks=() if (n, m) in FAST_TRAIN else pytest.mark.slow)
    for m in ("lora", "dora", "qlora", "full") for n in FAMILIES])
def test_each_family_trains_a_step(family_dirs, tmp_path, capsys, name, method):
    folder, tokenizer = family_dirs(name)
    if not (folder / "config.json").exists():
        build_family_model(name, folder, tokenizer)
    data = write_jsonl(tmp_path / "train.jsonl", probes(name, count=8, seed=3))
    results = tunesmith.train({
        "model": {"name": str(folder), "dtype": "float32"},
        "data": {"train": str(data), "validation_share": 0.25, "max_seq_len": 1024, "cache": False,
                 "template_variables": FAMILIES[name].variables},
        "adapter": {"method": method, "r": 4},
        "train": {"max_steps": 1, "batch_size": 2, "log_every": 1},
        "eval": {"generate": False, "report": False},
        "output": {"dir": str(tmp_path / "run")}})
    assert results["steps"] == 1 and results["final_loss"] > 0
    assert results["data"]["examples"]["train"] >= 5
    # The attention function and the LoRA layers are generic (with plain fallbacks: sliding windows,
    # softcapping); norm, MLP and rotary rewrites only replace the classes they were checked against.
    assert ("rmsnorm" in results["fast_paths"]) == (name in FAST_PATH_FAMILIES), results["fast_paths"]
    assert "fast paths: " in capsys.readouterr().err  # the choice is printed at the start


def test_the_phi4_vocabulary_built_from_cl100k_gives_phi4s_published_ids(family_dirs):
    """Phi-4's tokenizer is built here from cl100k_base (tests/data/families/vendor.py); these ids are the
    ones Phi-4's own tokenizer gives (as dotnet/machinelearning's Tiktoken tests list them)."""
    tokenizer = tokenizer_of(family_dirs, "phi4")
    text = "<|im_start|>Hello<|im_sep|> World<|im_end|><|dummy_85|>"
    assert tokenizer(text, add_special_tokens=False).input_ids == [100264, 9906, 100266, 4435, 100265, 100349]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (100257, 100265, 100349)
