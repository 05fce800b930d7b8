"""Verify a written GGUF: read it back with transformers (an independent reader, which undoes the
permutation) and, where llama-cpp-python is installed, load it in llama.cpp itself; compare logits with
the merged model on the run's own examples, the prompt tokens the file's tokenizer and template build
with training's, and llama.cpp's own tokens of the rendered conversations with training's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.tokenize import IGNORE
from ..errors import UserError
from .agreement import DECIDED, agreement
from .gguf import NOT_READ_BY_TRANSFORMERS, PERMUTED, READ_BACK_AS, gguf_architecture, gguf_names, rope_from_ggml

F16_TOLERANCE = 1e-2  # max abs logit difference, relative to the largest reference logit
# q8_0 rounds every weight, so its logits move a little everywhere (on the default model about 0.13 logits,
# one standard deviation): where the merged model's two best tokens are nearly tied, the file may pick the
# other one. On high-entropy text (medical answers, 8 steps of fine-tuning) that was 3% of answer positions
# at a mean KL divergence of 0.0012, and every flip was at a gap under 0.16 logits. So q8_0 is held to the
# mean KL divergence llama.cpp's own `perplexity --kl-divergence` reports (a 6-bit file is about 0.004, a
# broken layout or a lost tensor well above 0.1), and to top-1 agreement where the merged model has decided.
Q8_KLD = 0.01  # the most mean KL(merged || file) at answer positions
Q8_TOP1 = 0.99  # share of decided answer positions whose top-1 token must agree
# A 4- or 5-bit file is not refused, but said to be far from the merged model past these (the
# walk-through's q4_0 of the default model: KL 0.23, 78% top-1 agreement, and nothing said).
FAR_KLD, FAR_TOP1 = 0.1, 0.9


@dataclass
class GGUFCheck:
    file: str
    quant: str
    positions: int
    max_abs_diff: float
    relative_diff: float
    top1_agreement: float  # at answer positions (where the next token is an answer token)
    top1_all_positions: float  # prompt positions too: predicting the user's text, near-ties are common
    kl_divergence: float  # mean KL(merged || file) at answer positions
    top1_decided: float  # at answer positions where the merged model's top token leads by DECIDED logits
    decided_positions: int
    prompts_checked: int
    prompts_equal: int
    llama_cpp: dict | None = None  # the same comparison in llama.cpp itself, where llama-cpp-python is installed
    warning: str | None = None  # a 4- or 5-bit file far from the merged model (far_from_merged)

    def as_dict(self) -> dict:
        return asdict(self)


def template_parity(trained_tokenizer, gguf_tokenizer, conversations: list[list[dict]]) -> tuple[int, int]:
    """(checked, equal): generation prompts built by both tokenizers' chat templates, token for token."""
    from ..data.tokenize import token_ids
    from ..data.tools import split_tools

    equal = 0
    for conversation in conversations:
        if conversation[0]["role"] == "text":  # raw text has no template: its own tokens, by both
            text = conversation[0]["content"]
            equal += int(token_ids(trained_tokenizer, [text]) == token_ids(gguf_tokenizer, [text]))
            continue
        tools, messages = split_tools(conversation)
        prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        ours = trained_tokenizer.apply_chat_template(prompt, tools=tools, add_generation_prompt=True, tokenize=True)
        theirs = gguf_tokenizer.apply_chat_template(prompt, tools=tools, add_generation_prompt=True, tokenize=True)
        answer = messages[-1]["content"]  # BOS aside: the file adds it only where the template has it (adds_bos)
        same_answer = token_ids(trained_tokenizer, [answer]) == token_ids(gguf_tokenizer, [answer])
        equal += int(_ids(ours) == _ids(theirs) and same_answer)
    return len(conversations), equal


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def answer_positions(batch: dict) -> torch.Tensor:
    """Among the real positions (as logits_of orders them), those whose next token is an answer token:
    what the model produces when it is used. Without labels: none."""
    mask = batch["attention_mask"].bool()
    labels = batch.get("labels")
    following = torch.zeros_like(mask)
    if labels is not None:
        following[:, :-1] = labels[:, 1:] != IGNORE
    return following[mask]


