"""`tunesmith plan` counts what each objective adds: pairs are two sequences, a GRPO prompt
group_size ones; a full fine-tune with a reference keeps a frozen copy; GRPO's sampling cache is
reported beside the training peak. And `tunesmith pairs` writes pairs graded by the user's scorer."""
from __future__ import annotations

import json
import shutil

import pytest

from helpers import qa_rows, write_jsonl
from tunesmith.config import validate
from tunesmith.errors import UserError
from tunesmith.plan import GiB, estimate, format_plan, model_shape, plan, plan_for, setup_from_config
from tunesmith.plan.objectives import sampling_cache_bytes


def setup_for(method: str = "lora", **train):
    return setup_from_config(validate({"model": {"name": "llama-3.1-8b", "dtype": "bfloat16"}, "train": {"batch_size": 2, **train},
                                       "adapter": {"method": method}}))


def test_pairs_double_the_sequences_and_the_activations():
    shape = model_shape("llama-3.1-8b")
    sft, dpo, kto = setup_for(), setup_for(objective="dpo"), setup_for(objective="kto")
    assert (sft.batch, dpo.batch, kto.batch) == (2, 4, 2)  # KTO's KL sequences keep nothing for the backward
    assert estimate(shape, dpo).parts["activations"] == pytest.approx(2 * estimate(shape, sft).parts["activations"], rel=0.01)


def test_a_full_fine_tune_keeps_a_reference_copy_only_where_the_objective_has_a_reference():
    shape = model_shape("llama-3.1-8b")
    with_reference = estimate(shape, setup_for(objective="dpo", method="full")).parts
    assert with_reference["reference copy"] == pytest.approx(shape.total_params * 2)  # bf16 weights
    for objective in ("orpo", "simpo", "sft"):
        assert "reference copy" not in estimate(shape, setup_for(objective=objective, method="full")).parts
    assert "reference copy" not in estimate(shape, setup_for(objective="dpo")).parts  # LoRA: adapters disabled
    assert "reference copy" not in estimate(shape, setup_for(objective="grpo", beta=0.0, method="full")).parts
    assert "reference copy" in estimate(shape, setup_for(objective="grpo", beta=0.04, method="full")).parts


def test_grpo_plans_groups_and_reports_its_sampling_cache():
    shape = model_shape("llama-3.1-8b")
    setup = setup_for(objective="grpo", group_size=8)
    assert setup.batch == 16 and setup.sampled_tokens == 16 * setup.seq
    # keys and values of 32 layers x 8 kv heads x 128 (bf16) for every sampled token
    assert sampling_cache_bytes(shape, setup) == 2 * 32 * 1024 * 2 * 16 * setup.seq
    text = format_plan(plan(shape, setup, include_this_machine=False))
    assert "objective: grpo, micro-batches of 16 sequences" in text and "KV cache of" in text
    assert f"{sampling_cache_bytes(shape, setup) / GiB:.2f} GiB" in text and "leaves sampling out" in text


