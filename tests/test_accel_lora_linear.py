"""accel/lora_linear.py: PEFT's results where it applies, PEFT's own forward where it does not."""
import pytest
import torch

from helpers import assert_same_gradients, demo_examples, lora_model
from tunesmith.accel import lora_linear
from tunesmith.data.collate import collate
from tunesmith.device import to_device
from tunesmith.models import load_model
from tunesmith.training.loss import label_loss_sum


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_lora_layers_equal_peft(tiny_model_dir, tiny_tokenizer, dtype, tolerance):
    """The fused layers: the same loss, adapter gradients and input gradients as PEFT's
    own forward, on every LoRA layer of the model."""
    batch = collate(demo_examples(tiny_tokenizer, 4), tiny_tokenizer.pad_token_id)
    results = []
    for fused_layers in (False, True):
        model = lora_model(load_model(str(tiny_model_dir), dtype))
        patched = [m for m in model.modules() if "forward" in vars(m) and hasattr(m, "lora_A")]
        assert len(patched) == 7 * model.config.num_hidden_layers
        if not fused_layers:
            for module in patched:
                del module.forward
        embeddings = model.get_input_embeddings()
        embeddings.weight.requires_grad_(True)  # so the input gradient of the first layer is checked too
        total, _ = label_loss_sum(model, batch)
        total.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        results.append((total.detach().float(), grads))
    (plain, plain_grads), (fast, fast_grads) = results
    assert torch.allclose(plain, fast, rtol=tolerance)
    assert_same_gradients(plain_grads, fast_grads, tolerance)
    assert lora_linear.install(torch.nn.Linear(3, 3)) == 0


def test_fused_lora_layers_step_aside_where_peft_differs(tiny_model_dir, tiny_tokenizer):
    """Dropout, DoRA and disabled adapters are PEFT's own; a plain layer with adapters disabled
    gives the base model's output."""
    from peft import LoraConfig, get_peft_model

    model = load_model(str(tiny_model_dir))
    for config in (LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj"]),
                   LoraConfig(r=4, use_dora=True, target_modules=["q_proj"])):
        assert lora_linear.install(get_peft_model(load_model(str(tiny_model_dir)), config)) == 0
    batch = collate(demo_examples(tiny_tokenizer, 2), tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        base, _ = label_loss_sum(model, batch)
        tuned = lora_model(load_model(str(tiny_model_dir)))
        adapted, _ = label_loss_sum(tuned, batch)
        with tuned.disable_adapter():
            disabled, _ = label_loss_sum(tuned, batch)
    assert not torch.allclose(adapted, base)
    assert torch.allclose(disabled, base, rtol=1e-6)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_layers_on_a_4bit_base_equal_peft(tiny_model_dir, tiny_tokenizer, dtype, tolerance):
    """QLoRA: the fused layer over bitsandbytes' NF4 base (weight dequantised for the product)
    gives PEFT's loss and gradients, and is what a QLoRA model trains through."""
    pytest.importorskip("bitsandbytes")
    from helpers import trainable
    from tunesmith.config import AdapterConfig
    from tunesmith.models import load_quantized

    batch = collate(demo_examples(tiny_tokenizer, 4), tiny_tokenizer.pad_token_id)
    results = []
    for fused_layers in (False, True):
        torch.manual_seed(0)
        model = trainable(load_quantized(str(tiny_model_dir), dtype), AdapterConfig(method="qlora", r=4),
                          fast_paths=False)
        if fused_layers:
            lora_linear.install(model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        patched = [m for m in model.modules() if "forward" in vars(m) and hasattr(m, "lora_A")]
        assert len(patched) == (7 * model.config.num_hidden_layers if fused_layers else 0)
        model.get_input_embeddings().weight.requires_grad_(True)  # the input gradient of the first layer too
        total, _ = label_loss_sum(model, to_device(batch, model.get_input_embeddings().weight.device))  # 4-bit: GPU where there is one
        total.backward()
        results.append((total.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()
                                                 if p.requires_grad}))
    (plain, plain_grads), (fast, fast_grads) = results
    assert torch.allclose(plain, fast, rtol=tolerance)
    if dtype == torch.float32:
        assert_same_gradients(plain_grads, fast_grads, tolerance)
    else:  # bf16 rounds at other places: the gradients as a whole within 1%
        difference = sum(float(((fast_grads[k] - g) ** 2).sum()) for k, g in plain_grads.items()) ** 0.5
        assert difference / sum(float((g ** 2).sum()) for g in plain_grads.values()) ** 0.5 < tolerance / 2
