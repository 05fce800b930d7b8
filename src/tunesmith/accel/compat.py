"""What tunesmith reads of other libraries' insides, and the versions that was checked on.

The fast paths recompute what transformers, peft and bitsandbytes compute, and a few other
places use names those libraries do not promise to keep. Every such name is listed here once,
with the library it belongs to. A fast path names the libraries it depends on; where an
installed version lies outside the range it was checked on (CHECKED, kept equal to the ranges
in pyproject.toml), it is not applied: one warning, and the plain transformers + peft path runs.
tests/test_accel.py fails when the installed versions leave these ranges while the fast paths
still apply; bench/version_range.sh runs the fast-path tests on the oldest and newest of each.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from importlib import metadata

# Library -> (oldest, newest) version the fast paths and private names were checked on.
CHECKED = {
    "transformers": ("5.23.0", "5.23.0"),  # 5.24.0 failed (attention forward takes `cache`): 2026-12-02
    "peft": ("0.21.0", "0.21.2"),
    "bitsandbytes": ("0.50.0", "0.50.2"),
}


@dataclass(frozen=True)
class PrivateName:
    library: str
    name: str
    used_by: str
    why: str


PRIVATE_NAMES = (
    PrivateName("transformers", "PreTrainedConfig._attn_implementation", "accel/, training/loss.py",
                "which attention function a model runs (set through the public set_attn_implementation)"),
    PrivateName("transformers", "modeling_<family>.eager_attention_forward", "accel/rotary.py",
                "the default attention function a rewritten attention forward falls back to"),
    PrivateName("transformers", "integrations.sdpa_attention.sdpa_attention_forward", "accel/cpu/attention.py, accel/cuda/attention.py",
                "SDPA for the attention shapes the fast attention leaves alone"),
    PrivateName("transformers", "utils.chat_template_utils.render_jinja_template", "data/tokenize.py",
                "renders many conversations in one call with the tokenizer's own Jinja environment"),
    PrivateName("transformers", "integrations.gguf.gguf_tokenizer_mapping.GGUF_PRE_TOKENIZER_SPLITS", "export/gguf_vocab.py",
                "the pre-tokenizer names llama.cpp knows, to write the one matching the tokenizer"),
    PrivateName("transformers", "modeling_gguf_pytorch_utils imports gguf.GGUFReader / get_tensor_name_map per call",
                "models/default.py", "the default model's conversion parses its GGUF once, not three times"),
    PrivateName("peft", "tuners.lora.layer.Linear (lora_variant, fan_in_fan_out, scaling, merged)", "accel/lora_linear.py",
                "to know where a LoRA layer's forward is exactly base(x) + scaling * B(A(x))"),
    PrivateName("bitsandbytes", "nn.Linear4bit.support_avx512bf16_for_cpu", "models/quant.py",
                "turns off the packed bf16 CPU kernel where fp32 compute was asked for"),
    PrivateName("bitsandbytes", "nn.modules._convert_weight_packed_for_cpu_inverse", "models/quant.py",
                "undoes the packed CPU layout before dequantising for a merge"),
    PrivateName("torch", "ops.mkldnn._is_mkldnn_bf16_supported", "device.py",
                "whether this CPU multiplies bf16 fast (AVX512-BF16 or AMX)"),
)


def version_of(library: str) -> str | None:
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return None


def _parse(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        numbers.append(int(digits or 0))
    return tuple(numbers)


def within_checked(library: str, version: str | None = None) -> bool:
    """Whether the installed (or given) version of `library` lies in its CHECKED range; a library
    not installed is no conflict (a fast path that needs it does not apply anyway)."""
    version = version if version is not None else version_of(library)
    if version is None or library not in CHECKED:
        return True
    oldest, newest = CHECKED[library]
    return _parse(oldest) <= _parse(version) <= _parse(newest)


@functools.lru_cache(maxsize=None)
def usable(rewrite: str, libraries: tuple[str, ...]) -> bool:
    """True where every library `rewrite` reads the insides of is within its checked range; else
    warn once and answer False (the plain path runs)."""
    outside = [f"{lib} {version_of(lib)} (checked {CHECKED[lib][0]} to {CHECKED[lib][1]})"
               for lib in libraries if not within_checked(lib)]
    if outside:
        warnings.warn(f"fast path '{rewrite}' not applied: {', '.join(outside)}; running the plain path",
                      RuntimeWarning, stacklevel=2)
    return not outside
