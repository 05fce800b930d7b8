"""Starting, stopping and resuming runs from the dashboard: `tunesmith train` in a child process,
so a run started from the page is the same as one started in a terminal."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .. import runlock
from ..entry import SAFE_ENTRY
from ..config import Config, dump, load_config
from ..errors import UserError
from .folders import LOG_FILE, RUN_NAME, inside, status, training_pid

# Form field -> config key. Everything else goes through the free "key=value" lines.
FORM_KEYS = {
    "model": "model.name", "train": "data.train", "validation": "data.validation", "test": "data.test",
    "max_seq_len": "data.max_seq_len", "method": "adapter.method", "r": "adapter.r", "alpha": "adapter.alpha",
    "epochs": "train.epochs", "max_steps": "train.max_steps", "batch_size": "train.batch_size",
    "grad_accum": "train.grad_accum", "lr": "train.lr", "log_every": "train.log_every",
    "checkpoint_every": "train.checkpoint_every", "eval_every": "eval.every_steps",
}
DATA_KEYS = ("train", "validation", "test")
# Settings that make training run code other than tunesmith's: the model repository's own Python
# (model.trust_remote_code) and modules imported by name (eval.scorer, GRPO's train.rewards). From the
# dashboard only when it was started with `tunesmith ui --allow-code`.
CODE_SETTINGS = {"model.trust_remote_code": lambda cfg: cfg.model.trust_remote_code,
                 "eval.scorer": lambda cfg: cfg.eval.scorer is not None,
                 "train.rewards": lambda cfg: bool(cfg.train.rewards)}


def form_config(form: dict, runs_dir: Path, allow_code: bool = False) -> tuple[str, Config]:
    """(run name, validated config) from the form; mistakes raise UserError with the field's name.

    Settings that run code are refused unless `allow_code`: they are judged on the validated
    config, so no spelling of them in the free lines gets through."""
    name = str(form.get("name") or "").strip()
    if not RUN_NAME.match(name):
        raise UserError(f"run name {name!r}: use letters, digits, '.', '_' or '-' (at most 100), starting with a letter or digit")
    overrides = []
    for field, key in FORM_KEYS.items():
        value = form.get(field)
        if value is None or str(value).strip() == "":
            continue
        value = str(value).strip()
        if field in DATA_KEYS and value != "demo":
            value = str(Path(value).expanduser().absolute())  # the child process may run elsewhere
        overrides.append(f"{key}={value}")
    for number, line in enumerate(str(form.get("extra") or "").splitlines(), 1):
        if line.strip() and not line.strip().startswith("#"):
            if "=" not in line:
                raise UserError(f"extra settings, line {number}: expected section.key=value, got {line.strip()!r}")
            overrides.append(line.strip())
    overrides.append(f"output.dir={inside(runs_dir, name)}")
    cfg = load_config(None, overrides)
    refuse_code(cfg, allow_code)
    return name, cfg


def refuse_code(cfg: Config, allow_code: bool) -> None:
    """Refuse a config with settings that run code, unless the dashboard was started to allow them."""
    asked = [key for key, is_set in CODE_SETTINGS.items() if is_set(cfg)]
    if asked and not allow_code:
        raise UserError(f"{' and '.join(asked)}: would run code other than tunesmith's; refused from the dashboard "
                        "unless it was started with `tunesmith ui --allow-code` (or train from the terminal)")


def preview(form: dict, runs_dir: Path, allow_code: bool = False) -> dict:
    """The data check and the plan, shown before a run starts."""
    from ..api import check_data_paths
    from ..data.check import build_report
    from ..data.prepare import prepare
    from ..start import unmerged
    from ..training.step import total_steps

    name, cfg = form_config(form, runs_dir, allow_code)
    check_data_paths(cfg)
    # The spec (a run folder's: the tokenizer it kept) lets a cached tokenisation skip loading the tokenizer.
    data = prepare(cfg.data, unmerged(cfg.model.name)[1])
    check = build_report(data, cfg.data, cfg.data.train, cfg.model.name)
    train = data.splits["train"]
    steps = total_steps(cfg, len(train))
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    mean_tokens = train.tokens / max(1, len(train))
    basic = {"optimizer_steps": steps, "examples_per_step": per_step, "epochs": round(steps * per_step / max(1, len(train)), 2),
             "tokens_to_train": int(steps * per_step * mean_tokens), "mean_tokens_per_example": round(mean_tokens, 1)}
    return {"name": name, "config": cfg.model_dump(mode="json"), "exists": (runs_dir / name).exists(),
            "data_check": check, "plan": basic, "plan_text": memory_and_time(cfg)}


def memory_and_time(cfg: Config) -> str | None:
    """`tunesmith plan CONFIG`'s memory and time estimate (the run's own micro-batches and padding)
    where that module is installed; the basic plan stands without."""
    try:
        from ..plan import format_plan, plan_of
    except ImportError:
        return None
    try:
        return format_plan(plan_of(cfg, read_data=True))
    except Exception as err:  # an estimate that fails must not block starting the run
        return f"no estimate: {type(err).__name__}: {err}"


def start(form: dict, runs_dir: Path, allow_code: bool = False) -> tuple[str, subprocess.Popen]:
    """Write the run's config.yaml into a new run folder and train it in a child process."""
    from ..api import check_data_paths

    name, cfg = form_config(form, runs_dir, allow_code)
    folder = runs_dir / name
    if folder.exists():
        raise UserError(f"{folder}: a run of that name exists; choose another name")
    check_data_paths(cfg)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump(cfg), encoding="utf-8")
    return name, launch(folder)


