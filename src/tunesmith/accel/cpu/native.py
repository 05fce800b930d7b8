"""Native CPU attention for padding-free rows (kernels/attention.c), built on first use.

accel/cpu/attention.py computes a padding-free row's attention from batched matmuls: torch's
matmuls are fast, but with a head size of 64 each is small, and around them the scores make
several passes through memory (softmax, its recomputation and gradient) and the masked upper
triangle is multiplied by the block. On the default model that was about a fifth of a training
step. The C kernel keeps tiles of 8 queries x 32 keys in registers (AVX512-BF16 dot products,
fp32 sums, online softmax; the backward recomputes the probabilities from the log-sum-exp, as
flash attention does), skips the masked tiles and stores no score matrix. One layer's forward +
backward on one micro-batch's sequences (489 ... 69 tokens, 9 heads, 3 key/value heads, 2
threads, alternating in one process): 50.5 ms with the batched matmuls, 19.4 ms with the kernel;
the bench's training speed went 367 -> 426 tokens/s.

It is compiled by the system C compiler (`cc`, or $CC) for this processor (-march=native), once
per head size, into a cache folder ($TUNESMITH_CACHE, default ~/.cache/tunesmith), and checked
against a plain computation once per process before it is used. It runs where the processor has
AVX512-BF16, the attention is bf16 and the head size is 64, 96 or 128, and where, timed once per
attention shape on this machine, it is faster than the batched matmuls (on processors with AMX,
torch's matmuls are much faster than these AVX-512 dot products). TUNESMITH_NATIVE=0 turns it
off, =1 skips the timing. Anything else runs accel/cpu/attention.py's matmuls unchanged.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels") / "attention.c"
HEAD_DIMS = (64, 96, 128)
_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float


def _setting() -> str:
    return os.environ.get("TUNESMITH_NATIVE", "auto")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def supported(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernel can run here for this attention (not whether it is built or chosen)."""
    return (_setting() != "0" and dtype == torch.bfloat16 and head_dim in HEAD_DIMS
            and platform.machine() in ("x86_64", "AMD64") and {"avx512f", "avx512bw", "avx512_bf16"} <= _cpu_flags()
            and _compiler() is not None)


def _cache_dir() -> Path:
    return Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith")) / "kernels"


def _build(head_dim: int) -> Path:
    """The shared library for `head_dim`, compiled unless this source, compiler and processor
    already have one in the cache (written under a temporary name, then renamed: concurrent
    ranks never load half a file)."""
    compiler = _compiler()
    flags = ["-O3", "-march=native", "-shared", "-fPIC", f"-DHEAD_DIM={head_dim}"]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, version, " ".join(flags),
                                    " ".join(sorted(_cpu_flags()))]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"attention-{head_dim}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".so")
        os.close(handle)
        try:
            done = subprocess.run([compiler, *flags, "-o", partial, str(SOURCE), "-lm"], capture_output=True,
                                  text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "compiler failed")
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return target


class _Kernel:
    """The library of one head size, with its entry points typed."""

    def __init__(self, path: Path, head_dim: int):
        lib = ctypes.CDLL(str(path))
        self.work_words = getattr(lib, f"work_words_{head_dim}")
        self.work_words.argtypes, self.work_words.restype = [_I, _I], _L
        self.forward = getattr(lib, f"forward_{head_dim}")
        self.forward.argtypes = [_P, _L, _L, _P, _L, _L, _P, _L, _L, _P, _L, _L, _P, _L, _I, _F, _P, _I, _P]
        self.backward = getattr(lib, f"backward_{head_dim}")
        self.backward.argtypes = [_P, _L, _L, _P, _L, _L, _P, _L, _L, _P, _L, _L, _P, _L, _L, _P, _L,
                                  _P, _L, _L, _P, _L, _L, _P, _L, _L, _I, _F, _P, _I, _P]


@functools.lru_cache(maxsize=None)
def kernel(head_dim: int) -> _Kernel | None:
    """The built and checked kernel, or None (after one warning) where building or the check fails."""
    try:
        loaded = _Kernel(_build(head_dim), head_dim)
        _check(loaded, head_dim)
        return loaded
    except Exception as err:  # noqa: BLE001 (no compiler, a failed build or check: the matmul path stays)
        warnings.warn(f"native CPU attention unavailable ({type(err).__name__}: {err}); using batched matmuls",
                      RuntimeWarning, stacklevel=2)
        return None


