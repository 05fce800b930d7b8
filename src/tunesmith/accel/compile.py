"""torch.compile for the small element-wise functions of the fast paths, with an eager fallback.

Only the compiler's own failures (no C++ compiler, an operator inductor cannot lower) turn
compiling off; an error of the function itself (a shape bug, out of memory) reaches the caller.
"""
from __future__ import annotations

import os
import warnings

import torch


def compiler_errors() -> tuple[type[BaseException], ...]:
    """What torch raises when compiling fails, as opposed to what the function raises when it runs.

    Without a working C++ compiler inductor raises InductorError (a BackendCompilerFailed) around
    InvalidCxxCompiler or CppCompileError (checked on torch 2.13); an operator it cannot lower or a
    dynamo bug raise the others. A shape error in the function surfaces as dynamo's
    TorchRuntimeError and out of memory as itself: neither is here, both reach the caller.
    Looked up by name, so a torch without one of them still works."""
    from torch._dynamo import exc as dynamo
    from torch._inductor import exc as inductor

    found = [getattr(dynamo, name, None) for name in ("BackendCompilerFailed", "InternalTorchDynamoError", "Unsupported")]
    found += [getattr(inductor, name, None) for name in ("InductorError", "CppCompileError", "InvalidCxxCompiler",
                                                         "OperatorIssue")]
    return tuple(error for error in found if isinstance(error, type) and issubclass(error, BaseException))


def _out_of_memory(err: BaseException | None) -> bool:
    """Whether out of memory is what a compiler error wraps (the backend ran out while compiling)."""
    for _ in range(8):
        if err is None:
            return False
        if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
            return True
        err = err.__cause__ or getattr(err, "inner_exception", None)
    return False


def compiled(fn):
    """fn compiled on first use; eager from then on if compiling fails (or TUNESMITH_COMPILE=0).

    Only the compiler's own failures turn compiling off; any other error (out of memory, a shape
    bug) is the caller's to see, and compiling stays on."""
    state = {"fast": None if os.environ.get("TUNESMITH_COMPILE", "1") != "0" else False}

    def call(*args):
        if state["fast"] is None:
            state["fast"] = torch.compile(fn, dynamic=True)
        if state["fast"]:
            try:
                return state["fast"](*args)
            except compiler_errors() as err:
                if _out_of_memory(err):
                    raise
                warnings.warn(f"torch.compile failed for {fn.__name__}; running it eagerly ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})", RuntimeWarning, stacklevel=2)
                state["fast"] = False
        return fn(*args)

    call.state = state  # {"fast": None (not yet compiled), the compiled function, or False (eager)}
    return call
