"""Load a base model and its tokenizer from 'default', a local folder, a .gguf file or a hub id."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError


def resolve_model_path(name: str) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None) for a model spec."""
    if name in ("", "default"):
        from .default import default_model_dir

        return str(default_model_dir()), None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{name}: GGUF file not found")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"{name}: folder has no config.json; not a transformers model folder")
        return str(path), None
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"{name}: model folder not found")
    return name, None  # a hub id


def bf16_is_fast() -> bool:
    """bf16 matmuls pay on CUDA with bf16 support and on CPUs with AVX512-BF16 or AMX."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def compute_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if bf16_is_fast() else torch.float32
    return getattr(torch, name)


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    folder = Path(spec).expanduser()
    if (folder / "tokenizer_config.json").exists():  # e.g. an adapter folder: tokenizer without model
        where, gguf = str(folder), None
    else:
        where, gguf = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=gguf, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise UserError(f"{spec}: cannot load tokenizer ({str(err).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """A causal LM in eval mode; GGUF weights are dequantised by transformers."""
    from transformers import AutoModelForCausalLM

    where, gguf = resolve_model_path(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, gguf_file=gguf, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise UserError(f"{spec}: cannot load model ({str(err).splitlines()[0]})") from None
    model.eval()
    return model
