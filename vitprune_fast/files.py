"""File modes: what the library writes gets the user's umask, like every other file a program writes.

Writers that go through a temporary file (``tempfile.mkstemp``: mode 0600, safetensors' ``save_file``) would
otherwise leave files only their owner can read.
"""
from __future__ import annotations

import os


def umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give the file at ``path`` mode ``0o666 & ~umask`` (what ``open(path, "w")`` gives a new file)."""
    os.chmod(path, 0o666 & ~umask())


__all__ = ["apply_umask", "umask"]