def read_back(path: Path, config):
    """The file's weights in a model with the merged model's settings: read by transformers (an independent
    reader) where it knows the architecture, else by gguf's own reader undoing tunesmith's naming and layout
    (SmolLM3; the llama.cpp check is then the independent one). transformers is given the merged config (as
    the architecture the file is written as: Mistral as llama), so the settings its GGUF reader derives or
    leaves out (Qwen3's head size, Llama 3's RoPE scaling) are the model's own; llama.cpp checks the file's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    arch = gguf_architecture(config)
    if arch in NOT_READ_BY_TRANSFORMERS:
        model.load_state_dict(gguf_state_dict(path, model), strict=True)
        return model.eval()
    settings = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
    read_as = READ_BACK_AS.get(config.model_type)
    as_written = AutoConfig.for_model(read_as, **settings) if read_as else config
    read, info = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=as_written,
                                                      dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"]:  # transformers would leave these randomly initialised
        missing = sorted(info["missing_keys"])
        raise UserError(f"{path}: {len(missing)} weights are missing from the GGUF, for example {missing[0]}")
    model.load_state_dict(read.state_dict(), strict=True)
    return model.eval()


def gguf_tokenizer(path: Path):
    """The file's own tokenizer and chat template, read by transformers. Its GGUF reader refuses a whole file
    of an architecture it has no model for (SmolLM3), though the tokenizer fields do not depend on it: those
    are read from a copy holding only the tokenizer fields, under an architecture name it accepts."""
    import tempfile

    from gguf import GGUFReader, GGUFWriter

    from ..models import load_tokenizer

    reader = GGUFReader(str(path))
    if reader.fields["general.architecture"].contents() not in NOT_READ_BY_TRANSFORMERS:
        return load_tokenizer(str(path))
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "tokenizer.gguf"
        writer = GGUFWriter(str(copy), "llama")
        for name, field in reader.fields.items():
            if name.startswith("tokenizer."):
                kind = field.types[0]
                writer.add_key_value(name, field.contents(), kind, sub_type=field.types[-1] if len(field.types) > 1 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        return load_tokenizer(str(copy))


def gguf_state_dict(path: Path, model) -> dict[str, torch.Tensor]:
    """Every weight of `model` read from the GGUF file (gguf.GGUFReader, dequantised)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    stored = {t.name: t for t in reader.tensors}
    arch = gguf_architecture(model.config)
    names = dict(gguf_names(model, arch))
    state = {}
    for hf_name, tensor in model.state_dict().items():
        name = names.get(hf_name) or names["model.embed_tokens.weight"]  # a tied head reads the embedding
        found = stored[name]
        values = torch.from_numpy(np.array(dequantize(found.data, found.tensor_type), dtype=np.float32))
        values = values.reshape(tensor.shape)
        heads = {"attn_q": model.config.num_attention_heads, "attn_k": model.config.num_key_value_heads}
        kind = name.split(".")[-2]
        if arch in PERMUTED and kind in heads:
            values = rope_from_ggml(values, heads[kind])
        state[hf_name] = values
    return state


