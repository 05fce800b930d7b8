"""llama.cpp itself, through `llama-cpp-python` (optional: `pip install -e .[llamacpp]`, a source build of
llama.cpp): load an exported GGUF and compare its logits with the merged model's, and write the
K-quant mixes (q4_k_m, q5_k_m) the `gguf` package cannot (its quantize() has no K-quant encoder).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .agreement import agreement

FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M"}


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _require(what: str):
    if not available():
        raise UserError(f"{what} needs llama.cpp: install tunesmith's llamacpp extra (pip install -e '.[llamacpp]', "
                        "which builds llama-cpp-python from source)")
    import llama_cpp

    return llama_cpp


def quantize(source: Path, target: Path, kind: str) -> Path:
    """llama.cpp's own quantiser (llama_model_quantize) from an f16 GGUF to a K-quant mix."""
    llama_cpp = _require(f"GGUF {kind}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[kind])
    params.nthread = os.cpu_count() or 1
    with _quiet():
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if failed:
        raise UserError(f"llama.cpp could not quantise {source} to {kind} (status {failed})")
    return target


@contextlib.contextmanager
def _quiet():
    """llama.cpp logs to the C stderr; keep it out of the user's terminal."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def logits(path: Path, batch: dict[str, torch.Tensor], lora: Path | None = None) -> torch.Tensor:
    """llama.cpp's logits at the batch's real positions (one row at a time, as one sequence each), with a
    GGUF LoRA adapter applied where given."""
    llama_cpp = _require("the llama.cpp check")
    lengths = batch["attention_mask"].sum(1).tolist()
    with _quiet():
        model = llama_cpp.Llama(str(path), n_ctx=max(64, max(lengths)), n_batch=max(lengths), logits_all=True,
                                n_threads=os.cpu_count() or 1, verbose=False, lora_path=str(lora) if lora else None)
    rows = []
    for ids, length in zip(batch["input_ids"].tolist(), lengths):
        model.reset()
        model.eval(ids[:length])
        rows.append(torch.from_numpy(np.array(model.scores[:length], dtype=np.float32)))
    del model
    return torch.cat(rows)


def check(path: Path, reference: torch.Tensor, batch: dict[str, torch.Tensor], answers: torch.Tensor,
          lora: Path | None = None) -> dict:
    """llama.cpp's logits against the merged model's (agreement.py)."""
    return agreement(logits(path, batch, lora)[:, : reference.shape[1]], reference, answers)


def tokenize(path: Path, texts: list[str]) -> list[list[int]]:
    """llama.cpp's own tokens for each text (special tokens parsed, no BOS added): what Ollama and
    llama-server feed the model after rendering a chat template."""
    llama_cpp = _require("the llama.cpp tokenizer check")
    with _quiet():
        model = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    found = [model.tokenize(text.encode("utf-8"), add_bos=False, special=True) for text in texts]
    del model
    return found


def generate(path: Path, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int]) -> list[list[int]]:
    """Greedy answers from llama.cpp for prompts given as token ids (built by the training tokenizer)."""
    llama_cpp = _require("generation in llama.cpp")
    longest = max(len(p) for p in prompts) + max_new_tokens
    with _quiet():
        model = llama_cpp.Llama(str(path), n_ctx=longest, n_batch=min(512, longest),
                                n_threads=os.cpu_count() or 1, verbose=False)
    answers = []
    for prompt in prompts:
        model.reset()
        out: list[int] = []
        for token in model.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
            if token in stop_ids or len(out) >= max_new_tokens:
                break
            out.append(token)
        answers.append(out)
    del model
    return answers
