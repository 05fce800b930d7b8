"""Write a merged model as a GGUF file (llama.cpp, Ollama) with the `gguf` package, and verify it.

Tensor names come from gguf's own HF -> GGUF name map, metadata keys from its writer, so the file
reads as llama.cpp's converter would write it: Mistral as the `llama` architecture, the q/k
projections of the `llama` architecture permuted from HF's rotary layout (two halves) into GGML's
(interleaved pairs), Gemma's norms as 1 + weight, the tokenizer as llama.cpp reads it (gguf_vocab.py),
and the chat template that training used.

Verification reads the file back with transformers (an independent reader, which undoes the
permutation) and compares logits with the merged model on the run's own examples, and the
prompt tokens the read-back tokenizer builds with those of the training tokenizer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.tokenize import IGNORE
from ..errors import UserError
from .gguf_vocab import add_tokenizer, adds_bos  # noqa: F401 (adds_bos: the Ollama export asks it too)

# HF model_type -> GGUF architecture (llama.cpp's converter writes Mistral as llama).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "smollm3": "smollm3",
                 "phi3": "phi3", "gemma3_text": "gemma3"}
# Model types whose GGUF transformers reads back as another model type (Mistral is written as llama).
READ_BACK_AS = {"mistral": "llama"}
# Architectures whose RMS norms scale by (1 + weight): llama.cpp's converter stores weight + 1.
NORM_PLUS_ONE = {"gemma3"}
# Architectures whose q/k rows llama.cpp wants interleaved (its converter's LlamaModel and subclasses).
PERMUTED = {"llama", "smollm3"}
# Architectures whose GGUF transformers refuses to open at all: the checks read them another way.
NOT_READ_BY_TRANSFORMERS = {"smollm3"}
# What the `gguf` package itself can quantise (gguf.quants: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; its K-quants
# raise NotImplementedError), and the K-quant mixes llama.cpp's own quantiser makes from an f16 file.
QUANTS = ("f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
LLAMA_CPP_QUANTS = ("q4_k_m", "q5_k_m")
F16_TOLERANCE = 1e-2  # max abs logit difference, relative to the largest reference logit
Q8_TOP1 = 0.99  # share of answer positions whose top-1 token must agree


@dataclass
class GGUFCheck:
    file: str
    quant: str
    positions: int
    max_abs_diff: float
    relative_diff: float
    top1_agreement: float  # at answer positions (where the next token is an answer token)
    top1_all_positions: float  # prompt positions too: predicting the user's text, near-ties are common
    prompts_checked: int
    prompts_equal: int
    llama_cpp: dict | None = None  # the same comparison in llama.cpp itself, where llama-cpp-python is installed

    def as_dict(self) -> dict:
        return asdict(self)


def gguf_architecture(config) -> str:
    """The GGUF architecture for a transformers config, or a UserError naming the supported ones."""
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise UserError(f"GGUF export supports the {', '.join(sorted(ARCHITECTURES))} architectures; "
                        f"this model is '{config.model_type}'")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError(f"GGUF export: a {config.model_type} model with attention/MLP biases is not supported")
    for kind, rope in rope_by_layer_type(config).items():
        allowed = ("default",) if kind == "sliding_attention" else ("default", "llama3", "linear")
        if rope.get("rope_type", "default") not in allowed:
            raise UserError(f"GGUF export: rope scaling '{rope.get('rope_type')}' on {kind} layers is not supported "
                            f"({', '.join(allowed)} are)")
    if arch == "gemma3":
        # llama.cpp scales queries by 1/sqrt(head size), or 1/sqrt(hidden/heads) for the 62-layer 27B.
        expected = (config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 62
                    else head_size(config))
        if config.query_pre_attn_scalar != expected or config.attn_logit_softcapping:
            raise UserError("GGUF export: this Gemma 3 scales or caps attention scores in a way llama.cpp does not "
                            f"read from the file (query_pre_attn_scalar {config.query_pre_attn_scalar}, llama.cpp "
                            f"uses {expected}; attention softcapping {config.attn_logit_softcapping})")
    return arch


def head_size(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_by_layer_type(config) -> dict[str, dict]:
    """RoPE parameters per attention type: Gemma 3 has its own for sliding and full attention layers."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return rope
    return {"full_attention": rope}


