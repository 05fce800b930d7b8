"""Merge an adapter into a full-precision copy of its base, and prove the merge changed nothing.

The merged model's logits are compared with the adapter model's on samples of the run's own
data; beyond the tolerance the export is refused, with the measured difference. A QLoRA adapter
is merged into the dequantised NF4 weights it was trained on (in fp32), never into 4-bit: the
rounding to 4 bits would swallow most of the update.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import runs
from ..config import load_config
from ..data.collate import collate
from ..data.formats import is_raw_text
from ..data.tokenize import Encoded, encode, encode_documents
from ..errors import UserError
from ..models import load_base, load_model, load_tokenizer
from ..models.quant import dequantize
from ..permissions import as_umask_allows
from ..progress import say

TOLERANCE = 1e-4  # fp32 max abs logit difference, per unit of logit scale (max |logit|, at least 1)
MAX_SHARD_SIZE = "2GB"  # safetensors files past this size are split (as hub models are)


@dataclass
class MergeCheck:
    folder: Path
    max_abs_diff: float
    tolerance: float
    positions: int

    def as_dict(self) -> dict:
        return {"folder": str(self.folder), "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "positions": self.positions}


def sample_conversations(run: Path, count: int = 8) -> list[list[dict]]:
    """The run's first validation (else training) conversations: the inputs the model was made for."""
    folder = runs.RunFolder(run)
    return (folder.conversations("validation") or folder.conversations("train"))[:count]


def sample_batch(run: Path, tokenizer, conversations: list[list[dict]] | None = None) -> dict[str, torch.Tensor]:
    """A padded batch of `sample_conversations` (read here unless given), or fixed pseudo-random tokens when
    the data moved away."""
    max_len = load_config(run / "config.yaml").data.max_seq_len
    conversations = sample_conversations(run) if conversations is None else conversations
    if is_raw_text(conversations):  # continued pre-training: each document's first row, as trained
        encoded = [Encoded(e.input_ids[:max_len], e.labels[:max_len])
                   for e in encode_documents(tokenizer, [c[0]["content"] for c in conversations])]
    else:  # cut to max_seq_len, as data.overlong: truncate trains them (dropped, the check ran on random tokens)
        encoded = [Encoded(e.input_ids[:max_len], e.labels[:max_len]) for e in (encode(tokenizer, c) for c in conversations)]
    if encoded:
        return collate(encoded, tokenizer.pad_token_id)
    # Pseudo-random tokens still compare the two models.
    ids = torch.randint(0, len(tokenizer), (2, 64), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def logits_of(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 logits at the real (non-padding) positions, on the CPU: a 4-bit base loads onto a GPU
    where there is one, the merged model onto the CPU, and the two are compared."""
    model.eval()
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    return out[batch["attention_mask"].to(device).bool()].float().cpu()


def allowed_difference(reference: torch.Tensor, tolerance: float) -> tuple[float, float]:
    """(logit scale, largest difference accepted) against the `reference` logits. fp32 rounding grows
    with the logits: a real model's (|logit| ~ 20-30) differ by ~2e-4 after a correct merge, so the
    tolerance is per unit of logit scale (at least 1)."""
    scale = max(1.0, float(reference.abs().max()))
    return scale, tolerance * scale


def adapter_model(base_name: str, adapter: Path, quantized: bool):
    """The model as trained: the (4-bit for QLoRA) base with the adapter on top, fp32 compute."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base_name, torch.float32, quantized), adapter)


def merged_model(base_name: str, adapter: Path, quantized: bool):
    from peft import PeftModel

    base = load_base(base_name, torch.float32, quantized)
    if quantized:
        dequantize(base)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload()


def merge_run(run: str | Path, out: str | Path | None = None, tolerance: float = TOLERANCE,
              max_shard_size: str = MAX_SHARD_SIZE) -> MergeCheck:
    """Write the run's merged model (safetensors, fp32, with tokenizer, chat template and generation
    config; files of at most `max_shard_size`) to `out`, checked against the adapter model after a
    reload from disk."""
    run = runs.RunFolder(run).require().path
    trained = runs.trained_folder(run)
    out = Path(out) if out else run / "export" / "merged"
    if not (trained / "adapter_config.json").exists():
        raise UserError(f"{run}: a full fine-tune; {trained} is already a complete model, there is nothing to merge")
    cfg = load_config(run / "config.yaml")
    quantized = cfg.adapter.method == "qlora"
    tokenizer = load_tokenizer(str(trained))
    batch = sample_batch(run, tokenizer)
    reference = logits_of(adapter_model(cfg.model.name, trained, quantized), batch)

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    started = time.perf_counter()
    say(f"merge: the adapter into its base{' (dequantised from NF4)' if quantized else ''}, fp32 -> {out}")
    try:
        merged = merged_model(cfg.model.name, trained, quantized)
        merged.save_pretrained(partial, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(partial)
        as_umask_allows(partial)
        del merged
        # Compare what was written, not what is in memory: a save that drops or unties a weight shows here.
        diff = float((logits_of(load_model(str(partial), torch.float32), batch) - reference).abs().max())
    except BaseException:  # Ctrl-C, a full disk: no half-written model (gigabytes) left behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    scale, allowed = allowed_difference(reference, tolerance)
    check = MergeCheck(out, diff, allowed, int(batch["attention_mask"].sum()))
    if not diff <= allowed:
        raise UserError(f"{run}: merged model's logits differ from the adapter model's by {diff:.3g} "
                        f"(tolerance {tolerance:g}) x logit scale {scale:.3g} = {allowed:.3g}; merge not exported "
                        f"(left in {partial})")
    shutil.rmtree(out, ignore_errors=True)
    partial.replace(out)
    runs.write_json(out / "merge_check.json", check.as_dict())
    say(f"merge: read back from disk, its logits within {diff:.2g} of the adapter model's (allowed {allowed:.2g}) at "
        f"{check.positions} positions ({time.perf_counter() - started:.0f} s)")
    return check
