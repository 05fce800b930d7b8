"""The main flow as plain functions: train (data -> model -> fit -> save -> evaluate) and evaluate."""
from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import torch

from . import runlock, runs
from .adapters.lora import apply_adapter, count_parameters, model_bytes, save_trained
from .config import Config, dump, load_config
from .errors import UserError
from .data.prepare import Split, prepare, write_demo_files
from .eval.generate import generate_answers
from .eval.metrics import example_scores, load_scorer, mean_scores
from .models import compute_dtype, load_base, load_model, load_tokenizer
from .plan import TrainingMemory
from .training.loop import eval_loss, fit
from .training import distributed
from .training.early_stop import EarlyStopping
from .training.progress import open_loggers


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def train(config: Config | str | Path | dict, overrides: list[str] | None = None, must_resume: bool = False) -> dict:
    """Fine-tune as configured; returns the run's results (also written to results.json).

    A run folder holding checkpoints of an unfinished run is resumed (train.resume, default on).
    Under torchrun every rank calls this; rank 0 alone writes the run folder and scores generations."""
    cfg = _as_config(config, overrides)
    ranks = distributed.setup()
    try:
        return _train(cfg, must_resume, ranks)
    finally:
        distributed.teardown(ranks)


def _train(cfg: Config, must_resume: bool, ranks: distributed.Ranks) -> dict:
    check_data_paths(cfg)
    run_dir = Path(cfg.output.dir)
    runs.check_run_dir(run_dir, cfg.output.overwrite, must_resume)
    with contextlib.ExitStack() as held:  # released however the run ends: the run folder's lock, the loggers
        if ranks.main:
            held.enter_context(runlock.hold(run_dir))  # one writer per run folder, for the process's whole run
        return _train_holding(cfg, must_resume, ranks, run_dir, held)


