"""Preference data (pairs, KTO) and GRPO prompts: read, checked with file:line reasons, masked as SFT
masks (the loss on the answer and its end-of-turn token only), and reported by `data check`."""
from __future__ import annotations

import json

import pytest

from helpers import write_jsonl
from tunesmith.config import DataConfig, validate
from tunesmith.data.check import check_data
from tunesmith.data.preference import PAIRS, UNPAIRED, answer_start, prepare_preference
from tunesmith.data.prompts import prepare_prompts
from tunesmith.data.tokenize import IGNORE
from tunesmith.errors import UserError

CHAT_PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"},
               {"role": "assistant", "content": "hi"}, {"role": "user", "content": "Again"}]
GOOD = [
    {"prompt": "Repeat: alpha beta", "chosen": "alpha beta", "rejected": "gamma"},
    {"prompt": CHAT_PROMPT, "chosen": [{"role": "assistant", "content": "hi again"}],
     "rejected": [{"role": "assistant", "content": "no"}]},
    {"chosen": [{"role": "user", "content": "Repeat: delta"}, {"role": "assistant", "content": "delta"}],
     "rejected": [{"role": "user", "content": "Repeat: delta"}, {"role": "assistant", "content": "omega"}]},
]
BAD = [
    "{not json",
    {"prompt": "Repeat: x", "chosen": "x"},  # missing rejected
    {"prompt": "Repeat: y", "chosen": "y", "rejected": " y "},  # chosen equals rejected
    {"prompt": "Repeat: z", "chosen": "", "rejected": "q"},  # empty side
    {"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "a"}],
     "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "b"}]},  # prompts differ
    {"prompt": "Repeat: w", "chosen": {"text": "w"}, "rejected": "w"},  # wrong type
    {"prompt": "Repeat: v", "chosen": [{"role": "assistant", "content": "v"}, {"role": "assistant", "content": "v"}],
     "rejected": "u"},  # not one answer
]


def data_cfg(path, **extra) -> DataConfig:
    return DataConfig(train=str(path), validation=str(path), **extra)


def answer_tokens(encoded) -> list[int]:
    return [t for t in encoded.labels if t != IGNORE]


def test_pairs_in_every_form_are_masked_like_sft(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    split = prepare_preference(data_cfg(path), tiny_tokenizer, PAIRS).splits["train"]
    assert len(split) == 3
    eos = tiny_tokenizer.eos_token_id
    for pair, answers in zip(split.encoded, [("alpha beta", "gamma"), ("hi again", "no"), ("delta", "omega")]):
        for encoded, text in zip((pair.chosen, pair.rejected), answers):
            labelled = answer_tokens(encoded)
            assert labelled[-1] == eos  # the end-of-turn token is learned
            assert tiny_tokenizer.decode(labelled[:-1]).strip() == text  # nothing but the answer carries a loss
            start = answer_start(encoded)
            assert encoded.labels[start:start + len(labelled)] == labelled  # one contiguous run
        # both sides share the prompt tokens exactly
        assert pair.chosen.input_ids[:answer_start(pair.chosen)] == pair.rejected.input_ids[:answer_start(pair.rejected)]
    # the chat prompt's earlier assistant turn ("hi") is context, not learned
    assert tiny_tokenizer.decode(answer_tokens(split.encoded[1].chosen)).count("hi") == 1


def test_pairs_with_content_parts_read_as_their_text(tiny_tokenizer, tmp_path):
    parts = lambda text: [{"type": "text", "text": text[:2]}, {"type": "text", "text": text[2:]}]  # noqa: E731
    as_parts = {"prompt": [{"role": "user", "content": parts("Say hi")}],
                "chosen": [{"role": "assistant", "content": parts("hi there")}], "rejected": "no"}
    plain = {"prompt": "Say hi", "chosen": "hi there", "rejected": "no"}
    encoded = [prepare_preference(data_cfg(write_jsonl(tmp_path / f"{n}.jsonl", [r])), tiny_tokenizer, PAIRS)
               .splits["train"].encoded[0] for n, r in (("parts", as_parts), ("plain", plain))]
    assert encoded[0].chosen.input_ids == encoded[1].chosen.input_ids
    assert encoded[0].chosen.labels == encoded[1].chosen.labels


def test_bad_pairs_are_reported_with_file_line_and_reason(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", GOOD[:1] + BAD)
    prepared = prepare_preference(data_cfg(path), tiny_tokenizer, PAIRS)
    reasons = {p.line: (p.kind, p.reason) for p in prepared.problems if p.file == str(path)}
    kinds = {line: kind for line, (kind, _) in reasons.items()}
    assert kinds == {2: "broken JSON", 3: "missing field", 4: "chosen equals rejected", 5: "empty text",
                     6: "prompts differ", 7: "wrong type", 8: "not one answer"}
    assert "'rejected'" in reasons[3][1] and "field 'chosen' must be text" in reasons[7][1]
    assert len(prepared.splits["train"]) == 1


def test_a_repeated_pair_is_a_duplicate_unless_dedup_is_off(tiny_tokenizer, tmp_path):
    """data.dedup applies to pairs as to SFT records: line 2 repeating line 1 is reported as a duplicate
    (in train, and in the validation read of the same file) and trains once; with dedup off both train."""
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD[0], GOOD[0]])
    prepared = prepare_preference(data_cfg(path), tiny_tokenizer, PAIRS)
    assert [(p.line, p.kind) for p in prepared.problems] == [(2, "duplicate (exact)")] * 2
    assert prepared.problems[0].reason == f"duplicate (exact) of {path}:1"  # named, as SFT records' are
    assert len(prepared.splits["train"]) == 1 and prepared.splits["train"].origins == [(str(path), 1)]
    kept = prepare_preference(data_cfg(path, dedup=False), tiny_tokenizer, PAIRS)
    assert kept.problems == [] and kept.splits["train"].origins == [(str(path), 1), (str(path), 2)]


def test_over_long_pairs_follow_the_length_policy(tiny_tokenizer, tmp_path):
    rows = [GOOD[0], {"prompt": "Repeat: " + "alpha " * 200, "chosen": "alpha", "rejected": "beta"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    prepared = prepare_preference(data_cfg(path, max_seq_len=64), tiny_tokenizer, PAIRS)
    assert [p.line for p in prepared.problems if "max_seq_len" in p.reason] == [2, 2]  # both validation and train read
    with pytest.raises(UserError, match=":2: example has"):
        prepare_preference(data_cfg(path, max_seq_len=64, overlong="error"), tiny_tokenizer, PAIRS)


def test_kto_records_and_their_mismatched_kl_sequences(tiny_tokenizer, tmp_path):
    rows = [{"prompt": f"Repeat: {w}", "completion": w, "label": i % 2 == 0} for i, w in enumerate(["alpha", "beta", "gamma"])]
    rows.append({"prompt": "Repeat: x", "completion": "x", "label": "maybe"})
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    prepared = prepare_preference(data_cfg(path), tiny_tokenizer, UNPAIRED)
    assert [(p.line, p.kind) for p in prepared.problems][:1] == [(4, "wrong type")]
    examples = prepared.splits["train"].encoded
    assert [e.desirable for e in examples] == [True, False, True]
    for index, example in enumerate(examples):  # this prompt with the previous example's answer
        previous = examples[index - 1].completion
        assert example.kl.input_ids[:answer_start(example.kl)] == example.completion.input_ids[:answer_start(example.completion)]
        assert answer_tokens(example.kl) == answer_tokens(previous)


def test_preference_objectives_refuse_the_demo_task(tiny_tokenizer):
    with pytest.raises(UserError, match="tunesmith pairs"):
        prepare_preference(DataConfig(train="demo"), tiny_tokenizer, PAIRS)


def test_prompts_from_prompt_records_and_sft_records(tiny_tokenizer, tmp_path):
    rows = [{"prompt": "Repeat: alpha", "reference": "alpha"},
            {"prompt": [{"role": "user", "content": "Repeat: beta"}]},
            {"messages": [{"role": "user", "content": "Repeat: gamma"}, {"role": "assistant", "content": "gamma"}]},
            {"prompt": "Repeat: " + "alpha " * 100, "reference": "x"},
            {"prompt": "", "reference": "x"}]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    prepared = prepare_prompts(data_cfg(path, max_seq_len=64), tiny_tokenizer, answer_tokens=16)
    split = prepared.splits["train"]
    assert [p.reference for p in split.encoded] == ["alpha", None, "gamma"]
    assert {(p.line, p.kind) for p in prepared.problems} == {(4, "longer than max_seq_len"), (5, "empty text")}
    # rendered as evaluation renders a prompt: ends with the generation prompt
    assert tiny_tokenizer.decode(split.encoded[0].input_ids).endswith("<|im_start|>assistant\n")


def test_mixed_sources_are_prompts_too_and_their_weights_are_sft_only(tiny_tokenizer, tmp_path):
    main = write_jsonl(tmp_path / "main.jsonl", [{"prompt": f"Repeat: {i}"} for i in range(4)])
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"prompt": f"Say: {i}"} for i in range(6)])
    prepared = prepare_prompts(data_cfg(main, mix={str(extra): 1.0}), tiny_tokenizer)
    assert len(prepared.splits["train"]) == 10
    with pytest.raises(UserError, match="a mixed source is read once"):
        validate({"data": {"train": str(main), "mix": {str(extra): 2.0}}, "train": {"objective": "grpo"}})


