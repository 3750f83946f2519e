"""The GPU check: everything one short GPU lease should tell us, in priority order, inside one deadline.

    bash bench/gpu_check.sh                        # on a GPU machine: offline install, then this script
    python bench/gpu_check.py --dry-run --deadline 60   # anywhere: the CUDA steps are reported as skipped

Steps, in order (each is recorded with its status, seconds and result files):

1. ``env``        GPU, driver, CUDA, torch / triton / timm / Python versions, compilers, Python headers, ninja,
                  the C++ extension (loaded, or why not) and how the package was installed.
2. ``preflight``  every Triton kernel launched once on the device against its float64 reference
                  (FlashAttention's rule); stops at the first failure and names it. Dry run: the CPU interpreter.
3. ``gpu_tests``  every ``gpu``-marked test (pass / fail list, slowest tests).
4. benchmarks at the check's sizes: ``kernels`` (engine shapes, GB/s vs a measured copy), ``kl_engine``
   (DeiT-S 224 px bf16: published loop vs fast engine, TFLOP/s vs a measured bf16 matmul, whole model
   extrapolated), ``dimap`` (Swin-B), ``pruned_speed`` (bs 1 / 64 / 256), ``pruned_speed_libraries`` (ViT-B in
   timm, transformers where installed, torchvision, pruned to ~50 % FLOPs), ``kl_engine_screened`` (DeiT-B
   224 px bf16, 32 images: the screened selection vs the fast engine on every candidate, extrapolated to 2,000
   images), then ``dap``, ``slicing`` and ``finetune_scale`` (bf16 vs fp32 training steps).

A step starts only when the time it needs at least (``Step.min_s``) is left before the deadline, minus a reserve
for writing the results; a running step is stopped (its whole process group) when the deadline comes. Results
go to ``bench/results/gpu_check-<device>.json`` next to each benchmark's own file; where ``$OUT`` is set (the
device tool), every result file written by this run and the log ``gpu_check.log`` are copied to ``$OUT`` after
every step, so a command stopped from outside still returns what finished. ``python bench/report.py`` renders
them into the README.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import RESULTS, device_name, run_process, slug, versions  # noqa: E402

DEFAULT_DEADLINE = 480  # seconds: a device command may run 10 minutes; this leaves margin for start and transfer
RESERVE = 10  # seconds kept back for writing results


@dataclass(frozen=True)
class Step:
    """One subprocess step: ``cmd`` (after ``python``), run from the repository root.

    Attributes:
        name: step name (also the result file prefix of a benchmark).
        cmd: arguments after the interpreter.
        min_s: do not start with less time left than this (its expected duration on an H100/H200).
        cap_s: stop it after this long even when more time is left.
        needs_cuda: skipped without CUDA (and in a dry run).
    """

    name: str
    cmd: tuple[str, ...]
    min_s: float
    cap_s: float
    needs_cuda: bool = True


STEPS = (
    Step("preflight", ("bench/gpu_check.py", "--preflight", "--preflight-out", "{tmp}/preflight.json"), 15, 120,
         needs_cuda=False),
    Step("gpu_tests", ("bench/gpu_tests.py", "--timeout", "{timeout}"), 60, 240),
    Step("kernels", ("bench/kernels.py",), 30, 120),
    Step("kl_engine", ("bench/kl_engine.py", "--check"), 40, 150),
    Step("dimap", ("bench/dimap.py", "--models", "swin_base_patch4_window7_224", "--repeats", "3"), 20, 90),
    Step("pruned_speed", ("bench/pruned_speed.py", "--check"), 30, 120),
    Step("pruned_speed_libraries", ("bench/pruned_speed.py", "--libraries"), 30, 90),
    Step("kl_engine_screened", ("bench/kl_engine.py", "--screened"), 90, 200),
    Step("dap", ("bench/dap.py", "--quick", "--repeats", "3"), 30, 90),
    Step("slicing", ("bench/slicing.py", "--quick", "--devices", "cuda"), 20, 60),
    Step("finetune_scale", ("bench/finetune_scale.py", "--quick"), 30, 90),
)


@dataclass
class Check:
    """The run's state: deadline, log, result files, where to copy them."""

    deadline: float  # time.monotonic() value
    out: Path | None
    tmp: Path  # scratch directory of this run
    started: float = field(default_factory=time.time)
    log_lines: list[str] = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, line: str) -> None:
        print(line, flush=True)
        self.log_lines.append(line)
        if self.out is not None:
            with open(self.out / "gpu_check.log", "a") as f:
                f.write(line + "\n")

    def fresh_results(self) -> list[Path]:
        """Result files written since the check started."""
        return sorted(p for p in RESULTS.glob("*.json") if p.stat().st_mtime >= self.started - 1)

    def copy_out(self) -> None:
        if self.out is None:
            return
        dst = self.out / "results"
        dst.mkdir(parents=True, exist_ok=True)
        for p in self.fresh_results():
            shutil.copy2(p, dst / p.name)


