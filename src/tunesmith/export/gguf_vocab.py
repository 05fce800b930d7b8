"""The tokenizer inside a GGUF, as llama.cpp reads it.

Two kinds of vocabulary, both stored by transformers as a BPE model in tokenizer.json:
- byte-level BPE (Llama 3, Qwen, Mistral Nemo, SmolLM, Phi-4): llama.cpp's `gpt2` model, with the merges
  and the name of the pre-tokenizer's split regex;
- SentencePiece BPE with byte fallback (Phi-3, Gemma 3): llama.cpp's `llama` model, which has no merges
  but merges the adjacent pair whose joined piece scores highest. The scores are taken from the merge
  ranks, so llama.cpp merges in the order transformers does.
"""
from __future__ import annotations

import json
import re

from ..errors import UserError

BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPACE = "\u2581"  # SentencePiece's visible space
ADDED_SCORE = -1000.0  # llama.cpp's converter gives added tokens this score; they are split out before merging


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The vocabulary, special ids and chat template as llama.cpp reads them."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export supports BPE tokenizers (byte-level or SentencePiece-style); this one is "
                        f"{model.get('type')}")
    if model.get("byte_fallback"):
        add_sentencepiece_vocabulary(writer, tokenizer, backend, vocab_size)
    else:
        add_byte_level_vocabulary(writer, tokenizer, model, vocab_size)
    for token, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        token_id = getattr(tokenizer, f"{token}_token_id")
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(adds_bos(tokenizer))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def add_byte_level_vocabulary(writer, tokenizer, model: dict, vocab_size: int) -> None:
    from gguf import TokenType

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
            tokens.append(added[i].content)
        elif i in by_id:
            types.append(TokenType.NORMAL)
            tokens.append(by_id[i])
        else:  # embedding rows past the tokenizer (padding to a round size)
            types.append(TokenType.UNUSED)
            tokens.append(f"[PAD{i}]")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])


def add_sentencepiece_vocabulary(writer, tokenizer, backend: dict, vocab_size: int) -> None:
    from gguf import TokenType

    model = backend["model"]
    scores = merge_scores(model["merges"])
    unmerged = -float(len(model["merges"]) + 1)  # a longer piece no merge makes: last, as transformers never makes it
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, kinds, values = [], [], []
    for i in range(vocab_size):
        if i in added:
            content = added[i].content
            if added[i].special:
                kind = TokenType.CONTROL
            else:  # llama.cpp matches user-defined tokens in the raw text, where spaces are still spaces
                kind, content = TokenType.USER_DEFINED, content.replace(SPACE, " ")
            tokens.append(content), kinds.append(kind), values.append(ADDED_SCORE)
        elif i in by_id:
            piece = by_id[i]
            kind = TokenType.BYTE if BYTE_PIECE.fullmatch(piece) else TokenType.NORMAL
            if piece == model.get("unk_token"):
                kind = TokenType.UNKNOWN
            tokens.append(piece), kinds.append(kind)
            values.append(scores.get(piece, 0.0 if len(piece) == 1 or kind != TokenType.NORMAL else unmerged))
        else:
            tokens.append(f"[PAD{i}]"), kinds.append(TokenType.UNUSED), values.append(ADDED_SCORE)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(values)
    writer.add_token_types(kinds)
    writer.add_add_space_prefix(prepends_space(backend))


def merge_scores(merges: list) -> dict[str, float]:
    """A score per piece that orders merges as their ranks do: the first merge making a piece gives it
    minus its rank (transformers' converter lists every split of a piece, best first)."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def prepends_space(backend: dict) -> bool:
    """Whether the tokenizer puts a visible space before the text (Phi-3, Llama 2: yes; Gemma: no), as a
    `Prepend` normalizer or a `Metaspace` pre-tokenizer that prepends."""
    steps = []
    for part in (backend.get("normalizer"), backend.get("pre_tokenizer")):
        if part:
            steps += part.get("normalizers") or part.get("pretokenizers") or [part]
    return any((s.get("type") == "Prepend" and s.get("prepend") == SPACE)
               or (s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never") for s in steps)


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE, from its tokenizer.json."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    for step in pre.get("pretokenizers", []):
        regex = (step.get("pattern") or {}).get("Regex") if step.get("type") == "Split" else None
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            if regex == split:
                return name
    raise UserError(f"GGUF export: the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) has no llama.cpp equivalent "
                    "known to tunesmith")


def adds_bos(tokenizer) -> bool:
    """Whether llama.cpp should start every text with BOS: where the tokenizer does and the chat template,
    which training follows, begins with it too (Phi-3's tokenizer adds BOS, its template does not)."""
    first = tokenizer("a").input_ids
    if not (first and first[0] == tokenizer.bos_token_id):
        return False
    if not tokenizer.chat_template:
        return True
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "a"}], add_generation_prompt=True,
                                             tokenize=False)
    return rendered.startswith(tokenizer.bos_token)
