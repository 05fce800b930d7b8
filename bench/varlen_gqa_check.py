"""Does torch's varlen_attn take grouped key/value heads unrepeated (GQA) on this GPU? Forward and
backward against the repeated-heads call, on random bf16 data."""
import torch
from torch.nn.attention.varlen import varlen_attn

torch.manual_seed(0)
lengths = [700, 1300, 48]
cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
T, H, Hkv, D = sum(lengths), 32, 8, 128
q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(T, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(T, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
g = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
ref = varlen_attn(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), cu, cu, max(lengths), max(lengths),
                  window_size=(-1, 0))
ref_grads = torch.autograd.grad(ref, (q, k, v), g)
try:
    out = varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths), window_size=(-1, 0))
    grads = torch.autograd.grad(out, (q, k, v), g)
    rel = lambda a, b: float((a.detach().float() - b.float()).norm() / b.float().norm())
    print("varlen GQA unrepeated: out", rel(out, ref), "grads", [rel(a, b) for a, b in zip(grads, ref_grads)])
except Exception as err:
    print("varlen GQA unrepeated fails:", type(err).__name__, str(err)[:300])
