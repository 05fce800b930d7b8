"""An Ollama Modelfile next to the GGUF: the chat template training used, in Go-template syntax.

A Jinja template cannot be translated in general. tunesmith holds a Go template for each family it
knows (ChatML: SmolLM2, Qwen2.5, Qwen3; ChatML with thinking off: Qwen3 trained with
enable_thinking=false; Llama 3.1; Mistral Nemo; Gemma 3; Phi-3; Phi-4; SmolLM3 thinking on and off) and picks the one whose render of probe conversations
(system, multi-turn; rendered by gotemplate.py, an interpreter of Go's template language) gives the
same tokens as the training template's generation prompt, with the BOS llama.cpp adds where the GGUF
says so. Anything else is refused with a clear message. Tool schemas are not part of these templates:
llama.cpp's server applies the GGUF's own Jinja template (--jinja) for tool calling. Go templates have
no `trim`: Gemma 3's template trims each message, so a message with surrounding spaces renders
differently (the probes say so when it matters).
"""
from __future__ import annotations

from pathlib import Path

from ..data.tokenize import end_of_turn_strings, prompt_ids, token_ids
from ..data.tools import split_tools
from ..errors import UserError
from .gotemplate import GoTemplateError, render

CHATML_GO = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
             "{{ end }}<|im_start|>assistant\n")
def smollm3_go(mode: str) -> str:
    """SmolLM3 in one reasoning mode (data.template_variables enable_thinking): a metadata header, the system
    message (or the mode's default instructions) under Custom Instructions; tool results as user turns.
    Go templates cannot search or edit text, so a system message holding /think or /no_think (which
    switches SmolLM3's mode) renders differently and the probe check refuses it."""
    default = SMOLLM3_THINKING_INSTRUCTIONS if mode == "/think" else "You are a helpful AI assistant named SmolLM, trained by Hugging Face."
    empty_thought = "" if mode == "/think" else "<think>\n\n</think>\n"
    return ("{{- $system := \"\" }}{{ range $i, $m := .Messages }}{{ if and (eq $i 0) (eq $m.Role \"system\") }}"
            "{{ $system = $m.Content }}{{ end }}{{ end }}<|im_start|>system\n## Metadata\n\nKnowledge Cutoff Date: "
            f"June 2025\nReasoning Mode: {mode}\n\n## Custom Instructions\n\n"
            f"{{{{ if $system }}}}{{{{ $system }}}}{{{{ else }}}}{default}{{{{ end }}}}\n\n<|im_end|>\n"
            "{{ range .Messages }}{{ if or (eq .Role \"user\") (eq .Role \"tool\") }}<|im_start|>user\n{{ .Content }}"
            f"<|im_end|>\n{{{{ else if eq .Role \"assistant\" }}}}<|im_start|>assistant\n{empty_thought}{{{{ .Content }}}}"
            f"<|im_end|>\n{{{{ end }}}}{{{{ end }}}}<|im_start|>assistant\n{empty_thought}")


SMOLLM3_THINKING_INSTRUCTIONS = (
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face. Your role as an assistant involves "
    "thoroughly exploring questions through a systematic thinking process before providing the final precise and "
    "accurate solutions. This requires engaging in a comprehensive cycle of analysis, summarizing, exploration, "
    "reassessment, reflection, backtracking, and iteration to develop well-considered thinking process. Please "
    "structure your response into two main sections: Thought and Solution using the specified format: <think> "
    "Thought section </think> Solution section. In the Thought section, detail your reasoning process in steps. "
    "Each step should include detailed considerations such as analysing questions, summarizing relevant findings, "
    "brainstorming new ideas, verifying the accuracy of the current steps, refining any errors, and revisiting "
    "previous steps. In the Solution section, based on various attempts, explorations, and reflections from the "
    "Thought section, systematically present the final solution that you deem correct. The Solution section should "
    "be logical, accurate, and concise and detail necessary steps needed to reach the conclusion.")
