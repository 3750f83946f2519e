"""Loading the C++ extension (``csrc/compact.cpp``): prebuilt ``vitprune_fast._C``, else a JIT build with ninja.

``VITPRUNE_FAST_NO_EXT=1`` disables the extension (checked on every call, so tests can flip it). When the
extension can be neither imported nor built the library warns once and callers use their plain-torch path.
"""
from __future__ import annotations

import os
import shutil
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch  # noqa: F401 -- libtorch must be loaded before the extension module

ENV_DISABLE = "VITPRUNE_FAST_NO_EXT"
JIT_NAME = "vitprune_fast_compact"  # distinct from `_C` so a JIT build never shadows the setup.py one
API_VERSION = 2  # must match kApiVersion in csrc/compact.cpp

_lock = threading.Lock()
_loaded = False  # a load was attempted (successful or not); never retried within a process
_ext: ModuleType | None = None
_error: str | None = None


def source_path() -> Path | None:
    """Path of ``compact.cpp``: inside the package when shipped as package data, else the repo's ``csrc/``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc" / "compact.cpp", here.parent / "csrc" / "compact.cpp"):
        if cand.is_file():
            return cand
    return None


def _disabled() -> bool:
    return os.environ.get(ENV_DISABLE, "0") == "1"


def _check(mod: ModuleType) -> ModuleType:
    version = getattr(mod, "API_VERSION", None)
    if version != API_VERSION:
        raise ImportError(f"{mod.__name__} has API version {version}, expected {API_VERSION} (stale build)")
    return mod


def _jit_build() -> ModuleType:
    from torch.utils import cpp_extension

    src = source_path()
    if src is None:
        raise FileNotFoundError("csrc/compact.cpp not found next to the package or in the source checkout")
    # ninja is often pip-installed in the venv without the venv's bin/ on PATH.
    old_path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + old_path
        except ImportError:
            pass
    try:
        # -fopenmp: at::parallel_for is header-inline and only parallel when compiled with OpenMP.
        mod = cpp_extension.load(
            name=JIT_NAME,
            sources=[str(src)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    finally:
        os.environ["PATH"] = old_path
    return _check(mod)


def _load() -> tuple[ModuleType | None, str | None]:
    reasons = []
    try:
        from . import _C  # built by setup.py

        return _check(_C), None
    except (ImportError, OSError) as exc:  # not built, stale, or built against another torch
        reasons.append(f"prebuilt vitprune_fast._C: {exc}")
    try:
        return _jit_build(), None
    except Exception as exc:  # any build failure (no compiler, no ninja...) just means "no extension"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reasons.append(f"JIT build: {type(exc).__name__}: {first[:300]}")  # first line: the compiler log is long
    return None, "; ".join(reasons)


def get_ext() -> ModuleType | None:
    """The loaded extension module, or None (disabled by ``VITPRUNE_FAST_NO_EXT=1`` or unavailable).

    The first call imports ``vitprune_fast._C`` or JIT-builds ``csrc/compact.cpp`` (into the torch extensions
    cache, ``TORCH_EXTENSIONS_DIR``); a failure warns once and is not retried.
    """
    global _loaded, _ext, _error
    if _disabled():
        return None
    with _lock:
        if not _loaded:
            _ext, _error = _load()
            _loaded = True
            if _ext is None:
                warnings.warn(
                    f"vitprune_fast: C++ extension unavailable, using the plain-torch fallback for in-place "
                    f"compaction (same results, more memory traffic). Cause: {_error}. "
                    f"Set {ENV_DISABLE}=1 to silence this warning.",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _ext


def extension_available() -> bool:
    """Whether the C++ extension is enabled and loaded (building it on first call if needed)."""
    return get_ext() is not None


def load_error() -> str | None:
    """Why the extension could not be loaded (None if it loaded or was not tried yet)."""
    return _error


__all__ = ["get_ext", "extension_available", "load_error", "source_path"]
