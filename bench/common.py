"""Shared helpers for the benchmarks: device naming, timing, measured ceilings, JSON results.

Every benchmark times through :func:`seconds` (CUDA: ``triton.testing.do_bench`` median, which uses CUDA events
and flushes L2 between runs; CPU: median of repeated ``perf_counter`` runs after a warm-up) and writes through
:func:`write_json`, so results carry the device, library versions, thread count and load average alike.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

# where results go; tests point it elsewhere (subprocesses inherit the variable)
RESULTS = Path(os.environ.get("VITPRUNE_FAST_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or what ``platform`` knows)."""
    return device_name("cpu")


def device_name(device: str | torch.device = "cpu") -> str:
    """Human-readable device: the GPU name, or the CPU model (the name latency tables are keyed by)."""
    from vitprune_fast.latency import device_name as name

    return name(torch.device(device))


def quick_main(name: str, doc: str, run: Callable[[str, torch.device], dict]) -> None:
    """A benchmark's ``main``: ``--quick``, the default device (one thread on CPU), ``run(size, device)`` -> the
    payload, written as ``bench/results/<name>[-quick]-<device>.json``. ``size`` is ``"quick"`` or the device type."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = ap.parse_args()
    device = default_device()
    if device.type == "cpu":
        torch.set_num_threads(1)
    payload = run("quick" if args.quick else device.type, device)
    print("->", write_json(name, device, payload, quick=args.quick))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def slug(name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())[:60]


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device: str | torch.device = "cpu", repeats: int = 5, stat: str = "median",
            warmup: bool = True) -> float:
    """Seconds per call of ``fn()``.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each run) with ``stat`` as return mode.
    CPU: one untimed warm-up call (unless ``warmup=False``), then ``repeats`` timed calls reduced by ``stat``
    (``median`` / ``min`` / ``mean``).
    """
    if torch.device(device).type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode=stat) / 1e3
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median, "min": min, "mean": statistics.mean}[stat](times)


def timed(fn, repeats: int = 3, device: str | torch.device = "cpu") -> tuple[float, object]:
    """Median wall seconds over ``repeats`` runs of an expensive ``fn`` (no warm-up; CUDA-synchronised) and
    the last result. For calls too long for ``do_bench`` (a whole scoring job)."""
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def round_robin(fns: dict, repeats: int, device: str | torch.device = "cpu"
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall seconds, process CPU seconds) of every call, timed round-robin: each round calls every function once,
    so the load of a shared machine hits all of a round alike (compare them with :func:`median_ratio`)."""
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            c0 = time.process_time()
            wall[k].append(timed(fn, 1, device)[0])
            cpu[k].append(time.process_time() - c0)
    return wall, cpu


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of ``a[i] / b[i]`` (round-robin timings)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def copy_bandwidth_gbs(device: str | torch.device, nbytes: int | None = None) -> float:
    """Measured copy bandwidth in GB/s (read + write counted) of a buffer far larger than the caches."""
    device = torch.device(device)
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = seconds(lambda: dst.copy_(src), device, repeats=5)
    return 2 * nbytes / t / 1e9


def matmul_peak_tflops(device: str | torch.device, dtype: torch.dtype = torch.bfloat16, n: int | None = None) -> float:
    """Measured dense matmul throughput in TFLOP/s (``2 n^3`` per ``n x n`` product)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / seconds(lambda: a @ b, device, repeats=3) / 1e12


def versions() -> dict:
    out = {"torch": torch.__version__}
    for mod in ("triton", "timm"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def result_path(name: str, device: str | torch.device, quick: bool = False) -> Path:
    """``bench/results/<name>[-quick]-<device slug>.json``."""
    return RESULTS / f"{name}{'-quick' if quick else ''}-{slug(device_name(device))}.json"


def document(name: str, device: str | torch.device, payload: dict, quick: bool = False) -> dict:
    """One benchmark's results with the device, versions, threads, date and load average."""
    return {"benchmark": name, "device": device_name(device), "backend": torch.device(device).type,
            **versions(), "threads": torch.get_num_threads(), "quick": quick, "date": time.strftime("%Y-%m-%d"),
            "loadavg_1min_at_end": os.getloadavg()[0],  # other work on the machine skews CPU timings
            **payload}


def write_json(name: str, device: str | torch.device, payload: dict, quick: bool = False) -> Path:
    """Write :func:`document` to ``bench/results/<name>[-quick]-<device>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = result_path(name, device, quick)
    path.write_text(json.dumps(document(name, device, payload, quick), indent=1) + "\n")
    return path


def run_process(cmd: list[str], timeout: float | None, on_line: Callable[[str], None] | None = None,
                env: dict | None = None, cwd: str | os.PathLike | None = None) -> int | str:
    """Exit code of ``cmd``, or ``"timeout"`` after killing its whole process group (pytest, workers...).

    With ``on_line``, the command's stdout and stderr are read line by line and handed to it (a log that is
    complete when this returns); otherwise they go to this process's own streams.
    """
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    pipe = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) if on_line else {}
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, **group, **pipe)
    reader = None
    if on_line:
        reader = threading.Thread(target=lambda: [on_line(line.rstrip("\n")) for line in proc.stdout], daemon=True)
        reader.start()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    finally:
        if proc.poll() is None:  # timed out, or this process was interrupted
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if reader is not None:
            reader.join(timeout=10)
