"""What the methods share: the Method record, and the PEFT and full-weight ways of making a
model trainable, counting and saving what was trained. torch and peft are imported where used,
so the registry stays importable by the config alone."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import UserError
from ..permissions import as_umask_allows

if TYPE_CHECKING:
    from ..config import AdapterConfig

ADAPTER_DIR = "adapter"  # what an adapter method saves: a PEFT adapter folder + tokenizer
MODEL_DIR = "model"  # what full fine-tuning saves: a transformers model folder + tokenizer

MODULES_TO_SAVE_WARNING = ("adapter.modules_to_save is set: vLLM rejects LoRA adapters that carry fully trained "
                           "modules; serve a merged model there (tunesmith export RUN --merge)")


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    make_trainable: Callable  # (model, AdapterConfig) -> the model with the configured parts trainable
    quantized_base: bool = False  # the frozen base is loaded as 4-bit NF4 (bitsandbytes)
    trains_all_weights: bool = False  # every weight trains: saved as a model folder, fp32 master weights
    weight_norms: bool = False  # DoRA: a magnitude vector per adapted layer (plan: its memory)

    @property
    def saves(self) -> str:
        """The run folder's sub-folder of the trained weights."""
        return MODEL_DIR if self.trains_all_weights else ADAPTER_DIR

    def load_base(self, spec: str, dtype, device=None, trust_remote_code: bool = False):
        """The frozen base on `device`: NF4 with `dtype` as compute dtype, or as stored in `dtype`."""
        from ..models import load_base

        return load_base(spec, dtype, self.quantized_base, trust_remote_code, device)


def transformer_linear_names(model) -> list[str]:
    """Names of the linear layers inside the transformer blocks (not the LM head or embeddings).

    bitsandbytes' Linear4bit is an nn.Linear, so a 4-bit base gives the same names."""
    import torch

    output = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def add_lora(model, cfg: "AdapterConfig", dora: bool = False):
    """PEFT LoRA (or DoRA) adapters on the configured layers; the base stays frozen in its dtype."""
    from peft import LoraConfig, get_peft_model

    if cfg.gradient_checkpointing is True:  # 'auto': training/checkpointing.py, once the data is known
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # the checkpointed blocks' inputs need a grad path to the adapters
    if cfg.modules_to_save:
        warnings.warn(MODULES_TO_SAVE_WARNING, UserWarning, stacklevel=2)
    targets = transformer_linear_names(model) if cfg.target_modules == "all-linear" else cfg.target_modules
    check_module_names(model, targets, cfg.modules_to_save)
    lora = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
        use_rslora=cfg.use_rslora, use_dora=dora, modules_to_save=cfg.modules_to_save or None,
        bias="none", task_type="CAUSAL_LM",
    )
    # PEFT keeps the adapter weights in fp32 (autocast_adapter_dtype) even when the base is bf16.
    model = get_peft_model(model, lora)
    if cfg.dtype == "bfloat16":
        import torch

        for name, param in model.named_parameters():
            # DoRA's magnitudes move by less than bf16 can hold (TRL keeps them fp32 too, trl#7268); the
            # copies of modules_to_save run in the base's dtype, on its hidden states
            if param.requires_grad and "lora_" in name and "lora_magnitude_vector" not in name:
                param.data = param.data.to(torch.bfloat16)
    return model


def check_module_names(model, targets: list[str], to_save: list[str] | None) -> None:
    """Each adapter.target_modules and modules_to_save name is a layer of the model (peft fails on a
    misspelt target with a traceback, and silently trains nothing for a misspelt module to save)."""
    names = [name for name, _ in model.named_modules() if name]
    for setting, wanted in (("adapter.target_modules", targets), ("adapter.modules_to_save", to_save or [])):
        unknown = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in names)]
        if unknown or (setting == "adapter.target_modules" and not wanted):
            linear = sorted(transformer_linear_names(model))
            raise UserError(f"{setting}: {unknown or 'an empty list'} names no layer of this model; its linear layers "
                            f"are {linear}" + (", and lm_head, embed_tokens" if setting.endswith("save") else ""))


def make_fully_trainable(model, cfg: "AdapterConfig"):
    import torch

    low = next(model.parameters()).dtype
    if low in (torch.bfloat16, torch.float16):
        # Mixed precision: AdamW updates of a few 1e-5 vanish when added to bf16 weights (8-bit
        # mantissa), so the weights become fp32 and the matmuls stay in the low dtype (autocast).
        model.float()
        for module in (model.get_decoder(), model.get_output_embeddings()):
            module.forward = _autocast_forward(module.forward, low)
    for param in model.parameters():
        param.requires_grad_(True)
    if cfg.freeze_embeddings:
        # With tied embeddings this also freezes the LM head: they are one tensor.
        model.get_input_embeddings().weight.requires_grad_(False)
    if cfg.gradient_checkpointing is True:  # 'auto': training/checkpointing.py, once the data is known
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def _autocast_forward(forward, dtype):
    """`forward` under autocast to `dtype` on the device its inputs are on, known only at the call: a
    sharded run builds the model on the meta device, and rank 0 makes its copy trainable on the CPU."""
    import torch

    def run(*args, **kwargs):
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device, dtype=dtype):
            return forward(*args, **kwargs)

    return run


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
    import torch

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
    with warnings.catch_warnings():
        # peft looks for the base's config.json to see whether the vocabulary grew; a base read from
        # a .gguf file has none beside it, and tunesmith never resizes the embeddings.
        warnings.filterwarnings("ignore", message="Could not find a config file in", category=UserWarning)
        model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    as_umask_allows(folder)
