"""The `tunesmith` command: its parser and `main`. Each sub-command runs one function of commands.py,
which calls one function of the Python API."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from .commands import (cmd_chat, cmd_choose, cmd_compare, cmd_config, cmd_curve, cmd_data_check, cmd_demo, cmd_eval,
                       cmd_export, cmd_generate, cmd_pairs, cmd_plan, cmd_push, cmd_report, cmd_train, cmd_ui)
from .errors import Interrupted, Terminated, UserError, one_line, plain_warnings, stop_on_sigterm
from .flags import COUNT, NUMBER, SCORED_AS_RUN, SIZE, add_decoding_options, add_prompt_options, at_least, share
from .methods import NAMES as METHOD_NAMES
from .objectives.settings import OBJECTIVE_NAMES
from .plan.shapes import SHIPPED as SHIPPED_SHAPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune pre-trained language models on your data.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune as a YAML config says, with section.key=value overrides")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="e.g. train.lr=1e-4 adapter.r=8")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint (an unfinished run "
                                                         "is resumed anyway; with this flag, having none is an error)")
    p.add_argument("--nproc", type=SIZE, default=1,
                   help="processes on this machine (one per GPU, or CPU processes with gloo), launched with torchrun")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="fine-tune the default model on the built-in ticket-triage task")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="eval loss and generation scores of a model or run on a data file; general ability")
    p.add_argument("model", help="run folder, adapter folder, model folder, .gguf, hub id or 'default'")
    p.add_argument("--data", default=None, help="data file: eval loss and generation scores (a run: its own test data, "
                                                "scored as its training did unless options say otherwise)")
    p.add_argument("--device", default="auto", help="auto (CUDA where there is one), cpu, cuda or cuda:N")
    p.add_argument("--general", action="store_true",
                   help="general-ability probes (MMLU, ARC, HellaSwag, TruthfulQA, GSM8K); a run or adapter is "
                        "scored against its base, each difference with its 95%% interval")
    p.add_argument("--general-data", default=None, help="folder of probe files (default: the shipped probe)")
    p.add_argument("--general-sets", default=None, help="comma-separated probe sets (default: all)")
    p.add_argument("--general-limit", type=SIZE, default=None, help="first N items of each probe set")
    p.add_argument("--general-margin", type=NUMBER, default=2.0, help="warn when a set drops by more points than this")
    _add_scoring_options(p)
    p.set_defaults(func=cmd_eval, **dict.fromkeys(SCORED_AS_RUN))  # unset: a run's own (measure.scored_as)

    p = sub.add_parser("compare", help="A vs B (e.g. base vs fine-tuned) with paired 95%% intervals and answers side by side")
    p.add_argument("a", help="baseline: model, run folder or 'default'")
    p.add_argument("b", help="candidate: run folder, adapter folder or model")
    p.add_argument("--data", required=True)
    p.add_argument("--kshot", type=COUNT, default=0, help="also score A with K training examples in its prompt")
    p.add_argument("--retrieval-k", type=COUNT, default=0,
                   help="also score A and B with the K training examples most similar to each question (BM25)")
    p.add_argument("--kshot-data", default=None,
                   help="where the k-shot and retrieved examples come from (default: the run's training data)")
    p.add_argument("--out", default=None, help="folder for comparison.json/.jsonl (default: B when it is a run folder)")
    _add_scoring_options(p)
    p.set_defaults(func=cmd_compare, **dict.fromkeys(SCORED_AS_RUN))  # unset: B's run's own (measure.scored_as)

    p = sub.add_parser("pairs", help="sample N answers per prompt, score them with your scorer, write chosen/rejected "
                                     "pairs for DPO")
    p.add_argument("model", help="run folder, adapter folder, model folder, .gguf, hub id or 'default'")
    p.add_argument("--data", required=True, help="prompts: {prompt, reference} records, or SFT data (last answer = reference)")
    p.add_argument("--samples", type=at_least(2), default=4, help="answers sampled per prompt (default 4)")
    p.add_argument("--scorer", default=None, help="module:function (answer, reference) -> float; default: the "
                                                  "reference's metric (JSON fields right, else ROUGE-L)")
    p.add_argument("--out", default=None, help="pairs file (default: RUN/pairs.jsonl, or pairs.jsonl); an existing "
                                               "file is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing pairs file (never the --data file)")
    p.add_argument("--temperature", type=NUMBER, default=1.0)
    p.add_argument("--max-new-tokens", type=SIZE, default=96)
    p.add_argument("--batch-size", type=SIZE, default=16, help="answers generated together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-margin", type=NUMBER, default=0.0, help="skip prompts whose best and worst score differ by no more")
    p.add_argument("--limit", type=SIZE, default=None, help="only the first N prompts")
    p.add_argument("--device", default="auto")
    p.add_argument("--chosen", choices=("best", "reference"), default="best",
                   help="best: the best sampled answer is chosen; reference: the prompt's reference answer, where it "
                        "scores above every sample (the samples' worst is rejected either way)")
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser("chat", help="talk to a model or fine-tuned run in the terminal, answers streamed")
    p.add_argument("model")
    add_prompt_options(p)
    add_decoding_options(p, max_new_tokens=256)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("report", help="write report.html (self-contained) and report.json of a run folder")
    p.add_argument("run")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("generate", help="answer one prompt, streamed")
    p.add_argument("model")
    p.add_argument("prompt")
    add_prompt_options(p)
    p.add_argument("--raw", action=argparse.BooleanOptionalAction, default=None,
                   help="continue the prompt as written, no chat template (default: so for a run trained on raw text)")
    add_decoding_options(p, max_new_tokens=128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("config", help="print the default config with every field documented, or --check a file")
    p.add_argument("--check", default=None)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("data", help="look at a data set before training")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("check", help="formats, counts, token lengths, drops by reason, duplicates, loss share")
    p.add_argument("file", help="data file, folder of data files, saved HF dataset folder or hub data set id; or a "
                                "run's config (.yaml): its data.train as the run reads it (its model, data settings, objective)")
    p.add_argument("--model", default=None, help="whose tokenizer and chat template to use (default: the config's "
                                                 "model, else the default model)")
    p.add_argument("--out", default="runs/data-check", help="folder for report.json and lengths.png")
    p.add_argument("--objective", default=None, choices=OBJECTIVE_NAMES,
                   help="read the data as this objective's training would (default: pairs and KTO records by "
                        "their fields, anything else as SFT data; prompts alone need --objective grpo)")
    p.add_argument("overrides", nargs="*", help="data settings, e.g. max_seq_len=1024 overlong=truncate")
    p.set_defaults(func=cmd_data_check)

    p = sub.add_parser("ui", help="local dashboard: start, watch and compare runs in a browser")
    p.add_argument("--runs", default="runs", help="folder holding the run folders")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; every API request needs the token printed at start")
    p.add_argument("--token", default=None, help="token to require (default: TUNESMITH_UI_TOKEN, which `ps` does not show, "
                   "else a random one per start; an empty one is refused)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME", help="with --host 0.0.0.0: a name the "
                   "dashboard is opened by besides IP addresses and this machine's own (a DNS alias, a proxy's)")
    p.add_argument("--allow-code", action="store_true",
                   help="let runs started or resumed from the page set model.trust_remote_code, eval.scorer and "
                        "train.rewards (they run code)")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("plan", help="will it fit, how long will it take: memory and time from the model's config alone")
    p.add_argument("config", nargs="?", default=None, help="a run config (its data gives the token count)")
    p.add_argument("overrides", nargs="*", help="e.g. adapter.method=qlora train.batch_size=4")
    p.add_argument("--model", default=None, help="hub id, local folder, 'default' or a shipped shape: " + ", ".join(SHIPPED_SHAPES))
    p.add_argument("--method", choices=list(METHOD_NAMES), default=None)
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None)
    p.add_argument("--seq", type=SIZE, default=None, help="longest sequence (tokens)")
    p.add_argument("--batch", type=SIZE, default=None, help="micro-batch size")
    p.add_argument("--grad-accum", type=SIZE, default=None, help="micro-batches per optimizer step (gradients held between)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--r", type=SIZE, default=None, help="LoRA rank")
    p.add_argument("--targets", default=None, help="comma-separated LoRA targets (default: every linear layer)")
    p.add_argument("--label-share", type=share, default=None, help="share of positions with a label (default 1)")
    p.add_argument("--device", default=None, help="the device to plan for (t4, l4, a10, rtx4090, a100-40gb, a100-80gb, "
                   "h100, h200, this-machine): the table's last row, its dtype for the breakdown, and the changes "
                   "that make it fit")
    p.add_argument("--memory", type=at_least(1e-3, float), default=None, help="check against this much memory (GiB)")
    p.add_argument("--tokens", type=SIZE, default=None, help="training tokens per epoch (default: counted from the data)")
    p.add_argument("--utilisation", type=share, default=None, help="share of the device's peak reached")
    p.add_argument("--no-this-machine", action="store_true", help="skip this machine (no matmul benchmark)")
    p.add_argument("--nproc", type=SIZE, default=None, help="GPUs the run spreads over (as `train --nproc`): memory per device")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                   help="with --nproc: FSDP2 shards weights, gradients and optimizer states (train.fsdp); else DDP replicas")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("choose", help="which base model: plan, loss and metrics zero-shot / with retrieval / after a "
                                      "short fine-tune, ranked with intervals")
    p.add_argument("config", help="a run config: its data (validation examples are scored) and settings")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--models", required=True, help="comma-separated candidates: local folders, .gguf files, hub ids, default, run folders (their merged model)")
    p.add_argument("--budget-tokens", type=SIZE, default=None,
                   help="also fine-tune each candidate for about this many training tokens and score it again")
    p.add_argument("--device", default=None, help="plan against this device (t4, a100-80gb, h100, this-machine, ...)")
    p.add_argument("--memory", type=at_least(1e-3, float), default=None, help="plan against this much memory (GiB)")
    p.add_argument("--limit", type=SIZE, default=None, help="score only the first N validation examples")
    p.add_argument("--retrieval-k", type=COUNT, default=3, help="retrieved training examples in the prompt (0 = none)")
    p.add_argument("--rank-by", default="answer_loss_per_char",
                   help="metric to rank by (default: answer loss per character, comparable across tokenizers)")
    p.add_argument("--out", default="runs/choose", help="folder for choose.json, choose.png and the short fine-tunes")
    p.set_defaults(func=cmd_choose)

    p = sub.add_parser("curve", help="does more data still help? train on nested fractions of the data, plot the "
                                     "held-out metric with intervals")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--fractions", default="0.25,0.5,1", help="comma-separated shares of the training data")
    p.add_argument("--seed", type=int, default=0, help="seed of the nested fractions")
    p.add_argument("--out", default="runs/curve", help="folder for the runs, curve.json and curve.png")
    p.set_defaults(func=cmd_curve)

    p = sub.add_parser("export", help="export a run (hf, peft, gguf, ollama), each verified before it is called done")
    p.add_argument("run")
    p.add_argument("--format", default=None, help="comma-separated: hf (merged model), peft (adapter for vLLM/TGI), "
                                                  "gguf (llama.cpp), ollama (Modelfile next to the GGUF), gguf-lora (base GGUF + "
                                                  "LoRA adapter GGUF for llama.cpp --lora); default hf")
    p.add_argument("--quant", default="f16", choices=["f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q4_k_m", "q5_k_m"],
                   help="GGUF weight type (default f16); q4_k_m and q5_k_m are written by llama.cpp (llamacpp extra)")
    p.add_argument("--merge", action="store_true", help="same as --format hf: merged full-precision model "
                                                        "(QLoRA: into the dequantised base)")
    p.add_argument("--out", default=None, help="export folder (default: RUN/export)")
    p.add_argument("--tolerance", type=NUMBER, default=None, help="largest fp32 logit difference accepted, per unit of logit scale (default 1e-4)")
    p.add_argument("--force", action="store_true", help="GGUF: export even when the run's data is gone and only random "
                                                        "tokens can be checked (said in the check)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="upload a finished run's adapter or merged model to the Hugging Face Hub, with a "
                                    "model card: base vs fine-tuned with 95%% intervals, data summary, config")
    p.add_argument("run")
    p.add_argument("repo_id", help="namespace/name of the model repo (created if missing)")
    p.add_argument("--what", choices=["adapter", "merged"], default=None,
                   help="default: the adapter of an adapter method (LoRA, DoRA, QLoRA), the model of a full fine-tune")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its setting)")
    p.add_argument("--revision", default="main", help="branch to commit to (created from main if missing)")
    p.add_argument("--token", default=None, help="hub token (default: HF_TOKEN, then the stored `hf auth login`); a token given here "
                   "is seen by every user of the machine in `ps`, so prefer those two")
    p.add_argument("--endpoint", default=None, help="hub address (default: HF_ENDPOINT, then https://huggingface.co)")
    p.set_defaults(func=cmd_push)
    return parser


def _add_scoring_options(p) -> None:
    add_decoding_options(p, max_new_tokens=96)
    p.add_argument("--batch-size", type=SIZE, default=16)
    p.add_argument("--limit", type=SIZE, default=None, help="only the first N examples of the file")
    p.add_argument("--scorer", default=None, help="your own metric as module:function (prediction, reference) -> float")
    p.add_argument("--seed", type=int, default=0, help="of sampling (--temperature above 0)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse takes a command's key=value overrides only before its first option; after one, they are not
    # "unrecognized" to a user (`train my.yaml --resume train.lr=1e-4`): they join the overrides, in order.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if not hasattr(args, "overrides") or a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides += extra
    plain_warnings(args.debug)
    stop_on_sigterm()
    try:
        return args.func(args)
    except (UserError, OSError) as err:  # OSError: a file unreadable, a folder where a file goes, a full disk
        if isinstance(err, BrokenPipeError) and output_closed():
            # `tunesmith config | head`: the reader has what it wanted; ended quietly, as a shell's tools end
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            return 128 + signal.SIGPIPE
        if args.debug:
            raise
        ranks = sys.modules.get("tunesmith.training.distributed")  # loaded in a rank of `train --nproc`
        if not (ranks and ranks.tell_launcher(f"error: {one_line(err)}")):  # which says it once
            print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except Interrupted as err:
        err.tell()
        return err.exit_code
    except (KeyboardInterrupt, Terminated) as err:  # outside training's steps (loading, scoring, exporting)
        print("interrupted" if isinstance(err, KeyboardInterrupt) else str(err), file=sys.stderr)
        return 130 if isinstance(err, KeyboardInterrupt) else 128 + err.signum


def output_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (poll reports an error on its end)."""
    import select

    try:
        poller = select.poll()  # not on Windows: there the pipe's error is reported as any other
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
