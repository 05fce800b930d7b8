"""Why a conversation cannot be tokenised: its chat template refuses it, or a message holds one of
the model's special tokens as text ("<|im_end|>" inside an answer).

A conversation is tokenised whole, the template's own special tokens with it, so such a string in a
message becomes that token: an end of turn inside an answer ends what is labelled there (the rest
of the answer is never learned, and the model learns to stop mid-answer), a "<|im_start|>" in a
question opens a turn the data never had. Such a record is refused with the token and the turn;
raw text documents keep theirs (an EOS between documents there is usually meant)."""
from __future__ import annotations

import re
from functools import lru_cache

THINK_TAG = re.compile(r"</?think>|\[/?THINK\]")  # reasoning tags: content, though some tokenizers make them special


class TemplateError(ValueError):
    """The chat template cannot render a conversation (e.g. roles that must alternate)."""

    kind = "template refused"

    def reason(self) -> str:
        """As a dropped record's problem says it."""
        return f"template: {self}" if self.kind == TemplateError.kind else str(self)


class SpecialTokenText(TemplateError):
    kind = "special token in text"


def special_pattern(tokenizer, structure: str, ends: list[str]) -> re.Pattern | None:
    """One pattern for the special tokens that make a conversation's structure: those the template
    writes around a plain conversation (`structure`, its render) and the ends of a turn (`ends`);
    None where there are none. Reasoning tags (SmolLM3's and Qwen3's <think> are special tokens) are
    content a message may hold."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    strings = {token.content for token in decoder.values() if token.special and token.content.strip()
               and (token.content in structure or token.content in ends) and not THINK_TAG.fullmatch(token.content)}
    return _compiled(tuple(sorted(strings, key=lambda s: (-len(s), s)))) if strings else None


@lru_cache(maxsize=16)
def _compiled(strings: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(map(re.escape, strings)))  # longest first: "<|im_end|>" before "<|im"


def special_text(pattern: re.Pattern | None, messages: list[dict]) -> str | None:
    """Why the messages cannot be tokenised as written, or None."""
    if pattern is None:
        return None
    for index, message in enumerate(messages):
        for key in ("content", "reasoning_content"):
            text = message.get(key)
            found = pattern.search(text) if isinstance(text, str) else None
            if found:
                return (f"the {message.get('role')} message (turn {index + 1}) holds {found.group()!r}, one of the "
                        "model's special tokens, as text: tokenised, it would become that token (an end of turn "
                        "would cut the answer's labels there); remove or reword it")
    return None