# A raw-text run (continued pre-training) is served its prompt as it is: no chat turns, no system prompt.
RAW = ("raw text", "{{ .Prompt }}")
# Templates that hold their own default system text (or none): the Modelfile gets no SYSTEM of the template's.
OWN_DEFAULT_SYSTEM = {"smollm3", "smollm3-no-think", RAW[0]}

GO_TEMPLATES = {
    "chatml": CHATML_GO,
    "chatml-no-think": CHATML_GO + "<think>\n\n</think>\n\n",
    "llama3.1": ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                 "Today Date: 26 Jul 2024\n\n{{ range .Messages }}{{ if eq .Role \"system\" }}{{ .Content }}{{ end }}"
                 "{{ end }}<|eot_id|>{{ range .Messages }}{{ if ne .Role \"system\" }}<|start_header_id|>{{ .Role }}"
                 "<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}{{ end }}"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    # BOS written out: the Tekken vocabulary does not add it by itself, so the GGUF does not ask llama.cpp to.
    "mistral-nemo": ("{{- $system := \"\" }}<s>{{ range .Messages }}{{ if eq .Role \"system\" }}{{ $system = .Content }}"
                     "{{ end }}{{ end }}{{ range $i, $m := .Messages }}{{ if eq $m.Role \"user\" }}[INST]"
                     "{{ if and (eq (len (slice $.Messages $i)) 1) $system }}{{ $system }}\n\n{{ end }}"
                     "{{ $m.Content }}[/INST]{{ else if eq $m.Role \"assistant\" }}{{ $m.Content }}</s>{{ end }}{{ end }}"),
    # Gemma 3: the system text opens the first user turn; the assistant is "model". BOS comes from llama.cpp.
    "gemma3": ("{{- $system := \"\" }}{{ range .Messages }}{{ if eq .Role \"system\" }}{{ $system = .Content }}{{ end }}"
               "{{ end }}{{- $first := true }}{{ range .Messages }}{{ if eq .Role \"user\" }}<start_of_turn>user\n"
               "{{ if $first }}{{ if $system }}{{ $system }}\n\n{{ end }}{{ $first = false }}{{ end }}"
               "{{ .Content }}<end_of_turn>\n{{ else if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}"
               "<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n"),
    # Phi-3: an empty system message is left out, as its template does.
    "phi3": ("{{ range .Messages }}{{ if and (eq .Role \"system\") .Content }}<|system|>\n{{ .Content }}<|end|>\n"
             "{{ else if eq .Role \"user\" }}<|user|>\n{{ .Content }}<|end|>\n{{ else if eq .Role \"assistant\" }}"
             "<|assistant|>\n{{ .Content }}<|end|>\n{{ end }}{{ end }}<|assistant|>\n"),
    # Phi-4: every user turn already ends with the assistant's header.
    "phi4": ("{{ range .Messages }}{{ if eq .Role \"system\" }}<|im_start|>system<|im_sep|>{{ .Content }}<|im_end|>"
             "{{ else if eq .Role \"user\" }}<|im_start|>user<|im_sep|>{{ .Content }}<|im_end|>"
             "<|im_start|>assistant<|im_sep|>{{ else if eq .Role \"assistant\" }}{{ .Content }}<|im_end|>{{ end }}"
             "{{ end }}"),
}
GO_TEMPLATES.update({"smollm3": smollm3_go("/think"), "smollm3-no-think": smollm3_go("/no_think")})
PROBES = [
    [{"role": "user", "content": "U1"}],
    [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"}],
    [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "U2"}],
    [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Why did the chicken..."},
     {"role": "user", "content": "Another one, please"}],
]


def ollama_messages(messages: list[dict]) -> dict:
    """The data an Ollama template sees: .Messages with Role and Content."""
    return {"Messages": [{"Role": m["role"], "Content": m.get("content") or ""} for m in messages]}


def template_default_system(tokenizer) -> str | None:
    """The system text the template inserts when a conversation has none (SmolLM2, Qwen2.5 do), or None."""
    text = tokenizer.apply_chat_template(PROBES[0], add_generation_prompt=True, tokenize=False)
    head = "<|im_start|>system\n"
    if text.startswith(head):
        return text[len(head):text.index("<|im_end|>")]
    return None