def _train_holding(cfg: Config, must_resume: bool, ranks: distributed.Ranks, run_dir: Path,
                   held: contextlib.ExitStack) -> dict:
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    data = prepare(cfg.data, tokenizer)
    # Only now, with config and data known good, is the run folder touched: a mistake loses nothing.
    if ranks.main:
        runs.prepare_run_dir(run_dir, cfg.output.overwrite, must_resume)
        (run_dir / "config.yaml").write_text(dump(cfg), encoding="utf-8")
        if cfg.data.train == "demo":
            write_demo_files({name: split.conversations for name, split in data.splits.items()}, run_dir)
    ranks.barrier()
    log = held.enter_context(contextlib.closing(
        open_loggers(run_dir, cfg.eval.loggers, cfg.model_dump(mode="json")) if ranks.main else distributed.SilentLog()))
    summary = data.summary()
    say(f"data: {summary['examples']} examples, {summary['tokens']['train']} train tokens "
        f"({summary['label_tokens']['train']} with a loss); dropped: {summary['dropped'] or 'none'}")
    for problem in data.problems[:5]:
        say(f"  skipped {problem}")

    dtype = compute_dtype(cfg.model.dtype)
    predicted_peak = plan_at_start(cfg, summary)
    memory = TrainingMemory()
    model = load_base(cfg.model.name, dtype, cfg.adapter.method == "qlora", cfg.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    test = data.splits.get("test")
    validation = data.splits.get("validation")
    results: dict = {"config": cfg.model_dump(mode="json"), "data": summary, "dtype": str(dtype).replace("torch.", "")}

    base: dict = {}
    if validation:
        base["eval_loss"] = eval_loss(model, validation, cfg.eval.batch_size, pad_id, ranks)
    if test and cfg.eval.generate and cfg.eval.compare_base and ranks.main:
        base.update(score_generation(model, tokenizer, test, cfg, run_dir / "predictions_base.jsonl", "base"))

    torch.manual_seed(cfg.train.seed)
    model = apply_adapter(model, cfg.adapter)
    trainable, total = count_parameters(model)
    results["model_bytes"] = model_bytes(model)
    say(f"model: {cfg.model.name} ({dtype}), {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable "
        f"({100 * trainable / total:.2f}%), {results['model_bytes'] / 2**20:.0f} MiB as loaded; method {cfg.adapter.method}")
    stopper = EarlyStopping(cfg.eval.patience, cfg.eval.min_delta)
    memory.start()
    result = fit(model, data.splits["train"], validation, cfg, pad_id, log, run_dir,
                 on_eval=stopper if cfg.eval.patience and validation else None, ranks=ranks)
    results["peak_memory"] = {"predicted": predicted_peak, "measured": memory.peak()}
    say(f"peak training memory: measured {results['peak_memory']['measured'] / 2**30:.2f} GiB"
        + (f", planned {predicted_peak / 2**30:.2f} GiB" if predicted_peak else ""))
    if stopper.stopped_at:
        log.write(event="early_stop", step=stopper.stopped_at, best_step=stopper.best_step, best_eval_loss=stopper.best)
        say(f"early stop at step {stopper.stopped_at}: no eval-loss improvement over {cfg.eval.min_delta} in "
            f"{cfg.eval.patience} evaluations (best {stopper.best:.4f} at step {stopper.best_step})")
    if result.full_state is not None:  # FSDP2: the gathered weights, in an unsharded copy, for saving and scoring
        model = load_base(cfg.model.name, dtype, False, cfg.model.trust_remote_code)
        model.load_state_dict(result.full_state)
    if ranks.main:
        save_trained(model, tokenizer, run_dir / (runs.ADAPTER_DIR if cfg.adapter.method != "full" else runs.MODEL_DIR))

    tuned: dict = {}
    if validation:
        tuned["eval_loss"] = (result.final_eval if result.final_eval is not None
                              else eval_loss(model, validation, cfg.eval.batch_size, pad_id, ranks))
        log.write(event="eval", step=result.steps, eval_loss=tuned["eval_loss"],
                  perplexity=math.exp(min(tuned["eval_loss"], 50)))
    if not ranks.main:
        ranks.barrier()  # rank 0 scores, writes results and the report
        return {"base": base, "fine_tuned": tuned, "run_dir": str(run_dir), "rank": ranks.rank}
    if test and cfg.eval.generate:
        tuned.update(score_generation(model, tokenizer, test, cfg, run_dir / "predictions.jsonl", "fine-tuned"))
    results.update({
        "trainable_parameters": trainable, "total_parameters": total,
        "steps": result.steps, "resumed_from": result.resumed_from, "train_tokens": result.train_tokens, "train_seconds": round(result.seconds, 1),
        "tokens_per_second": round(result.tokens_per_second, 1), "first_loss": result.losses[0] if result.losses else None,
        "final_loss": result.losses[-1] if result.losses else None, "skipped_steps": result.skipped_steps,
        "base": base, "fine_tuned": tuned, "run_dir": str(run_dir),
        "early_stopped_at": stopper.stopped_at, "best_step": result.best_step, "restored_best": result.restored_best,
    })
    runs.write_json(run_dir / "results.json", results)
    if cfg.eval.report:
        from .eval.report import write_report

        say(f"report: {write_report(run_dir)[0]}")
    ranks.barrier()
    say(comparison_table(base, tuned))
    return results


def plan_at_start(cfg: Config, summary: dict) -> float | None:
    """Say what `tunesmith plan` expects this run to need; an estimate that fails never stops a run."""
    from .plan import training_estimate

    # No glibc mmap-threshold change here: handing every freed activation back to the system made
    # each step page-fault its buffers in again and halved training speed (360 -> 196 tokens/s).
    try:
        predicted, line = training_estimate(cfg, summary)
    except Exception as err:  # noqa: BLE001
        say(f"plan: no estimate ({type(err).__name__}: {err})")
        return None
    say(line)
    return predicted


def check_data_paths(cfg: Config) -> None:
    """Fail before anything slow is loaded when a data file is missing."""
    from .data.sources import check_source

    for name in ("train", "validation", "test"):
        path = getattr(cfg.data, name)
        if path and not (name == "train" and path == "demo"):
            check_source(path, f"data.{name}")  # a hub data set id passes; a missing local file does not
    for path in cfg.data.mix:
        check_source(path, "data.mix")


def score_generation(model, tokenizer, split: Split, cfg: Config, out: Path | None = None, label: str = "model") -> dict:
    """Generate answers for the split's prompts and score them against its reference answers."""
    conversations = split.conversations[: cfg.eval.test_limit] if cfg.eval.test_limit else split.conversations
    references = [c[-1]["content"] for c in conversations]
    answers, speed = generate_answers(model, tokenizer, conversations, cfg.eval.max_new_tokens, cfg.eval.batch_size,
                                      label=f"generate ({label})", temperature=cfg.eval.temperature, seed=cfg.eval.seed)
    scores = score(answers, references, cfg.eval.scorer)
    scores["test_examples"] = len(references)
    scores["generated_tokens_per_second"] = round(speed["tokens_per_second"], 1)
    if out is not None:
        with open(out, "w", encoding="utf-8") as handle:
            for conversation, answer in zip(conversations, answers):
                handle.write(json.dumps({"prompt": conversation[-2]["content"], "reference": conversation[-1]["content"],
                                         "answer": answer}) + "\n")
    return scores


def score(answers: list[str], references: list[str], scorer: str | None = None) -> dict:
    """JSON references get field-level scores; free text gets exact match, normalised exact match,
    token F1 and ROUGE-L; `scorer` ('module:function') adds the user's own metric."""
    rows = example_scores(answers, references, load_scorer(scorer) if scorer else None, _scorer_name(scorer))
    return mean_scores(rows)


def _scorer_name(spec: str | None) -> str:
    return spec.rpartition(":")[2] if spec else "custom"


def evaluate(model_or_run: str, data: str, max_new_tokens: int = 96, batch_size: int = 16, limit: int | None = None,
             scorer: str | None = None, temperature: float = 0.0, seed: int = 0) -> dict:
    """Eval loss and generation scores of a model or run on a data file."""
    from .config import DataConfig, EvalConfig
    from .runs import load_trained

    model, tokenizer, _ = load_trained(model_or_run)
    prepared = prepare(DataConfig(train=data, validation=data), tokenizer)
    split = prepared.splits["validation"]
    cfg = Config(eval=EvalConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, test_limit=limit, scorer=scorer,
                                 temperature=temperature, seed=seed))
    results = {"eval_loss": eval_loss(model, split, batch_size, tokenizer.pad_token_id)}
    results.update(score_generation(model, tokenizer, split, cfg, label="eval"))
    return results


