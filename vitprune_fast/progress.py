"""Progress of the long runs (the UP-ViTs engines): a bar per stage, one line per stage, or events for a listener.

Every engine names its stages (the screened engine: ``exact residual``, ``screen``, ``calibration``, ``band``,
``audit``), so that what is moving -- and the ETA of the stage it is in -- shows; a run with ``progress="lines"`` (the
CLI's ``--quiet``) still prints one line when each stage starts, so a long run is never silent.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm.auto import tqdm

#: ``True`` (a tqdm bar per stage), ``False`` (silent), ``"lines"`` (one line per stage on stderr), or a callable
#: ``listener(stage, done, total)`` called when a stage starts (done 0), advances and ends (done == total).
Progress = bool | str | Callable[[str, int, int], None]


class _Stage:
    """One stage: a tqdm bar and/or events; ``update(n)``, ``set_postfix_str(s)``, ``close()``."""

    def __init__(self, progress: Progress, desc: str, name: str, total: int | None, unit: str):
        self.name, self.total, self.done = name, total, 0
        self._listener = progress if callable(progress) else None
        self._bar = tqdm(total=total, unit=unit, desc=f"{desc}: {name}", dynamic_ncols=True) if progress is True \
            else None
        if progress == "lines":
            print(f"{desc}: {name}" + (f" ({total} {unit})" if total is not None else ""), file=sys.stderr, flush=True)
        self._emit()

    def _emit(self) -> None:
        if self._listener is not None:
            self._listener(self.name, self.done, self.total)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        self._emit()

    def set_postfix_str(self, s: str, refresh: bool = False) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(s, refresh=refresh)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> _Stage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_progress(progress: Progress) -> Progress:
    """``progress`` itself, or a clear ConfigError for a value that is none of the accepted ones."""
    from .errors import ConfigError

    if progress in (True, False, "lines") or callable(progress):
        return progress
    raise ConfigError(f"progress must be True, False, 'lines' or a callable(stage, done, total), got {progress!r}")


def stage(progress: Progress, desc: str, name: str, total: int | None, unit: str = "cand") -> _Stage:
    """A stage of ``total`` units of work (None: unknown), reported as ``progress`` says (see :data:`Progress`)."""
    return _Stage(check_progress(progress), desc, name, total, unit)


__all__ = ["Progress", "check_progress", "stage"]
