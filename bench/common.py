"""Shared helpers for the benchmarks: device naming, timing, JSON results."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str | torch.device = "cpu") -> str:
    """Human-readable device: the GPU name, or the CPU model from /proc/cpuinfo."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:60]


def timed(fn, repeats: int = 3, device: str | torch.device = "cpu") -> tuple[float, object]:
    """Median wall seconds over ``repeats`` runs (CUDA-synchronised) and the last result."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times, out = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def write_json(name: str, device: str | torch.device, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    dev = device_name(device)
    path = RESULTS / f"{name}-{slug(dev)}.json"
    doc = {"benchmark": name, "device": dev, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "loadavg_1min_at_end": os.getloadavg()[0], **payload}  # other work on the machine skews CPU timings
    path.write_text(json.dumps(doc, indent=1))
    return path