def test_pairs_command_writes_scored_pairs(tiny_model_dir, tmp_path):
    from tunesmith.cli import main

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"], "reference": r["completion"]}
                                                        for r in qa_rows(6)])
    (tmp_path / "by_length.py").write_text("def score(answer, reference):\n    return len(answer) % 7\n")
    out = tmp_path / "pairs.jsonl"
    code = main(["pairs", str(tiny_model_dir), "--data", str(prompts), "--samples", "3", "--scorer",
                 f"{tmp_path / 'by_length.py'}:score", "--max-new-tokens", "6", "--out", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in open(out)]
    assert rows, "no pair written"
    for row in rows:
        assert row["score_chosen"] > row["score_rejected"]
        assert len(row["chosen"][0]["content"]) % 7 == row["score_chosen"]
        assert row["prompt"][-1]["role"] == "user" and row["reference"]
    # the file is DPO data as it is
    from tunesmith.data.preference import PAIRS, prepare_preference
    from tunesmith.models import load_tokenizer

    cfg = validate({"data": {"train": str(out), "validation": str(out)}}).data
    assert len(prepare_preference(cfg, load_tokenizer(str(tiny_model_dir)), PAIRS).splits["train"]) == len(rows)


def test_pairs_with_reference_chosen_where_it_beats_every_sample(tiny_model_dir, tmp_path):
    """--chosen reference: the reference answer is chosen where it outscores the samples, the worst sample rejected."""
    from tunesmith.pairs import make_pairs

    rows = qa_rows(6)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"], "reference": r["completion"]} for r in rows])
    # the reference scores 10 against itself, except for the first prompt's, which no sample can fall below
    (tmp_path / "rank.py").write_text(
        f"def score(answer, reference):\n    if answer == reference:\n"
        f"        return -1.0 if reference == {rows[0]['completion']!r} else 10.0\n    return len(answer) % 7\n")
    out = tmp_path / "pairs.jsonl"
    summary = make_pairs(str(tiny_model_dir), str(prompts), samples=3, scorer=f"{tmp_path / 'rank.py'}:score",
                         out=str(out), max_new_tokens=6, chosen="reference")
    written = [json.loads(line) for line in open(out)]
    by_reference = [row for row in written if row["chosen"][0]["content"] == row["reference"]]
    assert summary["chosen_from_reference"] == len(by_reference) == 5
    for row in by_reference:
        assert row["score_chosen"] == 10.0 and row["score_rejected"] < 7
    assert all(row["reference"] != rows[0]["completion"] for row in by_reference)
    with pytest.raises(UserError, match="--chosen"):
        make_pairs(str(tiny_model_dir), str(prompts), chosen="gold", out=str(out))


def test_pairs_skip_what_training_could_not_read(tiny_model_dir, tmp_path, monkeypatch):
    """A prompt the chat template refuses is skipped and reported (it crashed the sampler), and an answer that
    ended at once (empty text, which the DPO reader refuses) is never a side of a pair."""
    import tunesmith.objectives.rollout as rollout
    from tunesmith.data.preference import PAIRS, prepare_preference
    from tunesmith.models import load_tokenizer
    from tunesmith.pairs import make_pairs

    tokenizer = load_tokenizer(str(tiny_model_dir))
    end, real = tokenizer.convert_tokens_to_ids("<|im_end|>"), rollout.sample
    monkeypatch.setattr(rollout, "sample", lambda model, prompts, copies, *a, **k: [
        [end] if i % copies == 0 else answer for i, answer in enumerate(real(model, prompts, copies, *a, **k))])
    template = ("{%- for m in messages -%}{%- if m['role'] == 'system' -%}{{ raise_exception('System role not "
                "supported') }}{%- endif -%}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}")
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(model)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Repeat: alpha beta {i}"} for i in range(4)] + [
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Repeat: x"}]}])
    (tmp_path / "by_length.py").write_text("def score(answer, reference):\n    return float(len(answer))\n")
    out = tmp_path / "pairs.jsonl"
    summary = make_pairs(str(model), str(prompts), samples=3, scorer=f"{tmp_path / 'by_length.py'}:score", out=str(out),
                         max_new_tokens=6)
    assert summary["skipped_records"] == 1 and summary["empty_samples_left_out"] == 4 and summary["prompts"] == 4
    rows = [json.loads(line) for line in open(out)]
    assert rows and all(row["rejected"][0]["content"] for row in rows)
    cfg = validate({"data": {"train": str(out), "validation": str(out)}}).data
    assert len(prepare_preference(cfg, load_tokenizer(str(model)), PAIRS).splits["train"]) == len(rows)


def test_pairs_without_references_or_scorer_are_refused_before_the_output_is_touched(tiny_model_dir, tmp_path,
                                                                                      monkeypatch, capsys):
    """Prompts without a reference need a scorer: said at once, naming the first such prompt and the
    --scorer flag; an earlier pairs file is kept whole (--overwrite given), also when sampling fails half-way."""
    import tunesmith.objectives.rollout as rollout
    from tunesmith.pairs import make_pairs

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Repeat: a", "reference": "a"},
                                                        {"prompt": "Repeat: b"}])
    out = tmp_path / "pairs.jsonl"
    out.write_text('{"earlier": true}\n')
    with pytest.raises(UserError, match=r"prompts.jsonl:2: this prompt has no reference answer \(1 of 2.*--scorer"):
        make_pairs(str(tiny_model_dir), str(prompts), samples=2, out=str(out), overwrite=True)
    monkeypatch.setattr(rollout, "sample", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    (tmp_path / "by_length.py").write_text("def score(answer, reference):\n    return float(len(answer))\n")
    with pytest.raises(KeyboardInterrupt):
        make_pairs(str(tiny_model_dir), str(prompts), samples=2, out=str(out), scorer=f"{tmp_path / 'by_length.py'}:score",
                   overwrite=True)
    assert out.read_text() == '{"earlier": true}\n'
    assert not (tmp_path / "pairs.jsonl.partial").exists()  # it was left behind
    # every answer scored alike: refused, the earlier file kept (an empty one was written, exit 0)
    (tmp_path / "flat.py").write_text("def score(answer, reference):\n    return 1.0\n")
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"no pair from 2 prompts: every prompt's answers scored alike"):
        make_pairs(str(tiny_model_dir), str(prompts), samples=2, out=str(out), scorer=f"{tmp_path / 'flat.py'}:score",
                   max_new_tokens=4, chosen="reference", overwrite=True)
    assert out.read_text() == '{"earlier": true}\n' and not (tmp_path / "pairs.jsonl.partial").exists()
    assert "--chosen reference: 1 of 2 prompts have no reference answer" in capsys.readouterr().err


