"""Chat messages -> token ids and labels, with the loss on assistant turns only.

A conversation is rendered with the chat template and cut, by characters, into alternating
prompt and answer pieces: the prompt before each answer is exactly what the template renders
with `add_generation_prompt=True` (so inference sees the same tokens as training), and each
answer runs up to and including its end-of-turn token, so the model learns to stop, also where
the pad token equals the EOS token (labels, not the attention mask, decide what is learned).
All pieces of a data set are tokenised in one batch call of the fast tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

IGNORE = -100

# For base models that ship no chat template. Plain-text headers (no special tokens the
# vocabulary may lack); each answer ends with the EOS token, so the model learns to stop.
FALLBACK_TEMPLATE = (
    "{%- if bos_token %}{{ bos_token }}{% endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{%- else %}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '### Assistant:\n' }}{%- endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"fallback": FALLBACK_TEMPLATE, "chatml": CHATML_TEMPLATE}


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    parts: list[int] | None = None  # lengths of the examples packed into this row; None = one example

    @property
    def label_count(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)

    def labels_in_a_row(self) -> list[int]:
        """The labels with the first one dropped, for an example placed after others in one row
        (packing, padding-free batches): there its first token would be predicted from the previous
        example's last one; alone in a padded row it is never predicted at all."""
        return [IGNORE] + list(self.labels[1:]) if self.labels else []


class TemplateError(ValueError):
    """The chat template cannot render a conversation (e.g. roles that must alternate)."""


def use_template(tokenizer, setting: str | None) -> str:
    """Set the tokenizer's chat template from the config and say where it came from.

    It is set on the tokenizer object so that the tokenizer saved with the trained model
    carries exactly the template the training data was rendered with.
    """
    if setting is None:
        if getattr(tokenizer, "chat_template", None):
            return "tokenizer"
        tokenizer.chat_template = FALLBACK_TEMPLATE
        return "fallback (the tokenizer has none)"
    tokenizer.chat_template = template_text(setting)
    if setting in NAMED_TEMPLATES:
        return setting
    return "config (inline)" if _inline(setting) else str(Path(setting).expanduser())


def _inline(setting: str) -> bool:
    return "{{" in setting or "{%" in setting


def template_text(setting: str) -> str:
    """The text of a configured data.chat_template: a named template's, an inline one, or a .jinja
    file's contents as they are now (the data cache keys on this text, not on the file's path)."""
    if setting in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[setting]
    if _inline(setting):
        return setting
    path = Path(setting).expanduser()
    if not path.is_file():
        raise UserError(f"data.chat_template: '{setting}' is neither a template name "
                        f"({', '.join(NAMED_TEMPLATES)}), a Jinja template, nor a file")
    return path.read_text(encoding="utf-8")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return _render_batch(tokenizer, [messages], add_generation_prompt)[0]


