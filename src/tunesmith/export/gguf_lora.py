"""A LoRA adapter as a GGUF adapter file that llama.cpp applies to the base model's GGUF
(`llama-cli -m base-f16.gguf --lora adapter-f16.gguf`, Ollama `ADAPTER`).

As llama.cpp's convert_lora_to_gguf.py lays it out: general.type `adapter`, adapter.type `lora`,
adapter.lora.alpha, and for each adapted weight `<GGUF name>.lora_a` (r x in) and `.lora_b` (out x r),
named by the same HF -> GGUF map as the base file; `lora_b` of the q/k projections gets the base's row
permutation (the rows of B are output rows). llama.cpp scales by alpha / r, so an rsLoRA adapter
(alpha / sqrt(r)) is written with alpha x sqrt(r). Checked in llama.cpp where it is installed (base +
adapter logits against the adapter model's), else by reading the file back and applying it by hand.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .gguf import PERMUTED, gguf_architecture, gguf_names, rope_from_ggml, rope_to_ggml


def lora_tensors(base, adapter_dir: Path) -> tuple[dict[str, np.ndarray], float]:
    """(GGUF tensor name -> fp32 array, alpha as llama.cpp reads it) of a PEFT LoRA adapter on `base`."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("use_dora") or config.get("modules_to_save") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError("GGUF LoRA adapter: DoRA, modules_to_save and per-module ranks have no llama.cpp adapter form; "
                        "export the merged model (--format gguf)")
    r, alpha = config["r"], config["lora_alpha"]
    alpha = alpha * math.sqrt(r) if config.get("use_rslora") else alpha
    arch = gguf_architecture(base.config)
    names = dict(gguf_names(base, arch))
    heads = {"attn_q": base.config.num_attention_heads, "attn_k": base.config.num_key_value_heads}
    out = {}
    for key, tensor in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        name = names.get(f"{module}.weight")
        if name is None:
            raise UserError(f"GGUF LoRA adapter: no GGUF name for adapted weight '{module}'")
        tensor = tensor.float()
        kind = name.split(".")[-2]
        if part == "B.weight" and arch in PERMUTED and kind in heads:
            tensor = rope_to_ggml(tensor, heads[kind])
        out[f"{name}.lora_{part[0].lower()}"] = tensor.numpy()
    return out, float(alpha)


def write_lora_gguf(base, adapter_dir: Path, path: Path) -> Path:
    import gguf

    tensors, alpha = lora_tensors(base, adapter_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), gguf_architecture(base.config))
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, data in tensors.items():
        writer.add_tensor(name, data.astype(np.float16) if data.shape[-1] % 32 == 0 else data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def applied_by_hand(base, path: Path) -> torch.nn.Module:
    """`base` with the adapter file's low-rank updates added to its weights (read with gguf's reader)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    alpha = float(reader.fields["adapter.lora.alpha"].parts[-1][0])
    stored = {t.name: np.array(dequantize(t.data, t.tensor_type), dtype=np.float32) for t in reader.tensors}
    arch = gguf_architecture(base.config)
    heads = {"attn_q": base.config.num_attention_heads, "attn_k": base.config.num_key_value_heads}
    state = base.state_dict()
    with torch.no_grad():
        for hf_name, name in gguf_names(base, arch):
            if f"{name}.lora_a" not in stored:
                continue
            a, b = (torch.from_numpy(stored[f"{name}.lora_{x}"]) for x in "ab")
            b = b.reshape(state[hf_name].shape[0], -1)
            kind = name.split(".")[-2]
            if arch in PERMUTED and kind in heads:
                b = rope_from_ggml(b, heads[kind])
            a = a.reshape(b.shape[1], -1)
            state[hf_name] += alpha / a.shape[0] * (b @ a)
    base.load_state_dict(state)
    return base
