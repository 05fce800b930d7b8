"""Exports of a trained run, each checked before it is called done.

Formats: `hf` (merged transformers folder), `peft` (the adapter for vLLM / TGI), `gguf` (llama.cpp),
`ollama` (a Modelfile next to the GGUF), `gguf-lora` (the base model's GGUF and the LoRA adapter as a
GGUF adapter file that llama.cpp applies to it). Each lands in its own folder under `out` (default
RUN/export) with a README of how to load it.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ..errors import UserError

FORMATS = ("hf", "peft", "gguf", "ollama", "gguf-lora")


def parse_formats(formats: str | list[str] | None, merge: bool) -> list[str]:
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()] or ([formats] if formats.strip() else [])
    wanted = list(formats or []) + (["hf"] if merge else [])
    unknown = sorted(set(wanted) - set(FORMATS))
    if unknown:
        raise UserError(f"export: unknown format {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    return [f for f in FORMATS if f in wanted] or ["hf"]


def export(run: str | Path, out: str | Path | None = None, merge: bool = False, tolerance: float | None = None,
           formats: str | list[str] | None = None, quant: str = "f16", force: bool = False) -> dict:
    """Export a run in the given formats (default: hf); returns what each check measured.

    A GGUF is checked on the run's own sample conversations; where none are found (the data moved
    away) the export is refused unless `force`, and then says it was checked on random tokens only."""
    from .. import runs
    from ..runlock import refuse_links
    from ..config import load_config
    from .merge import TOLERANCE, merge_run
    from .peft_folder import export_peft
    from .readme import write_readme

    wanted = parse_formats(formats, merge)
    run = runs.RunFolder(run).require().path
    refuse_links(run)  # its export/ is written: never through a link of a run folder from elsewhere
    out = Path(out) if out else run / "export"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file; exports are folders (each format in one of its own under it)")
    trained = runs.trained_folder(run)
    quantized = load_config(run / "config.yaml").adapter.method == "qlora"
    results: dict = {}
    if {"gguf", "ollama"} & set(wanted):
        from .gguf import check_quant

        check_quant(quant)  # before any merging, as the architecture
    if {"gguf", "ollama", "gguf-lora"} & set(wanted):
        check_gguf_architecture(run)  # before any merging: an unsupported model fails at once
    if "hf" in wanted:
        results["merged"] = merge_run(run, out / "merged", TOLERANCE if tolerance is None else tolerance).as_dict()
        write_readme(out / "merged", "hf", run=run.name, **results["merged"])
    if "peft" in wanted:
        if not (trained / "adapter_config.json").exists():
            raise UserError(f"{run}: a full fine-tune has no adapter; export it with --format hf or gguf")
        results["peft"] = export_peft(run, trained, out / "peft", quantized, TOLERANCE if tolerance is None else tolerance)
        write_readme(out / "peft", "peft", run=run.name, **{**results["peft"], "warnings": "; ".join(
            results["peft"]["warnings"]) or "none"})
    if "gguf-lora" in wanted:
        results["gguf_lora"] = export_gguf_lora(run, out / "gguf-lora")
    if "gguf" in wanted or "ollama" in wanted:
        merged = out / "merged" if "merged" in results else None
        results["gguf"] = export_gguf(run, out / "gguf", quant, merged, "ollama" in wanted, force)
    return results


def check_gguf_architecture(run: Path) -> None:
    from transformers import AutoConfig

    from ..config import load_config
    from ..models.load import hub_options, resolve_model_path
    from .gguf import gguf_architecture

    where, gguf_file = resolve_model_path(load_config(run / "config.yaml").model.name)
    gguf_architecture(AutoConfig.from_pretrained(where, gguf_file=gguf_file, **hub_options(where)))


def export_gguf(run: Path, folder: Path, quant: str, merged: Path | None, modelfile: bool, force: bool = False) -> dict:
    """Write model-{quant}.gguf from the merged model, verify it, and (for ollama) add a Modelfile."""
    import torch

    from .. import runs
    from ..models import load_model, load_tokenizer
    from ..progress import say
    from . import llamacpp
    from .gguf import write_gguf
    from .gguf_check import verify_gguf
    from .gguf_vocab import adds_bos
    from .merge import TOLERANCE, logits_of, merge_run, sample_batch, sample_conversations
    from ..data.formats import is_raw_text
    from .ollama import RAW, choose_template, prompts_served_alike, quoted, write_modelfile
    from .readme import write_readme

    trained = runs.trained_folder(run)
    conversations = sample_conversations(run)
    tokenizer = load_tokenizer(str(trained))  # carries the chat template training used
    # Before anything is written: a run no Ollama template serves is refused at once.
    bos = adds_bos(tokenizer)
    raw = bool(conversations) and is_raw_text(conversations)  # trained on documents: no chat to template
    chosen = (RAW if raw else choose_template(tokenizer, bos)) if modelfile else None
    system = runs.system_prompt_of(str(run)) if modelfile and not raw else None
    if system:
        quoted(system, "the system prompt")
    if not conversations and not force:
        raise UserError(f"{run}: no sample conversations found (the run's validation and training data are gone, or "
                        "none of their records has an answer: GRPO prompts without a reference), so "
                        "the GGUF's logits and chat template cannot be checked on real prompts; restore the data, or "
                        "export with --force to check the logits on random tokens only")
    scratch = folder / ".partial"
    shutil.rmtree(scratch, ignore_errors=True)
    source = merged or trained
    if merged is None and (trained / "adapter_config.json").exists():
        source = merge_run(run, scratch / "merged", TOLERANCE).folder  # verified merge, deleted below
    model = load_model(str(source), torch.float32)
    batch = sample_batch(run, tokenizer, conversations)  # read above: not again
    reference = logits_of(model, batch)
    name = f"model-{quant}.gguf"
    started = time.perf_counter()
    say(f"gguf: writing {name}")
    written = write_gguf(model, tokenizer, scratch / name, quant, name=run.resolve().name)
    config = model.config
    del model
    readers = "transformers, then llama.cpp" if llamacpp.available() else "transformers"
    on = f"{len(conversations)} sample conversations" if conversations else "random tokens"
    say(f"gguf: reading {name} back ({readers}) to compare with the merged model on {on}")
    check = verify_gguf(written, quant, reference, batch, tokenizer, conversations, config).as_dict()
    say(f"gguf: {name} checked: mean KL divergence {check['kl_divergence']:.2g}, top-1 agreement "
        f"{check['top1_agreement']:.1%} ({check['top1_decided']:.1%} where the merged model has decided), prompts "
        f"token-equal {check['prompts_equal']}/{check['prompts_checked']} ({time.perf_counter() - started:.0f} s)")
    check["checked_on"] = (f"{len(conversations)} sample conversations of the run's data" if conversations else
                           "random tokens only (no sample conversations; --force): chat template not checked")
    os.replace(written, folder / name)
    shutil.rmtree(scratch, ignore_errors=True)
    check["file"] = str(folder / name)
    if modelfile:
        check["modelfile"] = str(write_modelfile(folder, name, tokenizer, system, bos, chosen))
        alike = len(conversations) if raw else prompts_served_alike(tokenizer, *chosen, conversations, system, bos)
        check["modelfile_prompts_equal"] = "raw text: the prompt as it is" if raw else f"{alike}/{len(conversations)}"
        if alike < len(conversations):
            say(f"ollama: warning: the Modelfile's template prompts {len(conversations) - alike} of "
                f"{len(conversations)} sample conversations differently from training (tool calls and results, or "
                "white space the chat template trims, are beyond Ollama's template); the GGUF's own chat template "
                "(llama.cpp, --format gguf) renders them as trained")
    write_readme(folder, "gguf", run=run.name, **{**check, "file": name})
    runs.write_json(folder / f"check-{quant}.json", check)
    return check


def export_gguf_lora(run: Path, folder: Path) -> dict:
    """base-f16.gguf (the base model, with the training chat template) and adapter-f16.gguf, checked: the
    base with the adapter applied (in llama.cpp where installed, and by hand from the file) against the
    adapter model's logits, f16 bar."""
    import torch

    from .. import runs
    from ..config import load_config
    from ..models import load_base, load_tokenizer
    from . import llamacpp
    from .agreement import agreement
    from .gguf import write_gguf
    from .gguf_check import F16_TOLERANCE, answer_positions
    from .gguf_lora import applied_by_hand, write_lora_gguf
    from .merge import adapter_model, logits_of, sample_batch

    trained = runs.trained_folder(run)
    if not (trained / "adapter_config.json").exists():
        raise UserError(f"{run}: a full fine-tune has no adapter; export it with --format gguf")
    cfg = load_config(run / "config.yaml")
    tokenizer = load_tokenizer(str(trained))
    batch = sample_batch(run, tokenizer)
    reference = logits_of(adapter_model(cfg.model.name, trained, cfg.adapter.method == "qlora"), batch)
    base = load_base(cfg.model.name, torch.float32, False)
    scratch = folder.with_name(folder.name + ".partial")  # the folder holds the files only once checked
    shutil.rmtree(scratch, ignore_errors=True)
    base_file = write_gguf(base, tokenizer, scratch / "base-f16.gguf", "f16", name=f"{run.resolve().name}-base")
    adapter_file = write_lora_gguf(base, trained, scratch / "adapter-f16.gguf")
    answers = answer_positions(batch)
    checks = {"by_hand": agreement(logits_of(applied_by_hand(base, adapter_file), batch), reference, answers)}
    if llamacpp.available():
        checks["llama_cpp"] = llamacpp.check(base_file, reference, batch, answers, lora=adapter_file)
    for reader, found in checks.items():
        if not found["relative_diff"] <= F16_TOLERANCE:
            raise UserError(f"{adapter_file}: base + adapter ({reader}) logits differ from the adapter model's by "
                            f"{found['max_abs_diff']:.3g} ({found['relative_diff']:.2%} of the logit scale)")
    shutil.rmtree(folder, ignore_errors=True)
    scratch.replace(folder)
    result = {"base": str(folder / base_file.name), "adapter": str(folder / adapter_file.name), **checks}
    runs.write_json(folder / "check.json", result)
    return result


__all__ = ["FORMATS", "export"]
