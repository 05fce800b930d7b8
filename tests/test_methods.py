"""Every method on two tiny architectures, through one shared tester.

For each (method, architecture): the loss falls, the trainable count is what the method implies
(computed from the model's shapes), the saved output reloads with the same logits and eval loss,
an adapter loads in plain peft with identical logits, and the merged model matches the adapter
model (fp32, max abs logit difference below 1e-4).
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

import tunesmith
from helpers import build_model, build_tokenizer, write_jsonl
from helpers import trainable
from tunesmith.config import AdapterConfig, DataConfig
from tunesmith.data.collate import collate
from tunesmith.data.prepare import prepare
from tunesmith.data.tokenize import encode
from tunesmith.errors import UserError
from tunesmith.export import export as export_run
from tunesmith.models import load_model
from tunesmith.plan import estimate, model_shape
from tunesmith.runs import load_trained
from tunesmith.eval.loss import eval_loss
from tunesmith.training.loss import label_loss_sum

R, ALPHA = 4, 8
METHODS = {  # name -> adapter settings
    "full": {"method": "full"},
    "lora": {"method": "lora"},
    "rslora": {"method": "lora", "use_rslora": True},
    "dora": {"method": "dora"},
    "qlora": {"method": "qlora"},
}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, Path]:
    """Small train / validation files of the demo task: few examples keep the matrix fast."""
    from tunesmith.data.demo import make_splits

    folder = tmp_path_factory.mktemp("method-data")
    splits = make_splits(24, seed=4, validation_size=8, test_size=0)
    return {name: write_jsonl(folder / f"{name}.jsonl", splits[name]) for name in ("train", "validation")}


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory) -> dict[str, Path]:
    folders = {}
    for arch in ("llama", "qwen2"):
        folder = tmp_path_factory.mktemp(f"tiny-{arch}")
        tokenizer = build_tokenizer(folder)
        build_model(folder, arch, vocab=len(tokenizer), seed=1)
        folders[arch] = folder
    return folders


def expected_trainable(name: str, config, total: int) -> int:
    """What the method trains, from the shapes: 7 linear layers per block (q, k, v, o, gate, up, down)."""
    if name == "full":
        return total
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out)
    per_block = sum(R * (n_in + n_out) for n_in, n_out in shapes)
    if name == "dora":
        per_block += sum(n_out for _, n_out in shapes)  # one magnitude per output feature
    return config.num_hidden_layers * per_block


def run_config(model_dir: Path, out: Path, adapter: dict, data: dict[str, Path]) -> dict:
    return {
        "model": {"name": str(model_dir), "dtype": "float32"},
        "data": {"train": str(data["train"]), "validation": str(data["validation"]), "max_seq_len": 256},
        "adapter": {"r": R, "alpha": ALPHA, **adapter},
        "train": {"max_steps": 5, "batch_size": 4, "lr": 2e-3 if adapter["method"] == "full" else 2e-2,
                  "log_every": 5, "warmup_ratio": 0.0},
        "eval": {"generate": False, "batch_size": 16, "report": False},
        "output": {"dir": str(out)},
    }


def sample_ids(tokenizer, path: Path, count: int = 4) -> dict[str, torch.Tensor]:
    rows = [json.loads(line) for line in open(path)][:count]
    return collate([encode(tokenizer, r["messages"]) for r in rows], tokenizer.pad_token_id)


@torch.no_grad()
def logits(model, batch, train_mode: bool = False) -> torch.Tensor:
    # Train mode (no dropout is configured) keeps bitsandbytes off its bf16 CPU inference kernel,
    # so a plainly loaded 4-bit model computes in the fp32 it was asked for.
    model.train(train_mode)
    device = next(model.parameters()).device  # a 4-bit base sits on the GPU where there is one
    mask = batch["attention_mask"].to(device)
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=mask).logits
    return out[mask.bool()].cpu()


def plain_peft_model(model_dir: Path, adapter_dir: Path, quantized: bool):
    """The adapter as any peft user would load it: transformers + peft, nothing of tunesmith."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    extra = {}
    if quantized:
        extra = {"device_map": "cpu", "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **extra)
    return PeftModel.from_pretrained(base, adapter_dir)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(METHODS))