def served_tokens(tokenizer, template: str, messages: list[dict], system: str | None, add_bos: bool) -> list[int]:
    """The tokens Ollama builds: the Go template's render (the Modelfile's SYSTEM first where the
    conversation has none), with llama.cpp's BOS where the GGUF asks for one."""
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    return bos + token_ids(tokenizer, [render(template, ollama_messages(messages))])[0]


def default_system(family: str, tokenizer) -> str | None:
    """The Modelfile's SYSTEM when the run fixes none: the template's default, unless the Go template holds it."""
    return None if family in OWN_DEFAULT_SYSTEM else template_default_system(tokenizer)


def choose_template(tokenizer, add_bos: bool, probes: list[list[dict]] | None = None) -> tuple[str, str]:
    """(family, Go template) whose render gives the training template's generation prompts, token for token."""
    probes = probes or PROBES
    wanted = [token_ids(tokenizer, [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)])[0]
              for m in probes]
    template_system = template_default_system(tokenizer)  # rendered once, not per candidate
    for name, template in GO_TEMPLATES.items():
        system = None if name in OWN_DEFAULT_SYSTEM else template_system
        try:
            if all(served_tokens(tokenizer, template, m, system, add_bos) == w for m, w in zip(probes, wanted)):
                return name, template
        except GoTemplateError:
            continue
    raise UserError("ollama export: no Ollama template of the families tunesmith knows (" + ", ".join(GO_TEMPLATES)
                    + ") renders like the run's chat template; use --format gguf (its chat template is inside the file)")


def prompts_served_alike(tokenizer, family: str, template: str, conversations: list[list[dict]],
                         system_prompt: str | None, add_bos: bool) -> int:
    """How many of the run's own conversations Ollama would prompt with training's tokens: the probes
    hold no tool calls or results (the Go templates see Role and Content only) nor white space that a
    template trims (Llama 3.1's)."""
    system = system_prompt or default_system(family, tokenizer)
    alike = 0
    for conversation in conversations:
        messages = split_tools(conversation[:-1] if conversation[-1]["role"] == "assistant" else conversation)[1]
        try:
            alike += served_tokens(tokenizer, template, messages, system, add_bos) == prompt_ids(tokenizer, conversation)
        except GoTemplateError:
            pass
    return alike


def quoted(value: str, what: str) -> str:
    """`value` between a Modelfile's triple quotes. Ollama's parser has no escapes: a value holding
    three quotes would end there and the rest be read as commands, so it is refused."""
    if '"""' in value:
        raise UserError(f'ollama export: {what} holds """, which a Modelfile cannot quote (Ollama\'s parser has no '
                        "escapes); rephrase it, or export gguf and write the Modelfile's SYSTEM yourself")
    return f'"""{value}"""'


def stop_value(stop: str) -> str:
    """A stop string for a one-line `PARAMETER stop "..."`: a quote or a line break in a tokenizer's
    end-of-turn token would end the value there and the rest be read as Modelfile commands."""
    if '"' in stop or "\n" in stop or "\r" in stop:
        raise UserError(f"ollama export: the end-of-turn token {stop!r} holds a quote or a line break, which a "
                        "Modelfile's stop parameter cannot hold; export gguf and write the Modelfile yourself")
    return stop


def write_modelfile(folder: Path, gguf_name: str, tokenizer, system_prompt: str | None, add_bos: bool = False,
                    chosen: tuple[str, str] | None = None) -> Path:
    """Modelfile with FROM, TEMPLATE, stop tokens and the fixed system prompt (if any); `chosen`: the
    (family, Go template) of `choose_template`, else chosen here."""
    family, template = chosen or choose_template(tokenizer, add_bos)
    system = system_prompt or default_system(family, tokenizer)
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {quoted(template, 'the template')}"]
    lines += [f'PARAMETER stop "{stop_value(stop)}"' for stop in end_of_turn_strings(tokenizer)]
    if system:
        lines.append(f"SYSTEM {quoted(system, 'the system prompt')}")
    path = folder / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
