"""Load a base model and its tokenizer from 'default', a local folder, a .gguf file or a hub id."""
from __future__ import annotations

import functools
import pickle
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError

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
        readable_gguf(path)
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"{name}: {_not_a_model(path)}")
        return str(path), None
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"{name}: model folder not found")
    owner = name.split("/", 1)[0]
    if "/" in name and Path(owner).is_dir():  # runs/mine mistyped: not the hub's (after 30 s of retries)
        raise UserError(f"{name}: model folder not found: {owner}/ has no {name.split('/', 1)[1]} (a hub id whose "
                        f"owner is also a folder here is read as that folder; run from another folder)")
    return name, None  # a hub id


@functools.lru_cache(maxsize=8)
def readable_gguf(path: Path) -> None:
    """A cut or damaged GGUF is one line here, not a struct.error from inside transformers' reader."""
    from gguf import GGUFReader

    try:
        GGUFReader(str(path))  # reads the header, metadata and tensor table; the weights stay mapped, unread
    except Exception as err:  # struct.error, ValueError, IndexError...: the reader checks nothing for us
        raise UserError(f"{path}: not a readable GGUF file ({type(err).__name__}: {str(err)[:120]}); "
                        "was it downloaded whole?") from None


def hub_options(where: str) -> dict:
    """from_pretrained's options for `where`: a hub id is read from the local cache only where the
    hub's host has no address (no network), failing at once instead of after half a minute of
    retried requests."""
    return {"local_files_only": True} if not Path(where).exists() and hub_unreachable() else {}


@functools.cache
def hub_unreachable() -> bool:
    """The hub's host (HF_ENDPOINT's) has no address, or HF_HUB_OFFLINE is set; asked once."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return True
    try:
        socket.getaddrinfo(urlparse(hub.ENDPOINT).hostname, 443)
    except OSError:
        return True
    return False


def _not_a_model(path: Path) -> str:
    """Why a folder without config.json is not a base model, and what to name instead."""
    if (path / "model" / "config.json").exists():
        return f"a run folder; its fine-tuned model is {path / 'model'}"
    if (path / "adapter" / "adapter_config.json").exists():
        return (f"a run folder with a LoRA adapter, not a whole model; `tunesmith export {path} --format hf` "
                f"writes the merged model to {path / 'export' / 'merged'}")
    if (path / "adapter_config.json").exists():
        return "a LoRA adapter, not a whole model; name its base model (adapter_config.json: base_model_name_or_path)"
    return "folder has no config.json; not a transformers model folder"


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    folder = Path(spec).expanduser()
    if (folder / "tokenizer_config.json").exists():  # e.g. an adapter folder: tokenizer without model
        where, gguf = str(folder), None
    else:
        where, gguf = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=gguf, trust_remote_code=trust_remote_code,
                                                  **hub_options(where))
    except OSError as err:
        raise UserError(f"{spec}: cannot load tokenizer ({str(err).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               device: torch.device | str | None = None):
    """A causal LM in eval mode on `device` (default: the CPU); GGUF weights are dequantised by transformers."""
    from transformers import AutoModelForCausalLM

    where, gguf = resolve_model_path(spec)
    # Weights go straight to the device (no full CPU copy first) through a single-device map.
    placement = {"device_map": {"": str(device)}} if device is not None and torch.device(device).type != "cpu" else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, gguf_file=gguf, dtype=dtype, trust_remote_code=trust_remote_code, **placement, **hub_options(where))
    except OSError as err:
        raise UserError(f"{spec}: cannot load model ({str(err).splitlines()[0]})") from None
    except (pickle.UnpicklingError, SafetensorError) as err:  # weights cut short, or a pickle that runs code
        raise UserError(f"{spec}: cannot read the model's weights ({type(err).__name__}: "
                        f"{(str(err).splitlines() or [''])[0][:200]})") from None
    if gguf:  # dequantised already; the GGUF quantiser transformers leaves on it refuses save_pretrained
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
    model.eval()
    return model


def load_skeleton(spec: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """The causal LM's modules without weights (on the meta device): what the trained weights of a
    sharded run are written through, without holding the base."""
    from transformers import AutoConfig, AutoModelForCausalLM

    where, gguf = resolve_model_path(spec)
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=gguf, trust_remote_code=trust_remote_code,
                                            **hub_options(where))
    except OSError as err:
        raise UserError(f"{spec}: cannot load model config ({str(err).splitlines()[0]})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    try:  # from_config derives one from config.json: the base's own EOS ids and sampling defaults are its file's
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(where, **hub_options(where))
    except (OSError, ValueError):
        pass  # none beside the weights (a .gguf file): as from_pretrained, the one config.json gives
    return model.eval()
