"""The `tunesmith` command: one sub-command -> one function of the Python API."""
from __future__ import annotations

import argparse
import json
import sys
from importlib import resources

from .errors import Interrupted, UserError


def cmd_train(args) -> int:
    from .api import train

    train(args.config, args.overrides, must_resume=args.resume)
    return 0


def cmd_demo(args) -> int:
    from .api import train

    config = resources.files("tunesmith") / "configs" / "demo.yaml"
    overrides = [f"output.dir={args.out}"] + args.overrides
    with resources.as_file(config) as path:
        results = train(str(path), overrides)
    base, tuned = results["base"], results["fine_tuned"]
    print(f"\nDemo: support-ticket triage on {results['fine_tuned'].get('test_examples', 0)} held-out tickets")
    print(f"  every field right: base {base.get('all_fields', 0):.1%} -> fine-tuned {tuned.get('all_fields', 0):.1%}")
    print(f"  valid JSON:        base {base.get('json_valid', 0):.1%} -> fine-tuned {tuned.get('json_valid', 0):.1%}")
    print(f"  eval loss:         base {base.get('eval_loss', float('nan')):.3f} -> fine-tuned {tuned.get('eval_loss', float('nan')):.3f}")
    print(f"  run folder: {results['run_dir']} (adapter, metrics.jsonl, predictions, results.json)")
    return 0


def cmd_eval(args) -> int:
    from .api import evaluate

    results = evaluate(args.model, args.data, args.max_new_tokens, args.batch_size, args.limit)
    print(json.dumps(results, indent=2))
    return 0


def cmd_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    from .data.tokenize import prompt_ids
    from .eval.generate import merged_adapter
    from .runs import load_trained

    model, tokenizer, _ = load_trained(args.model)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    ids = torch.tensor([prompt_ids(tokenizer, messages)])
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad(), merged_adapter(model):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                       do_sample=args.temperature > 0, temperature=args.temperature or None,
                       pad_token_id=tokenizer.pad_token_id, streamer=streamer)
    return 0


def cmd_config(args) -> int:
    from .config import Config, dump, field_docs, load_config

    if args.check:
        load_config(args.check, args.overrides)
        print(f"{args.check}: valid")
        return 0
    print(dump(Config()))
    for key, doc in field_docs().items():
        print(f"# {key}: {doc}")
    return 0


def cmd_ui(args) -> int:
    from .ui import serve

    serve(args.runs, args.host, args.port, args.token)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune pre-trained language models on your data.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune as a YAML config says, with section.key=value overrides")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="e.g. train.lr=1e-4 adapter.r=8")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint (an unfinished run is resumed anyway; "
                        "with this flag, having none is an error)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="fine-tune the default model on the built-in ticket-triage task")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="eval loss and generation scores of a model or run on a data file")
    p.add_argument("model", help="run folder, adapter folder, model folder, .gguf, hub id or 'default'")
    p.add_argument("--data", required=True)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="answer one prompt, streamed")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--system", default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("config", help="print the default config with every field documented, or --check a file")
    p.add_argument("--check", default=None)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("ui", help="local dashboard: start, watch and compare runs in a browser")
    p.add_argument("--runs", default="runs", help="folder holding the run folders")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--host", default="127.0.0.1", help="beyond 127.0.0.1, every request needs the token printed at start")
    p.add_argument("--token", default=None, help="token to require (default: a random one when --host is not local)")
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"stopped by signal {err.signum}; checkpoint saved: {err.saved}; resume with the same command",
              file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
