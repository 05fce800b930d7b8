"""The shape of a decoder-only transformer, read from its config alone (never its weights).

A few well-known shapes ship here so that plans for large models work where the hub cannot be
reached; anything else is read with transformers.AutoConfig from a hub id or a local folder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UserError

def _config(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, tied: bool,
            head_dim: int | None = None) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied, head_dim=head_dim)


# Config fields as published in the models' config.json files: short name -> (hub id, shape).
# vocab, hidden, intermediate, layers, attention heads, key/value heads, tied embeddings[, head_dim]
# (Qwen2.5's q/k/v biases and Qwen3's q/k norms are left out: under 0.1% of the weights.)
SHIPPED = {
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B", _config(128256, 4096, 14336, 32, 32, 8, False)),
    "llama-3.1-70b": ("meta-llama/Llama-3.1-70B", _config(128256, 8192, 28672, 80, 64, 8, False)),
    "llama-3.2-3b": ("meta-llama/Llama-3.2-3B", _config(128256, 3072, 8192, 28, 24, 8, True)),
    "llama-3.2-1b": ("meta-llama/Llama-3.2-1B", _config(128256, 2048, 8192, 16, 32, 8, True)),
    "llama-2-7b": ("meta-llama/Llama-2-7b-hf", _config(32000, 4096, 11008, 32, 32, 32, False)),
    "llama-2-70b": ("meta-llama/Llama-2-70b-hf", _config(32000, 8192, 28672, 80, 64, 8, False)),
    "llama-65b": ("huggyllama/llama-65b", _config(32000, 8192, 22016, 80, 64, 64, False)),
    "tinyllama-1.1b": ("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
                       _config(32000, 2048, 5632, 22, 32, 4, False)),
    "mistral-7b": ("mistralai/Mistral-7B-v0.3", _config(32768, 4096, 14336, 32, 32, 8, False)),
    "qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B", _config(151936, 896, 4864, 24, 14, 2, True)),
    "qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B", _config(151936, 1536, 8960, 28, 12, 2, True)),
    "qwen2.5-3b": ("Qwen/Qwen2.5-3B", _config(151936, 2048, 11008, 36, 16, 2, True)),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B", _config(152064, 3584, 18944, 28, 28, 4, False)),
    "qwen2.5-14b": ("Qwen/Qwen2.5-14B", _config(152064, 5120, 13824, 48, 40, 8, False)),
    "qwen2.5-32b": ("Qwen/Qwen2.5-32B", _config(152064, 5120, 27648, 64, 40, 8, False)),
    "qwen2.5-72b": ("Qwen/Qwen2.5-72B", _config(152064, 8192, 29568, 80, 64, 8, False)),
    "qwen3-0.6b": ("Qwen/Qwen3-0.6B", _config(151936, 1024, 3072, 28, 16, 8, True, 128)),
    "qwen3-1.7b": ("Qwen/Qwen3-1.7B", _config(151936, 2048, 6144, 28, 16, 8, True, 128)),
    "qwen3-4b": ("Qwen/Qwen3-4B", _config(151936, 2560, 9728, 36, 32, 8, True, 128)),
    "qwen3-8b": ("Qwen/Qwen3-8B", _config(151936, 4096, 12288, 36, 32, 8, False, 128)),
    "qwen3-14b": ("Qwen/Qwen3-14B", _config(151936, 5120, 17408, 40, 40, 8, False, 128)),
    "qwen3-32b": ("Qwen/Qwen3-32B", _config(151936, 5120, 25600, 64, 64, 8, False, 128)),
}


def _model_type(name: str) -> str:
    """transformers' model_type of a shipped shape, from its short name."""
    return next((kind for kind in ("qwen3", "qwen2", "mistral") if name.startswith(kind)), "llama")


KNOWN = {hub_id: {**config, "model_type": _model_type(name)} for name, (hub_id, config) in SHIPPED.items()}
ALIASES = {name: hub_id for name, (hub_id, _) in SHIPPED.items()}

# Linear layers of a Llama-style block: name -> (input width, output width) as functions of the shape.
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    name: str = "model"
    model_type: str = ""  # transformers' name of the family (llama, qwen2, ...)

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear layer in one block."""
        h, q, kv, i = self.hidden, self.q_width, self.kv_width, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def block_linear_params(self) -> int:
        return sum(a * b for a, b in self.linears().values())

    @property
    def block_params(self) -> int:
        return self.block_linear_params + 2 * self.hidden  # two RMSNorm weights

    @property
    def embedding_params(self) -> int:
        """Token embeddings plus an untied LM head (a tied head is the same tensor)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def total_params(self) -> int:
        return self.layers * self.block_params + self.embedding_params + self.hidden


def shape_from_dict(config: dict, name: str = "model") -> ModelShape:
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    return ModelShape(
        vocab=config["vocab_size"], hidden=hidden, intermediate=config["intermediate_size"],
        layers=config["num_hidden_layers"], heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or hidden // heads,
        tied=bool(config.get("tie_word_embeddings", False)), name=name, model_type=config.get("model_type", ""))


# What a tuned release adds to its base's name: Llama-3.1-8B-Instruct, Llama-2-7b-chat-hf,
# Mistral-7B-Instruct-v0.3, TinyLlama-1.1B-Chat-v1.0 (the architecture is the base's)
TUNED_SUFFIX = re.compile(r"-(instruct|chat|hf|it|base|v\d+(\.\d+)*)$")


def shipped_variant(spec: str) -> str | None:
    """The shipped shape a hub id names with a tuned release's suffixes (meta-llama/Meta-Llama-3.1-8B-Instruct
    -> llama-3.1-8b), or None."""
    name = spec.lower().rsplit("/", 1)[-1].removeprefix("meta-")
    while TUNED_SUFFIX.search(name):
        name = TUNED_SUFFIX.sub("", name)
    return name if name in ALIASES and "/" in spec else None


def model_shape(spec: str, trust_remote_code: bool = False) -> ModelShape:
    """The shape of 'default', a shipped name, a local folder or a hub id, from its config only."""
    key = ALIASES.get(spec.lower(), spec)
    if key in KNOWN:
        return shape_from_dict(KNOWN[key], key)
    from transformers import AutoConfig

    from ..models import resolve_model_path
    from ..models.load import hub_options

    where, gguf = resolve_model_path(spec)
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=gguf, trust_remote_code=trust_remote_code,
                                            **hub_options(where))
    except (OSError, ValueError) as err:
        variant = shipped_variant(spec)
        if variant:  # offline: the tuned model has its base's shape, which ships here
            from ..progress import say

            say(f"plan: {spec}: cannot read its config ({str(err).splitlines()[0]}); planned with the shipped "
                f"shape {variant} ({ALIASES[variant]}), the same architecture")
            return shape_from_dict(KNOWN[ALIASES[variant]], spec)
        raise UserError(f"{spec}: cannot read the model config ({str(err).splitlines()[0]}); "
                        f"shipped shapes: {', '.join(sorted(ALIASES))}") from None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        return shape_from_dict(config.to_dict(), spec)
    except KeyError as err:
        raise UserError(f"{spec}: config has no {err}; only decoder-only transformers can be planned") from None
