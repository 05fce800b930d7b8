"""torch.compile for the small element-wise functions of the fast paths, with an eager fallback."""
from __future__ import annotations

import os
import warnings

import torch


def compiled(fn):
    """fn compiled on first use; eager from then on if compiling fails (or TUNESMITH_COMPILE=0)."""
    state = {"fast": None if os.environ.get("TUNESMITH_COMPILE", "1") != "0" else False}

    def call(*args):
        if state["fast"] is None:
            state["fast"] = torch.compile(fn, dynamic=True)
        if state["fast"]:
            try:
                return state["fast"](*args)
            except Exception as err:  # noqa: BLE001 (any compiler failure: fall back, keep training)
                warnings.warn(f"torch.compile failed for {fn.__name__}; running it eagerly ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})", RuntimeWarning, stacklevel=2)
                state["fast"] = False
        return fn(*args)

    return call