def test_data_check_reports_preference_data_like_sft_data(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", GOOD + BAD)
    report = check_data(str(path), str(tiny_model_dir), tmp_path / "check")
    assert report["formats"] == {"pairs (text)": 1, "pairs (chat)": 2}
    assert report["dropped"]["chosen equals rejected"] == {"count": 1, "first": [f"{path}:6"],
                                                           "example": f"{path}:6: chosen equals rejected: nothing to prefer"}
    assert report["dropped"]["prompts differ"]["first"] == [f"{path}:8"]
    assert sum(report["examples"].values()) == 3 and report["label_tokens"] > 0
    assert json.loads((tmp_path / "check" / "report.json").read_text())["records"] == 10
    # Columns named as a spreadsheet names them (`Chosen`) are read as training reads them
    capitalised = tmp_path / "pairs.csv"
    capitalised.write_text("Prompt,Chosen,Rejected\n" + "".join(f"Question {i}?,Right {i}.,Wrong {i}.\n" for i in range(6)))
    assert check_data(str(capitalised), str(tiny_model_dir), tmp_path / "check2")["formats"] == {"pairs (text)": 6}


def test_grpo_prompts_are_the_tokens_evaluation_generates_from(tiny_tokenizer):
    """Sampling during training sees exactly the prompt tokens that generation at evaluation sees."""
    from tunesmith.data.prompts import encode_prompts
    from tunesmith.data.tokenize import prompt_ids

    conversation = CHAT_PROMPT + [{"role": "assistant", "content": "hi again"}]
    assert encode_prompts(tiny_tokenizer, [CHAT_PROMPT]) == [prompt_ids(tiny_tokenizer, conversation)]


def test_data_check_reads_prompts_alone_as_grpo_data_only_when_asked(tiny_model_dir, tmp_path):
    from tunesmith.errors import UserError

    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Repeat: alpha"}, {"prompt": "Repeat: beta"}])
    report = check_data(str(path), str(tiny_model_dir), tmp_path / "check", objective="grpo")
    assert report["formats"] == {"prompts (text)": 2}
    # a prompt has no label: "N train tokens (0 with a loss)" read as data that trains nothing
    cfg = validate({"data": {"train": str(path)}, "train": {"objective": "grpo"}})
    from tunesmith.data.check import data_lines
    from tunesmith.models import load_tokenizer

    line = data_lines(prepare_prompts(cfg.data, load_tokenizer(str(tiny_model_dir))), cfg.data)[0]
    assert "prompt tokens (the answers are sampled in training); dropped: none" in line and "with a loss" not in line
    with pytest.raises(UserError, match=r"prompts.jsonl:1: missing field: 'completion'"):
        check_data(str(path), str(tiny_model_dir), tmp_path / "check")  # SFT data missing its answers


def test_a_test_split_beside_pairs_and_prompts_holds_the_examples_ending_at_each_reference(tiny_tokenizer, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    test = write_jsonl(tmp_path / "test.jsonl", [
        {"messages": [{"role": "user", "content": "Repeat: one"}, {"role": "assistant", "content": "one"}]},
        {"messages": [{"role": "user", "content": "Repeat: two"}, {"role": "assistant", "content": "two"},
                      {"role": "user", "content": "Again"}, {"role": "assistant", "content": "two again"}]}])
    prepared = prepare_preference(data_cfg(pairs, test=str(test)), tiny_tokenizer, PAIRS)
    split = prepared.splits["test"]
    answers = [tiny_tokenizer.decode(answer_tokens(e)[:-1]) for e in split.encoded]
    assert answers[0].strip() == "one" and answers[1].endswith("two again")
    assert prepared.summary()["tokens"]["test"] == sum(len(e.input_ids) for e in split.encoded) > 0
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Repeat: a"}, {"prompt": "Repeat: b"}])
    assert len(prepare_prompts(data_cfg(prompts, test=str(test)), tiny_tokenizer).splits["test"]) == 2
    # Each test example names its own line; a broken one and one the template refuses are problems
    call = {"type": "function", "function": {"name": "get_time", "arguments": {}}}  # this template drops tool calls
    test = write_jsonl(tmp_path / "test2.jsonl", ['{"broken', {"messages": [
        {"role": "user", "content": "Time?"}, {"role": "assistant", "content": "", "tool_calls": [call]}],
        "tools": [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]},
        {"prompt": "Repeat: three", "completion": "three"}])
    prepared = prepare_preference(data_cfg(pairs, test=str(test)), tiny_tokenizer, PAIRS)
    assert prepared.splits["test"].origins == [(str(test), 3)]
    assert [(p.line, p.kind) for p in prepared.problems if p.file == str(test)][1] == (2, "template refused")


def test_every_objective_says_what_its_eval_loss_is():
    """`train` says under its closing table what eval_loss means for a non-SFT objective."""
    from tunesmith.objectives import EVAL_LOSS, NAMES

    assert set(EVAL_LOSS) == set(NAMES) - {"sft"}


def test_a_dpo_eval_loss_with_its_sft_term_is_not_called_0_693_at_no_preference():
    """With sft_weight the eval loss holds the chosen NLL too (3.14 on a fresh DPO run): the note said
    '0.693 = no preference', which made the run look broken."""
    from tunesmith.config import TrainConfig
    from tunesmith.objectives import EVAL_LOSS, eval_loss_note

    assert eval_loss_note(TrainConfig(objective="dpo")) == EVAL_LOSS["dpo"]
    assert "plus sft_weight 1 x the chosen answers' mean NLL" in eval_loss_note(TrainConfig(objective="dpo", sft_weight=1.0))


def test_sft_records_read_as_pairs_name_what_they_hold(tiny_model_dir, tmp_path):
    """train.objective: dpo on a messages file: 'missing field: chosen (the record looks like a preference
    pair)' said the opposite of the mistake; a pair without 'rejected' said nothing of what it had."""
    from tunesmith.errors import UserError

    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                               {"role": "assistant", "content": "Hello"}]}])
    with pytest.raises(UserError, match=r"'chosen' \(a preference pair needs chosen, rejected; the record has messages\)"):
        check_data(str(chat), str(tiny_model_dir), tmp_path / "check", objective="dpo")
    half = write_jsonl(tmp_path / "half.jsonl", [{"prompt": "Hi", "chosen": "Hello"}])
    with pytest.raises(UserError, match=r"'rejected' \(a preference pair needs chosen, rejected; the record has prompt, chosen\)"):
        check_data(str(half), str(tiny_model_dir), tmp_path / "check", objective="dpo")


