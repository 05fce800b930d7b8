"""Starting a run from an earlier run: `model: runs/sft` (DPO or GRPO after SFT, or more SFT).

The earlier run's adapter is merged into its base once (export/merge.py: the verified merge,
written to RUN/export/merged and reused afterwards); a full fine-tune's model folder is used as it
is. The new run then trains a fresh adapter on that model, so the objectives' reference (the
adapters disabled) is exactly where the new run starts. It keeps a record of that model (lineage.py):
loaded after the earlier run was trained again, it is refused rather than put on the new model.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .errors import UserError
from .lineage import RECORD, weights_fingerprint
from .methods import ADAPTER_DIR, MODEL_DIR
from .runs import RunFolder, write_json


def is_run_start(spec: str) -> bool:
    """Whether `model.name` names a run folder (config.yaml) rather than a model folder (config.json)."""
    run = RunFolder(spec)
    return run.is_run() and not (run.path / "config.json").exists()


def starting_model(spec: str) -> str:
    """The model folder a `model.name` stands for: itself, or the merged model of a run folder."""
    if not is_run_start(spec):
        return spec
    run = RunFolder(spec)
    if not any((run.path / name).is_dir() for name in (ADAPTER_DIR, MODEL_DIR)):
        raise UserError(f"{spec}: folder has no config.json (not a model folder) and no {ADAPTER_DIR}/ or "
                        f"{MODEL_DIR}/ (not a finished run)")
    trained = run.trained()  # its weights damaged: said as such
    if not (trained / "adapter_config.json").exists():
        return str(trained)  # a full fine-tune: a complete model folder
    merged = run.path / "export" / "merged"
    check = merged / "merge_check.json"
    # Merged from this adapter, not from one the run held before it was trained again
    if not check.is_file() or check.stat().st_mtime < (trained / "adapter_model.safetensors").stat().st_mtime:
        from .export.merge import merge_run
        from .runlock import refuse_links

        print(f"model: merging the adapter of run {run.path} into its base (once) -> {merged}", file=sys.stderr,
              flush=True)
        refuse_links(run.path)  # export/merged is written there
        merge_run(run.path, merged)
    return str(merged)


def unmerged(spec: str) -> tuple[str, str]:
    """(model, tokenizer) standing for `model.name` where nothing trains (plan, data check): a run folder's
    base (a merge changes no shape) or full fine-tune, and the tokenizer it trained with, kept beside its
    weights. Nothing is merged or written into the run folder; anything else stands for itself."""
    if not is_run_start(spec):
        return spec, spec
    run = RunFolder(spec)
    trained = run.trained()
    if (trained / "adapter_config.json").exists():
        return run.read_config().model.name, str(trained)
    return str(trained), str(trained)


def source_run(model: str) -> Path | None:
    """The run folder whose model a model folder is (RUN/model, or RUN/export/merged: its adapter merged), or None."""
    path = Path(model)
    if path.name == MODEL_DIR:
        run = path.parent
    elif path.name == "merged" and path.parent.name == "export":
        run = path.parent.parent
    else:
        return None
    return run if RunFolder(run).is_run() else None


def record_start(run: RunFolder, model: str) -> None:
    """Written with a new run's config.yaml: what it trains on where that is an earlier run's model (`model:
    RUN`, or that run's folder named itself), checked by every later load and resume (lineage.py)."""
    source = source_run(model)
    if source is None:  # an earlier run's record in this folder would refuse this one for nothing
        (run.path / RECORD).unlink(missing_ok=True)
        return
    write_json(run.path / RECORD, {"run": str(source.resolve()), "model": str(Path(model).resolve()),
                                   "weights": weights_fingerprint(source)})


def resolve_start(cfg, ranks):
    """The config with a run folder as model.name replaced by its model folder (rank 0 merges, the others wait)."""
    if not is_run_start(cfg.model.name):
        return cfg
    folder = starting_model(cfg.model.name) if ranks.main else None
    ranks.barrier()
    folder = folder or starting_model(cfg.model.name)
    print(f"model: starting from run {cfg.model.name} ({Path(folder)})", file=sys.stderr, flush=True)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": folder})})


def anchored(cfg):
    """The config with its local paths made absolute: data files, a model folder or GGUF, output.dir.

    The run's config.yaml is read again later, from wherever the user is (export's checks on the run's
    own conversations, compare's k-shot pool, eval and chat of the run, a resume from the dashboard);
    paths relative to the directory training started in would name other files or none there."""
    from .config import Config
    from .setting_keys import with_paths
    from .data.sources import is_hub_id

    def absolute(key: str, spec: str) -> str:
        path = Path(spec).expanduser()
        if key == "model.name":  # a local folder or GGUF; else a hub id or "default"
            kept = spec == "default" or not path.exists()
        else:  # "demo" and hub data sets stay; output.dir is a folder, made or not
            kept = key != "output.dir" and (spec == "demo" or is_hub_id(spec))
        return spec if kept else str(path.resolve())

    return Config.model_validate(with_paths(cfg.model_dump(), absolute))