def test_the_estimate_at_start_counts_the_sequences_each_objective_trains():
    """The run's largest micro-batch (plan/__init__.py largest_micro_batch) in the sequences that
    keep activations: a pair both of its sequences once, a KTO example its answer (the KL
    sequence runs without gradients), a GRPO prompt group_size answers of up to
    max_completion_tokens after it."""
    from tunesmith.data.collate import PADDING_FREE, rounded_up
    from tunesmith.data.preference import Pair, Unpaired
    from tunesmith.data.prepare import Split
    from tunesmith.data.prompts import Prompt
    from tunesmith.data.tokenize import IGNORE, Encoded
    from tunesmith.plan import largest_micro_batch
    from tunesmith.plan.objectives import label_share

    def encoded(length, labels):
        return Encoded([5] * length, [IGNORE] * (length - labels) + [5] * labels)

    def config(**train):
        return validate({"model": {"name": "llama-3.1-8b"}, "data": {"max_seq_len": 512},
                         "train": {"batch_size": 2, **train}})

    sft = [encoded(100, 40), encoded(60, 20)]
    assert largest_micro_batch(Split('train', encoded=sft), config(), PADDING_FREE, 1) == (2, 100, rounded_up(160))
    pairs = [Pair(encoded(100, 40), encoded(80, 20)), Pair(encoded(50, 10), encoded(70, 30))]
    assert largest_micro_batch(Split('train', encoded=pairs), config(objective="dpo"), PADDING_FREE, 1) == (4, 100, rounded_up(300))
    kto = [Unpaired(encoded(100, 40), True, kl=encoded(90, 30)), Unpaired(encoded(50, 10), False, kl=encoded(70, 30))]
    assert largest_micro_batch(Split('train', encoded=kto), config(objective="kto"), PADDING_FREE, 1) == (2, 100, rounded_up(150))
    grpo = config(objective="grpo", group_size=4, max_completion_tokens=64)
    prompts = [Prompt([5] * 30), Prompt([5] * 50)]
    assert largest_micro_batch(Split('train', encoded=prompts), grpo, PADDING_FREE, 1) == (8, 114, rounded_up(4 * 94 + 4 * 114))
    assert label_share(prompts, grpo.train, 512) == pytest.approx(8 * 64 / (4 * 94 + 4 * 114))


def test_plan_config_counts_the_tokens_a_grpo_epoch_trains_and_the_utilisation_asked(tiny_model_dir, tmp_path):
    """A GRPO prompt trains as group_size sequences of prompt and answer: the epoch's tokens counted the
    prompts alone (19x too short an epoch time); and --utilisation was used, not printed."""
    from tunesmith.objectives import prepare_data
    from tunesmith.plan import plan_for

    rows = [{"prompt": r["prompt"], "reference": r["completion"]} for r in qa_rows(24)]
    config = {"model": {"name": str(tiny_model_dir), "dtype": "float32"},
              "data": {"train": str(write_jsonl(tmp_path / "grpo.jsonl", rows)), "max_seq_len": 256},
              "train": {"objective": "grpo", "group_size": 8, "max_completion_tokens": 64, "batch_size": 2},
              "output": {"dir": str(tmp_path / "run")}}
    path = tmp_path / "grpo.json"
    path.write_text(json.dumps(config))
    found = plan_for(str(path), include_this_machine=False, utilisation=0.1)
    split = prepare_data(validate(config), str(tiny_model_dir)).splits["train"]
    # (times the rows' rounding up: data/collate.py rounded_up, which the epoch computes too)
    assert 1 <= found.padding < 1.1
    assert found.tokens == round(sum(8 * min(256, len(e.input_ids) + 64) for e in split.encoded) * found.padding)
    assert "utilisation 10% of each device's peak, as asked" in format_plan(found)


def test_plan_flags_are_read_as_the_objective_reads_the_config(tiny_model_dir, tmp_path):
    """--batch counts DPO pairs as train.batch_size does (two sequences each), and --method full
    keeps the reference copy a full DPO fine-tune holds (both were applied after the objective)."""
    config = tmp_path / "dpo.json"
    config.write_text(json.dumps({"model": {"name": str(tiny_model_dir), "dtype": "float32"},
                                  "train": {"objective": "dpo", "batch_size": 2}}))
    found = plan_for(str(config), tokens=1000, batch=4, method="full", seq=128)
    assert (found.setup.batch, found.setup.seq, found.setup.method) == (8, 128, "full")
    assert found.setup.reference_copy
    assert not plan_for(str(config), tokens=1000, batch=4).setup.reference_copy


def test_the_epoch_time_counts_the_reference_forward_of_dpo_and_kto():
    """DPO and KTO run the reference (adapters disabled) forward over every sequence without
    gradients: a forward's FLOPs more per token; SimPO and ORPO have no reference."""
    from tunesmith.plan.speed import flops_per_token

    shape = model_shape("llama-3.1-8b")
    plain = flops_per_token(shape, setup_for(objective="simpo"))
    forward = 2 * shape.layers * shape.block_linear_params
    for objective in ("dpo", "kto"):
        extra = flops_per_token(shape, setup_for(objective=objective)) - plain
        assert forward < extra < 1.2 * forward  # the blocks, plus the LM head's labels and attention
    assert flops_per_token(shape, setup_for(objective="orpo")) == plain
