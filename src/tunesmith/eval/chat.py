"""Talk to a model or fine-tuned run in the terminal, answers streamed as they are generated."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..data.tokenize import TemplateError, prompt_ids, render, stop_ids, token_ids, until_stop
from ..data.tools import FormatError, call_problem, checked_tools, tools_message
from ..errors import UserError
from .decoding import LoopGuard
from .generate import merged_adapter, merged_for_good
from .metrics import parse_tool_calls

HELP = "type a message; /reset starts over, /exit (or Ctrl-D) ends"
TOOL_HELP = "; /tool TEXT gives the result of the model's last tool call and lets it answer"


def stream_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
                 out=None, guard: LoopGuard = LoopGuard()) -> str:
    """Generate the next assistant turn for the messages, printing it as it comes; returns its text."""
    return stream_continuation(model, tokenizer, prompt_ids(tokenizer, messages), max_new_tokens, temperature, out,
                               guard)


def stream_continuation(model, tokenizer, prompt: list[int], max_new_tokens: int = 256, temperature: float = 0.0,
                        out=None, guard: LoopGuard = LoopGuard()) -> str:
    """Generate what follows the prompt's tokens, printing it as it comes; returns its text."""
    from transformers import TextStreamer

    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if out is not None:  # TextStreamer prints to stdout; send its text where asked
        streamer.on_finalized_text = lambda text, stream_end=False: print(text, end="" if not stream_end else "\n",
                                                                           file=out, flush=True)
    # Sampled chat keeps the model's own top-k/top-p
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    stops = stop_ids(tokenizer, model)
    with torch.no_grad(), merged_adapter(model):
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=stops, streamer=streamer,
                                **sampling, **guard.processors(ids.shape[1]))
    return tokenizer.decode(until_stop(output[0, ids.shape[1]:].tolist(), stops, keep_stop=False),
                            skip_special_tokens=True).strip()


def opening(model_or_run: str, system: str | None, out=None, tools: list[dict] | None = None,
            tokenizer=None) -> list[dict]:
    """A conversation's first messages: the declared tools, then the system prompt given ("" for
    none), else the one the run trained with."""
    from ..runs import system_prompt_of

    out = out or sys.stderr
    if system is None:
        system = system_prompt_of(model_or_run)
        if system:
            print(f"system prompt (the one the run trained with; --system '' for none): {system}", file=out)
    start = [{"role": "system", "content": system}] if system else []
    if not tools:
        return start
    probe = start + [{"role": "user", "content": "?"}]
    if tokenizer is not None and render(tokenizer, probe) == render(tokenizer, [tools_message(tools)] + probe):
        print("(the chat template does not render tools: the model is not shown them; data.chat_template sets one "
              "that does)", file=out)
    return [tools_message(tools)] + start


def read_tools(path: str | None) -> list[dict] | None:
    """--tools FILE: a JSON list of tools (function schemas, as a record's `tools`), or {"tools": [...]}."""
    if not path:
        return None
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
        return checked_tools(value.get("tools") if isinstance(value, dict) and "tools" in value else value)
    except OSError as err:
        raise UserError(f"{path}: cannot read the tools ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 (byte 0x{err.object[err.start]:02x} at offset {err.start}); convert it, "
                        f"e.g. iconv -f latin1 -t utf-8 {path}") from None
    except FormatError as err:
        raise UserError(f"{path}: {err}") from None


def not_utf8(text: str | None, what: str) -> str | None:
    """What is wrong with text that came from outside (a terminal, argv) and is not UTF-8: Python hands
    such bytes on as lone surrogates (Latin-1 'cafe' with an acute accent as 'caf' + U+DCE9), which
    the tokenizer refuses with a TypeError."""
    try:
        (text or "").encode("utf-8")
        return None
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        found = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
        return f"{what} is not UTF-8: {found} " + (f"after {text[:err.start][-20:]!r}" if err.start else "at its start")


def checked_utf8(text: str | None, what: str) -> str | None:
    """The text, or a UserError saying where it is not UTF-8."""
    problem = not_utf8(text, what)
    if problem:
        raise UserError(f"{problem}; set the terminal to UTF-8, or convert the text (iconv -f latin1 -t utf-8)")
    return text


