"""Resumable score storage: one safetensors file per finished work unit, plus a fingerprint of the job."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import VitPruneError


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
            tmp = meta.with_suffix(".tmp")
            tmp.write_text(json.dumps({"fingerprint": job, "describe": describe}, indent=1))
            os.replace(tmp, meta)

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

        tmp = self.path / f"{key}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self._file(key))  # atomic: an interrupted write never looks finished
