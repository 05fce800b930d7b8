"""Continued pre-training on raw text (data.format text): rows know their documents, held-out
text is scored by its loss, base against fine-tuned, with nothing generated."""
import itertools
import json

import pytest
import torch

from tunesmith.config import DataConfig
from tunesmith.data.collate import collate
from tunesmith.data.prepare import prepare
from tunesmith.data.tokenize import document_rows, encode_text, token_ids
from tunesmith.errors import UserError
from tunesmith.eval.baselines import compare_models
from tunesmith.data.formats import is_raw_text
from tunesmith.eval.compare import text_losses
from tunesmith.models import load_model
from tunesmith.runs import load_trained
from tunesmith.training.loss import label_loss_sum

from helpers import write_jsonl

DOCS = ["word " * n + f"end{n}" for n in (5, 40, 3, 4, 70, 12)]


def test_each_row_names_the_document_it_starts_in(tiny_tokenizer):
    ended = [ids + [tiny_tokenizer.eos_token_id] for ids in token_ids(tiny_tokenizer, DOCS)]
    starts = [0, *itertools.accumulate(len(ids) for ids in ended)]
    rows = encode_text(tiny_tokenizer, DOCS, 16)
    assert [t for _, row in rows for t in row.input_ids] == [t for ids in ended for t in ids]
    for k, (document, row) in enumerate(rows):
        assert starts[document] <= 16 * k < starts[document + 1]
    assert len({document for document, _ in rows}) >= 4  # not all named after the first
    # Scored apart: each document's rows are its own tokens, and no row crosses into the next.
    by_document = [[t for d, row in document_rows(tiny_tokenizer, DOCS, 16) if d == i for t in row.input_ids]
                   for i in range(len(DOCS))]
    assert by_document == [ids[:len(ids) - (len(ids) % 16 == 1)] for ids in ended]  # a lone last token has no target


def test_prepared_rows_point_at_their_lines_and_test_documents_stay_whole(tmp_path, tiny_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": d} for d in DOCS + [d + " again" for d in DOCS]])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": d} for d in DOCS[:3]])
    cfg = DataConfig(train=str(train), test=str(test), max_seq_len=16, validation_share=0.2, cache=False)
    splits = prepare(cfg, tiny_tokenizer).splits
    train_lines = {line for _, line in splits["train"].origins}
    validation_lines = {line for _, line in splits["validation"].origins}
    assert len(train_lines) > 3 and not train_lines & validation_lines  # a document is in one split only
    assert [c[0]["content"] for c in splits["test"].conversations] == DOCS[:3]
    assert [len(e.input_ids) for e in splits["test"].encoded] == [len(ids) + 1 for ids in token_ids(tiny_tokenizer, DOCS[:3])]


