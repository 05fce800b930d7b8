"""A thin layer over PEFT: make the configured parts trainable, count and save what was trained.

Methods: `lora` (rsLoRA with use_rslora), `dora` (weight-decomposed LoRA), `qlora` (LoRA on a
4-bit NF4 base loaded by models/quant.py) and `full` (every weight).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..config import AdapterConfig
from ..training import attention, fused, lora_linear

MODULES_TO_SAVE_WARNING = ("adapter.modules_to_save is set: vLLM rejects LoRA adapters that carry fully trained "
                           "modules; serve a merged model there (tunesmith export RUN --merge)")


def transformer_linear_names(model) -> list[str]:
    """Names of the linear layers inside the transformer blocks (not the LM head or embeddings).

    bitsandbytes' Linear4bit is an nn.Linear, so a 4-bit base gives the same names."""
    output = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def apply_adapter(model, cfg: AdapterConfig):
    """The model with the configured trainable parts; frozen weights stay in their loaded dtype.

    Norms and MLPs get the leaner training functions of training/fused.py (after PEFT has
    wrapped the model, so copies it makes are patched as themselves), plain LoRA layers the one
    of training/lora_linear.py, and on the CPU attention that of training/attention.py."""
    model = _make_trainable(model, cfg)
    fused.install(model)
    lora_linear.install(model)
    attention.install(model)
    return model


def _make_trainable(model, cfg: AdapterConfig):
    if cfg.method == "full":
        return make_fully_trainable(model, cfg)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        # peft's advice for k-bit bases: freeze everything, norms and embeddings to fp32.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.modules_to_save:
        warnings.warn(MODULES_TO_SAVE_WARNING, UserWarning, stacklevel=2)
    targets = transformer_linear_names(model) if cfg.target_modules == "all-linear" else cfg.target_modules
    lora = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
        use_rslora=cfg.use_rslora, use_dora=cfg.method == "dora", modules_to_save=cfg.modules_to_save or None,
        bias="none", task_type="CAUSAL_LM",
    )
    # PEFT keeps the adapter weights in fp32 (autocast_adapter_dtype) even when the base is bf16.
    return get_peft_model(model, lora)


def make_fully_trainable(model, cfg: AdapterConfig):
    low = next(model.parameters()).dtype
    if low in (torch.bfloat16, torch.float16):
        # Mixed precision: AdamW updates of a few 1e-5 vanish when added to bf16 weights (8-bit
        # mantissa), so the weights become fp32 and the matmuls stay in the low dtype (autocast).
        model.float()
        device = next(model.parameters()).device.type
        for module in (model.get_decoder(), model.get_output_embeddings()):
            module.forward = torch.autocast(device, dtype=low)(module.forward)
    for param in model.parameters():
        param.requires_grad_(True)
    if cfg.freeze_embeddings:
        # With tied embeddings this also freezes the LM head: they are one tensor.
        model.get_input_embeddings().weight.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def parameter_count(param) -> int:
    """Logical number of weights; a 4-bit parameter packs two weights per byte."""
    state = getattr(param, "quant_state", None)
    return state.shape.numel() if state is not None else param.numel()


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in model.parameters())
    return trainable, total


def model_bytes(model) -> int:
    """Memory of the model's weights and buffers as loaded (4-bit weights with their block scales)."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    size += sum(b.numel() * b.element_size() for b in model.buffers())
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is not None:
            size += sum(t.numel() * t.element_size() for t in state.as_dict(packed=True).values()
                        if isinstance(t, torch.Tensor))
    return size


def save_trained(model, tokenizer, folder: Path) -> None:
    """Adapters as a PEFT folder, full fine-tunes as a transformers folder; both with the tokenizer
    and its chat template, so inference builds the tokens training saw."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def is_adapter_folder(folder: Path) -> bool:
    return (Path(folder) / "adapter_config.json").exists()