# ---------------------------------------------------------------------------------------------------- env
def _line(cmd: list[str], which: int) -> str | None:
    """Line ``which`` of a command's output (None when the command is missing or fails)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [x.strip() for x in out.stdout.splitlines() if x.strip()]
    return lines[which] if out.returncode == 0 and lines else None


def environment(cuda: bool) -> dict:
    """What the machine has: enough to tell a broken install from a broken kernel."""
    import torch

    env = {"python": platform.python_version(), **versions(), "torch_cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "install": os.environ.get("VITPRUNE_FAST_INSTALL", "as found"),
           "gcc": _line(["gcc", "--version"], 0), "nvcc": _line(["nvcc", "--version"], -1),
           "ninja": shutil.which("ninja") is not None or _has_module("ninja"),
           "python_headers": (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count(),
                   driver=_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], 0))
    import vitprune_fast
    from vitprune_fast import _ext

    env["package_path"] = str(Path(vitprune_fast.__file__).parent)
    env["cpp_extension"] = _ext.extension_available()
    env["cpp_extension_error"] = _ext.load_error()
    import vitprune_fast.kernels.utils as ku

    env["triton_importable"] = ku.HAS_TRITON
    return env


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ------------------------------------------------------------------------------------------------- preflight
def preflight(device) -> dict:
    """Launch every kernel once against its float64 reference (tiny shapes; bf16 and fp32 on CUDA, fp32 and fp64
    in the CPU interpreter); stop at the first failure and name it."""
    import torch

    import kernels as bench_kernels  # bench/kernels.py (this script's directory comes first on sys.path)

    dtypes = (torch.bfloat16, torch.float32) if device.type == "cuda" else (torch.float32, torch.float64)
    rows = []
    for case in bench_kernels.cases("tiny", dtypes):
        op, shape = case[0], case[1]
        try:
            rows += bench_kernels.measure([case], device, None, time_kernels=False, time_refs=False)
        except Exception as e:  # a compile or launch error is the finding: record it and stop
            rows.append({"op": op, "shape": shape, "error": f"{type(e).__name__}: {e}"[:2000],
                         "within_tolerance": False})
        if not rows[-1]["within_tolerance"]:
            bad = rows[-1]
            return {"device": str(device), "ok": False, "failed": f"{bad['op']} {bad['shape']} {bad.get('dtype', '')}",
                    "results": rows}
    return {"device": str(device), "ok": True, "failed": None, "results": rows}


def _preflight_main(out: Path) -> int:
    import torch

    if not torch.cuda.is_available():  # dry run: the same kernels through the Triton interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    res = preflight(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    out.write_text(json.dumps(res, indent=1))
    print("preflight:", "every kernel within tolerance" if res["ok"] else f"FAILED at {res['failed']}")
    return 0 if res["ok"] else 1


# ---------------------------------------------------------------------------------------------------- the run
def run_step(step: Step, check: Check, cuda: bool, why_no_cuda: str = "no CUDA") -> dict:
    """Run one step if CUDA and the deadline allow; its record (status ok | failed | timeout | skipped).

    ``{timeout}`` in a step's arguments becomes the step's own time limit minus 15 s (a script that can stop
    itself and still write its results, like gpu_tests, gets that chance before it is killed); ``{tmp}`` is the
    run's scratch directory.
    """
    if step.needs_cuda and not cuda:
        return {"status": "skipped", "reason": why_no_cuda}
    left = check.left() - RESERVE
    if left < step.min_s:
        return {"status": "skipped", "reason": f"deadline: {left:.0f} s left, needs {step.min_s:.0f} s"}
    limit = min(left, step.cap_s)
    cmd = [sys.executable, *(a.format(timeout=max(1, int(limit - 15)), tmp=check.tmp) for a in step.cmd)]
    check.log(f"== {step.name}: {' '.join(cmd[1:])} (limit {limit:.0f} s)")
    t0 = time.monotonic()
    rc = run_process(cmd, limit, check.log, cwd=ROOT)
    rec = {"status": "ok" if rc == 0 else "timeout" if rc == "timeout" else "failed", "rc": rc,
           "seconds": round(time.monotonic() - t0, 1)}
    check.log(f"== {step.name}: {rec['status']} after {rec['seconds']} s")
    return rec


def run(deadline: float, dry_run: bool = False, out: Path | None = None, steps=STEPS) -> dict:
    """The whole check; returns (and writes) its summary."""
    import torch

    check = Check(time.monotonic() + deadline, out, Path(tempfile.mkdtemp(prefix="gpu_check-")))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not dry_run
    dev = device_name("cuda" if cuda else "cpu")
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {"benchmark": "gpu_check", "device": dev, "date": time.strftime("%Y-%m-%d %H:%M"),
               "dry_run": dry_run or not cuda, **versions(), "threads": torch.get_num_threads(), "deadline_s": deadline,
               "steps": {}}
    path = RESULTS / f"gpu_check-{slug(dev)}.json"

    def write():
        summary["seconds"] = round(time.time() - check.started, 1)
        summary["loadavg_1min_at_end"] = os.getloadavg()[0]
        path.write_text(json.dumps(summary, indent=1) + "\n")
        check.copy_out()

    t0 = time.monotonic()
    summary["env"] = environment(cuda)
    summary["steps"]["env"] = {"status": "ok", "seconds": round(time.monotonic() - t0, 1)}
    check.log("env: " + json.dumps(summary["env"]))
    write()
    why = "dry run" if dry_run else "no CUDA"
    for step in steps:
        rec = run_step(step, check, cuda, why)
        if step.name == "preflight":
            pre = check.tmp / "preflight.json"
            if pre.exists():
                summary["preflight"] = json.loads(pre.read_text())
        elif rec["status"] != "skipped":
            rec["result_files"] = [p.name for p in check.fresh_results() if p.name.startswith(step.name)]
        if rec["status"] == "skipped":
            check.log(f"== {step.name}: skipped ({rec['reason']})")
        summary["steps"][step.name] = rec
        write()
    summary["ok"] = all(r["status"] in ("ok", "skipped") for r in summary["steps"].values())
    write()
    check.log(f"gpu check done in {summary['seconds']} s: "
              + ", ".join(f"{k} {v['status']}" for k, v in summary["steps"].items()) + f"; wrote {path}")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE, help="seconds for the whole check")
    ap.add_argument("--dry-run", action="store_true", help="run as if the machine had no CUDA")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="also copy results and the log here (default $OUT)")
    ap.add_argument("--preflight", action="store_true", help=argparse.SUPPRESS)  # the preflight step's subprocess
    ap.add_argument("--preflight-out", default="preflight.json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.preflight:
        return _preflight_main(Path(args.preflight_out))
    summary = run(args.deadline, args.dry_run, Path(args.out) if args.out else None)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
