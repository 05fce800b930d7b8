"""Files a run writes get the modes the user's umask gives: safetensors (0.8 and later) writes through a
temporary file that it renames into place, always mode 0600 (safetensors issue #782), so an adapter beside
a readable config was unreadable to another user: a vLLM server, a container's user, a colleague."""
from __future__ import annotations

import os
from pathlib import Path


def as_umask_allows(folder: Path) -> None:
    """Every .safetensors file under `folder` at 0666 less the umask, as open() would have made it."""
    umask = os.umask(0o022)  # read by setting it: put back at once
    os.umask(umask)
    for path in Path(folder).rglob("*.safetensors"):
        if not path.is_symlink():
            path.chmod(0o666 & ~umask)