def test_grpo_prompts_read_as_sft_data_point_at_the_objective(tiny_model_dir, tmp_path):
    from tunesmith.errors import UserError

    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Repeat: a", "reference": "a"}])
    with pytest.raises(UserError, match=r"missing field: 'completion' .*GRPO prompts: train.objective: grpo, "
                                        r"data check --objective grpo"):
        check_data(str(path), str(tiny_model_dir), tmp_path / "check")


def test_kto_and_pair_files_read_as_sft_or_grpo_data_point_at_their_objective(tiny_tokenizer, tmp_path):
    """A KTO file trained with the objective left at sft was read as prompt/completion data: its
    false-labelled answers imitated like the others, without a word (GRPO took them as references).
    A pair file got "missing field: 'completion'". Both now name the objective; data.format reads
    a KTO file as SFT data on purpose."""
    from tunesmith.data.prepare import prepare

    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": f"Repeat: {w}", "completion": w, "label": i % 2 == 0}
                                               for i, w in enumerate(["a", "b", "c", "d"])])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", GOOD[:1] * 2)
    for path, said in ((kto, r"kto.jsonl:1: KTO record: .*train.objective: kto"),
                       (pairs, r"pairs.jsonl:1: preference pair: .*train.objective: dpo")):
        with pytest.raises(UserError, match=said):
            prepare(data_cfg(path), tiny_tokenizer)
        with pytest.raises(UserError, match=said):
            prepare_prompts(data_cfg(path), tiny_tokenizer)
    assert len(prepare(data_cfg(kto, format="prompt_completion"), tiny_tokenizer).splits["train"].encoded) == 4


def test_preference_roles_are_read_in_any_case_as_sft_roles_are(tiny_tokenizer, tmp_path):
    """'User' / 'Assistant' were accepted in SFT chat records but refused as unknown roles in pairs."""
    upper = [{"chosen": [{"role": "User", "content": "Repeat: delta"}, {"role": "ASSISTANT", "content": "delta"}],
              "rejected": [{"role": "user", "content": "Repeat: delta"}, {"role": " Assistant", "content": "omega"}]}]
    lower = [{"chosen": [{"role": "user", "content": "Repeat: delta"}, {"role": "assistant", "content": "delta"}],
              "rejected": [{"role": "user", "content": "Repeat: delta"}, {"role": "assistant", "content": "omega"}]}]
    splits = [prepare_preference(data_cfg(write_jsonl(tmp_path / f"{name}.jsonl", rows)), tiny_tokenizer, PAIRS)
              .splits["train"] for name, rows in (("upper", upper), ("lower", lower))]
    assert [e.chosen.input_ids for e in splits[0].encoded] == [e.chosen.input_ids for e in splits[1].encoded] != []
    assert [e.rejected.labels for e in splits[0].encoded] == [e.rejected.labels for e in splits[1].encoded]
