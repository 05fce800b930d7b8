"""`tunesmith pairs` never replaces its own prompts file, and replaces an existing pairs file only when
asked (--overwrite), as a finished run folder is replaced only with output.overwrite (walk-through 2).
Before, `--out prompts.jsonl` turned the prompts file into one pair without a word."""
from __future__ import annotations

import json

from helpers import qa_rows, write_jsonl
from tunesmith.cli import main


def _prompts(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"], "reference": r["completion"]}
                                                        for r in qa_rows(4)])
    (tmp_path / "by_length.py").write_text("def score(answer, reference):\n    return float(len(answer))\n")
    return prompts, ["--samples", "2", "--max-new-tokens", "4", "--scorer", f"{tmp_path / 'by_length.py'}:score"]


def test_pairs_refuse_to_write_over_their_prompts_or_an_existing_file(tiny_model_dir, tmp_path, capsys):
    prompts, options = _prompts(tmp_path)
    before = prompts.read_text()
    # the prompts file itself: refused, with --overwrite too, also under another name for the same file
    (tmp_path / "alias.jsonl").symlink_to(prompts)
    for out, extra in ((prompts, []), (prompts, ["--overwrite"]), (tmp_path / "alias.jsonl", ["--overwrite"])):
        assert main(["pairs", str(tiny_model_dir), "--data", str(prompts), *options, "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert "the prompts file itself" in err and len(err.strip().splitlines()) == 1, err
    assert prompts.read_text() == before
    # an existing file of the user's: refused, kept whole, nothing left beside it
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"hand": "written"}\n')
    assert main(["pairs", str(tiny_model_dir), "--data", str(prompts), *options, "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert f"{mine}: exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1, err
    assert mine.read_text() == '{"hand": "written"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alias.jsonl", "by_length.py", "mine.jsonl", "prompts.jsonl"]
    # asked for: replaced by the pairs
    assert main(["pairs", str(tiny_model_dir), "--data", str(prompts), *options, "--out", str(mine), "--overwrite"]) == 0
    capsys.readouterr()
    assert all("chosen" in json.loads(line) for line in mine.read_text().splitlines())


def test_a_second_pairs_into_the_default_file_is_refused_too(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Without --out the pairs go to ./pairs.jsonl (RUN/pairs.jsonl for a run): the same rule."""
    prompts, options = _prompts(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["pairs", str(tiny_model_dir), "--data", str(prompts), *options]) == 0
    first = (tmp_path / "pairs.jsonl").read_text()
    assert first
    assert main(["pairs", str(tiny_model_dir), "--data", str(prompts), *options, "--seed", "1"]) == 2
    assert "pairs.jsonl: exists" in capsys.readouterr().err
    assert (tmp_path / "pairs.jsonl").read_text() == first
