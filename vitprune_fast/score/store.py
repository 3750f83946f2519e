"""Resumable score storage: one safetensors file per finished work unit, plus a fingerprint of the job."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import VitPruneError
from ..files import apply_umask


def fingerprint(model: torch.nn.Module, chunks: list[torch.Tensor], settings: dict) -> str:
    """sha256 over the model's tensors, the proxy images and the scoring settings."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for c in chunks:
        h.update(str(tuple(c.shape)).encode())
        h.update(c.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


class ScoreStore:
    """A directory of finished work units; refuses to mix jobs with different fingerprints."""

    def __init__(self, path: str | os.PathLike, job: str, describe: dict):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        meta = self.path / "job.json"
        if meta.exists():
            try:
                old = json.loads(meta.read_text())
            except json.JSONDecodeError as e:
                raise VitPruneError(f"{meta} is corrupt; delete the directory to start over") from e
            if old.get("fingerprint") != job:
                raise VitPruneError(
                    f"{self.path} holds scores of a different job (model, proxy images or settings differ: "
                    f"{old.get('describe')}); use another checkpoint directory")
        else:
            text = json.dumps({"fingerprint": job, "describe": describe}, indent=1)
            _atomic_write(meta, lambda tmp: Path(tmp).write_text(text))

    def _file(self, key: str) -> Path:
        return self.path / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self._file(key).exists()

    def load(self, key: str) -> torch.Tensor:
        return self.load_tensors(key)["scores"]

    def save(self, key: str, scores: torch.Tensor) -> None:
        self.save_tensors(key, {"scores": scores})

    def load_tensors(self, key: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self._file(key)))

    def save_tensors(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        _atomic_write(self._file(key), lambda tmp: save_file(tensors, tmp))


def _atomic_write(dest: Path, write: Callable[[str], object]) -> None:
    """Write through a temporary file of this process's own, then rename.

    An interrupted write never looks finished, and ranks writing the same file at once (each its own temporary,
    the same content) never remove each other's temporary.
    """
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        apply_umask(tmp)  # mkstemp makes it 0600
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
