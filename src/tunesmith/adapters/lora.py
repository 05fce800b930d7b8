"""A thin layer over PEFT: build the adapter from the config, count and save what was trained."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import AdapterConfig


def transformer_linear_names(model) -> list[str]:
    """Names of the linear layers inside the transformer blocks (not the LM head or embeddings)."""
    output = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def apply_adapter(model, cfg: AdapterConfig):
    """The model with the configured trainable parts; frozen weights stay in their loaded dtype."""
    if cfg.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    targets = transformer_linear_names(model) if cfg.target_modules == "all-linear" else cfg.target_modules
    lora = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
        use_rslora=cfg.use_rslora, bias="none", task_type="CAUSAL_LM",
    )
    # PEFT keeps the adapter weights in fp32 (autocast_adapter_dtype) even when the base is bf16.
    return get_peft_model(model, lora)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


def save_trained(model, tokenizer, folder: Path) -> None:
    """Adapters as a PEFT folder, full fine-tunes as a transformers folder; both with the tokenizer
    and its chat template, so inference builds the tokens training saw."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def is_adapter_folder(folder: Path) -> bool:
    return (Path(folder) / "adapter_config.json").exists()