def resume(folder: Path, allow_code: bool = False) -> subprocess.Popen:
    """Continue a stopped run from its newest checkpoint (or retry a failed one)."""
    state = status(folder)
    if state not in ("stopped", "failed", "pending"):
        raise UserError(f"{folder.name}: is {state}; only a stopped or failed run can be resumed")
    refuse_code(load_config(folder / "config.yaml"), allow_code)
    return launch(folder)  # a second Resume racing this one finds the lock taken there


def finish(folder: Path, allow_code: bool = False) -> subprocess.Popen:
    """End a stopped run at its newest checkpoint: nothing more is trained; it is evaluated and its
    model written with that step's weights (`tunesmith train CONFIG train.max_steps=N`)."""
    from ..runs import RunFolder

    state, step = status(folder), RunFolder(folder).stopped_at()
    if state != "stopped" or step is None:
        raise UserError(f"{folder.name}: is {state}; only a stopped run (one with a checkpoint) can be finished")
    refuse_code(load_config(folder / "config.yaml"), allow_code)
    return launch(folder, f"train.max_steps={step}")


TOKEN_VARIABLE = "TUNESMITH_UI_TOKEN"  # the dashboard's token from the environment, out of sight of `ps`


# train.log, never through a link (runlock.handover has refused links in the folder already)
APPEND_NEW = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW


def launch(folder: Path, *overrides: str) -> subprocess.Popen:
    """`tunesmith train` on the folder's config in a child process that holds the run folder's lock
    from its first instant (taken here, handed over): the run shows as running at once, and a second
    trainer for the folder, from here or a terminal, is refused. The run goes on in this folder, where
    its config.yaml may name another (the folder was moved or copied)."""
    with runlock.handover(folder) as lock, open(os.open(folder / LOG_FILE, APPEND_NEW, 0o644), "ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-c", SAFE_ENTRY, "train", str(folder / "config.yaml"), *overrides,
             f"output.dir={folder.absolute()}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, pass_fds=(lock,),
            # Its own session: a Ctrl-C in the dashboard's terminal does not stop the runs it started.
            # Not the dashboard's token: a scorer or reward function of the run could read it.
            start_new_session=True, env={**{k: v for k, v in os.environ.items() if k != TOKEN_VARIABLE},
                                         "PYTHONUNBUFFERED": "1", runlock.INHERITED: str(lock)})
        runlock.record(lock, child.pid)
    return child


def stop(folder: Path) -> int:
    """SIGTERM to the process holding the run folder's lock, and to no other: the training loop
    finishes its step, writes a checkpoint and exits (status 143)."""
    pid = training_pid(folder)
    if pid is None:
        raise UserError(f"{folder.name}: not running")
    if pid <= 0:
        raise UserError(f"{folder.name}: its training process is starting; try again in a moment")
    os.kill(pid, signal.SIGTERM)
    return pid
