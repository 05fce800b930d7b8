"""The adapter folder as vLLM and TGI load it, with warnings for settings they reject."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

from ..methods.common import MODULES_TO_SAVE_WARNING

VLLM_DEFAULT_MAX_RANK = 16  # vLLM's --max-lora-rank default
SERVED_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def serving_warnings(adapter_config: dict, quantized: bool) -> list[str]:
    """What vLLM / TGI reject or treat differently, read from adapter_config.json."""
    found = []
    if adapter_config.get("modules_to_save"):
        found.append(MODULES_TO_SAVE_WARNING)
    if adapter_config.get("use_dora"):
        found.append("DoRA adapter: vLLM and TGI do not load DoRA; serve the merged model (--format hf or gguf)")
    rank = max([adapter_config.get("r", 0), *(adapter_config.get("rank_pattern") or {}).values()])
    if rank > VLLM_DEFAULT_MAX_RANK:
        found.append(f"rank {rank} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}; "
                     f"start vLLM with --max-lora-rank {rank} or higher")
    if adapter_config.get("bias", "none") != "none":
        found.append(f"adapter trains biases (bias={adapter_config['bias']}); vLLM and TGI ignore or reject them")
    targets = adapter_config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    unusual = sorted(set(targets) - SERVED_TARGETS)
    if unusual:
        found.append(f"target modules {unusual} are outside the attention/MLP projections TGI serves adapters on")
    if quantized:
        found.append("QLoRA adapter: trained on the 4-bit NF4 base; served on a bf16/fp16 base its outputs differ "
                     "slightly (the merged --format hf export is exact)")
    return found


def export_peft(trained: Path, out: Path, quantized: bool) -> dict:
    """Copy the adapter weights, config and tokenizer files (with the training chat template)."""
    config = json.loads((trained / "adapter_config.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(trained, out, ignore=shutil.ignore_patterns("*.partial", "README.md"))
    found = serving_warnings(config, quantized)
    for text in found:
        warnings.warn(text, UserWarning, stacklevel=2)
    return {"folder": str(out), "base_model": config.get("base_model_name_or_path"), "warnings": found}
