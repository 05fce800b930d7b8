"""Text that is not UTF-8 (a Latin-1 terminal, pasted bytes) reaching `chat` or `generate` is said in one
line (walk-through 2): it reached the tokenizer as lone surrogates and ended the process with a
TypeError traceback, a chat's whole conversation with it. A chat leaves that turn out and goes on."""
from __future__ import annotations

import io
import sys

import pytest

from tunesmith.cli import main
from tunesmith.errors import UserError


def test_chat_leaves_out_a_line_that_is_not_utf8_and_goes_on(tiny_model_dir, monkeypatch, capsys):
    from tunesmith.eval.chat import chat

    # standard input as a UTF-8 locale gives it (strict), the second line in Latin-1
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("Hello\ncaf\xe9 au lait\nThanks\n".encode("latin-1")),
                                                       encoding="utf-8", errors="strict"))
    out = io.StringIO()
    messages = chat(str(tiny_model_dir), system="", max_new_tokens=4, out=out)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [messages[0]["content"], messages[2]["content"]] == ["Hello", "Thanks"]
    said = [line for line in out.getvalue().splitlines() if "UTF-8" in line]
    assert said == ["(input is not UTF-8: byte 0xe9 after 'caf'; that message is left out: set the terminal to "
                    "UTF-8 and say it again)"]
    # the same bytes as a surrogate-escaped line (a C or C.UTF-8 locale's stdin, as argv always is)
    lines = iter(["caf\udce9", "/tool caf\udce9", "Hi", "/exit"])
    messages = chat(str(tiny_model_dir), system="", max_new_tokens=4, read=lambda prompt: next(lines), out=out)
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Hi"]


def test_generate_refuses_a_prompt_that_is_not_utf8_in_one_line(tiny_model_dir, capsys):
    assert main(["generate", str(tiny_model_dir), "caf\udce9 au lait", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: the prompt is not UTF-8: byte 0xe9 after 'caf'; set the terminal to UTF-8, or convert the "
                   "text (iconv -f latin1 -t utf-8)")
    assert main(["generate", str(tiny_model_dir), "Hi", "--system", "\udce9t\xe9", "--max-new-tokens", "2"]) == 2
    assert "--system is not UTF-8: byte 0xe9 at its start" in capsys.readouterr().err
    assert main(["chat", str(tiny_model_dir), "--system", "caf\udce9"]) == 2


def test_a_tools_file_that_is_not_utf8_is_said(tmp_path):
    from tunesmith.eval.chat import read_tools

    path = tmp_path / "tools.json"
    path.write_bytes('[{"type": "function", "function": {"name": "caf\xe9"}}]'.encode("latin-1"))
    with pytest.raises(UserError, match=r"tools.json: not UTF-8 \(byte 0xe9 at offset 47\); convert it"):
        read_tools(str(path))