def verify_gguf(path: Path, quant: str, reference_logits: torch.Tensor, batch: dict, trained_tokenizer,
                conversations: list[list[dict]], config=None) -> GGUFCheck:
    """Read the file back and compare with the merged model (whose config is `config`); refuse
    (UserError) when a check fails. 4- and 5-bit files are measured, not held to a bar here."""
    from ..models import load_model
    from .merge import logits_of

    model = read_back(path, config) if config is not None else load_model(str(path), torch.float32)
    answers = answer_positions(batch)
    found = agreement(logits_of(model, batch), reference_logits, answers)
    scale = float(reference_logits.abs().max()) or 1.0
    checked, equal = template_parity(trained_tokenizer, gguf_tokenizer(path), conversations)
    check = GGUFCheck(str(path), quant, int(answers.sum()) or len(reference_logits), **found, prompts_checked=checked,
                      prompts_equal=equal)
    from . import llamacpp

    if llamacpp.available():
        check.llama_cpp = llamacpp.check(path, reference_logits, batch, answers)
        check.llama_cpp["prompts_checked"], check.llama_cpp["prompts_equal"] = llama_cpp_tokens_parity(
            path, trained_tokenizer, conversations)
    for reader, found in (("transformers", asdict(check)), ("llama.cpp", check.llama_cpp)):
        if found:
            refuse_if_off(path, quant, reader, found, scale, check.positions)
    check.warning = far_from_merged(quant, asdict(check))
    if check.warning:
        from ..progress import say

        say(f"warning: {path.name}: {check.warning}")
    if equal != checked:
        raise UserError(f"{path}: the GGUF's tokenizer and chat template build different tokens than training's "
                        f"for {checked - equal} of {checked} sample conversations")
    if check.llama_cpp and check.llama_cpp["prompts_equal"] != check.llama_cpp["prompts_checked"]:
        off = check.llama_cpp["prompts_checked"] - check.llama_cpp["prompts_equal"]
        raise UserError(f"{path}: llama.cpp's tokenizer splits {off} of {check.llama_cpp['prompts_checked']} rendered "
                        "sample conversations into other tokens than training's")
    return check


def llama_cpp_tokens_parity(path: Path, trained_tokenizer, conversations: list[list[dict]]) -> tuple[int, int]:
    """(checked, equal): whole conversations rendered by the training template, tokenised by training's
    tokenizer and by llama.cpp's reading of the file."""
    from ..data.tokenize import token_ids
    from ..data.tools import split_tools
    from . import llamacpp

    texts = []
    for conversation in conversations:
        tools, messages = split_tools(conversation)
        texts.append(messages[0]["content"] if messages[0]["role"] == "text"  # raw text: no template
                     else trained_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False))
    theirs = llamacpp.tokenize(path, texts)
    return len(texts), sum(ours == found for ours, found in zip(token_ids(trained_tokenizer, texts), theirs))


def far_from_merged(quant: str, check: dict) -> str | None:
    """What to say of a quantised file (not f16 or q8_0, which are held to bars) whose answers moved far
    from the merged model's, or None."""
    if quant in ("f16", "q8_0") or (check["kl_divergence"] <= FAR_KLD and check["top1_decided"] >= FAR_TOP1):
        return None
    return (f"{quant} is far from the merged model: mean KL divergence {check['kl_divergence']:.3f} (q8_0 is held to "
            f"{Q8_KLD}), top-1 token agreement {check['top1_decided']:.0%} where the merged model has decided; "
            "its answers will differ often. q8_0 keeps them; or compare this file's answers before serving it")


def refuse_if_off(path: Path, quant: str, reader: str, check: dict, scale: float, positions: int) -> None:
    """f16 within F16_TOLERANCE of the logit scale; q8_0 within Q8_KLD and agreeing at Q8_TOP1 of decided positions."""
    diff = check["max_abs_diff"]
    if quant == "f16" and not check["relative_diff"] <= F16_TOLERANCE:
        raise UserError(f"{path}: f16 GGUF logits ({reader}) differ from the merged model's by {diff:.3g} "
                        f"({check['relative_diff']:.2%} of the logit scale {scale:.3g}; tolerance {F16_TOLERANCE:.0%})")
    if quant == "q8_0" and not (check["kl_divergence"] <= Q8_KLD and check["top1_decided"] >= Q8_TOP1):
        raise UserError(f"{path}: q8_0 GGUF ({reader}) is off the merged model: mean KL divergence "
                        f"{check['kl_divergence']:.4f} over {positions} answer positions (at most {Q8_KLD} allowed), "
                        f"top-1 token agreement {check['top1_decided']:.2%} at the {check['decided_positions']} where "
                        f"the merged model leads by {DECIDED} logits or more (at least {Q8_TOP1:.0%} needed)")