def test_method(name, arch, arch_dirs, data_files, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = arch_dirs[arch]
    adapter = METHODS[name]
    results = tunesmith.train(run_config(model_dir, tmp_path / "run", adapter, data_files))
    run = Path(results["run_dir"])

    # The loss falls.
    assert results["final_loss"] < results["first_loss"]
    assert results["fine_tuned"]["eval_loss"] < results["base"]["eval_loss"]

    # The trainable count is what the method implies.
    config = AutoConfig.from_pretrained(model_dir)
    base_total = sum(p.numel() for p in load_model(str(model_dir)).parameters())
    assert results["total_parameters"] == base_total + (results["trainable_parameters"] if name != "full" else 0)
    assert results["trainable_parameters"] == expected_trainable(adapter["method"], config, base_total)

    # The saved output reloads: same eval loss as the model that was trained, on the device it trained
    # on (a 4-bit base quantised on a GPU need not round as the CPU's quantiser does); then on the CPU
    # beside plain peft and the merged model.
    ours, tokenizer, _ = load_trained(str(run), dtype=torch.float32, device=results["device"])
    validation = prepare(DataConfig(train=str(data_files["train"]), validation=str(data_files["validation"])),
                         tokenizer).splits["validation"]
    reloaded = eval_loss(ours, validation, 16, tokenizer.pad_token_id)
    assert reloaded == pytest.approx(results["fine_tuned"]["eval_loss"], rel=1e-5)
    if results["device"] != "cpu":
        ours, tokenizer, _ = load_trained(str(run), dtype=torch.float32, device="cpu")
    batch = sample_ids(tokenizer, data_files["validation"])
    trained_logits = logits(ours, batch)

    if name == "full":
        assert (run / "model" / "model.safetensors").exists()
        plain = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
        assert torch.allclose(logits(plain, batch), trained_logits, atol=1e-5)
        with pytest.raises(UserError, match="nothing to merge"):
            export_run(run, merge=True)
        return

    # An adapter is a standard PEFT folder that plain peft loads with identical logits.
    adapter_dir = run / "adapter"
    for file in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (adapter_dir / file).exists(), file
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["use_dora"] == (name == "dora") and saved["use_rslora"] == (name == "rslora")
    plain = plain_peft_model(model_dir, adapter_dir, quantized=name == "qlora")
    assert (logits(plain, batch, train_mode=True) - trained_logits).abs().max() < 1e-5
    base_logits = logits(load_model(str(model_dir)), batch)
    assert (trained_logits - base_logits).abs().max() > 1e-3, "the adapter changed nothing"
    if name == "rslora":
        layer = plain.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == pytest.approx(ALPHA / math.sqrt(R))

    # The merge is verified: merged logits equal the adapter model's in fp32.
    check = export_run(run, merge=True)["merged"]
    assert check["max_abs_diff"] < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(check["folder"], dtype=torch.float32)
    assert not list(Path(check["folder"]).glob("adapter_*")), "the merged folder is a plain model"
    assert (logits(merged, batch) - trained_logits).abs().max() < 1e-4


def test_qlora_base_is_4bit_nf4_with_double_quantisation(arch_dirs):
    import bitsandbytes as bnb

    from tunesmith.methods.common import model_bytes
    from tunesmith.models import load_quantized

    model = load_quantized(str(arch_dirs["llama"]), torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * model.config.num_hidden_layers  # every linear layer of the blocks, not the head
    state = layers[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested and layers[0].compute_dtype == torch.bfloat16
    full = load_model(str(arch_dirs["llama"]), torch.bfloat16)
    assert model_bytes(model) < model_bytes(full)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_qlora_keeps_no_weight_in_the_mapped_checkpoint(arch_dirs):
    """Unquantised weights loaded in the checkpoint's own dtype (fp32 here) were views of the
    memory-mapped safetensors file, which kept the whole mapping and the pages quantising read
    resident (405 MiB on the default model): each must have memory of its own."""
    from tunesmith.models import load_quantized

    # On the CPU, where the mapping lives: a 4-bit load goes to the GPU by default where there is one,
    # and device memory never lies in a host mapping, so there the check would pass whatever was kept.
    model = load_quantized(str(arch_dirs["llama"]), torch.float32, device="cpu")
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(".safetensors"):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            mapped.append((start, end))
    floats = [t for t in [*model.parameters(), *model.buffers()] if t.dtype.is_floating_point]
    assert floats
    inside = [t.shape for t in floats if any(a <= t.untyped_storage().data_ptr() < b for a, b in mapped)]
    assert inside == []


def test_generation_leaves_a_qlora_model_as_trained(arch_dirs, tiny_tokenizer):
    """Decoding never merges into a 4-bit base: logits after generation equal those before."""
    from tunesmith.eval.generate import generate_answers
    from tunesmith.models import load_base

    torch.manual_seed(0)
    model = trainable(load_base(str(arch_dirs["llama"]), torch.float32, True), AdapterConfig(method="qlora", r=4))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a trained-looking adapter, so a lossy merge would show
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]], device=next(model.parameters()).device)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    conversation = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]
    generate_answers(model, tiny_tokenizer, [conversation], max_new_tokens=4, batch_size=1)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_merge_refuses_beyond_tolerance_and_says_by_how_much(arch_dirs, data_files, tmp_path, capsys, monkeypatch):
    """A merge whose output differs from the adapter model is not exported; the CLI says so in one line.
    The bar a user gets without --tolerance: a correct merge passes, one weight 0.05 off does not (the
    allowed difference is per unit of the largest logit, at least 1)."""
    from tunesmith.cli import main
    from tunesmith.errors import UserError
    from tunesmith.export import merge

    results = tunesmith.train(run_config(arch_dirs["llama"], tmp_path / "run", {"method": "lora"}, data_files))
    capsys.readouterr()
    assert main(["export", results["run_dir"], "--merge", "--tolerance", "1e-12"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"differ from the adapter model's by [0-9.e-]+ \(tolerance 1e-12\)", error), error
    assert "Traceback" not in error
    assert not (Path(results["run_dir"]) / "export" / "merged").exists()
    assert main(["export", str(tmp_path / "missing"), "--merge"]) == 2
    assert "missing: no such run folder" in capsys.readouterr().err

    assert merge.allowed_difference(torch.tensor([[-30.0, 2.0]]), 1e-4) == pytest.approx((30.0, 3e-3))
    assert merge.allowed_difference(torch.tensor([[0.2, -0.1]]), 1e-4) == pytest.approx((1.0, 1e-4))
    assert merge.merge_run(results["run_dir"], tmp_path / "right").max_abs_diff <= merge.TOLERANCE
    real = merge.merged_model

    def one_weight_off(*args):
        model = real(*args)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[0, 0] += 0.05
        return model

    monkeypatch.setattr(merge, "merged_model", one_weight_off)
    with pytest.raises(UserError, match="differ from the adapter model's"):
        merge.merge_run(results["run_dir"], tmp_path / "off")
    assert not (tmp_path / "off").exists()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, tiny_tokenizer):
    from tunesmith.data.demo import make_splits

    rows = make_splits(4, seed=2, validation_size=0, test_size=0)["train"]
    batch = collate([encode(tiny_tokenizer, r["messages"]) for r in rows], tiny_tokenizer.pad_token_id)

    def grads(checkpointing: bool) -> torch.Tensor:
        model = trainable(load_model(str(tiny_model_dir)), AdapterConfig(method="full", gradient_checkpointing=checkpointing))
        model.train()
        total, count = label_loss_sum(model, batch)
        (total / count).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    plain, recomputed = grads(False), grads(True)
    assert (plain - recomputed).norm() / plain.norm() < 1e-5


