"""RunFolder: the one owner of a run folder's layout, its status, and loading a trained model back.

A run folder holds what `tunesmith train` writes:

    config.yaml            the validated config the run trained with
    metrics.jsonl          one JSON record per line (train, eval, events)
    checkpoints/step-N/    resumable states (step-N.partial while being written)
    best.safetensors       trainable weights of the lowest eval loss so far
    adapter/ or model/     the trained weights with tokenizer (Method.saves)
    started_from.json      the earlier run's model a run started from (`model: RUN`; lineage.py)
    data/                  the demo task's data files
    predictions*.jsonl     generated answers on the test split (fine-tuned, base, baselines)
    results.json           the run's results, written last (a finished run)
    comparison.json(l)     `tunesmith compare` output
    report.html/.json      the report
    train.log, .lock       the dashboard's log of a run it started; the trainer's lock
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from . import runlock
from .errors import UserError
from .lineage import check_base
from .methods import ADAPTER_DIR, MODEL_DIR
from .weightfiles import read_json, readable_weights

CHECKPOINT_PREFIX = "step-"
PARTIAL = ".partial"


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # Layout
    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    best_weights = property(lambda self: self.path / "best.safetensors")
    data = property(lambda self: self.path / "data")
    results = property(lambda self: self.path / "results.json")
    comparison = property(lambda self: self.path / "comparison.json")
    general = property(lambda self: self.path / "general.json")  # `eval RUN --general`, after training
    comparison_rows = property(lambda self: self.path / "comparison.jsonl")
    base_scores = property(lambda self: self.path / "base_scores.json")  # eval/base_cache.py
    log = property(lambda self: self.path / "train.log")

    def predictions(self, which: str = "fine_tuned") -> Path:
        """predictions.jsonl (the fine-tuned model's), predictions_base.jsonl, predictions_<baseline>.jsonl."""
        return self.path / ("predictions.jsonl" if which == "fine_tuned" else f"predictions_{which}.jsonl")

    def trained(self) -> Path:
        """The folder of the trained weights (adapter/ or model/), its weight files readable and the model
        it trained on (an earlier run's: lineage.py) still as it was."""
        for name in (ADAPTER_DIR, MODEL_DIR):
            if (self.path / name).is_dir():
                readable_weights(self.path / name)
                check_base(self.path)
                return self.path / name
        pid = runlock.holder(self.path)
        if pid is not None and pid != os.getpid():  # the trainer itself reads its model at the end
            raise UserError(f"{self.path}: still training (process {pid or 'starting'}); its model is written when it "
                            "ends: wait for it, or stop it (Ctrl-C there, or kill it) to keep its last checkpoint")
        step = self.stopped_at()
        if step is not None:  # stopped before the end: it can go on, or end where it is
            raise UserError(f"{self.path}: training stopped at step {step} ({self.checkpoint_folders()[-1]}) before "
                            "it wrote its model; "
                            f"`tunesmith train {self.config}` goes on, `tunesmith train {self.config} "
                            f"train.max_steps={step}` ends the run at that step and writes its model")
        raise UserError(f"{self.path}: no trained model in this run folder (expected '{ADAPTER_DIR}/' or '{MODEL_DIR}/')")

    # Reading
    def is_run(self) -> bool:
        return self.config.is_file()

    def require(self) -> "RunFolder":
        if not self.is_run():
            raise UserError(f"{self.path}: not a run folder (no config.yaml)" if self.path.is_dir() else
                            f"{self.path}: no such run folder")
        return self

    def read_config(self):
        """The run's Config (validated as when it trained)."""
        from .config import load_config

        return load_config(self.config)

    def conversations(self, split: str) -> list[list[dict]]:
        """A split's conversations ("train", "validation") as training read them: with the config's format,
        columns and system prompt (for another objective than SFT, those of its records with a good
        answer). [] where the split has no local file (moved away, a hub data set, none)."""
        from .data.prepare import load_conversations

        written = self.data / f"{split}.jsonl"  # the demo task's generated files: chat messages already
        if written.is_file():
            return load_conversations(str(written), None)[0]
        cfg = self.read_config()
        data, objective = cfg.data, cfg.train.objective
        spec = getattr(data, split)
        if not spec or spec == "demo" or not Path(spec).expanduser().exists():
            return []
        if objective != "sft":  # pairs, KTO answers, GRPO prompts: those with a good answer
            from .objectives import answered_conversations

            return answered_conversations(spec, data, objective)
        return load_conversations(spec, data.system_prompt, data.format, data.columns, data.hub_split)[0]

    def read_results(self) -> dict | None:
        """results.json, with `eval RUN --general`'s probe where training ran none."""
        found = read_json(self.results)
        if not isinstance(found, dict):
            return None  # a broken or foreign file: as if none
        later = read_json(self.general) if not found.get("general") else None
        return {**found, "general": later} if isinstance(later, dict) else found

    def intact_results(self) -> dict | None:
        """read_results, where a results.json that is there but does not read is an error: the report
        and push would otherwise leave the run's own figures out without a word."""
        found = self.read_results()
        if found is None and self.results.exists():
            raise UserError(f"{self.results}: damaged (not a readable JSON object); restore it from a copy, or "
                            f"train the run again; nothing was written")
        return found

    def records(self, event: str | None = None) -> list[dict]:
        """metrics.jsonl's records (of one event kind)."""
        return [r for r in read_jsonl(self.metrics) if event is None or r.get("event") == event]

    def checkpoint_folders(self, complete: bool = True) -> list[Path]:
        return checkpoint_folders(self.checkpoints, complete)

    def stopped_at(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        found = self.checkpoint_folders()
        return checkpoint_step(found[-1].name) if found else None

    def status(self) -> str:
        """finished / running / stopped (resumable) / failed / pending, from the folder alone."""
        from . import runlock

        if runlock.holder(self.path) is not None:  # also while it writes its report after results.json
            return "running"
        if self.results.is_file():
            return "finished"
        if self.checkpoint_folders():
            return "stopped"
        if self.log.is_file() or self.metrics.is_file():
            return "failed"
        return "pending"

    # Writing
    def check_folder(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path}: output.dir exists and is not a folder")

    def check_usable(self, overwrite: bool, must_resume: bool = False, resume: bool = True, merged: bool = True) -> None:
        """Refuse an unusable run folder before anything is loaded or written (`merged` False: before
        `model: RUN` is merged again, so a removed merge is no reason)."""
        self.check_folder()
        if must_resume and not self.checkpoint_folders():
            raise UserError(f"{self.path}: --resume given, but there is no checkpoint to resume from")
        if not overwrite and not must_resume and self.results.exists():
            raise UserError(f"{self.path}: holds a finished run; choose another output.dir or set output.overwrite=true")
        # A run that starts over beside another's checkpoints would lose its own to them (the oldest go).
        if not overwrite and not resume and self.checkpoint_folders():
            raise UserError(f"{self.path}: holds the checkpoints of an unfinished run, and train.resume=false starts "
                            "over: set output.overwrite=true to delete them, or choose another output.dir")
        if self.checkpoint_folders() and not self.starts_over(overwrite, must_resume, resume):
            check_base(self.path, merged)  # a resume goes on on the model it started on

    def starts_over(self, overwrite: bool, must_resume: bool, resume: bool) -> bool:
        """Whether `prepare` deletes the earlier run's state: overwrite of a finished run, or of an
        unfinished one with train.resume off."""
        return overwrite and not must_resume and (self.results.exists() or not resume)

    def prepare(self, overwrite: bool, must_resume: bool = False, resume: bool = True) -> None:
        """A fresh or resumable run folder. Overwrite starts a finished run over (an unfinished one too
        with train.resume off); an unfinished run is resumed by the loop: `tunesmith demo` (overwrite on)
        stopped with Ctrl-C and run again goes on from its checkpoint."""
        self.check_usable(overwrite, must_resume, resume)
        if self.starts_over(overwrite, must_resume, resume):
            # The earlier run's model and exports too: a lora run retrained as a full fine-tune kept
            # serving its adapter/, and `model: RUN` its merge.
            for target in (self.checkpoints, self.metrics, self.results, self.best_weights, self.path / ADAPTER_DIR,
                           self.path / MODEL_DIR, self.path / "export", self.comparison, self.comparison_rows,
                           self.general, self.base_scores):  # the earlier model's scores too
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            # early_stop.BestWeights.kept; the earlier model's answers and report (the new report showed
            # them as its own); pairs.jsonl stays: `tunesmith pairs` data a later run may train on
            for earlier in [*self.path.glob("best-step-*.safetensors"), *self.path.glob("predictions*.jsonl"),
                            self.path / "report.html", self.path / "report.json"]:
                earlier.unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)


def checkpoint_folders(folder: Path, complete: bool = True) -> list[Path]:
    """Complete checkpoints (or the partial ones left by a crash) in `folder`, oldest first by step."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name.endswith(PARTIAL) != complete]
    return sorted(found, key=lambda p: checkpoint_step(p.name))


def checkpoint_step(name: str) -> int:
    """The step of a checkpoint folder name ('step-00000012' or 'step-00000012.partial')."""
    digits = name.removeprefix(CHECKPOINT_PREFIX).removesuffix(PARTIAL)
    return int(digits) if digits.isdigit() else -1


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    """The JSON objects of a JSONL file; a line still being written (or cut by a crash) is left out."""
    rows: list[dict] = []
    try:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                if limit is not None and len(rows) >= limit:
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    rows.append(record)
    except OSError:
        pass
    return rows


def write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=2, default=str))


def write_text(path: Path, text: str) -> None:
    """Written to a new file beside `path`, flushed to disk, then renamed onto it: a reader never sees
    half a file, a crash right after leaves the old or the new file, never an empty one, and a link
    in either place (a run folder from elsewhere) is replaced, never written through."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with open(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (POSIX: the directory entry is data of the folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_run(path: str | Path) -> bool:
    return RunFolder(path).is_run()


def trained_on_raw_text(spec: str) -> bool:
    """Whether a run folder trained on raw text alone (data.format text, or every record it read was)."""
    run = RunFolder(spec)
    if not run.is_run():
        return False
    if run.read_config().data.format == "text":
        return True
    formats = ((run.read_results() or {}).get("data") or {}).get("formats") or {}
    return set(formats) == {"text"}


def system_prompt_of(spec: str) -> str | None:
    """The system prompt a run folder trained with: data.system_prompt, else the system message every one of
    its training conversations starts with (the demo's); None for a model, or where they differ. Asked without
    it, a model trained with one answers as it was never trained to."""
    run = RunFolder(spec)
    if not run.is_run():
        return None
    given = run.read_config().data.system_prompt
    if given:
        return given
    openings = set()
    for conversation in run.conversations("train"):
        first = next((m for m in conversation if m["role"] != "tools"), {})
        openings.add(first["content"] if first.get("role") == "system" else None)
    return openings.pop() if len(openings) == 1 else None


def own_test_data(spec: str) -> str:
    """The test data a run was scored on at its end (data.test, or the demo's data/test.jsonl), for
    `tunesmith eval RUN` without --data."""
    run = RunFolder(spec)
    if not run.is_run():
        raise UserError("eval: give --data FILE, --general, or both (a run folder is scored on its own test data)")
    config = run.read_config()
    written = run.data / "test.jsonl"  # the demo's, generated with its training data
    test = config.data.test or (str(written) if written.is_file() else None)
    if test is None:
        raise UserError(f"{spec}: the run had no test data (data.test); give --data FILE, --general, or both")
    from .progress import say

    say(f"eval: the run's own test data, {test}" + (f"; it was scored with eval.scorer {config.eval.scorer}: "
                                                    f"add --scorer {config.eval.scorer}" if config.eval.scorer else ""))
    return test


def trained_folder(run: str | Path) -> Path:
    return RunFolder(run).trained()


def check_loadable(spec: str) -> None:
    """What load_trained would refuse before loading weights (a model folder that is not there; a run
    still training, without its model, or whose base run changed since), said at once."""
    from .models.load import resolve_model_path

    if is_run(Path(spec)):
        RunFolder(spec).trained()
    elif not (Path(spec) / "adapter_config.json").exists():
        resolve_model_path(spec)


def load_trained(spec: str, dtype=None, device=None):
    """(model, tokenizer, base model name) for a run folder, an adapter folder or a plain model,
    on `device` (default: train.device's auto)."""
    import torch

    from . import methods
    from .device import compute_dtype, resolve
    from .models import load_model, load_tokenizer

    device = resolve("auto") if device is None else torch.device(device)
    path = Path(spec)
    method, trained, base_name = None, None, spec
    if is_run(path):
        run = RunFolder(path)
        config = run.read_config()
        base_name, method, trained = config.model.name, methods.get(config.adapter.method), run.trained()
        dtype = dtype or compute_dtype(config.model.dtype, device)
    elif (path / "adapter_config.json").exists():
        trained = path
        readable_weights(trained)  # a run's are checked by run.trained()
        adapter = read_json(path / "adapter_config.json")
        if not isinstance(adapter, dict) or "base_model_name_or_path" not in adapter:
            raise UserError(f"{path / 'adapter_config.json'}: not an adapter config naming its base "
                            "(base_model_name_or_path)")
        base_name = adapter["base_model_name_or_path"]
        method = methods.get("lora")
    dtype = dtype or compute_dtype("auto", device)
    if trained is None:
        return load_model(spec, dtype, device=device), load_tokenizer(spec), spec
    tokenizer = load_tokenizer(str(trained))
    if (trained / "adapter_config.json").exists():
        from peft import PeftModel

        if not isinstance(read_json(trained / "adapter_config.json"), dict):
            raise UserError(f"{trained / 'adapter_config.json'}: not a JSON object (the file is damaged); "
                            "train the run again, or restore the folder")

        # A QLoRA adapter was trained on the 4-bit base: it is reloaded on that same base.
        model = PeftModel.from_pretrained(method.load_base(base_name, dtype, device), trained)
    else:
        model = load_model(str(trained), dtype, device=device)
    model.eval()
    torch.set_grad_enabled(True)
    return model, tokenizer, base_name
