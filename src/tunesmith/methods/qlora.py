"""QLoRA: LoRA adapters on a frozen 4-bit NF4 base (bitsandbytes, double quantisation).

peft's prepare_model_for_kbit_training is not used: it turns norms, embeddings and the LM head
to fp32, and with them the whole residual stream, so on the default model QLoRA peaked at 3.3 GiB
against LoRA's 1.4 GiB. Here the non-quantised weights stay in the compute dtype (the RMSNorm
itself normalises in fp32) and only the adapters are fp32, so QLoRA needs less than LoRA.
"""
from .common import Method, add_lora


def _freeze_and_add(model, cfg):
    from ..models.quant import keep_unpacked

    keep_unpacked(model)  # the base is evaluated before it trains: its 4-bit products must keep their backward
    for param in model.parameters():
        param.requires_grad_(False)
    return add_lora(model, cfg)


METHOD = Method(
    name="qlora",
    description="LoRA on a 4-bit NF4 base (bitsandbytes, double quantisation)",
    make_trainable=_freeze_and_add,
    quantized_base=True,
)