def test_freeze_embeddings_and_modules_to_save(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.get_input_embeddings().weight.numel()
    frozen = trainable(model, AdapterConfig(method="full", freeze_embeddings=True))
    assert sum(p.numel() for p in frozen.parameters() if p.requires_grad) == total - embeddings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = trainable(load_model(str(tiny_model_dir)), AdapterConfig(r=R, modules_to_save=["norm"]))
    assert any("vLLM" in str(w.message) for w in caught)
    # peft matches by name suffix: every *norm module gets a trained copy.
    from peft.utils import ModulesToSaveWrapper

    copies = [m.modules_to_save["default"] for m in peft_model.modules() if isinstance(m, ModulesToSaveWrapper)]
    assert len(copies) == 2 * peft_model.config.num_hidden_layers + 1
    trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trained == expected_trainable("lora", peft_model.config, 0) + sum(c.weight.numel() for c in copies)


def test_lora_dropout_and_alpha_reach_the_layers_and_the_saved_adapter(tiny_model_dir, tiny_tokenizer, tmp_path):
    """adapter.dropout and adapter.alpha are the run's, not peft's defaults (dropout 0, alpha 8): every
    adapted layer drops its input with p = 0.1 and scales by alpha / r = 16 / 4, and the saved
    adapter_config.json says so (what a server loading the adapter applies)."""
    from peft.tuners.lora import LoraLayer

    from tunesmith.methods.common import save_trained

    model = trainable(load_model(str(tiny_model_dir)), AdapterConfig(r=4, alpha=16, dropout=0.1))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(isinstance(m.lora_dropout["default"], torch.nn.Dropout) for m in layers)
    assert {m.lora_dropout["default"].p for m in layers} == {0.1}
    assert {m.scaling["default"] for m in layers} == {4.0}
    save_trained(model, tiny_tokenizer, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"]) == (4, 16, 0.1)


def test_full_fine_tune_of_a_bf16_model_is_mixed_precision(tiny_model_dir, tiny_tokenizer):
    """fp32 master weights (small updates are not rounded away), bf16 matmuls."""
    from tunesmith.data.demo import make_splits

    rows = make_splits(2, seed=6, validation_size=0, test_size=0)["train"]
    batch = collate([encode(tiny_tokenizer, r["messages"]) for r in rows], tiny_tokenizer.pad_token_id)
    model = trainable(load_model(str(tiny_model_dir), torch.bfloat16), AdapterConfig(method="full"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    seen = []
    model.get_decoder().layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    total, count = label_loss_sum(model, batch)
    (total / count).backward()
    assert seen == [torch.bfloat16]
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.AdamW(model.parameters(), lr=1e-5).step()
    changed = sum(int((p != b).sum()) for p, b in zip(model.parameters(), before))
    assert changed > 0.9 * sum(b.numel() for b in before)  # in bf16 most of these updates would round away


def test_a_full_fine_tune_in_bf16_builds_without_weights_and_casts_where_its_inputs_are(tiny_model_dir, tiny_tokenizer):
    """Autocast was fixed to the device the weights were on when the method applied: FSDP2 builds the
    model on the meta device (autocast refused 'meta': every bf16 full fine-tune with train.fsdp failed
    at its start) and rank 0 makes its copy trainable on the CPU before it may move to its GPU."""
    from tunesmith.config import validate
    from tunesmith.data.demo import make_splits
    from tunesmith import methods
    from tunesmith.training import sharded_start

    cfg = validate({"model": {"name": str(tiny_model_dir), "dtype": "bfloat16"}, "adapter": {"method": "full"}})
    skeleton = sharded_start.skeleton(cfg, methods.get("full"), torch.bfloat16)
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    assert {p.dtype for p in skeleton.parameters()} == {torch.float32}
    model = trainable(load_model(str(tiny_model_dir), torch.bfloat16), AdapterConfig(method="full"), fast_paths=False)
    rows = make_splits(2, seed=6, validation_size=0, test_size=0)["train"]
    seen = []
    model.get_decoder().layers[0].mlp.register_forward_hook(lambda m, i, out: seen.append(torch.is_autocast_enabled("cpu")))
    label_loss_sum(model, collate([encode(tiny_tokenizer, r["messages"]) for r in rows], tiny_tokenizer.pad_token_id))
    assert seen == [True] and not torch.is_autocast_enabled("cpu")  # on inside the forward only


@pytest.mark.parametrize("method", ["lora", "qlora", "dora"])
def test_bf16_adapters_keep_weights_gradients_and_adam_states_in_bf16(method, arch_dirs, data_files, tmp_path):
    """adapter.dtype=bfloat16 (TRL's QLoRA set-up): the adapters, their gradients and AdamW's
    moments in bf16 (DoRA's magnitudes stay fp32), the run trains, the saved adapter reloads with
    plain peft, and the plan counts half the adapter bytes."""
    from tunesmith.config import validate
    from tunesmith.plan import setup_from_config

    config = run_config(arch_dirs["llama"], tmp_path / "run", {"method": method, "dtype": "bfloat16"}, data_files)
    config["model"]["dtype"] = "bfloat16"
    config["train"].update(checkpoint_every=5)
    results = tunesmith.train(config)
    assert results["final_loss"] < results["first_loss"]
    run = Path(results["run_dir"])
    state = torch.load(next(run.glob("checkpoints/*/optim.pt")), weights_only=False)["optimizer"]["state"]
    moments = {state[i]["exp_avg"].dtype for i in state}
    assert moments == ({torch.bfloat16, torch.float32} if method == "dora" else {torch.bfloat16})
    saved = safetensors.torch.load_file(run / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for name, t in saved.items() if "lora_" in name and "magnitude" not in name} == {torch.bfloat16}
    plain = plain_peft_model(arch_dirs["llama"], run / "adapter", quantized=method == "qlora")
    assert plain(**{"input_ids": torch.tensor([[1, 5, 9]])}).logits.isfinite().all()
    setups = [setup_from_config(validate({**config, "adapter": {"method": method, "dtype": dtype}}))
              for dtype in ("float32", "bfloat16")]
    shape = model_shape(str(arch_dirs["llama"]))
    halves = [estimate(shape, setup).parts for setup in setups]
    assert halves[1]["adapter weights"] * 2 == halves[0]["adapter weights"]
    assert halves[1]["optimizer states"] * 2 == halves[0]["optimizer states"]


@pytest.mark.slow  # three short runs: the 10-minute budget of `make test`; in .ci/run's slow set
def test_a_gguf_base_trains_saves_and_merges_and_refuses_qlora_in_one_line(arch_dirs, data_files, tmp_path):
    """transformers leaves a GGUF quantiser on the dequantised model: a full fine-tune's save and every merge
    (`model: RUN`, export) failed with a traceback after training; QLoRA on a GGUF file was a traceback."""
    from tunesmith.export.gguf import write_gguf
    from tunesmith.models import load_tokenizer
    from tunesmith.start import starting_model

    gguf = tmp_path / "tiny.gguf"
    write_gguf(load_model(str(arch_dirs["llama"])), load_tokenizer(str(arch_dirs["llama"])), gguf, quant="f16")
    full = tunesmith.train(run_config(gguf, tmp_path / "full", {"method": "full"}, data_files))
    assert (Path(full["run_dir"]) / "model" / "model.safetensors").exists()
    tunesmith.train(run_config(gguf, tmp_path / "lora", {"method": "lora"}, data_files))
    assert (Path(starting_model(str(tmp_path / "lora"))) / "merge_check.json").exists()
    with pytest.raises(UserError, match="QLoRA quantises a model folder's weights"):
        tunesmith.train(run_config(gguf, tmp_path / "qlora", {"method": "qlora"}, data_files))


def test_layer_names_are_checked_and_bf16_adapters_leave_saved_modules_in_the_bases_dtype(arch_dirs, data_files,
                                                                                         tmp_path):
    """A misspelt target was a peft traceback, a misspelt module to save trained nothing silently; bf16
    adapters on an fp32 base cast the lm_head copy of modules_to_save too, and training failed on a dtype mismatch."""
    for adapter, wrong in (({"target_modules": ["q_prj"]}, "['q_prj'] names no layer"),
                           ({"modules_to_save": ["lmhead"]}, "['lmhead'] names no layer")):
        with pytest.raises(UserError, match=re.escape(wrong)):
            tunesmith.train(run_config(arch_dirs["llama"], tmp_path / "bad", {"method": "lora", **adapter}, data_files))
    config = run_config(arch_dirs["llama"], tmp_path / "bf16", {"method": "lora", "dtype": "bfloat16",
                                                                "modules_to_save": ["lm_head"]}, data_files)
    assert math.isfinite(tunesmith.train(config)["fine_tuned"]["eval_loss"])


@pytest.mark.slow  # three short runs: the 10-minute budget of `make test`; in .ci/run's slow set
def test_overwriting_a_run_removes_its_model_and_exports_and_a_start_from_it_merges_again(arch_dirs, data_files,
                                                                                          tmp_path):
    """A lora run trained again in place as a full fine-tune kept serving its adapter/; `model: RUN` kept the
    merge of the adapter the run held before."""
    from tunesmith.start import starting_model

    run = tmp_path / "run"
    tunesmith.train(run_config(arch_dirs["llama"], run, {"method": "lora"}, data_files))
    first = safetensors.torch.load_file(Path(starting_model(str(run))) / "model.safetensors")
    again = run_config(arch_dirs["llama"], run, {"method": "lora"}, data_files)
    again["train"]["lr"], again["output"]["overwrite"] = 0.1, True
    tunesmith.train(again)
    second = safetensors.torch.load_file(Path(starting_model(str(run))) / "model.safetensors")
    assert any(not torch.equal(first[k], second[k]) for k in first)
    full = run_config(arch_dirs["llama"], run, {"method": "full"}, data_files)
    full["output"]["overwrite"] = True
    tunesmith.train(full)
    assert not (run / "adapter").exists() and type(load_trained(str(run))[0]).__name__ == "LlamaForCausalLM"