@torch.enable_grad()  # the reference needs autograd, whatever the caller's mode (an autograd forward runs without)
def _check(loaded: _Kernel, head_dim: int) -> None:
    """Forward and backward of a small case against plain autograd in fp32 (bf16 rounding allowed)."""
    generator = torch.Generator().manual_seed(0)
    lengths, heads, kv = (37, 1, 70), 4, 2
    bounds = _bounds_of(lengths)
    q, k, v = (torch.randn(1, n, sum(lengths), head_dim, generator=generator).to(torch.bfloat16)
               for n in (heads, kv, kv))
    grad = torch.randn(1, sum(lengths), heads, head_dim, generator=generator).to(torch.bfloat16)
    out, lse, parts = _forward(loaded, q, k, v, bounds, head_dim ** -0.5, heads // kv)
    got = (out, *_backward(loaded, q, k, v, out, lse, grad, parts, head_dim ** -0.5, heads // kv))
    exact = [x.float().requires_grad_(True) for x in (q, k, v)]
    reference = torch.cat([_plain(*(x[:, :, a:b] for x in exact), head_dim ** -0.5) for a, b in bounds], 2)
    expected = (reference.transpose(1, 2), *torch.autograd.grad(reference.transpose(1, 2), exact, grad.float()))
    for name, a, e in zip(("output", "dq", "dk", "dv"), got, expected):
        error = float((a.float() - e.detach()).abs().max()) / max(1.0, float(e.detach().abs().max()))
        if not error < 0.05:
            raise RuntimeError(f"self-check failed: {name} off by {error:.3g}")


def _plain(q, k, v, scale: float):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v


def _bounds_of(lengths) -> tuple:
    ends = [0]
    for n in lengths:
        ends.append(ends[-1] + n)
    return tuple(zip(ends[:-1], ends[1:]))


_pool: dict = {}  # workers -> ThreadPoolExecutor
_work: list[torch.Tensor] = []  # one work space per thread, kept (a new one would fault its pages in every call)


def _run(function, parts: list[torch.Tensor], words: int, *args) -> None:
    """`function` over each part's work items, one part per thread (this thread takes the first);
    ctypes lets go of the GIL while the C code runs."""
    while len(_work) < len(parts):
        _work.append(torch.empty(0, dtype=torch.int32))
    for index in range(len(parts)):
        if _work[index].numel() < words:
            _work[index] = torch.empty(words, dtype=torch.int32)

    def call(index: int) -> None:
        items = parts[index]
        function(*args, items.data_ptr(), items.shape[0], _work[index].data_ptr())

    if len(parts) > 1:
        workers = len(parts) - 1
        pool = _pool.get(workers) or _pool.setdefault(workers, ThreadPoolExecutor(workers, "tunesmith-attention"))
        others = [pool.submit(call, index) for index in range(1, len(parts))]
        call(0)
        for future in others:
            future.result()
    else:
        call(0)


def _split(bounds: tuple, kv_heads: int, threads: int) -> list[torch.Tensor]:
    """(start, end, key/value head) work items shared out over the threads, largest first to the
    least loaded (the work grows as the square of the length)."""
    items = sorted(((a, b, h) for a, b in bounds for h in range(kv_heads)), key=lambda x: x[0] - x[1])
    loads, parts = [0] * threads, [[] for _ in range(threads)]
    for item in items:
        least = loads.index(min(loads))
        parts[least].append(item)
        loads[least] += (item[1] - item[0]) ** 2
    return [torch.tensor(part, dtype=torch.int32).reshape(-1, 3) for part in parts if part]


def _strides(x: torch.Tensor) -> tuple[int, int]:
    """(head, token) strides of a [1, heads, tokens, dim] tensor whose last dimension is contiguous."""
    return x.stride(1), x.stride(2)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(loaded: _Kernel, query, key, value, bounds, scale: float, groups: int):
    heads, tokens, dim = query.shape[1:]
    out = query.new_empty(1, tokens, heads, dim)  # the layout the output projection reads
    lse = torch.empty(heads, tokens, dtype=torch.float32)
    parts = _split(bounds, key.shape[1], max(1, torch.get_num_threads()))
    longest = max(b - a for a, b in bounds)
    _run(loaded.forward, parts, loaded.work_words(longest, groups),
         query.data_ptr(), *_strides(query), key.data_ptr(), *_strides(key), value.data_ptr(), *_strides(value),
         out.data_ptr(), out.stride(2), out.stride(1), lse.data_ptr(), lse.stride(0), groups, scale)
    return out, lse, parts


def _backward(loaded: _Kernel, query, key, value, out, lse, grad_out, parts, scale: float, groups: int):
    grad_out = _rows(grad_out)  # [1, tokens, heads, dim]
    grad_q, grad_k, grad_v = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    longest = max(int((p[:, 1] - p[:, 0]).max()) for p in parts)
    _run(loaded.backward, parts, loaded.work_words(longest, groups),
         query.data_ptr(), *_strides(query), key.data_ptr(), *_strides(key), value.data_ptr(), *_strides(value),
         out.data_ptr(), out.stride(2), out.stride(1), grad_out.data_ptr(), grad_out.stride(2), grad_out.stride(1),
         lse.data_ptr(), lse.stride(0), grad_q.data_ptr(), *_strides(grad_q), grad_k.data_ptr(), *_strides(grad_k),
         grad_v.data_ptr(), *_strides(grad_v), groups, scale)
    return grad_q, grad_k, grad_v


class NativeSegmentedAttention(torch.autograd.Function):
    """accel/cpu/attention.py SegmentedAttention's computation (q [1, H, T, D], k, v [1, Hkv, T, D],
    each sequence of `bounds` attending causally to itself -> [1, T, H, D]) by the C kernel."""

    @staticmethod
    def forward(ctx, query, key, value, bounds, scale, groups):
        loaded = kernel(query.shape[-1])
        query, key, value = _rows(query), _rows(key), _rows(value)
        out, lse, parts = _forward(loaded, query, key, value, bounds, scale, groups)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.loaded, ctx.parts, ctx.scale, ctx.groups = loaded, parts, scale, groups
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        return *_backward(ctx.loaded, query, key, value, out, lse, grad_out, ctx.parts, ctx.scale, ctx.groups), \
            None, None, None


_decided: dict = {}  # (heads, kv_heads, head_dim) -> whether the kernel runs


def chosen(heads: int, kv_heads: int, head_dim: int, baseline) -> bool:
    """Whether a bf16 padding-free attention of this shape runs the kernel, decided once per
    process by _decide on a thread of its own: the decision builds and times attention with
    autograd, which must stay out of the caller's graph (gradient checkpointing's saved-tensor
    hooks, autocast and grad mode are per thread)."""
    key = (heads, kv_heads, head_dim)
    if key not in _decided:
        with ThreadPoolExecutor(1, "tunesmith-attention-choice") as pool:
            _decided[key] = pool.submit(_decide, *key, baseline).result()
    return _decided[key]


def _decide(heads: int, kv_heads: int, head_dim: int, baseline) -> bool:
    """The kernel is built and checked, and (TUNESMITH_NATIVE unset) faster here than `baseline`
    (the batched matmuls' autograd function): forward and backward of four sequences of 384
    tokens, best of three each."""
    if not supported(torch.bfloat16, head_dim) or kernel(head_dim) is None:
        return False
    if _setting() == "1":
        return True
    generator = torch.Generator().manual_seed(0)
    bounds = _bounds_of((384,) * 4)
    q, k, v = (torch.randn(1, n, 4 * 384, head_dim, generator=generator).to(torch.bfloat16).requires_grad_(True)
               for n in (heads, kv_heads, kv_heads))
    grad = torch.randn(1, 4 * 384, heads, head_dim, generator=generator).to(torch.bfloat16)

    def seconds(function) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            torch.autograd.grad(function.apply(q, k, v, bounds, head_dim ** -0.5, heads // kv_heads), (q, k, v), grad)
            best = min(best, time.perf_counter() - start)
        return best

    seconds(baseline)  # compiles its softmax passes before they are timed
    return seconds(NativeSegmentedAttention) < seconds(baseline)