def compare(a: str, b: str, data: str, kshot: int = 0, kshot_data: str | None = None, max_new_tokens: int = 96,
            batch_size: int = 16, limit: int | None = None, scorer: str | None = None, temperature: float = 0.0,
            seed: int = 0, out: str | None = None) -> dict:
    """A against B (e.g. base model vs fine-tuned run) with bootstrap intervals; optionally A k-shot too.

    Written to `out` (default: B's run folder, whose report then shows the comparison)."""
    from .eval.compare import compare_models, format_table, write_comparison

    if not Path(data).exists():
        raise UserError(f"{data}: data file not found")
    result = compare_models(a, b, data, kshot, kshot_data, max_new_tokens, batch_size, limit, temperature, seed,
                            load_scorer(scorer) if scorer else None, _scorer_name(scorer),
                            names=_names(a, b))
    folder = Path(out) if out else (Path(b) if runs.is_run(b) else None)
    if folder is not None:
        say(f"comparison: {write_comparison(result, folder)}")
        if runs.is_run(folder):
            from .eval.report import write_report

            say(f"report: {write_report(folder)[0]}")
    say(format_table(result))
    return result


def _names(a: str, b: str) -> tuple[str, str]:
    """Short column names for the table: folder names, or A and B where those are the same."""
    short = (Path(a).name or a, Path(b).name or b)
    return short if short[0] != short[1] else ("A", "B")


def comparison_table(base: dict, tuned: dict) -> str:
    keys = [k for k in tuned if isinstance(tuned[k], float) and k in base] or list(tuned)
    lines = [f"{'metric':<28}{'base':>12}{'fine-tuned':>12}"]
    for key in keys:
        b, t = base.get(key), tuned.get(key)
        fmt = (lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append(f"{key:<28}{fmt(b):>12}{fmt(t):>12}")
    return "\n".join(lines)


def _as_config(config, overrides) -> Config:
    from .config import merge, parse_overrides, validate

    if isinstance(config, (Config, dict)):
        raw = config.model_dump() if isinstance(config, Config) else config
        return validate(merge(raw, parse_overrides(overrides or [])))
    return load_config(config, overrides)
