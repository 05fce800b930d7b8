"""An Ollama Modelfile next to the GGUF: the chat template training used, in Go-template syntax.

A Jinja template cannot be translated in general, so the training template is rendered on probe
conversations and recognised as ChatML (the default model's and the test models' family) before a
Go template is written; anything else is refused with a clear message.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError

CHATML_GO = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
             "{{ end }}<|im_start|>assistant\n")
PROBE = [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]


def chatml(messages: list[dict]) -> str:
    """What CHATML_GO renders for `messages` in Ollama (generation prompt included)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def template_default_system(tokenizer) -> str | None:
    """The system text the template inserts when a conversation has none (SmolLM2 does), or None."""
    text = tokenizer.apply_chat_template(PROBE[1:2], add_generation_prompt=True, tokenize=False)
    head = "<|im_start|>system\n"
    if text.startswith(head):
        return text[len(head):text.index("<|im_end|>")]
    return None


def check_chatml(tokenizer) -> None:
    rendered = tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, tokenize=False)
    if rendered != chatml(PROBE):
        raise UserError("ollama export: the run's chat template is not ChatML, the one family tunesmith can write as "
                        "an Ollama TEMPLATE; use --format gguf (its chat template is inside the file)")


def write_modelfile(folder: Path, gguf_name: str, tokenizer, system_prompt: str | None) -> Path:
    """Modelfile with FROM, TEMPLATE, stop tokens and the fixed system prompt (if any)."""
    check_chatml(tokenizer)
    system = system_prompt or template_default_system(tokenizer)
    stops = dict.fromkeys(["<|im_end|>", tokenizer.eos_token] if tokenizer.eos_token else ["<|im_end|>"])
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{CHATML_GO}"""']
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    path = folder / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