def rope_factors(config) -> np.ndarray | None:
    """Llama 3 RoPE scaling as llama.cpp reads it: a `rope_freqs` tensor dividing each frequency,
    taken from transformers' own scaled frequencies (plain RoPE: None)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") != "llama3":
        return None
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    dim = head_size(config)
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return (plain / scaled.float()).numpy().astype(np.float32)


def rope_to_ggml(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF stores each head's rotary dims as two halves; GGML's llama kernel wants them interleaved."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_names(model, arch: str):
    """(HF name, GGUF name) of every weight the file holds, from gguf's own HF -> GGUF name map."""
    import gguf

    config = model.config
    by_name = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
    names = gguf.get_tensor_name_map(by_name[arch], config.num_hidden_layers)
    for hf_name in model.state_dict():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when output is absent
        stem, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(stem)
        if name is None:
            raise UserError(f"GGUF export: no GGUF name for weight '{hf_name}'")
        yield hf_name, f"{name}.{suffix}"


def gguf_tensors(model, arch: str):
    """(GGUF name, fp32 array) for every weight, in llama.cpp's naming and layout."""
    config = model.config
    state = model.state_dict()
    for hf_name, full_name in gguf_names(model, arch):
        name = full_name.rsplit(".", 1)[0]
        tensor = state[hf_name].detach().float()
        if arch in PERMUTED and name.endswith("attn_q"):
            tensor = rope_to_ggml(tensor, config.num_attention_heads)
        elif arch in PERMUTED and name.endswith("attn_k"):
            tensor = rope_to_ggml(tensor, config.num_key_value_heads)
        elif arch in NORM_PLUS_ONE and name.endswith("norm"):
            tensor = tensor + 1.0
        yield full_name, tensor.numpy()


def add_tensor(writer, name: str, data: np.ndarray, quant: str) -> None:
    """Norms and biases stay f32 (as llama.cpp keeps them); matrices become f16 or the quantised type
    (rows whose length is not a multiple of the 32-value block stay f16, as llama.cpp falls back too).
    The token embedding and output head of a 4/5-bit file are q8_0, as llama.cpp's own mixes keep them
    at more bits than the rest."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    kind = quant
    if quant not in ("f16", "q8_0") and name.split(".")[0] in ("token_embd", "output"):
        kind = "q8_0"
    if data.ndim == 1:
        writer.add_tensor(name, data.astype(np.float32))
    elif kind != "f16" and data.shape[-1] % 32 == 0:
        qtype = getattr(GGMLQuantizationType, kind.upper())
        writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, data.astype(np.float16))


def write_gguf(model, tokenizer, path: Path, quant: str = "f16", name: str = "model") -> Path:
    """Write `model` (a transformers causal LM, fp32) and its tokenizer as one GGUF file.

    K-quant mixes (q4_k_m, q5_k_m) are written as f16 and quantised by llama.cpp's own quantiser: the
    `gguf` package has no K-quant encoder (gguf.quants.quantize raises NotImplementedError for them)."""
    import gguf

    if quant in LLAMA_CPP_QUANTS:
        from . import llamacpp

        if not llamacpp.available():
            raise UserError(f"GGUF {quant}: the gguf package cannot write K-quants (no encoder for them); install "
                            "the llamacpp extra (llama-cpp-python) to have llama.cpp's quantiser write it, or use "
                            f"one of {', '.join(QUANTS)}")
        f16 = write_gguf(model, tokenizer, path.with_name(path.stem + ".f16.gguf"), "f16", name)
        llamacpp.quantize(f16, path, quant)
        f16.unlink()
        return path
    if quant not in QUANTS:
        raise UserError(f"GGUF export: unknown --quant '{quant}'; choose one of {', '.join(QUANTS + LLAMA_CPP_QUANTS)}")
    config = model.config
    arch = gguf_architecture(config)
    head_dim = head_size(config)
    rope = rope_by_layer_type(config)["full_attention"]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(int(head_dim * getattr(config, "partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    if rope.get("rope_type") == "linear":  # Gemma 3 4B and larger, on their global layers
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    add_sliding_window(writer, config)
    if getattr(config, "final_logit_softcapping", None):  # Gemma
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{quant.upper()}"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    factors = rope_factors(config)
    if factors is not None:
        writer.add_tensor("rope_freqs.weight", factors)
    for tensor_name, data in gguf_tensors(model, arch):
        add_tensor(writer, tensor_name, data, quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_sliding_window(writer, config) -> None:
    """Gemma 3's local layers: the window, which layers have it (llama.cpp otherwise assumes every sixth
    layer is global) and their own RoPE base."""
    layer_types = getattr(config, "layer_types", None) or []
    if config.model_type != "gemma3_text" or "sliding_attention" not in layer_types:
        return
    writer.add_sliding_window(config.sliding_window)
    writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in layer_types])
    local = rope_by_layer_type(config).get("sliding_attention", {})
    writer.add_rope_freq_base_swa(float(local.get("rope_theta", 10000.0)))


def template_parity(trained_tokenizer, gguf_tokenizer, conversations: list[list[dict]]) -> tuple[int, int]:
    """(checked, equal): generation prompts built by both tokenizers' chat templates, token for token."""
    from ..data.tokenize import token_ids
    from ..data.tools import split_tools

    equal = 0
    for conversation in conversations:
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


