"""Run folders: what a training run writes, and loading a trained model back from one."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from .errors import UserError

ADAPTER_DIR = "adapter"  # PEFT adapter + tokenizer (LoRA runs)
MODEL_DIR = "model"  # full transformers folder + tokenizer (full fine-tunes)


def check_run_dir(folder: Path, overwrite: bool, must_resume: bool = False) -> None:
    """Refuse an unusable run folder before anything is loaded or written."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: output.dir exists and is not a folder")
    has_checkpoint = (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir())
    if must_resume and not has_checkpoint:
        raise UserError(f"{folder}: --resume given, but there is no checkpoint to resume from")
    if not overwrite and not must_resume and (folder / "results.json").exists():
        raise UserError(f"{folder}: holds a finished run; choose another output.dir or set output.overwrite=true")


def prepare_run_dir(folder: Path, overwrite: bool, must_resume: bool = False) -> None:
    """A fresh or resumable run folder. Overwrite starts over; an unfinished run is resumed by the loop."""
    check_run_dir(folder, overwrite, must_resume)
    if overwrite and not must_resume:
        for name in ("checkpoints", "metrics.jsonl", "results.json"):
            target = folder / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    folder.mkdir(parents=True, exist_ok=True)


def write_json(path: Path, value) -> None:
    """Written to a temporary name, then renamed: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)


def trained_folder(run: Path) -> Path:
    for name in (ADAPTER_DIR, MODEL_DIR):
        if (run / name).is_dir():
            return run / name
    raise UserError(f"{run}: no trained model in this run folder (expected '{ADAPTER_DIR}/' or '{MODEL_DIR}/')")


def is_run(path: str | Path) -> bool:
    return (Path(path) / "config.yaml").exists()


def load_trained(spec: str, dtype=None):
    """(model, tokenizer, base model name) for a run folder, an adapter folder or a plain model."""
    import torch

    from .models import compute_dtype, load_base, load_model, load_tokenizer

    path = Path(spec)
    base_name, trained, quantized = spec, None, False
    if is_run(path):
        config = yaml.safe_load((path / "config.yaml").read_text())
        base_name = config["model"]["name"]
        # A QLoRA adapter was trained on the 4-bit base: reload it on that same base.
        quantized = config.get("adapter", {}).get("method") == "qlora"
        trained = trained_folder(path)
        dtype = dtype or compute_dtype(config["model"].get("dtype", "auto"))
    elif (path / "adapter_config.json").exists():
        trained = path
        base_name = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    dtype = dtype or compute_dtype("auto")
    if trained is None:
        return load_model(spec, dtype), load_tokenizer(spec), spec
    tokenizer = load_tokenizer(str(trained))
    if (trained / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_base(base_name, dtype, quantized), trained)
    else:
        model = load_model(str(trained), dtype)
    model.eval()
    torch.set_grad_enabled(True)
    return model, tokenizer, base_name
