"""Chat messages -> token ids and labels, with the loss on assistant turns only.

A conversation is rendered with the chat template and cut, by characters, into alternating
prompt and answer pieces: the prompt before each answer is exactly what the template renders
with `add_generation_prompt=True` (so inference sees the same tokens as training), and each
answer runs up to and including its end-of-turn token, so the model learns to stop, also where
the pad token equals the EOS token (labels, not the attention mask, decide what is learned).
All pieces of a data set are tokenised in one batch call of the fast tokenizer.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from .refusals import SpecialTokenText, TemplateError, special_pattern, special_text
from .templates import FALLBACK_TEMPLATE
from .tools import TOOLS_ROLE, split_tools

IGNORE = -100

# End-of-turn tokens of today's families (besides EOS): ChatML, Llama 3 (end of turn, end of message
# after a tool call), Gemma, Phi-3/4.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")
CLOSE_TAG = re.compile(r"</think>|\[/THINK\]")
THINK_CLOSE = re.compile(r"\s*(</think>|\[/THINK\])?\s*")
THINK_BLOCK = re.compile(r"^\s*(<think>.*?</think>|\[THINK\].*?\[/THINK\])\s*", re.S)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    parts: list[int] | None = None  # lengths of the examples packed into this row; None = one example
    ends_at: int | None = None  # one of a conversation's examples per answer: it is messages[:ends_at]

    @property
    def label_count(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)

    def labels_in_a_row(self) -> list[int]:
        """The labels with the first one dropped, for an example placed after others in one row
        (packing, padding-free batches): there its first token would be predicted from the previous
        example's last one; alone in a padded row it is never predicted at all."""
        return [IGNORE] + list(self.labels[1:]) if self.labels else []


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as the tokenizer's chat template renders it, with its declared tools (`tools=`).

    Rendered by transformers' `render_jinja_template` (a private helper of `apply_chat_template`, kept
    for its sandbox, reasoning aliases and tool-schema handling; pinned with transformers' version)."""
    from jinja2 import TemplateError as JinjaError
    from transformers.utils.chat_template_utils import render_jinja_template

    tools, messages = split_tools(messages)
    # A tokenizer without a template (a base model used as is) renders with the documented fallback.
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_TEMPLATE
    try:
        rendered, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=template,
                                            add_generation_prompt=add_generation_prompt,
                                            **tokenizer.special_tokens_map)
    except (JinjaError, TypeError, ValueError, KeyError, IndexError) as err:
        raise TemplateError(f"chat template refused the conversation ({err})") from None
    return rendered[0]


def render_many(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool = False,
                check_special: bool = True) -> list:
    """Rendered texts, or the TemplateError of each conversation the template refuses (or, with
    `check_special`, that holds a special token as text: refusals.py; data preparation checks, where
    such a record is dropped by its line; one conversation scored or sampled is tokenised as written)."""
    out: list = []
    specials = special_pattern(tokenizer, _structure(tokenizer), end_of_turn_strings(tokenizer)) \
        if check_special else None
    for messages in conversations:
        try:
            why = special_text(specials, messages)
            if why:
                raise SpecialTokenText(why)
            out.append(render(tokenizer, messages, add_generation_prompt))
        except TemplateError as err:
            out.append(err)
    return out


def _structure(tokenizer) -> str:
    """The template's render of a plain conversation: the special tokens in it are its structure."""
    turns = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    for probe in ([{"role": "system", "content": "s"}] + turns, turns):  # Gemma 2's template refuses a system turn
        try:
            return render(tokenizer, probe)
        except TemplateError:
            pass
    return ""


def _answer_spans(tokenizer, conversations: list[list[dict]], train_on_inputs: bool, reasoning: str,
                  check_special: bool = True) -> list:
    """Per conversation: a list of (text, labelled character spans), one per example, or a TemplateError."""
    if reasoning == "drop":
        conversations = [drop_reasoning(c) for c in conversations]
    texts = render_many(tokenizer, conversations, check_special=check_special)
    if train_on_inputs:
        return [t if isinstance(t, TemplateError) else [(t, [(0, len(t))], None)] for t in texts]
    stops = end_of_turn_strings(tokenizer)
    out: list = []
    for messages, text in zip(conversations, texts):
        try:
            if isinstance(text, TemplateError):
                raise text
            out.append(turn_examples(tokenizer, messages, text, stops, reasoning))
        except TemplateError as err:
            out.append(err)
    return out


