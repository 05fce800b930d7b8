"""The chat template a data set is rendered with: the tokenizer's own, a named one, an inline one or a
.jinja file, set on the tokenizer so that the tokenizer saved with the trained model carries it."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

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


def use_template(tokenizer, setting: str | None, variables: dict | None = None) -> str:
    """Set the tokenizer's chat template from the config and say where it came from.

    It is set on the tokenizer object so that the tokenizer saved with the trained model
    carries exactly the template the training data was rendered with; `variables` (e.g.
    {enable_thinking: false}) are set at the template's top, so serving renders as training did.
    """
    source = _choose_template(tokenizer, setting)
    if variables:
        header = "".join(f"{{%- set {name} = {_jinja_literal(value)} -%}}" for name, value in variables.items())
        if not tokenizer.chat_template.startswith(header):
            tokenizer.chat_template = header + tokenizer.chat_template
        source += " with " + ", ".join(f"{k}={v}" for k, v in variables.items())
    return source


def _jinja_literal(value) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "none"}[value]
    return json.dumps(value)


def _choose_template(tokenizer, setting: str | None) -> str:
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
