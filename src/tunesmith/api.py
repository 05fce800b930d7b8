"""The main flow as plain functions: train (data -> model -> fit -> save -> evaluate) and evaluate."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from . import accel, methods, objectives, runlock
from .config import Config, dump, load_config
from .data.check import data_lines
from .data.collate import PADDED, PADDING_FREE, layout
from .data.packing import as_trained
from .data.prepare import write_demo_files
from .device import compute_dtype, describe, resolve
from .errors import UserError
from .eval.baselines import baseline_table, cut_answers_warning, format_baselines, score_base_rows, score_tuned_rows
from .eval.baselines import summary as row_summary
from .eval import base_cache
from .eval.base_cache import BaseScores
from .eval.general import GeneralAbility, score_probe
from .data.formats import is_raw_text
from .eval.decoding import LoopGuard
from .eval.loss import eval_loss
from .eval.scoring import scorer_name
from .eval.selection import selection
from .methods.common import count_parameters, model_bytes, save_trained
from .models import load_tokenizer
from .models.quant import require_bitsandbytes
from .plan import TrainingMemory
from .progress import say
from .runs import RunFolder, write_json
from .start import anchored, record_start, resolve_start
from .training import distributed, recompute, sharded_end, sharded_start
from .training.loggers import open_loggers
from .training.loop import eval_figures, fit


def train(config: Config | str | Path | dict, overrides: list[str] | None = None, must_resume: bool = False) -> dict:
    """Fine-tune as configured; returns the run's results (also written to results.json).

    A run folder holding checkpoints of an unfinished run is resumed (train.resume, default on).
    Under torchrun every rank calls this; rank 0 alone writes the run folder and scores generations."""
    cfg = _as_config(config, overrides)
    ranks = distributed.setup(cfg.train.device)
    try:
        return _train(cfg, must_resume, ranks)
    finally:
        distributed.teardown(ranks)


def _train(cfg: Config, must_resume: bool, ranks: distributed.Ranks) -> dict:
    check_data_paths(cfg)
    if cfg.eval.scorer:  # imported now, not first when the trained model's answers are scored
        from .eval.metrics import load_scorer

        load_scorer(cfg.eval.scorer)
    if cfg.eval.best_metric != "eval_loss" and ranks.world > 1:
        raise UserError(f"eval.best_metric={cfg.eval.best_metric} generates answers during training in one process "
                        "only; under torchrun use eval.best_metric=eval_loss")
    run = RunFolder(anchored(cfg).output.dir)
    run.check_folder()
    # One writer per run folder, held for the process's whole run (the dashboard reads it as "running").
    # Taken before the folder is judged: a second writer hears of the first, not of its half-written state.
    with runlock.hold(run.path) if ranks.main else contextlib.nullcontext():
        # Judged before `model: RUN` is merged: a resume its start refuses, or a finished run, merged it for nothing.
        run.check_usable(cfg.output.overwrite, must_resume, cfg.train.resume, merged=False)
        cfg = anchored(resolve_start(cfg, ranks))  # model: an earlier run folder -> its (merged) model
        run.check_usable(cfg.output.overwrite, must_resume, cfg.train.resume)  # and the merge it trained on
        device = resolve(cfg.train.device, ranks.local_rank)
        method = methods.get(cfg.adapter.method)
        tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
        data = objectives.prepare_data(cfg, tokenizer)
        # Only now, with config and data known good, is the run folder written: a mistake loses nothing.
        _refuse_changed_resume(run, cfg, data, must_resume)
        if ranks.main:
            run.prepare(cfg.output.overwrite, must_resume, cfg.train.resume)
            run.config.write_text(dump(cfg), encoding="utf-8")
            record_start(run, cfg.model.name)  # an earlier run's model: later loads check it is unchanged
            if cfg.data.train == "demo":
                write_demo_files({name: split.conversations for name, split in data.splits.items()}, run.path)
        ranks.barrier()
        log = open_loggers(run.path, cfg.eval.loggers, cfg.model_dump(mode="json")) if ranks.main else distributed.SilentLog()
        try:
            return _train_model(cfg, run, data, tokenizer, method, device, ranks, log)
        finally:  # closed however the run ends
            log.close()


def _refuse_changed_resume(run: RunFolder, cfg: Config, data, must_resume: bool) -> None:
    """A resume its checkpoint refuses (another lr, other data) is refused before config.yaml is
    rewritten: the refused settings replaced the ones the checkpoint trained with (and the model loaded
    first). The loop checks again against the checkpoint it picks."""
    from .training import checkpoint as ckpt
    from .training.step import total_steps

    done = run.checkpoint_folders()
    if not cfg.train.resume or not done or (cfg.output.overwrite and not must_resume and run.results.exists()):
        return
    newest = ckpt.damage(done[-1], thorough=False) if must_resume else None
    if newest and all(ckpt.damage(path, thorough=False) for path in reversed(done[:-1])):  # until one reads back
        raise UserError(f"{run.path}: --resume given, but no checkpoint reads back (the newest, {done[-1].name}: "
                        f"{type(newest).__name__}: {str(newest)[:120]}); without --resume the run starts over")
    train = as_trained(data.splits["train"], cfg.data)
    try:
        ckpt.check_same_settings(done[-1], ckpt.resume_settings(cfg, train), total_steps(cfg, len(train)))
    except (OSError, ValueError, KeyError):
        pass  # a damaged checkpoint: the loop skips it and says so


def _train_model(cfg: Config, run: RunFolder, data, tokenizer, method, device, ranks, log) -> dict:
    for line in data_lines(data, cfg.data):
        say(line)
    if "test" in data.splits and cfg.eval.generate and not is_raw_text(data.splits["test"].conversations):
        # The answer's tokens but the end-of-turn token, which is labelled too.
        cut = cut_answers_warning([e.label_count - 1 for e in data.splits["test"].encoded], cfg.eval)
        if cut:
            say(cut)
    dtype = compute_dtype(cfg.model.dtype, device)
    say(describe(device, dtype))
    if method.quantized_base:  # a library, not training memory: imported before the baseline
        require_bitsandbytes()
    memory = TrainingMemory(device)
    sharded = ranks.active and cfg.train.fsdp  # FSDP2: weightless here, rank 0's weights sent into the shards below
    if sharded:
        model = sharded_start.skeleton(cfg, method, dtype)
    else:
        model = method.load_base(cfg.model.name, dtype, device, cfg.model.trust_remote_code)
        torch.manual_seed(cfg.train.seed)
        # The method's trainable parts start as the identity (LoRA's B = 0), so the model scores as
        # the base until it trains: the base is evaluated through the same fast paths as training.
        model = method.make_trainable(model, cfg.adapter)
    applied = accel.apply(model, device, cfg.train.fast_paths)
    say(accel.describe(applied, cfg.train.fast_paths, device))
    if cfg.adapter.offload_activations:
        say("activations: the checkpointed blocks' inputs wait in pinned host memory" if device.type == "cuda"
            else "activations: adapter.offload_activations has no effect on the CPU (they are in host memory already)")
    eval_layout = PADDING_FREE if accel.padding_free(model) else PADDED
    train_layout = layout(cfg.data.packing, eval_layout == PADDING_FREE)
    train_split = as_trained(data.splits["train"], cfg.data)
    objective = None
    if cfg.train.objective != "sft":  # preference and reward objectives (objectives/, issue 23)
        objective = objectives.build(cfg, model, tokenizer, method, device, train_layout)
        objective.prepare(model, [s for s in (train_split, data.splits.get("validation")) if s], ranks)
    planned = plan_of_run(cfg, train_split, train_layout, device, ranks.world)  # the run's first steps, drawn once
    checkpointing = recompute.choose(cfg, model, planned, device, memory.baseline, ranks)
    if checkpointing.line:
        say(checkpointing.line)
    predicted_peak = plan_at_start(planned, checkpointing.blocks)
    trainable, total = count_parameters(model)
    results: dict = {"config": cfg.model_dump(mode="json"), "data": data.summary(), "dtype": str(dtype).replace("torch.", ""),
                     "device": str(device), "fast_paths": applied, "batch_layout": train_layout,
                     "model_bytes": model_bytes(model), "gradient_checkpointing": checkpointing.record()}
    say(f"model: {cfg.model.name} ({dtype}), {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable "
        f"({100 * trainable / total:.2f}%), {results['model_bytes'] / 2**20:.0f} MiB as loaded; method {method.name}")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and cfg.data.max_seq_len > positions:  # rotary ones run on untrained past it, learned ones fail
        say(f"warning: data.max_seq_len={cfg.data.max_seq_len} is more than the {positions} positions {cfg.model.name} "
            "was trained on; longer examples go past them")
    pad_id = tokenizer.pad_token_id
    test, validation = data.splits.get("test"), data.splits.get("validation")
    root, whole = sharded_start.load_weights(model, cfg, method, dtype, device, ranks) if sharded else (None, None)

    def evaluate(loss_module=None, label: str = "eval loss") -> float:
        if objective is not None:  # the objective's loss on the validation split (grpo: minus its mean reward)
            return objective.evaluate(model, validation, cfg.eval.batch_size, ranks)
        return eval_loss(model, validation, cfg.eval.batch_size, pad_id, ranks, loss_module or root, eval_layout, label)

    base: dict = {}
    began = time.perf_counter()  # an evaluation during training takes as long: training's ETA counts them
    if validation:
        base["eval_loss"] = evaluate(label="eval loss (base)")
        if objective is not None:  # the pair objectives' pair accuracy, base and fine-tuned
            base.update(objective.held_out_figures(model, validation, cfg.eval.batch_size, ranks))
    select = selection(model, tokenizer, validation, cfg.eval)  # eval.best_metric other than the eval loss
    if select:  # the base's figure, and a wrong metric name found before any training
        base[f"validation_{select.metric}"] = select("generate (validation, base)")
        say(f"best weights by {select.metric} of {len(select.conversations)} validation answers: base "
            f"{base[f'validation_{select.metric}']:.4f}")
    eval_seconds = time.perf_counter() - began
    # The baselines' rows on the test split, and the general-ability probe (read first: a wrong
    # eval.general_data stops the run before anything slow).
    evidence = GeneralAbility(cfg.eval) if cfg.eval.general and ranks.main else None
    scored, scorer = None, model  # scorer: the whole model, one process's (a sharded one: rank 0's, where it fits)
    if sharded:
        wanted = whole is not None and (bool(test and cfg.eval.generate) or evidence is not None)
        scorer, why = sharded_start.for_scoring(whole, device, cfg.train.fast_paths) if wanted else (None, None)
        whole = None
        if scorer is None:
            evidence = None
            results.update({"not_scored": why} if why else {})
    kept = BaseScores(run.base_scores)  # a resumed run's base scores, as its first start scored them
    if test and cfg.eval.generate and ranks.main and scorer is not None:
        pool = train_split_of(data)
        scored = kept.rows(base_cache.rows_key(cfg, dtype, device, test.conversations, pool, eval_layout),
                           lambda: score_base_rows(scorer, tokenizer, test.conversations, pool, cfg.eval, run.path,
                                                   eval_layout, cfg.data.max_seq_len))
        if cfg.eval.compare_base:
            base.update(row_summary(scored[0]))
    if evidence is not None:
        evidence.scores["base"] = kept.probe(base_cache.probe_key(cfg, dtype, device, evidence.probe),
                                             lambda: score_probe(scorer, tokenizer, evidence.probe, "base"))
    if sharded:  # rank 0's whole copy freed before training (on its GPU it may take most of the memory)
        scorer = None
        sharded_end.collect_garbage(device)

    utilisation = _utilisation(cfg, train_split, device, ranks.world)
    log.write(event="run", step=0, device=str(device), dtype=results["dtype"], fast_paths=applied,
              batch_layout=train_layout, planned_peak=predicted_peak, gradient_checkpointing=checkpointing.record())
    memory.start()
    result = fit(model, train_split, validation, cfg, pad_id, log, run.path, ranks, train_layout,
                 evaluate if validation else None, utilisation, objective, select, eval_seconds)
    if result.tokens_trained:  # else the run ended at its checkpoint: no step here to measure
        results["peak_memory"] = {"predicted": predicted_peak, "measured": memory.peak(), **memory.details()}
        say(f"peak training memory: measured {results['peak_memory']['measured'] / 2**30:.2f} GiB"
            + (f", planned {predicted_peak / 2**30:.2f} GiB" if predicted_peak else ""))
    tuned: dict = {}
    if validation:  # ranks evaluate together (fit has scored sharded FSDP2 weights already)
        tuned["eval_loss"] = (result.final_eval if result.final_eval is not None
                              else evaluate(label="eval loss (fine-tuned)"))
        if objective is not None:
            tuned.update(objective.held_out_figures(model, validation, cfg.eval.batch_size, ranks))
    if select:  # the returned weights' figure, beside the base's: scored by fit where it evaluated them
        known = dict(result.selected).get(result.best_step if result.restored_best else result.steps)
        tuned[f"validation_{select.metric}"] = (select.value(known) if known is not None
                                               else select("generate (validation, fine-tuned)"))
    if ranks.fsdp:  # the trained weights written first; the whole model back only where it fits
        state, result.gathered_state, model = result.gathered_state, None, None
        if ranks.main:
            model, not_scored = sharded_end.finish(state, cfg, method, dtype, device, tokenizer, run.path / method.saves,
                                                   wanted=scored is not None or evidence is not None)
            results.update({"not_scored": not_scored} if not_scored else {})
        del state
        if model is not None:  # scored through the fast paths, as the base was
            accel.apply(model, device, cfg.train.fast_paths)
        elif ranks.main:
            evidence = None  # no fine-tuned half: the probe's base half is left out of the results too
    elif ranks.main:
        save_trained(model, tokenizer, run.path / method.saves)
    if not ranks.main:
        ranks.barrier()  # rank 0 scores, writes results and the report (distributed.COLLECTIVE_TIMEOUT)
        return {"base": base, "fine_tuned": tuned, "run_dir": str(run.path), "rank": ranks.rank}
    if "eval_loss" in tuned:
        log.write(event="eval", step=result.steps, **eval_figures(tuned["eval_loss"], cfg.train.objective),
                  **{k: v for k, v in tuned.items() if k.startswith("validation_")})
    if scored is not None and model is not None:  # None: a sharded model too large for one device
        scored += score_tuned_rows(model, tokenizer, test.conversations, train_split_of(data), cfg.eval, run.path,
                                   eval_layout, cfg.data.max_seq_len)
        tuned.update(row_summary(scored[-1]))
        if len(scored) > 1:
            results["baselines"] = baseline_table(scored, seed=cfg.eval.seed, scorer_name=scorer_name(cfg.eval.scorer),
                                                  guard=LoopGuard.of(cfg.eval))
    if evidence is not None and model is not None:
        evidence.score(model, tokenizer, "fine-tuned")
        results["general"] = evidence.results()
    stopper, speed = result.early_stopping, result.tokens_per_second
    results.update({
        "trainable_parameters": trainable, "total_parameters": total,
        "steps": result.steps, "resumed_from": result.resumed_from, "train_tokens": result.train_tokens,
        "train_seconds": round(result.total_seconds, 1), "tokens_per_second": speed and round(speed, 1),
        "mfu": round(utilisation(speed), 4) if utilisation and speed else None,
        "first_loss": result.losses[0] if result.losses else None,
        "final_loss": result.losses[-1] if result.losses else None, "skipped_steps": result.skipped_steps,
        "base": base, "fine_tuned": tuned, "run_dir": str(run.path),
        "early_stopped_at": stopper.stopped_at if stopper else None, "best_step": result.best_step,
        "best_metric": cfg.eval.best_metric,
        "restored_best": result.restored_best,
    })
    write_json(run.results, results)
    if cfg.eval.report:
        from .eval.report import write_report

        say(f"report: {write_report(run.path)[0]}")
    ranks.barrier()
    say(comparison_table(base, tuned))
    if cfg.train.objective != "sft" and "eval_loss" in tuned:
        say(f"eval_loss: {objectives.eval_loss_note(cfg.train)}")
    if "baselines" in results:
        say(format_baselines(results["baselines"]))
    if evidence is not None:
        say(evidence.table())
        for line in evidence.warnings():
            say(line)
    return results


def train_split_of(data) -> list[list[dict]]:
    """The training conversations: the pool of k-shot and retrieved examples."""
    return data.splits["train"].conversations


def _utilisation(cfg: Config, train_split, device, world: int = 1):
    """tokens/s of the whole run -> MFU of its devices (each one's share of the tokens over its own
    peak), or None where it cannot be worked out (an unknown shape or device)."""
    from .plan import utilisation_of

    try:
        per_device = utilisation_of(cfg, train_split, device)
    except Exception:  # noqa: BLE001 (a figure for the records; never a reason to stop a run)
        return None
    return per_device if world == 1 or per_device is None else (lambda speed: per_device(speed / world))


def plan_of_run(cfg: Config, train_split, train_layout: str, device, devices: int = 1):
    """The plan's view of the run about to start (plan/run.py run_setup), or None, said, where it
    cannot be made: an estimate that fails never stops a run."""
    from .plan import run_setup

    try:
        return run_setup(cfg, train_split, train_layout, device, devices)
    except Exception as err:  # noqa: BLE001
        say(f"plan: no estimate ({type(err).__name__}: {err})")
        return None


def plan_at_start(planned, checkpointed: int) -> float | None:
    """Say what `tunesmith plan` expects this run to need, for its real micro-batches and the
    blocks it checkpoints; an estimate that fails never stops a run."""
    from .plan import estimated

    if planned is None:
        return None
    try:
        predicted, line = estimated(planned, checkpointed)
    except Exception as err:  # noqa: BLE001
        say(f"plan: no estimate ({type(err).__name__}: {err})")
        return None
    say(line)
    return predicted


def check_data_paths(cfg: Config) -> None:
    """Fail before anything slow is loaded when a data file is missing (or a setting would do nothing:
    said to a new run only, as a run folder of before the rule still reads)."""
    from .data.sources import check_source

    if cfg.eval.patience and not cfg.eval.every_steps:
        raise UserError(f"eval.patience={cfg.eval.patience} counts evaluations during training, and there are "
                        "none: set eval.every_steps (e.g. eval.every_steps=50)")
    refused = cfg.train.objective_refusal()
    run = RunFolder(cfg.output.dir)  # one started before the rule goes on from its checkpoints as it trained
    if refused and not (cfg.train.resume and run.checkpoint_folders() and not run.results.exists()):
        raise UserError(refused)

    for name in ("train", "validation", "test"):
        path = getattr(cfg.data, name)
        if path and not (name == "train" and path == "demo"):
            check_source(path, f"data.{name}")  # a hub data set id passes; a missing local file does not
    for path in cfg.data.mix:
        check_source(path, "data.mix")


def check_config(path: str, overrides: list[str], import_code: bool = False) -> Config:
    """`tunesmith config --check`: the settings, and what train refuses before loading anything (a data
    file or local model folder that is not there; a run folder as the base is resolved by train)."""
    from .models.load import resolve_model_path
    from .runs import is_run

    cfg = load_config(path, overrides)
    check_data_paths(cfg)
    if cfg.model.name != "default" and not is_run(Path(cfg.model.name)):
        resolve_model_path(cfg.model.name)
    from .eval.metrics import find_scorer, load_scorer
    # Imported now by a run about to start (the command line's own config), not once each rank has loaded
    # the model; found, never run, by `config --check`, and never in the dashboard's process.
    for spec in (cfg.train.rewards if cfg.train.objective == "grpo" else []) + [cfg.eval.scorer or ""]:
        if spec:
            (load_scorer if import_code else find_scorer)(spec)
    return cfg


def comparison_table(base: dict, tuned: dict) -> str:
    """Train's closing table: every figure of the fine-tuned model, the base's beside it where it was
    scored ("-" with eval.compare_base off)."""
    from .eval.evidence import model_figures

    tuned = model_figures(tuned)
    keys = [k for k in tuned if isinstance(tuned[k], float)] or list(tuned)
    lines = [f"{'metric':<28}{'base':>12}{'fine-tuned':>12}"]
    for key in keys:
        b, t = base.get(key), tuned.get(key)
        # round(v, 3) + 0.0: a GRPO eval loss of -0.0001 showed as "-0.000"
        fmt = (lambda v: "-" if v is None else f"{round(v, 3) + 0.0:.3f}" if isinstance(v, float) else str(v))
        lines.append(f"{key:<28}{fmt(b):>12}{fmt(t):>12}")
    return "\n".join(lines)


def _as_config(config, overrides) -> Config:
    from .config import merge, parse_overrides, validate

    if isinstance(config, (Config, dict)):
        raw = config.model_dump() if isinstance(config, Config) else config
        extra = parse_overrides(overrides or [])
        return validate(merge(raw, extra), overrides=extra)
    return load_config(config, overrides)