def turn_examples(tokenizer, messages: list[dict], text: str, stops: list[str], reasoning: str) -> list:
    """[(text, spans, ends_at)]: each answer after the prompt serving builds for it (the generation-prompt render
    of the messages before it), as the template renders that answer, up to its end-of-turn token.

    Where each such prompt + answer is a prefix of the whole conversation's render, that is one example
    with a span per answer; else one example per answer, each with its history as served (e.g. Qwen3
    drops earlier turns' reasoning, Mistral Nemo puts the system prompt into the last user turn only)."""
    head = 1 if messages and messages[0]["role"] == TOOLS_ROLE else 0
    examples, consistent, done = [], True, 0
    for i in [i for i, m in enumerate(messages) if m["role"] == "assistant"]:
        turn = text if i == len(messages) - 1 else render(tokenizer, messages[:i + 1])
        prompt = render(tokenizer, messages[:i], True) if i > head else opening_prompt(turn, messages[i])
        start = answer_start(tokenizer, turn, prompt)
        answer = turn[start:answer_end(turn, start, stops)]
        spans = [(len(prompt) + a, len(prompt) + b) for a, b in answer_pieces(messages[i], answer, reasoning)
                 if messages[i].get("weight", 1)]  # weight 0: context, not taught
        examples.append((prompt + answer, spans, i + 1))
        consistent &= len(prompt) >= done and text.startswith(prompt + answer)
        done = len(prompt) + len(answer)
    if consistent:
        return [(text, [span for _, spans, _ in examples for span in spans], None)]
    return [example for example in examples if example[1]]  # (messages[:ends_at]: a weight-0 answer has none)


def opening_prompt(turn: str, message: dict) -> str:
    """What the template renders before a conversation's opening answer (chat logs that start with the
    bot's greeting): most templates refuse the generation prompt of an empty history, and some render
    another preamble for it than before a first turn (SmolLM2 leaves out its default system prompt), so
    the answer starts where its text does in the render of the conversation up to it."""
    content = message.get("content") or ""
    at = turn.rfind(content) if content.strip() else -1
    if at < 0:
        raise TemplateError("the conversation opens with an assistant turn whose text the chat template does not "
                            "render as written; start it with a user turn")
    return turn[:at]


def answer_start(tokenizer, turn: str, prompt: str) -> int:
    """Where the answer starts in the render of the conversation up to it: after the generation prompt
    when the render continues it, else after the last occurrence of the prompt's final special token
    (and what follows it, e.g. Llama 3's '<|end_header_id|>\\n\\n')."""
    if turn.startswith(prompt):
        return len(prompt)
    specials = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    last = max((prompt.rfind(token) for token in specials), default=-1)
    marker = prompt[last:] if last >= 0 else ""
    if not marker or marker not in turn:
        raise TemplateError("the chat template does not render a conversation as a prefix of its continuation")
    return turn.rfind(marker) + len(marker)


def end_of_turn_strings(tokenizer) -> list[str]:
    """Tokens that end an assistant turn: EOS, and the end-of-turn tokens of the known families present."""
    added = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    found = [tokenizer.eos_token] if tokenizer.eos_token else []
    return found + [t for t in END_OF_TURN if t in added and t not in found]


def stop_ids(tokenizer, model=None) -> list[int]:
    """Token ids where generation stops: every end of turn that training labels (Phi-3 ends a turn with
    <|end|>, its EOS is <|endoftext|>; a base Qwen's or Llama's likewise), and the model's own EOS ids."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in end_of_turn_strings(tokenizer)]
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += own if isinstance(own, (list, tuple)) else [] if own is None else [own]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def until_stop(tokens: list[int], stops: list[int], keep_stop: bool = True) -> list[int]:
    """Generated tokens up to their first stop token (kept or not); what follows it (padding) dropped."""
    end = next((i for i, token in enumerate(tokens) if token in stops), None)
    return tokens if end is None else tokens[:end + keep_stop]


def answer_end(text: str, start: int, stops: list[str]) -> int:
    """End of the answer starting at `start`: just past its first end-of-turn token, else the text's end."""
    ends = [at + len(stop) for stop in stops if (at := text.find(stop, start)) >= 0]
    return min(ends) if ends else len(text)


def answer_pieces(message: dict, answer: str, reasoning: str) -> list[tuple[int, int]]:
    """The labelled spans of one rendered answer: all of it, or (reasoning: mask) what follows its reasoning.

    Refused (TemplateError) where the template drops what the example is meant to teach: a tool call
    or the reasoning that data.reasoning says to keep."""
    for call in message.get("tool_calls") or []:
        if call["function"]["name"] not in answer:
            raise TemplateError(f"the chat template does not render tool calls ('{call['function']['name']}' is "
                                "missing from the assistant turn); it cannot train tool calling")
    thought = (message.get("reasoning_content") or "").strip()
    if thought and reasoning != "drop" and thought not in answer:
        raise TemplateError("the chat template does not render reasoning_content; set data.reasoning=drop, or put "
                            "the reasoning into the answer as <think>...</think>")
    found = reasoning_span(answer, thought) if reasoning == "mask" else 0
    return [(found, len(answer))]


def reasoning_span(answer: str, thought: str) -> int:
    """Where the answer's reasoning (and its closing tag and white space) ends; 0 when it has none."""
    if thought:
        at = answer.find(thought) + len(thought)
    else:
        close = CLOSE_TAG.search(answer)
        if not close:
            return 0
        at = close.start()
    return THINK_CLOSE.match(answer, at).end()