def test_short_documents_inside_one_row_count_as_usable(tmp_path, tiny_tokenizer):
    """data.min_valid_share counts records: raw-text documents that share a row are all used."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"note {i}"} for i in range(40)])
    cfg = DataConfig(train=str(train), max_seq_len=64, min_valid_share=0.95, cache=False)
    assert len(prepare(cfg, tiny_tokenizer).splits["train"]) < 10  # far fewer rows than the 36 documents


def test_text_losses_are_each_documents_loss_over_its_rows(tiny_model_dir, tiny_tokenizer):
    model = load_model(str(tiny_model_dir))
    conversations = [[{"role": "text", "content": d}] for d in DOCS]
    losses, counts = text_losses(model, tiny_tokenizer, conversations, batch_size=3, row_tokens=16)
    for i, (loss, count) in enumerate(zip(losses, counts)):
        total, n = 0.0, 0
        for _, row in (r for r in document_rows(tiny_tokenizer, DOCS, 16) if r[0] == i):
            s, c = label_loss_sum(model, collate([row], tiny_tokenizer.pad_token_id))
            total, n = total + s.item(), n + c
        assert count == n and loss == pytest.approx(total / n, rel=1e-5)


def test_a_system_prompt_is_not_put_before_raw_text():
    from tunesmith.data.formats import with_system_prompt

    text = [{"role": "text", "content": "a document"}]
    assert with_system_prompt(text, "You answer billing questions.") == text
    chat = [{"role": "user", "content": "a"}]
    assert with_system_prompt(chat, "S")[0] == {"role": "system", "content": "S"}


def test_mixed_raw_text_and_conversations_are_refused():
    assert is_raw_text([[{"role": "text", "content": "a"}]])
    assert not is_raw_text([[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]])
    with pytest.raises(UserError, match="mixes raw text"):
        is_raw_text([[{"role": "text", "content": "a"}], [{"role": "user", "content": "a"}]])


def test_compare_and_eval_on_raw_text_score_its_loss(tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    from tunesmith.measure import evaluate

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    data = str(write_jsonl(tmp_path / "text.jsonl", [{"text": d} for d in DOCS]))
    result = compare_models(str(tiny_model_dir), str(tiny_model_dir), data, samples=100)
    assert set(result["models"]["B"]) == {"answer_loss"}
    assert result["differences"][0]["difference"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(UserError, match="raw text has no prompts"):
        compare_models(str(tiny_model_dir), str(tiny_model_dir), data, kshot=1, kshot_data=data)
    scored = evaluate(str(tiny_model_dir), data)
    losses, counts = text_losses(load_model(str(tiny_model_dir)), tiny_tokenizer,
                                 [[{"role": "text", "content": d}] for d in DOCS], row_tokens=512)
    assert scored["test_examples"] == len(DOCS)
    assert scored["eval_loss"] == pytest.approx(sum(x * n for x, n in zip(losses, counts)) / sum(counts), rel=1e-4)


def test_a_run_on_raw_text_scores_held_out_text_base_against_fine_tuned(tiny_model_dir, tiny_tokenizer, tmp_path,
                                                                         monkeypatch):
    from tunesmith import train

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    corpus = [f"The PixelPad model {i} has a screen of {i % 7 + 5} inches and a battery of {i % 5 + 2} cells."
              for i in range(60)]
    held_out = [f"The PixelPad model {i} has a screen of {i % 7 + 5} inches." for i in range(100, 106)]
    held_out.append(" ".join(corpus[10:18]))  # longer than max_seq_len: scored in rows of it, as trained
    results = train({
        "model": {"name": str(tiny_model_dir), "dtype": "float32"},
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in corpus])),
                 "test": str(write_jsonl(tmp_path / "test.jsonl", [{"text": t} for t in held_out])),
                 "max_seq_len": 64},
        "train": {"max_steps": 8, "batch_size": 4, "lr": 2e-2, "warmup_ratio": 0.0},
        "eval": {"kshot": 2, "retrieval_k": 2},  # no prompt to put examples in: left out
        "output": {"dir": str(tmp_path / "run")}})
    table = results["baselines"]
    assert list(table["models"]) == ["base", "fine-tuned"]
    assert set(table["models"]["fine-tuned"]) == {"answer_loss"} and table["primary_metric"] == "answer_loss"
    assert results["fine_tuned"]["test_examples"] == len(held_out)
    assert results["fine_tuned"]["answer_loss"] < results["base"]["answer_loss"]  # the corpus's patterns learned
    assert table["verdict"].startswith("fine-tuning beats base")
    tuned, _, _ = load_trained(str(tmp_path / "run"))
    in_rows = {}
    for row in (64, 512):
        losses, counts = text_losses(tuned, tiny_tokenizer, [[{"role": "text", "content": t}] for t in held_out],
                                     row_tokens=row)
        in_rows[row] = sum(x * n for x, n in zip(losses, counts)) / sum(counts)
    scored = results["fine_tuned"]["answer_loss"]  # in rows of the run's max_seq_len, not of 512
    assert abs(scored - in_rows[64]) < abs(scored - in_rows[512]) / 100
    run = tmp_path / "run"
    assert not list(run.glob("predictions*.jsonl"))  # nothing was generated
    assert json.loads((run / "results.json").read_text())["baselines"]["verdict"] == table["verdict"]
    assert (run / "report.html").exists()
    # An export is checked on the text as trained: each sample document's first row, no chat template.
    from tunesmith.export.merge import sample_batch

    batch = sample_batch(run, tiny_tokenizer)
    expected = [ids + [tiny_tokenizer.eos_token_id] for ids in token_ids(tiny_tokenizer, corpus[:8])]
    assert [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])] == expected
    # `generate` continues a text as the run read its data: no chat template around it.
    from tunesmith.eval.chat import generate_once
    from tunesmith.runs import trained_on_raw_text

    assert trained_on_raw_text(str(run)) and not trained_on_raw_text(str(tiny_model_dir))
    prompt = "The PixelPad model 7 has"
    ids = torch.tensor([token_ids(tiny_tokenizer, [prompt])[0]])
    expected = tuned.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              pad_token_id=tiny_tokenizer.pad_token_id)[0, ids.shape[1]:]
    continued = generate_once(str(run), prompt, max_new_tokens=6)
    assert continued == tiny_tokenizer.decode(expected, skip_special_tokens=True).strip()
    # For Ollama the text goes in as it is: no chat template, no system prompt (it got ChatML with the
    # tokenizer's default system prompt, and '8/8 prompts as trained', comparing chat turns of role 'text').
    from tunesmith.cli import main

    assert main(["export", str(run), "--format", "ollama", "--out", str(tmp_path / "out")]) == 0
    modelfile = (tmp_path / "out" / "gguf" / "Modelfile").read_text()
    assert 'TEMPLATE """{{ .Prompt }}"""' in modelfile and "SYSTEM" not in modelfile
    [check] = (tmp_path / "out" / "gguf").glob("check-*.json")
    assert json.loads(check.read_text())["modelfile_prompts_equal"] == "raw text: the prompt as it is"


def test_choose_ranks_base_models_by_their_loss_per_character_on_the_corpus(tiny_model_dir, tiny_tokenizer, tmp_path,
                                                                            monkeypatch):
    """Which base model knows my domain's text best: nats per character, comparable across tokenizers."""
    from helpers import build_model

    from tunesmith.choose import choose

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other"
    build_model(other, vocab=len(tiny_tokenizer), seed=5)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes((tiny_model_dir / name).read_bytes())
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": d + f" number {i}"} for i, d in enumerate(DOCS * 3)])
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {{train: {train}, max_seq_len: 32}}\n")
    result = choose(str(config), [str(tiny_model_dir), str(other)], memory_gib=24, retrieval_k=3,
                    out=str(tmp_path / "choose"), samples=100)
    ranking = result["ranking"]
    assert len(ranking) == 2 and all(set(r["settings"]) == {"zero-shot"} for r in ranking)  # no prompt for retrieval
    values = [r["settings"]["zero-shot"]["answer_loss_per_char"] for r in ranking]
    assert values == sorted(values) and values[0] > 0



def test_near_duplicate_rows_of_one_document_are_named_once():
    from tunesmith.data.near_dup import report

    row = [{"role": "text", "content": " ".join(f"w{i}" for i in range(60))}]
    found = report([row] * 3 + [[{"role": "text", "content": "other words entirely here"}]],
                   [("a.jsonl", 4)] * 3 + [("a.jsonl", 5)], {}, 0.8)
    assert found["within_train"] == {"count": 2, "first": ["a.jsonl:4 (two rows of one raw-text document)"]}
