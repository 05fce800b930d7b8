"""What each sub-command of `tunesmith` does: one function of the Python API, its result printed.

cli.py builds the parser and runs these; each takes the parsed arguments and returns the exit status.
"""
from __future__ import annotations

import json
from importlib import resources

from .eval.decoding import LoopGuard
from .eval.evidence import demo_lines


def cmd_train(args) -> int:
    if args.nproc > 1:  # the same command under torchrun, once the config (data files, scorers) is known good
        from .api import check_config
        from .training.distributed import launch

        check_config(args.config, args.overrides, import_code=True)
        return launch(args.nproc, ["train", args.config, *args.overrides] + (["--resume"] if args.resume else []))
    from .api import train

    train(args.config, args.overrides, must_resume=args.resume)
    return 0


def cmd_demo(args) -> int:
    from .api import train

    config = resources.files("tunesmith") / "configs" / "demo.yaml"
    overrides = [f"output.dir={args.out}"] + args.overrides
    with resources.as_file(config) as path:
        results = train(str(path), overrides)
    print("\n".join(demo_lines(results)))
    return 0


def cmd_eval(args) -> int:
    from .measure import evaluate, evaluate_general

    results, sets = {}, args.general_sets.split(",") if args.general_sets else None
    if args.general:  # its set names and files checked before any answer is generated
        from .eval.general import load_probe
        load_probe(args.general_data, sets, args.general_limit)
    if args.data or not args.general:  # without either: a run's own test data
        results = evaluate(args.model, args.data, args.max_new_tokens, args.batch_size, args.limit, args.scorer,
                           args.temperature, args.seed, args.device, LoopGuard.of(args))
    if args.general:
        results["general"] = evaluate_general(args.model, args.general_data, sets, args.general_limit,
                                              args.general_margin, args.seed, args.device, keep=True)
    print(json.dumps(results, indent=2))
    return 0


def cmd_compare(args) -> int:
    from .measure import compare

    compare(args.a, args.b, args.data, args.kshot, args.kshot_data, args.max_new_tokens, args.batch_size, args.limit,
            args.scorer, args.temperature, args.seed, args.out, args.retrieval_k, LoopGuard.of(args))
    return 0


def cmd_chat(args) -> int:
    from .eval.chat import chat

    chat(args.model, args.system, args.max_new_tokens, args.temperature, guard=LoopGuard.of(args), tools=args.tools)
    return 0


def cmd_report(args) -> int:
    from .eval.report import write_report

    print("\n".join(str(path) for path in write_report(args.run)))  # report.html, report.json
    return 0


def cmd_generate(args) -> int:
    from .eval.chat import generate_once

    generate_once(args.model, args.prompt, args.system, args.raw, args.max_new_tokens, args.temperature,
                  LoopGuard.of(args), args.tools)
    return 0


def cmd_config(args) -> int:
    from .api import check_config
    from .config import Config, dump, field_docs

    if args.check:
        check_config(args.check, args.overrides)
        print(f"{args.check}: valid")
        return 0
    print(dump(Config()))
    for key, doc in field_docs().items():
        print(f"# {key}: {doc}")
    return 0


def cmd_data_check(args) -> int:
    from pathlib import Path

    from .data.check import check_data, format_report

    path, model, settings, objective = args.file, args.model, args.overrides, args.objective
    if Path(path).suffix.lower() in (".yaml", ".yml"):  # a run's config: its training data as that run reads it
        from .config import load_config

        cfg = load_config(path, [s if s.startswith("data.") else f"data.{s}" for s in settings])
        path, settings = cfg.data.train, cfg.data.model_dump(mode="json", exclude={"train"})
        model, objective = model or cfg.model.name, objective or cfg.train.objective
    print(format_report(check_data(path, model or "default", args.out, settings, objective)))
    return 0


def cmd_ui(args) -> int:
    from .ui import serve

    serve(args.runs, args.host, args.port, args.token, args.allow_code, args.allow_host)
    return 0


def cmd_plan(args) -> int:
    from .plan import format_plan, plan_for

    targets = tuple(args.targets.split(",")) if args.targets else None
    found = plan_for(args.config, args.overrides, args.model, args.device, args.memory, args.tokens, args.utilisation,
                     not args.no_this_machine, method=args.method, dtype=args.dtype, seq=args.seq, batch=args.batch,
                     gradient_checkpointing=args.gradient_checkpointing, r=args.r, targets=targets,
                     label_share=args.label_share, grad_accum=args.grad_accum, devices=args.nproc, fsdp=args.fsdp)
    print(format_plan(found))
    return 0


def cmd_choose(args) -> int:
    from .choose import choose, format_choice

    result = choose(args.config, [m.strip() for m in args.models.split(",") if m.strip()], args.overrides,
                    args.budget_tokens, args.device, args.memory, args.limit, args.retrieval_k, args.rank_by, args.out)
    print(format_choice(result))
    return 0


def cmd_curve(args) -> int:
    from .curve import curve, format_curve, parse_fractions

    print(format_curve(curve(args.config, parse_fractions(args.fractions), args.overrides, args.out, args.seed)))
    return 0


def cmd_export(args) -> int:
    from .export import export

    print(json.dumps(export(args.run, args.out, args.merge, args.tolerance, args.format, args.quant, args.force), indent=2))
    return 0


def cmd_push(args) -> int:
    from .export.push import push

    print(push(args.run, args.repo_id, args.what, args.private, args.revision, args.token, args.endpoint))
    return 0


def cmd_pairs(args) -> int:
    from .pairs import make_pairs

    print(json.dumps(make_pairs(args.model, args.data, args.samples, args.scorer, args.out, args.temperature,
                                args.max_new_tokens, args.batch_size, args.seed, args.min_margin, args.limit,
                                args.device, args.chosen, args.overwrite), indent=2))
    return 0
