"""Every family's GGUF loaded by llama.cpp itself (llama-cpp-python, the llamacpp extra; skipped where it
is not installed): f16 logits within 1% of the logit scale of the transformers model's, q8_0 top-1 tokens
equal at >= 99% of answer positions, the K-quant mix q4_k_m written by llama.cpp's quantiser and measured.
Slow set (about 2 minutes); bench/llamacpp_families.py prints the full table."""
from __future__ import annotations

import pytest

from test_family_exports import WRITTEN, family_model, sample
from tunesmith.export import gguf as gguf_export, llamacpp
from tunesmith.export.merge import logits_of

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python (the llamacpp extra) not installed")]


@pytest.mark.parametrize("name", WRITTEN)
def test_family_gguf_in_llama_cpp(family_dirs, tmp_path, name):
    model, tokenizer = family_model(family_dirs, name)
    _, batch = sample(tokenizer, name)
    reference = logits_of(model, batch)
    answers = gguf_export.answer_positions(batch)
    found = {}
    for quant in ("f16", "q8_0", "q4_k_m"):
        path = gguf_export.write_gguf(model, tokenizer, tmp_path / f"{quant}.gguf", quant)
        found[quant] = llamacpp.check(path, reference, batch, answers)
    assert found["f16"]["relative_diff"] < 1e-2
    assert found["q8_0"]["top1_agreement"] >= 0.99
    assert found["q4_k_m"]["top1_agreement"] > 0.5  # measured; the bench prints it