def rope_from_ggml(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of rope_to_ggml."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def verify_gguf(path: Path, quant: str, reference_logits: torch.Tensor, batch: dict, trained_tokenizer,
                conversations: list[list[dict]], config=None) -> GGUFCheck:
    """Read the file back and compare with the merged model (whose config is `config`); refuse
    (UserError) when a check fails. 4- and 5-bit files are measured, not held to a bar here."""
    from ..models import load_model, load_tokenizer
    from .merge import logits_of

    model = read_back(path, config) if config is not None else load_model(str(path), torch.float32)
    logits = logits_of(model, batch)
    diff = float((logits - reference_logits).abs().max())
    scale = float(reference_logits.abs().max()) or 1.0
    same = logits.argmax(-1) == reference_logits.argmax(-1)
    answers = answer_positions(batch)
    top1 = float(same[answers].float().mean()) if answers.any() else float(same.float().mean())
    checked, equal = template_parity(trained_tokenizer, gguf_tokenizer(path), conversations)
    check = GGUFCheck(str(path), quant, int(answers.sum()) or len(same), diff, diff / scale, top1,
                      float(same.float().mean()), checked, equal)
    from . import llamacpp

    if llamacpp.available():
        check.llama_cpp = llamacpp.check(path, reference_logits, batch, answers)
        check.llama_cpp["prompts_checked"], check.llama_cpp["prompts_equal"] = llama_cpp_tokens_parity(
            path, trained_tokenizer, conversations)
    for reader, found in (("transformers", asdict(check)), ("llama.cpp", check.llama_cpp)):
        if found:
            refuse_if_off(path, quant, reader, found, scale, check.positions)
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
        texts.append(trained_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False))
    theirs = llamacpp.tokenize(path, texts)
    return len(texts), sum(ours == found for ours, found in zip(token_ids(trained_tokenizer, texts), theirs))


def refuse_if_off(path: Path, quant: str, reader: str, check: dict, scale: float, positions: int) -> None:
    """f16 within F16_TOLERANCE of the logit scale, q8_0 top-1 agreement at least Q8_TOP1."""
    diff, top1 = check["max_abs_diff"], check["top1_agreement"]
    if quant == "f16" and not check["relative_diff"] <= F16_TOLERANCE:
        raise UserError(f"{path}: f16 GGUF logits ({reader}) differ from the merged model's by {diff:.3g} "
                        f"({check['relative_diff']:.2%} of the logit scale {scale:.3g}; tolerance {F16_TOLERANCE:.0%})")
    if quant == "q8_0" and not top1 >= Q8_TOP1:
        raise UserError(f"{path}: q8_0 GGUF ({reader}) agrees with the merged model on the top-1 token at {top1:.2%} "
                        f"of {positions} answer positions (at least {Q8_TOP1:.0%} needed)")
