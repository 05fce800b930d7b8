"""Every family's GGUF in llama.cpp itself: tiny random models built from each family's real config with
its real tokenizer (tests/families.py), exported in each type, loaded by llama.cpp (llama-cpp-python),
and compared with the transformers model on the family's probe conversations.

    .venv/bin/pip install -e '.[llamacpp]'     # builds llama.cpp from source
    .venv/bin/python bench/llamacpp_families.py [FAMILY ...]

Prints, per family and type, the max abs logit difference (and its share of the logit scale) and the
top-1 agreement at answer positions and at all positions.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from families import EXPORTED, FAMILIES, build_aligned_family_model, build_family_tokenizer, probes  # noqa: E402
from tunesmith.data.collate import collate  # noqa: E402
from tunesmith.data.formats import to_example  # noqa: E402
from tunesmith.data.templates import use_template  # noqa: E402
from tunesmith.data.tokenize import encode_many  # noqa: E402
from tunesmith.export import gguf as gguf_export, gguf_check, llamacpp  # noqa: E402
from tunesmith.export.merge import logits_of  # noqa: E402
from tunesmith.models import load_tokenizer  # noqa: E402

QUANTS = ["f16", "q8_0", "q5_0", "q4_0", "q5_k_m", "q4_k_m"]


def main(names: list[str]) -> None:
    root = Path(tempfile.mkdtemp())
    print(f"{'family':<10}{'type':<8}{'max|diff|':>11}{'of scale':>10}{'top-1 ans':>11}{'top-1 all':>11}{'s':>6}")
    for name in names:
        folder = root / name
        build_family_tokenizer(name, folder)
        tokenizer = load_tokenizer(str(folder))
        model = build_aligned_family_model(name, folder, tokenizer)
        use_template(tokenizer, None, FAMILIES[name].variables)
        conversations = [to_example(r)[1] for r in probes(name, count=8, seed=7)]
        batch = collate([e for r in encode_many(tokenizer, conversations) for e in r], tokenizer.pad_token_id)
        reference = logits_of(model, batch)
        answers = gguf_check.answer_positions(batch)
        for quant in QUANTS:
            started = time.perf_counter()
            path = gguf_export.write_gguf(model, tokenizer, root / f"{name}-{quant}.gguf", quant)
            found = llamacpp.check(path, reference, batch, answers)
            print(f"{name:<10}{quant:<8}{found['max_abs_diff']:>11.4f}{found['relative_diff']:>10.2%}"
                  f"{found['top1_agreement']:>11.2%}{found['top1_all_positions']:>11.2%}"
                  f"{time.perf_counter() - started:>6.0f}", flush=True)
            path.unlink()


if __name__ == "__main__":
    main(sys.argv[1:] or EXPORTED)
