"""Starting a run from an earlier run: `model: runs/sft` (DPO or GRPO after SFT, or more SFT).

The earlier run's adapter is merged into its base once (export/merge.py: the verified merge,
written to RUN/export/merged and reused afterwards); a full fine-tune's model folder is used as it
is. The new run then trains a fresh adapter on that model, so the objectives' reference (the
adapters disabled) is exactly where the new run starts.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .errors import UserError
from .methods import ADAPTER_DIR, MODEL_DIR
from .runs import RunFolder


def starting_model(spec: str) -> str:
    """The model folder a `model.name` stands for: itself, or the merged model of a run folder."""
    run = RunFolder(spec)
    if not run.is_run() or (run.path / "config.json").exists():
        return spec
    if not any((run.path / name).is_dir() for name in (ADAPTER_DIR, MODEL_DIR)):
        raise UserError(f"{spec}: folder has no config.json (not a model folder) and no adapter/ or model/ "
                        "(not a finished run)")
    trained = run.trained()
    if not (trained / "adapter_config.json").exists():
        return str(trained)  # a full fine-tune: a complete model folder
    merged = run.path / "export" / "merged"
    if not (merged / "merge_check.json").is_file():
        from .export.merge import merge_run

        print(f"model: merging the adapter of run {run.path} into its base (once) -> {merged}", file=sys.stderr,
              flush=True)
        merge_run(run.path, merged)
    return str(merged)


def resolve_start(cfg, ranks):
    """The config with a run folder as model.name replaced by its model folder (rank 0 merges, the others wait)."""
    if not RunFolder(cfg.model.name).is_run():
        return cfg
    folder = starting_model(cfg.model.name) if ranks.main else None
    ranks.barrier()
    folder = folder or starting_model(cfg.model.name)
    print(f"model: starting from run {cfg.model.name} ({Path(folder)})", file=sys.stderr, flush=True)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": folder})})
