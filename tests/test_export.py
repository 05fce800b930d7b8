"""Exports (hf, peft, gguf, ollama) of tiny LoRA runs on Llama-, Qwen2- and Mistral-like models.

GGUF files are read back by transformers (an independent reader) and compared with the merged
model: f16 logits within 1% of the logit scale, q8_0 top-1 tokens equal at >= 99% of positions,
generation prompts token-equal to training's. Biases and norms are randomised and q/k scaled up (sharp attention) so that a dropped
or misnamed bias or norm, or a wrong q/k layout, would show.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tunesmith
from helpers import build_model, build_tokenizer, write_jsonl
from test_methods import run_config
from tunesmith.cli import main
from tunesmith.errors import UserError
from tunesmith.export import export
from tunesmith.export import gguf as gguf_export
from tunesmith.export.ollama import write_modelfile
from tunesmith.export.peft_folder import serving_warnings


def build_mistral(folder: Path, vocab: int) -> None:
    from transformers import AutoModelForCausalLM, MistralConfig

    torch.manual_seed(2)
    config = MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=False, eos_token_id=2, pad_token_id=2, bos_token_id=None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # A random untied head gives near-tied logits no quantised model could rank alike; a trained head
    # is aligned with the embeddings. Same values, still a separate `output` tensor in the GGUF.
    model.lm_head.weight.data.copy_(model.model.embed_tokens.weight.data)
    model.save_pretrained(folder, safe_serialization=True)


def randomise_biases_and_norms(folder: Path) -> None:
    """Initialised biases are 0 and norms 1: a writer that dropped them would still pass. Not here."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Large q/k biases would flatten attention into near-tied logits; 0.05 still moves every logit.
            scale = 0.05 if name.endswith("bias") else 0.3 if "norm" in name else 0.0
            param.add_(scale * torch.randn(param.shape, generator=generator))
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(8)  # sharp attention: a wrong q/k layout in the GGUF must show in the logits
    model.save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One short LoRA run per architecture, with a fixed system prompt in every example."""
    from tunesmith.data.demo import make_splits

    root = tmp_path_factory.mktemp("export")
    splits = make_splits(16, seed=5, validation_size=8, test_size=0)
    data = {name: write_jsonl(root / f"{name}.jsonl", splits[name]) for name in ("train", "validation")}
    found = {}
    for arch in ("llama", "qwen2", "mistral"):
        folder = root / f"model-{arch}"
        tokenizer = build_tokenizer(folder)
        if arch == "mistral":
            build_mistral(folder, len(tokenizer))
        else:
            build_model(folder, arch, vocab=len(tokenizer), seed=1)
        randomise_biases_and_norms(folder)
        config = run_config(folder, root / f"run-{arch}", {"method": "lora"}, data)
        config["train"]["max_steps"] = 3
        found[arch] = Path(tunesmith.train(config)["run_dir"])
    return found


def gguf_fields(path: Path) -> tuple[dict, dict]:
    """(metadata, tensor name -> type name) as llama.cpp's own reader (gguf-py) sees the file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    meta = {}
    for key in ("general.architecture", "tokenizer.ggml.model", "tokenizer.chat_template", "tokenizer.ggml.eos_token_id"):
        field = reader.fields[key]
        value = field.parts[field.data[0]]
        meta[key] = bytes(value).decode() if field.types[0].name == "STRING" else int(value[0])
    meta["tokens"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    return meta, {t.name: t.tensor_type.name for t in reader.tensors}


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_gguf_reads_back_with_the_merged_models_logits_and_training_prompts(arch, quant, runs, tmp_path):
    from tunesmith.models import load_tokenizer

    run = runs[arch]
    check = export(run, tmp_path, formats="gguf", quant=quant)["gguf"]
    path = Path(check["file"])
    assert path == tmp_path / "gguf" / f"model-{quant}.gguf" and path.is_file()
    assert not (tmp_path / "gguf" / ".partial").exists() and not (tmp_path / "merged").exists()
    assert check["positions"] > 100  # answer positions of the 8 validation examples
    if quant == "f16":
        assert check["relative_diff"] < 1e-2
    assert check["top1_agreement"] >= 0.99
    assert check["prompts_equal"] == check["prompts_checked"] == 8

    meta, tensors = gguf_fields(path)
    assert meta["general.architecture"] == ("qwen2" if arch == "qwen2" else "llama")  # Mistral is llama in GGUF
    assert meta["tokenizer.ggml.model"] == "gpt2"
    trained = load_tokenizer(str(run / "adapter"))
    assert meta["tokenizer.chat_template"] == trained.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == trained.eos_token_id
    assert meta["tokens"] == len(trained)
    assert ("output.weight" in tensors) == (arch == "mistral")  # tied embeddings write no output tensor
    assert ("blk.0.attn_q.bias" in tensors) == (arch == "qwen2")
    assert tensors["blk.1.ffn_norm.weight"] == "F32"
    assert tensors["blk.1.ffn_down.weight"] == ("Q8_0" if quant == "q8_0" else "F16")
    assert json.loads((tmp_path / "gguf" / f"check-{quant}.json").read_text())["file"] == str(path)
    assert "llama-cli -m model-" in (tmp_path / "gguf" / "README.md").read_text()


def test_gguf_check_refuses_a_wrong_layout_and_says_by_how_much(runs, tmp_path, monkeypatch):
    """Without the q/k permutation llama.cpp needs, the read-back logits differ: the export is refused."""
    monkeypatch.setattr(gguf_export, "rope_to_ggml", lambda weight, heads: weight)
    with pytest.raises(UserError, match=r"f16 GGUF logits \(transformers\) differ from the merged model.s by [0-9.e-]+ \("):
        export(runs["llama"], tmp_path, formats="gguf")
    assert not (tmp_path / "gguf" / "model-f16.gguf").exists()


def test_gguf_check_refuses_a_file_missing_a_weight_or_with_another_chat_template(runs, tmp_path, monkeypatch):
    """Two ways a file can be wrong that its logits on the merged model's inputs need not show at once: a
    weight left out (transformers would fill it with random values) and a chat template that renders the
    conversations into other tokens than training's."""
    import gguf

    real_tensors = gguf_export.gguf_tensors
    with monkeypatch.context() as patch:
        patch.setattr(gguf_export, "gguf_tensors",
                      lambda model, arch: ((n, d) for n, d in real_tensors(model, arch) if n != "blk.1.ffn_down.weight"))
        with pytest.raises(UserError, match=r"1 weights are missing from the GGUF, for example model.layers.1.mlp.down_proj"):
            export(runs["llama"], tmp_path, formats="gguf")
    real_template = gguf.GGUFWriter.add_chat_template
    monkeypatch.setattr(gguf.GGUFWriter, "add_chat_template", lambda writer, template: real_template(writer, "Hi. " + template))
    with pytest.raises(UserError, match=r"tokenizer and chat template build different tokens than training's for 8 of 8"):
        export(runs["llama"], tmp_path, formats="gguf")
    assert not (tmp_path / "gguf" / "model-f16.gguf").exists()


def test_a_quantisation_this_machine_cannot_write_is_refused_before_the_merge(runs, tmp_path, monkeypatch):
    """`--quant q4_k_m` without llama.cpp merged the model (12 s on the default model) before refusing."""
    from tunesmith.export import llamacpp, merge

    monkeypatch.setattr(llamacpp, "available", lambda: False)
    monkeypatch.setattr(merge, "merge_run", lambda *a, **k: pytest.fail("merged before the quantisation was checked"))
    with pytest.raises(UserError, match="cannot write K-quants"):
        export(runs["llama"], tmp_path, formats="gguf", quant="q4_k_m")
    with pytest.raises(UserError, match="unknown --quant 'q3'"):
        export(runs["llama"], tmp_path, formats="ollama", quant="q3")
    assert not (tmp_path / "gguf").exists()


def test_weights_are_as_readable_as_the_files_beside_them(runs, tmp_path):
    """safetensors writes 0600 whatever the umask: another user (a vLLM server) could read the adapter's
    config but not its weights ("No adapter found"). The run's weights and the exported copies get the
    mode their config has."""
    import stat

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    adapter = runs["llama"] / "adapter"
    assert mode(adapter / "adapter_model.safetensors") == mode(adapter / "adapter_config.json")
    export(runs["llama"], tmp_path, formats="hf,peft")
    for folder, config in ((tmp_path / "merged", "config.json"), (tmp_path / "peft", "adapter_config.json")):
        weights = list(folder.glob("*.safetensors"))
        assert weights and all(mode(w) == mode(folder / config) for w in weights), folder


def test_q8_0_is_judged_by_kl_divergence_and_decided_positions_not_by_near_ties(tmp_path):
    """q8_0 moves every logit a little: where the merged model's two best tokens are nearly tied, the file may
    pick the other one. Such flips alone (a real run's q8_0 had 3% of them) pass; a file whose logits are off
    is refused, with its KL divergence."""
    from tunesmith.export.agreement import agreement
    from tunesmith.export.gguf_check import refuse_if_off

    generator = torch.Generator().manual_seed(0)
    reference = 4 * torch.randn(400, 64, generator=generator)
    best = reference.argmax(-1)
    tied = torch.arange(400) < 40  # a tenth of the positions: the runner-up 0.01 logits behind
    runner_up = (best[tied] + 1) % 64
    reference[tied.nonzero().squeeze(1), runner_up] = reference.max(-1).values[tied] - 0.01
    answers = torch.ones(400, dtype=torch.bool)
    rounded = reference + 0.05 * torch.randn(400, 64, generator=generator)  # q8_0-like noise
    found = agreement(rounded, reference, answers)
    assert found["top1_agreement"] < 0.99 < found["top1_decided"] and found["decided_positions"] < 360
    assert found["kl_divergence"] < 0.01
    refuse_if_off(tmp_path / "m.gguf", "q8_0", "transformers", found, 1.0, 400)  # passes
    shuffled = reference[torch.randperm(400, generator=generator)]  # rows for other positions: a broken file
    off = agreement(shuffled, reference, answers)
    with pytest.raises(UserError, match=r"q8_0 GGUF \(transformers\) is off the merged model: mean KL divergence "
                                        r"[0-9.]+ over 400 answer positions"):
        refuse_if_off(tmp_path / "m.gguf", "q8_0", "transformers", off, 1.0, 400)
    flattened = agreement(reference * 0.2, reference, answers)  # every best token kept, the distribution not
    assert flattened["top1_decided"] == 1.0
    with pytest.raises(UserError, match=r"mean KL divergence [0-9.]+ over 400 answer positions \(at most"):
        refuse_if_off(tmp_path / "m.gguf", "q8_0", "transformers", flattened, 1.0, 400)


def test_all_formats_from_the_cli(runs, tmp_path, capsys):
    from peft import PeftModel

    from tunesmith.data.demo import SYSTEM_PROMPT
    from tunesmith.export.merge import logits_of, sample_batch
    from tunesmith.models import load_model, load_tokenizer
    from tunesmith.runs import load_trained

    run = runs["llama"]
    assert main(["export", str(run), "--format", "hf,peft,gguf,ollama", "--quant", "q8_0", "--out", str(tmp_path)]) == 0
    said = capsys.readouterr()
    printed = json.loads(said.out)  # the result alone on stdout; each stage on stderr as it ends
    assert set(printed) == {"merged", "peft", "gguf"} and printed["merged"]["max_abs_diff"] < 1e-4
    assert printed["peft"]["max_abs_diff"] < 1e-6 and printed["peft"]["positions"] > 0  # the copy, reloaded by peft
    for line in ("merge: read back from disk, its logits within", "gguf: writing model-q8_0.gguf",
                 "gguf: model-q8_0.gguf checked: mean KL divergence"):
        assert line in said.err

    merged = tmp_path / "merged"
    assert {"config.json", "generation_config.json", "chat_template.jinja", "tokenizer.json"} <= {p.name for p in merged.iterdir()}
    assert list(merged.glob("*.safetensors"))

    # The peft folder loads in plain peft on the base and computes what the run's model computes.
    peft_dir = tmp_path / "peft"
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja"} <= {p.name for p in peft_dir.iterdir()}
    tokenizer = load_tokenizer(str(peft_dir))
    batch = sample_batch(run, tokenizer)
    base = json.loads((peft_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    plain = PeftModel.from_pretrained(load_model(base), peft_dir)
    # On the CPU beside plain peft (the run trained on the GPU where there is one): one device, to 1e-5.
    ours, _, _ = load_trained(str(run), dtype=torch.float32, device="cpu")
    assert (logits_of(plain, batch) - logits_of(ours, batch)).abs().max() < 1e-5

    modelfile = (tmp_path / "gguf" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf\n")
    assert '{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert f'SYSTEM """{SYSTEM_PROMPT}"""' in modelfile  # every demo example has this system prompt
    for folder, text in (("merged", "from_pretrained"), ("peft", "--enable-lora"), ("gguf", "ollama create")):
        assert text in (tmp_path / folder / "README.md").read_text()


@pytest.mark.parametrize("damage, expected", [
    ("truncate", "does not load in peft"),
    ("scale", "logits differ from the run's by"),
])
def test_a_peft_export_that_does_not_reload_as_the_run_is_refused_and_the_earlier_one_kept(
        runs, tmp_path, monkeypatch, damage, expected):
    import shutil

    from safetensors.torch import load_file, save_file

    from tunesmith.errors import UserError
    from tunesmith.export import export
    from tunesmith.export import peft_folder

    earlier = tmp_path / "peft"
    earlier.mkdir()
    (earlier / "adapter_model.safetensors").write_bytes(b"an earlier export")
    real_copy = shutil.copytree

    def damaged_copy(source, target, **options):
        real_copy(source, target, **options)
        weights = Path(target) / "adapter_model.safetensors"
        if damage == "truncate":  # a copy cut short (disk full, interrupted)
            weights.write_bytes(weights.read_bytes()[:200])
        else:  # weights other than the run's
            save_file({k: v * 3 for k, v in load_file(weights).items()}, weights)

    monkeypatch.setattr(peft_folder.shutil, "copytree", damaged_copy)
    with pytest.raises(UserError, match=expected):
        export(runs["llama"], tmp_path, formats="peft")
    assert (earlier / "adapter_model.safetensors").read_bytes() == b"an earlier export"


def test_unsupported_architecture_and_format_get_a_clear_message(tmp_path, capsys):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GPT2Config

    folder = tmp_path / "gpt2"
    tokenizer = build_tokenizer(folder)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    with pytest.raises(UserError, match="supports the gemma3_text, llama, mistral, phi3, qwen2, qwen3, smollm3 architectures; this model is .gpt2."):
        gguf_export.write_gguf(model, tokenizer, tmp_path / "x.gguf")

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(run / "adapter" / "adapter_model.safetensors"))  # refused before it loads
    (run / "config.yaml").write_text(json.dumps({"model": {"name": str(folder)}, "data": {"train": "demo"}}))
    assert main(["export", str(run), "--format", "gguf"]) == 2
    assert "this model is 'gpt2'" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "onnx"]) == 2
    assert "unknown format onnx; choose from hf, peft, gguf, ollama, gguf-lora" in capsys.readouterr().err


def test_ollama_refuses_a_template_it_cannot_write(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    tokenizer.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(UserError, match="no Ollama template of the families tunesmith knows"):
        write_modelfile(tmp_path, "model.gguf", tokenizer, None)


def test_serving_warnings_name_what_vllm_and_tgi_reject():
    assert serving_warnings({"r": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none"}, False) == []
    found = " | ".join(serving_warnings({"r": 128, "use_dora": True, "modules_to_save": ["lm_head"],
                                         "target_modules": ["q_proj", "embed_tokens"]}, True))
    for text in ("vLLM rejects", "DoRA", "--max-lora-rank 128", "['embed_tokens']", "QLoRA"):
        assert text in found
    # a rank of rank_pattern above r counts: vLLM's --max-lora-rank bounds every module's rank
    assert "--max-lora-rank 64" in " ".join(serving_warnings({"r": 8, "rank_pattern": {"v_proj": 64}}, False))


def test_gguf_is_not_called_verified_when_no_sample_conversation_was_found(runs, tmp_path):
    """Issue 20 item 18: with the run's data gone the check had 0 of 0 prompts and random tokens; it is
    refused unless forced, and a forced export says what was checked."""
    import shutil

    run = tmp_path / "moved"
    shutil.copytree(runs["qwen2"], run)
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"].update(train=str(tmp_path / "gone" / "train.jsonl"), validation=str(tmp_path / "gone" / "v.jsonl"))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    for name in ("train.jsonl", "validation.jsonl"):
        (run / "data" / name).unlink(missing_ok=True)
    with pytest.raises(UserError, match="no sample conversations found.*--force"):
        export(run, tmp_path / "out", formats="gguf")
    assert not (tmp_path / "out" / "gguf" / "model-f16.gguf").exists()
    check = export(run, tmp_path / "forced", formats="gguf", force=True)["gguf"]
    assert check["prompts_checked"] == 0 and check["checked_on"].startswith("random tokens only")
    assert "random tokens only" in (tmp_path / "forced" / "gguf" / "README.md").read_text()


def test_ollama_refuses_a_system_prompt_a_modelfile_cannot_quote(runs, tmp_path):
    """Ollama's Modelfile parser has no escapes: a system prompt holding three quotes would end the
    SYSTEM string there and the rest be read as commands. Refused before the GGUF is written; a
    prompt with ordinary quotes is written as it is."""
    import shutil

    import yaml

    run = tmp_path / "quoted"
    shutil.copytree(runs["qwen2"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["system_prompt"] = 'Answer in JSON: """{"a": 1}""" then stop'
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match='system prompt holds """'):
        export(run, tmp_path / "out", formats="ollama")
    assert not (tmp_path / "out" / "gguf").exists() or not any((tmp_path / "out" / "gguf").glob("*.gguf"))
    from tunesmith.models import load_tokenizer
    from tunesmith.runs import trained_folder

    tokenizer = load_tokenizer(str(trained_folder(runs["qwen2"])))
    text = write_modelfile(tmp_path, "m.gguf", tokenizer, 'Say "yes" or ""').read_text()
    assert 'SYSTEM """Say "yes" or """""\n' in text
    # A tokenizer from elsewhere whose end-of-turn token would add commands of its own to the Modelfile.
    from unittest import mock

    with mock.patch("tunesmith.export.ollama.end_of_turn_strings", return_value=['<|im_end|>"\nADAPTER /x']):
        with pytest.raises(UserError, match="end-of-turn token .* holds a quote or a line break"):
            write_modelfile(tmp_path, "m.gguf", tokenizer, None)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_adapter_as_a_gguf_adapter_file(runs, tmp_path, arch):
    """The adapter as llama.cpp's LoRA GGUF: applied to the base GGUF (in llama.cpp where installed, and by
    hand from the file) it gives the adapter model's logits."""
    from gguf import GGUFReader

    from tunesmith.export import llamacpp

    check = export(runs[arch], tmp_path, formats="gguf-lora")["gguf_lora"]
    assert check["by_hand"]["relative_diff"] < 1e-2 and check["by_hand"]["top1_agreement"] >= 0.99
    if llamacpp.available():
        assert check["llama_cpp"]["relative_diff"] < 1e-2
    reader = GGUFReader(check["adapter"])
    field = reader.fields["adapter.type"]
    assert bytes(field.parts[field.data[0]]).decode() == "lora"
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b", "blk.1.ffn_down.weight.lora_b"} <= names


def test_a_failed_export_leaves_no_files_that_look_finished(runs, tmp_path, monkeypatch):
    """A gguf-lora export refused after its base GGUF was written left base-f16.gguf in gguf-lora/; an
    Ollama export refused for its template left a checked GGUF without its check record; and
    `--tolerance 0` was taken for no tolerance given."""
    import tunesmith.export.gguf_lora as gguf_lora
    import tunesmith.export.merge as merge
    import tunesmith.export.ollama as ollama

    def refuse(*args, **kwargs):
        raise UserError("refused for the test")
    monkeypatch.setattr(gguf_lora, "write_lora_gguf", refuse)
    with pytest.raises(UserError, match="refused for the test"):
        export(runs["llama"], tmp_path, formats="gguf-lora")
    assert not (tmp_path / "gguf-lora").exists()
    monkeypatch.setattr(ollama, "choose_template", refuse)
    with pytest.raises(UserError, match="refused for the test"):
        export(runs["llama"], tmp_path, formats="gguf,ollama")
    assert not (tmp_path / "gguf").exists()
    asked = []
    monkeypatch.setattr(merge, "merge_run", lambda run, out, tolerance: asked.append(tolerance) or refuse())
    with pytest.raises(UserError):
        export(runs["llama"], tmp_path, formats="hf", tolerance=0.0)
    assert asked == [0.0]
    monkeypatch.undo()
    # Ctrl-C while the merged model is written or read back: no merged.partial (gigabytes) left behind.
    real_load = merge.load_model

    def interrupted(*args, **kwargs):
        assert (tmp_path / "interrupted" / "merged.partial" / "config.json").exists()  # written, then...
        raise KeyboardInterrupt
    monkeypatch.setattr(merge, "load_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(runs["llama"], tmp_path / "interrupted", formats="hf")
    assert not (tmp_path / "interrupted" / "merged.partial").exists()
    monkeypatch.setattr(merge, "load_model", real_load)
    # --out naming a file: refused before the merge (was "merged.partial: Not a directory" after it).
    (tmp_path / "my.yaml").write_text("x: 1\n")
    with pytest.raises(UserError, match="--out .*my.yaml: a file; exports are folders"):
        export(runs["llama"], tmp_path / "my.yaml", formats="hf")


def test_the_checks_run_on_the_runs_samples_cut_as_training_cuts_them(runs, tmp_path):
    """Samples longer than data.max_seq_len were dropped and the logits compared on random tokens, while
    the check said it used the run's conversations."""
    import shutil

    import yaml

    from tunesmith.data.tokenize import encode
    from tunesmith.export.merge import sample_batch, sample_conversations
    from tunesmith.models import load_tokenizer

    run = tmp_path / "short"
    shutil.copytree(runs["llama"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["max_seq_len"] = 40
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    tokenizer = load_tokenizer(str(run / "adapter"))
    conversations = sample_conversations(run)
    batch = sample_batch(run, tokenizer)
    assert len(batch["input_ids"]) == len(conversations) and batch["attention_mask"].sum(1).tolist() == [40] * 8
    assert batch["input_ids"][0, :40].tolist() == encode(tokenizer, conversations[0]).input_ids[:40]


def test_the_model_card_names_test_scores_made_without_the_base():
    from tunesmith.export.card import comparison_sections

    results = {"fine_tuned": {"eval_loss": 0.4, "all_fields": 0.9, "test_examples": 4}}
    text = "\n".join(comparison_sections(results, {}))
    assert "its 4 test examples were scored without the base model" in text and "scored no test split" not in text
    assert "scored no test split" in "\n".join(comparison_sections({"fine_tuned": {"eval_loss": 0.4}}, {}))


def test_ollama_says_which_of_the_runs_prompts_its_template_serves_otherwise(tmp_path):
    """The Go templates see Role and Content only: a tool call and its result are not rendered as training
    renders them (Qwen2.5's <tool_call>, <tool_response>)."""
    from families import build_family_tokenizer

    from tunesmith.export.ollama import choose_template, prompts_served_alike

    tokenizer = build_family_tokenizer("qwen2.5", tmp_path)
    call = {"type": "function", "function": {"name": "get_time", "arguments": {"zone": "UTC"}}}
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    tools = [{"role": "user", "content": "Time?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
             {"role": "tool", "content": '{"time": "12:00"}'}, {"role": "user", "content": "Thanks"},
             {"role": "assistant", "content": "You are welcome"}]
    chosen = choose_template(tokenizer, False)
    assert prompts_served_alike(tokenizer, *chosen, [plain], None, False) == 1
    assert prompts_served_alike(tokenizer, *chosen, [plain, tools], None, False) == 1


def test_a_card_cell_stays_one_cell_of_text():
    """Table cells come from the run's files (a comparison's model names, a scorer's metric names): a
    line break ended the row and markup rendered on the hub's page."""
    from tunesmith.export.card import cell

    assert cell("a|b\n| injected | row |") == "a\\|b \\| injected \\| row \\|"
    assert cell("<img src=x onerror=alert(1)>") == "&lt;img src=x onerror=alert(1)&gt;"
    assert (cell(0.123456), cell(None), cell("rouge_l")) == ("0.1235", "-", "rouge_l")


def test_the_go_template_interpreter_reads_trimming_eq_and_range_else_as_go_does():
    """The Ollama check renders the Go templates with gotemplate.py: it must read the subset it claims as
    Go does, or a template that passes the check would prompt otherwise in Ollama."""
    from tunesmith.export.gotemplate import render

    data = {"Messages": [{"Role": "tool"}, {"Role": "user"}], "Empty": []}
    assert render("a  {{- 1 -}}  \n b", data) == "a1b"  # both trim markers take the white space beside them
    assert render('{{ range .Messages }}{{ if eq .Role "user" "tool" }}y{{ end }}{{ end }}', data) == "yy"  # eq: any
    assert render("{{ range .Empty }}x{{ else }}none{{ end }}{{ range .Messages }}m{{ else }}none{{ end }}", data) == "nonemm"


def test_a_quantised_file_far_from_the_merged_model_is_said_so():
    """A q4_0 file of the default model at mean KL 0.23 and 78% top-1 agreement was reported as checked."""
    from tunesmith.export.gguf_check import far_from_merged

    far = {"kl_divergence": 0.23, "top1_decided": 0.78}
    assert "q4_0 is far from the merged model: mean KL divergence 0.230" in far_from_merged("q4_0", far)
    assert "78%" in far_from_merged("q4_0", far)
    assert far_from_merged("q4_0", {"kl_divergence": 0.03, "top1_decided": 0.95}) is None
    assert far_from_merged("q8_0", far) is None  # q8_0 and f16 are refused past their bars instead