def drop_reasoning(messages: list[dict]) -> list[dict]:
    """The conversation without reasoning: no reasoning_content, no <think>...</think> in answers."""
    out = []
    for message in messages:
        if message["role"] == "assistant":
            message = {k: v for k, v in message.items() if k != "reasoning_content"}
            message["content"] = THINK_BLOCK.sub("", message["content"]).lstrip()
        out.append(message)
    return out


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts, without added special tokens, in one batch of the fast tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_many(tokenizer, conversations: list[list[dict]], train_on_inputs: bool = False,
                reasoning: str = "train", check_special: bool = True) -> list[list[Encoded] | TemplateError]:
    """Per conversation its encoded examples (usually one), or the TemplateError of a refused one.

    Each example's whole text is tokenised at once (all of a data set in one batch call), exactly as
    `apply_chat_template` tokenises it; a token carries a label when it starts inside an answer span.
    (Tokenising prompt and answer pieces apart would differ for SentencePiece vocabularies, which put
    a word-start marker at the start of every piece.)"""
    texts: list[str] = []
    plans: list = []  # per conversation: [(text index, spans) per example], or its error
    for result in _answer_spans(tokenizer, conversations, train_on_inputs, reasoning, check_special):
        if isinstance(result, TemplateError):
            plans.append(result)
            continue
        plans.append([(len(texts) + n, spans, ends_at) for n, (_, spans, ends_at) in enumerate(result)])
        texts += [text for text, _, _ in result]
    tokenised = token_ids_and_starts(tokenizer, texts)
    out: list = []
    for plan in plans:
        if isinstance(plan, TemplateError):
            out.append(plan)
            continue
        encoded = []
        for index, spans, ends_at in plan:
            ids, starts = tokenised[index]
            encoded.append(Encoded(list(ids), answer_labels(ids, starts, spans), ends_at=ends_at))
        out.append(encoded)
    return out


def answer_labels(ids: list[int], starts: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """Each token's id where it starts inside an answer span [a, b), else IGNORE (vectorised: a
    Python test per token and span took 10 s of MedQuAD's 15,678 examples)."""
    import numpy as np

    at = np.asarray(starts)
    inside = np.zeros(len(at), dtype=bool)
    for a, b in spans:
        inside |= (at >= a) & (at < b)
    return np.where(inside, np.asarray(ids), IGNORE).tolist()


def token_ids_and_starts(tokenizer, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """(token ids, character offset where each token starts) of many texts, in one batch call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [(e.ids, [a for a, _ in e.offsets]) for e in backend.encode_batch(texts, add_special_tokens=False)]
    found = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [(ids, [a for a, _ in offsets]) for ids, offsets in zip(found["input_ids"], found["offset_mapping"])]


def encode(tokenizer, messages: list[dict], train_on_inputs: bool = False, reasoning: str = "train") -> Encoded:
    """The conversation's last example (the whole conversation, its last answer labelled at least)."""
    result = encode_many(tokenizer, [messages], train_on_inputs, reasoning, check_special=False)[0]
    if isinstance(result, TemplateError):
        raise result
    return result[-1]


def encode_text(tokenizer, documents: list[str], max_seq_len: int) -> list[tuple[int, Encoded]]:
    """Raw text for continued pre-training: documents joined with EOS, cut into max_seq_len rows;
    each row with the index of the document it starts in (where a data problem is reported)."""
    stream: list[int] = []
    starts = []  # the stream position where each document begins
    for ids in _ended(tokenizer, documents):
        starts.append(len(stream))
        stream += ids
    return [(bisect.bisect_right(starts, start) - 1, row) for start, row in _rows(stream, max_seq_len)]


def document_rows(tokenizer, documents: list[str], max_seq_len: int) -> list[tuple[int, Encoded]]:
    """Each document on its own, cut into rows of max_seq_len tokens, each row with its document's
    index: held-out text scored document by document."""
    return [(document, row) for document, ids in enumerate(_ended(tokenizer, documents))
            for _, row in _rows(ids, max_seq_len)]


def encode_documents(tokenizer, documents: list[str]) -> list[Encoded]:
    """Each document whole, ended by EOS, every token a label."""
    return [Encoded(ids, list(ids)) for ids in _ended(tokenizer, documents)]


def _ended(tokenizer, documents: list[str]) -> list[list[int]]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [ids + eos for ids in token_ids(tokenizer, documents)]


def _rows(ids: list[int], size: int) -> list[tuple[int, Encoded]]:
    """(start, row) of the ids cut into rows of `size`, every token a label; a lone token is no row."""
    return [(i, Encoded(ids[i:i + size], ids[i:i + size])) for i in range(0, len(ids), size) if len(ids) - i > 1]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a prompt for generation: the messages before the last answer, plus the generation prompt."""
    if len(messages) > 1 and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return token_ids(tokenizer, [render(tokenizer, messages, add_generation_prompt=True)])[0]
