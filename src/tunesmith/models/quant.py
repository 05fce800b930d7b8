"""4-bit base weights for QLoRA: bitsandbytes NF4 with double quantisation.

The frozen base is stored as NF4 (about half a byte per weight, plus a quantised scale per block
of 64); matrix products run in the compute dtype (bf16 where the hardware runs it fast). The
CPU backend of bitsandbytes does this without a GPU.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .load import hub_options, resolve_model_path


def nf4_config(compute: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def require_bitsandbytes() -> None:
    """Import bitsandbytes (about 120 MiB resident on the CPU), or say how to install it."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("adapter.method=qlora needs bitsandbytes: pip install 'tunesmith[qlora]'") from None


def load_quantized(spec: str, compute: torch.dtype = torch.bfloat16, trust_remote_code: bool = False,
                   device: torch.device | str | None = None):
    """The base model on `device` (default: the first CUDA device where there is one, else the
    CPU) with every linear layer of the transformer blocks in NF4 (the LM head stays as is)."""
    require_bitsandbytes()
    from transformers import AutoModelForCausalLM

    where, gguf = resolve_model_path(spec)
    if gguf:
        raise UserError(f"{spec}: QLoRA quantises a model folder's weights to NF4; transformers cannot do that to a "
                        "GGUF file: name the model's hub id or folder, or use adapter.method: lora")
    if device is None:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(  # a single-device map: every layer on the run's device
            where, gguf_file=gguf, quantization_config=nf4_config(compute), device_map={"": str(device)},
            dtype=torch.float32 if compute == torch.float32 else compute, trust_remote_code=trust_remote_code,
            **hub_options(where))
    except OSError as err:
        raise UserError(f"{spec}: cannot load model ({str(err).splitlines()[0]})") from None
    if compute == torch.float32:
        keep_unpacked(model)
    own_unquantized(model)
    model.eval()
    return model


def own_unquantized(model) -> None:
    """Give the weights left unquantised (embeddings, norms) memory of their own.

    Loaded in the checkpoint's own dtype they stay views into the memory-mapped safetensors file,
    and that one reference keeps the whole mapping alive, with every page that quantising the other
    layers read: on the default model in fp32, 405 MiB resident for 113 MiB of weights. Copied, the
    mapping closes and QLoRA holds what it stores."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and tensor.dtype.is_floating_point:
            tensor.data = tensor.data.clone()


def quantized_layers(model):
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def keep_unpacked(model) -> None:
    """Turn off bitsandbytes' packed CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights on the first no-grad forward in
    eval mode and multiplies in bf16, even when fp32 compute was asked for; and a packed layer's
    product has no backward, so a model that trains after such a forward (its base evaluation)
    would get no input gradient through its frozen layers. With it off, results equal the
    dequantised weights times the input: evaluation, reloads and merge checks agree with training.
    """
    for layer in quantized_layers(model):
        layer.support_avx512bf16_for_cpu = False


def dequantize(model) -> None:
    """Replace every 4-bit layer by a full-precision nn.Linear holding the dequantised weights, in place.

    The weights are exactly what the 4-bit layers compute with, so an adapter trained on the 4-bit
    base can be merged into them (merging into 4-bit would round the update away)."""
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

    for layer in quantized_layers(model):
        weight = layer.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # The CPU inference layout is not what dequantisation reads: convert it back first.
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    model.dequantize()
    model.float()


def load_base(spec: str, dtype: torch.dtype, quantize: bool = False, trust_remote_code: bool = False,
              device: torch.device | str | None = None):
    """The frozen base on `device`: NF4 with `dtype` as compute dtype (QLoRA), else as stored in `dtype`."""
    if quantize:
        return load_quantized(spec, dtype, trust_remote_code, device)
    from .load import load_model

    return load_model(spec, dtype, trust_remote_code, device)
