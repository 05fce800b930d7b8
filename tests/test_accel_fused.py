"""accel/rmsnorm.py, swiglu.py, rotary.py and compile.py: the same results as transformers' own
modules, less kept for the backward pass, and an eager fallback when compiling fails."""
import pytest
import torch

from helpers import assert_same_gradients, build_model, demo_examples, lora_model
from tunesmith.accel import families, rmsnorm, rotary, swiglu
from tunesmith.data.collate import collate
from tunesmith.models import load_model
from tunesmith.training.loss import label_loss_sum


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_and_mlp_equal_transformers(tiny_model_dir, tiny_tokenizer, dtype):
    """accel/rmsnorm.py and swiglu.py (with rotary.py): the loss equals the one through transformers' RMSNorm and MLP (in bf16
    within rounding: the compiled kernels round once where eager rounds after every op), the
    gradients of every weight (full fine-tune) match autograd's through the originals, and the
    model really runs the patched functions."""
    batch = collate(demo_examples(tiny_tokenizer, 4), tiny_tokenizer.pad_token_id)
    results = []
    for patch in (False, True):
        torch.manual_seed(0)
        model = load_model(str(tiny_model_dir), dtype)
        for p in model.parameters():
            p.requires_grad_(True)
        if patch:  # two norms, the MLP and the attention of every layer, and the final norm
            installed = rmsnorm.install(model) + swiglu.install(model) + rotary.install(model)
            assert installed == 4 * model.config.num_hidden_layers + 1
        total, _ = label_loss_sum(model, batch)
        total.backward()
        results.append((total.detach(), {n: p.grad.float() for n, p in model.named_parameters()}))
    (plain, plain_grads), (lean, lean_grads) = results
    assert torch.allclose(plain, lean, rtol=1e-6 if dtype == torch.float32 else 2e-3)
    assert_same_gradients(plain_grads, lean_grads, 1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_rotary_attention_equals_transformers(tmp_path, tiny_tokenizer, arch, dtype, tolerance):
    """The attention modules' forward with the compiled rotary embedding: transformers' loss and
    the gradients of every weight (full fine-tune, so the rotary backward reaches q_proj, k_proj
    and Qwen3's q/k norms), for each architecture it is installed on; inference (no gradient)
    runs transformers' own forward."""
    build_model(tmp_path, arch, vocab=len(tiny_tokenizer), seed=2)
    batch = collate(demo_examples(tiny_tokenizer, 4), tiny_tokenizer.pad_token_id)
    results, calls = [], []
    original = rotary.Rotary.apply
    rotary.Rotary.apply = lambda *args: calls.append(1) or original(*args)
    try:
        for patch in (False, True):
            model = load_model(str(tmp_path), dtype)
            model.requires_grad_(True)
            if patch:
                assert rotary.install(model) == model.config.num_hidden_layers
                with torch.no_grad():
                    label_loss_sum(model, batch)
                assert not calls  # no gradient: transformers' forward
            total, _ = label_loss_sum(model, batch)
            total.backward()
            results.append((total.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}))
    finally:
        rotary.Rotary.apply = original
    assert len(calls) == model.config.num_hidden_layers
    (plain, plain_grads), (fast, fast_grads) = results
    assert torch.allclose(plain, fast, rtol=tolerance / 10)
    assert_same_gradients(plain_grads, fast_grads, tolerance)


def test_fused_functions_keep_fewer_bytes(tiny_model_dir, tiny_tokenizer):
    """The point of the patch: a bf16 LoRA forward keeps less for the backward pass."""
    batch = collate(demo_examples(tiny_tokenizer, 4), tiny_tokenizer.pad_token_id)
    known = families.known()
    kept = []
    for patch in (False, True):
        model = lora_model(load_model(str(tiny_model_dir), torch.bfloat16))
        if not patch:  # trainable installed them: put the originals back
            for module in model.modules():
                if type(module) in known["norm"] + known["mlp"] + known["attention"]:
                    del module.forward
        sizes = {}

        def pack(tensor):
            sizes[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            label_loss_sum(model, batch)
        kept.append(sum(sizes.values()))
    assert kept[1] < 0.85 * kept[0]


def test_a_failing_compiler_falls_back_to_eager(monkeypatch):
    """Without a working C++ toolchain torch.compile fails at the first call: the function then
    runs eagerly, with one warning, and keeps giving the same results."""
    from tunesmith.accel.compile import compiled

    from torch._inductor.exc import InvalidCxxCompiler

    try:  # what inductor raises without a C++ compiler: torch 2.13 names the compiler, 2.11 takes no argument
        missing = InvalidCxxCompiler("/nonexistent/g++")
    except TypeError:
        missing = InvalidCxxCompiler()

    def broken(fn, **kwargs):
        def call(*args):
            raise missing
        return call

    monkeypatch.setattr(torch, "compile", broken)
    square_sum = compiled(lambda x: (x * x).sum())
    x = torch.arange(4.0)
    with pytest.warns(RuntimeWarning, match="InvalidCxxCompiler"):
        assert float(square_sum(x)) == 14.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        assert float(square_sum(x)) == 14.0


def test_without_a_cpp_compiler_torch_compile_fails_and_falls_back(tmp_path):
    """The real failure, not a stand-in: inductor with no C++ compiler (and an empty cache) raises
    one of accel/compile.py compiler_errors(), so the function runs eagerly with one warning."""
    import os
    import subprocess
    import sys

    script = ("import warnings, torch\n"
              "from tunesmith.accel.compile import compiled\n"
              "f = compiled(lambda x: (x * 2).sin().sum())\n"
              "with warnings.catch_warnings(record=True) as seen:\n"
              "    warnings.simplefilter('always')\n"
              "    value = float(f(torch.ones(8)))\n"
              "print(round(value, 4), f.state['fast'], [str(w.message).split(';')[0] for w in seen if w.category is RuntimeWarning])\n")
    env = {**os.environ, "CXX": "/nonexistent/g++", "CC": "/nonexistent/gcc",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TUNESMITH_COMPILE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = round(float((torch.ones(8) * 2).sin().sum()), 4)
    assert done.stdout.strip() == f"{expected} False ['torch.compile failed for <lambda>']", done.stdout


@pytest.mark.parametrize("error", ["shape", "memory"])
def test_errors_of_the_function_are_not_taken_for_compiler_failures(error):
    """A shape bug or an out-of-memory error in a compiled function reaches the caller as such, with
    no 'compile failed' warning, and compiling stays on (it used to be turned off for good)."""
    import warnings

    from tunesmith.accel.compile import compiled

    def product(x, y):
        return x @ y

    def allocate(x):
        raise torch.OutOfMemoryError("CPU out of memory: tried to allocate 80 GiB")

    function = compiled(product if error == "shape" else allocate)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a 'torch.compile failed' warning would raise here
        if error == "shape":
            with pytest.raises(RuntimeError, match="same reduction dim|size mismatch|shapes cannot be multiplied"):
                function(torch.ones(3, 4), torch.ones(5, 6))
            assert function.state["fast"] is not False
            assert torch.equal(function(torch.ones(3, 4), torch.ones(4, 2)), torch.full((3, 2), 4.0))
        else:
            with pytest.raises(torch.OutOfMemoryError):
                function(torch.ones(3))
    assert function.state["fast"] is not False
