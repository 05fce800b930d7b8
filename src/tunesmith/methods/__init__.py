"""Training methods behind one record; the registry config, CLI and plan take their lists from.

A Method says how the base is loaded (as stored, or 4-bit NF4), how it is made trainable, what
a run saves (a PEFT adapter, or a whole model folder), and what the memory plan and the exports
need to know of it. Adding a method is one new file in this package and its line in METHODS.
Module imports stay light (no torch): the config validates method names from here.
"""
from __future__ import annotations

from ..errors import UserError
from . import dora, full, lora, qlora
from .common import ADAPTER_DIR, MODEL_DIR, Method

METHODS: dict[str, Method] = {m.name: m for m in (lora.METHOD, dora.METHOD, qlora.METHOD, full.METHOD)}
NAMES: tuple[str, ...] = tuple(METHODS)


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown method {name!r}; choose from {', '.join(NAMES)}") from None


__all__ = ["METHODS", "NAMES", "Method", "get", "ADAPTER_DIR", "MODEL_DIR"]
