"""LoRA: low-rank adapters beside the frozen base weights (PEFT); rsLoRA with adapter.use_rslora."""
from .common import Method, add_lora

METHOD = Method(
    name="lora",
    description="low-rank adapters (PEFT) beside the frozen base weights",
    make_trainable=lambda model, cfg: add_lora(model, cfg),
)