def _render_batch(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
    from jinja2 import TemplateError as JinjaError
    from transformers.utils.chat_template_utils import render_jinja_template

    # A tokenizer without a template (a base model used as is) renders with the documented fallback.
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_TEMPLATE
    try:
        rendered, _ = render_jinja_template(conversations=conversations, chat_template=template,
                                            add_generation_prompt=add_generation_prompt,
                                            **tokenizer.special_tokens_map)
    except JinjaError as err:
        raise TemplateError(f"chat template refused the conversation ({err})") from None
    return rendered


def render_many(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool = False) -> list:
    """Rendered texts in one batch; where the template refuses one, each is rendered alone to find which."""
    try:
        return _render_batch(tokenizer, conversations, add_generation_prompt)
    except TemplateError:
        out: list = []
        for messages in conversations:
            try:
                out.append(render(tokenizer, messages, add_generation_prompt))
            except TemplateError as err:
                out.append(err)
        return out


def cut_points(text: str, prompts: list[str], turns: list[str], eot: str) -> list[int]:
    """Character cuts [0, answer1 start, answer1 end, answer2 start, ..., len(text)] of a rendered conversation.

    `prompts[k]` renders the messages before the k-th answer with the generation prompt, `turns[k]`
    the messages up to and including it. Pieces between cuts alternate: prompt (no loss), answer
    (loss, up to and including its end-of-turn token), prompt, ...
    """
    cuts = [0]
    for prompt, turn in zip(prompts, turns):
        if not (text.startswith(prompt) and text.startswith(turn) and len(prompt) >= cuts[-1]):
            raise TemplateError("the chat template does not render a conversation as a prefix of its continuation")
        stop = text.rfind(eot, len(prompt), len(turn)) if eot else -1
        cuts += [len(prompt), stop + len(eot) if stop >= 0 else len(turn)]
    return cuts + [len(text)]


def _answer_cuts(tokenizer, conversations: list[list[dict]], train_on_inputs: bool) -> list:
    """(text, cuts) or a TemplateError for each conversation; all renders batched."""
    texts = render_many(tokenizer, conversations)
    if train_on_inputs:
        return [t if isinstance(t, TemplateError) else (t, [0, 0, len(t)]) for t in texts]
    answers = [[i for i, m in enumerate(c) if m["role"] == "assistant"] for c in conversations]
    prompt_requests = [c[:i] for c, idx in zip(conversations, answers) for i in idx if i]
    turn_requests = [c[:i + 1] for c, idx in zip(conversations, answers) for i in idx if i < len(c) - 1]
    prompts, turns = iter(render_many(tokenizer, prompt_requests, True)), iter(render_many(tokenizer, turn_requests))
    eot = tokenizer.eos_token or ""
    out: list = []
    for messages, text, indices in zip(conversations, texts, answers):
        mine_prompts = [next(prompts) if i else "" for i in indices]
        mine_turns = [next(turns) if i < len(messages) - 1 else text for i in indices]
        failed = [r for r in [text, *mine_prompts, *mine_turns] if isinstance(r, TemplateError)]
        try:
            out.append(failed[0] if failed else (text, cut_points(text, mine_prompts, mine_turns, eot)))
        except TemplateError as err:
            out.append(err)
    return out


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts, without added special tokens, in one batch of the fast tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_many(tokenizer, conversations: list[list[dict]], train_on_inputs: bool = False) -> list[Encoded | TemplateError]:
    """Encoded examples (or the TemplateError of each conversation the template refuses)."""
    pieces: list[str] = []
    plans: list[list[int] | TemplateError] = []  # per conversation: the piece indices, or its error
    for result in _answer_cuts(tokenizer, conversations, train_on_inputs):
        if isinstance(result, TemplateError):
            plans.append(result)
            continue
        text, cuts = result
        plans.append(list(range(len(pieces), len(pieces) + len(cuts) - 1)))
        pieces += [text[a:b] for a, b in zip(cuts, cuts[1:])]
    ids = token_ids(tokenizer, pieces)
    out: list[Encoded | TemplateError] = []
    for plan in plans:
        if isinstance(plan, TemplateError):
            out.append(plan)
            continue
        input_ids, labels = [], []
        for order, piece in enumerate(plan):
            input_ids += ids[piece]
            labels += ids[piece] if order % 2 else [IGNORE] * len(ids[piece])
        out.append(Encoded(input_ids, labels))
    return out


def encode(tokenizer, messages: list[dict], train_on_inputs: bool = False) -> Encoded:
    result = encode_many(tokenizer, [messages], train_on_inputs)[0]
    if isinstance(result, TemplateError):
        raise result
    return result


def encode_text(tokenizer, documents: list[str], max_seq_len: int) -> list[Encoded]:
    """Raw text for continued pre-training: documents joined with EOS, cut into max_seq_len rows."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for ids in token_ids(tokenizer, documents):
        stream += ids + eos
    rows = [stream[i:i + max_seq_len] for i in range(0, len(stream), max_seq_len)]
    return [Encoded(row, list(row)) for row in rows if len(row) > 1]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a prompt for generation: the messages before the last answer, plus the generation prompt."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return token_ids(tokenizer, [render(tokenizer, messages, add_generation_prompt=True)])[0]
