"""DoRA: weight-decomposed LoRA (PEFT use_dora): a trained magnitude per output beside the adapters."""
from .common import Method, add_lora

METHOD = Method(
    name="dora",
    description="weight-decomposed LoRA (PEFT use_dora)",
    make_trainable=lambda model, cfg: add_lora(model, cfg, dora=True),
    weight_norms=True,
)