def lenient_stdin() -> None:
    """Bytes on standard input that are not UTF-8 reach `input()` as lone surrogates, as argv's do, to
    be said line by line: with a strict decoder (a UTF-8 locale) one such byte raised from `input()`,
    its whole read-ahead lost. Done before the first read (the decoder cannot change after one)."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="surrogateescape")
        except (OSError, ValueError):  # e.g. a closed stream: input() says so itself
            pass


def say_tool_calls(answer: str, tools: list[dict] | None, out) -> None:
    """Each tool call in an answer, on a line of its own, with what is wrong with it against the tools."""
    for call in parse_tool_calls(answer) if tools else []:
        found = call_problem(call["name"], call["arguments"], tools)
        wrong = f" - {found[0].removeprefix('tool call: ')}: {found[1]}" if found else " - valid"
        print(f"(tool call: {call['name']} {json.dumps(call['arguments'], ensure_ascii=False)}{wrong})", file=out)


def generate_once(model_or_run: str, prompt: str, system: str | None = None, raw: bool | None = None,
                  max_new_tokens: int = 128, temperature: float = 0.0, guard: LoopGuard = LoopGuard(),
                  tools: str | None = None) -> str:
    """One answer to the prompt, streamed; `raw`: the text continued as written, with no chat
    template (None: so for a run trained on raw text, which is how it read its data); `tools`: a
    JSON file of tools the template renders, the answer's calls said and checked against them."""
    from ..runs import load_trained, trained_on_raw_text

    checked_utf8(prompt, "the prompt")  # said before the model loads, as a mistake in the tools file
    checked_utf8(system, "--system")
    declared = read_tools(tools)
    model, tokenizer, _ = load_trained(model_or_run)
    model = merged_for_good(model)
    if raw is None and trained_on_raw_text(model_or_run):
        print("the run trained on raw text: its prompt is continued as written (--no-raw: as a chat turn)",
              file=sys.stderr)
        raw = True
    if raw:
        return stream_continuation(model, tokenizer, token_ids(tokenizer, [prompt])[0], max_new_tokens, temperature,
                                   guard=guard)
    messages = opening(model_or_run, system, tools=declared, tokenizer=tokenizer) + [{"role": "user", "content": prompt}]
    answer = stream_reply(model, tokenizer, messages, max_new_tokens, temperature, None, guard)
    say_tool_calls(answer, declared, sys.stderr)
    return answer


def chat(model_or_run: str, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
         read=input, out=sys.stdout, guard: LoopGuard = LoopGuard(), tools: str | None = None) -> list[dict]:
    """A conversation loop; each answer joins the history. Returns the conversation. `tools`: a JSON
    file of tools the template renders; the answers' calls are said, and `/tool TEXT` answers one."""
    from ..runs import load_trained, trained_on_raw_text

    checked_utf8(system, "--system")
    declared = read_tools(tools)
    if read is input:
        lenient_stdin()
    model, tokenizer, _ = load_trained(model_or_run)
    model = merged_for_good(model)
    if trained_on_raw_text(model_or_run):
        print("the run trained on raw text, not on chat turns: `tunesmith generate RUN TEXT` continues a text",
              file=out)
    start = opening(model_or_run, system, out, declared, tokenizer)
    messages = list(start)
    print(HELP + (TOOL_HELP if declared else ""), file=out)
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            break
        except UnicodeDecodeError:  # a stdin that could not be made lenient; its read-ahead is lost
            print("(input is not UTF-8: that message is left out; set the terminal to UTF-8)", file=out)
            continue
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        problem = not_utf8(text, "input")
        if problem:  # the turn is left out, the conversation goes on
            print(f"({problem}; that message is left out: set the terminal to UTF-8 and say it again)", file=out)
            continue
        if text == "/reset":
            messages = list(start)
            continue
        message = said_message(text, messages, declared, out)
        if message is None:
            continue
        try:
            kept = within_context(model, tokenizer, messages + [message], len(start), max_new_tokens, out)
            if not kept or kept[-1] is not message:  # the message alone leaves no room for an answer
                continue
            print("model> ", end="", file=out, flush=True)
            answer = stream_reply(model, tokenizer, kept, max_new_tokens, temperature, out, guard)
        except TemplateError as err:  # e.g. a tool result for a template that wants call ids
            print(f"({err}: that message is left out)", file=out)
            continue
        messages = kept + [{"role": "assistant", "content": answer}]
        say_tool_calls(answer, declared, out)
    return messages


def said_message(text: str, messages: list[dict], tools: list[dict] | None, out) -> dict | None:
    """The message a line of chat adds: the user's, or with tools `/tool RESULT`, the result of the
    last answer's tool call (None, said, where there is no call to answer; None for an empty line)."""
    if not text:
        return None
    command, _, rest = text.partition(" ")
    if command == "/tool" and not tools:  # sent on, the model was asked the words '/tool ...'
        print("(no tools declared: /tool answers a tool call; start chat with --tools FILE)", file=out)
        return None
    if command != "/tool":
        return {"role": "user", "content": text}
    last = messages[-1] if messages else {}
    if not (last.get("role") == "tool" or last.get("role") == "assistant" and parse_tool_calls(last["content"])):
        print("(no tool call to answer: the last answer made none)", file=out)
        return None
    return {"role": "tool", "content": rest.strip()}


def within_context(model, tokenizer, messages: list[dict], head: int, max_new_tokens: int, out) -> list[dict]:
    """The conversation with its oldest exchanges left out (the first `head` messages, the system
    prompt, kept) until the prompt and an answer of max_new_tokens fit the model's context: past it a
    model with absolute positions fails and one with rotary positions degrades without a word. A last
    message too long on its own is left out, and said so."""
    context = getattr(model.config, "max_position_embeddings", None)
    if not context:
        return messages
    if len(prompt_ids(tokenizer, messages[:head] + messages[-1:])) + max_new_tokens > context:
        print(f"(that message leaves no room in the model's {context} tokens for an answer of up to "
              f"{max_new_tokens}: say it shorter)", file=out)
        return messages[:-1]
    kept, dropped = list(messages), 0
    while len(prompt_ids(tokenizer, kept)) + max_new_tokens > context and len(kept) > head + 1:
        cut = next((i for i in range(head + 1, len(kept)) if kept[i]["role"] == "user"), len(kept) - 1)
        dropped += cut - head
        kept = kept[:head] + kept[cut:]
    if dropped:
        print(f"(the oldest {dropped} messages left out: with them the conversation is longer than the model's "
              f"{context} tokens)", file=out)
    return kept
