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


def export_peft(run: Path, trained: Path, out: Path, quantized: bool, tolerance: float) -> dict:
    """Copy the adapter weights, config and tokenizer files (with the training chat template), then
    load the copy with plain peft onto the base beside the run's adapter and compare their logits on
    the run's sample conversations: a truncated or missing file, or a config peft reads otherwise,
    shows there, before the folder takes the place of an earlier export."""
    from ..config import load_config
    from ..errors import UserError
    from ..models import load_tokenizer
    from .merge import adapter_model, allowed_difference, logits_of, sample_batch

    config = json.loads((trained / "adapter_config.json").read_text())
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(trained, partial, ignore=shutil.ignore_patterns("*.partial", "README.md"))
    batch = sample_batch(run, load_tokenizer(str(partial)))
    model = adapter_model(load_config(run / "config.yaml").model.name, trained, quantized)
    reference = logits_of(model, batch)
    try:
        model.load_adapter(str(partial), adapter_name="exported")
        model.set_adapter("exported")
        diff = float((logits_of(model, batch) - reference).abs().max())
    except Exception as err:  # noqa: BLE001 (whatever peft makes of a bad folder)
        raise UserError(f"{run}: the exported adapter folder does not load in peft ({type(err).__name__}: "
                        f"{str(err)[:200]}); not exported (left in {partial})") from None
    _, allowed = allowed_difference(reference, tolerance)
    if not diff <= allowed:
        raise UserError(f"{run}: the exported adapter's logits differ from the run's by {diff:.3g} (allowed "
                        f"{allowed:.3g}); not exported (left in {partial})")
    shutil.rmtree(out, ignore_errors=True)
    partial.replace(out)
    found = serving_warnings(config, quantized)
    for text in found:
        warnings.warn(text, UserWarning, stacklevel=2)
    return {"folder": str(out), "base_model": config.get("base_model_name_or_path"), "max_abs_diff": diff,
            "positions": int(batch["attention_mask"].sum()), "warnings": found}
