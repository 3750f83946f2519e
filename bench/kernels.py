"""Benchmark: the Triton kernels of the UP-ViTs KL engine vs their plain-torch references.

Run: ``python bench/kernels.py [--quick] [--warmup MS] [--rep MS]``.

Ops (engine-sized shapes, bf16 and fp32):

* ``kl_div``            ``kl_per_candidate`` vs ``kl_div_ref`` (log_softmax twice, product, sums) at the input dtype.
* ``masked_layernorm``  ``masked_layer_norm`` vs ``masked_layer_norm_ref`` (C1 candidates, one mask per candidate).
* ``expand_ln``         ``expand_ln`` vs ``expand_ln_ref`` (broadcast rank-1 delta, then ``F.layer_norm``).

On CUDA: medians (and p20/p80) from ``triton.testing.do_bench``, effective GB/s from the minimum bytes each op
must move (inputs read once, outputs written once), and that as a fraction of a measured device-to-device copy
bandwidth (``copy_`` of a 1 GiB buffer: read + write). Each timed kernel result is also checked against a
float64 reference first.

On CPU (no CUDA): GPU timing needs CUDA, so this only times the torch references (``time.perf_counter``
medians) and runs a tiny correctness smoke of each kernel in the Triton interpreter (``TRITON_INTERPRET=1``).

Results: a table on stdout and ``bench/results/kernels-<device>.json`` (device name included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must be set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
from vitprune_fast.kernels.expand_ln import expand_ln, expand_ln_ref  # noqa: E402
from vitprune_fast.kernels.kl_div import kl_div_ref, kl_per_candidate  # noqa: E402
from vitprune_fast.kernels.masked_layernorm import masked_layer_norm, masked_layer_norm_ref  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------- cases
# Each case builds its inputs on `device` and returns (kernel_fn, torch_fn, bytes_moved, check_fn).


def _case_kl(k, n, c, dtype, device):
    t = (torch.randn(n, c, device=device) * 3).to(dtype)
    s = (t.float().repeat(k, 1) + 0.5 * torch.randn(k * n, c, device=device)).to(dtype)
    nbytes = (k * n * c + n * c) * _elt(dtype) + k * 4

    def check():
        ref = kl_div_ref(t, s, k, compute_dtype=torch.float64)
        return (kl_per_candidate(t, s, k).double() - ref).abs().max().item()

    return (lambda: kl_per_candidate(t, s, k)), (lambda: kl_div_ref(t, s, k)), nbytes, check


def _case_masked_ln(k, n, tokens, d, dtype, device):
    rows = k * n * tokens
    x = (torch.randn(rows, d, device=device) * 2).to(dtype)
    mask = torch.rand(k, d, device=device) < 0.9
    w = (1 + 0.1 * torch.randn(d, device=device)).to(dtype)
    b = (0.1 * torch.randn(d, device=device)).to(dtype)
    nbytes = 2 * rows * d * _elt(dtype) + k * d + 2 * d * _elt(dtype)

    def check():
        ref = masked_layer_norm_ref(x, mask, w, b, compute_dtype=torch.float64)
        return (masked_layer_norm(x, mask, w, b).double() - ref).abs().max().item()

    return (lambda: masked_layer_norm(x, mask, w, b)), (lambda: masked_layer_norm_ref(x, mask, w, b)), nbytes, check


def _case_expand_ln(k, n, tokens, d, dtype, device):
    y = (torch.randn(n, tokens, d, device=device) * 2).to(dtype)
    a = torch.nn.functional.gelu(torch.randn(k, n, tokens, device=device)).to(dtype)
    w = (0.3 * torch.randn(k, d, device=device)).to(dtype)
    lw = (1 + 0.1 * torch.randn(d, device=device)).to(dtype)
    lb = (0.1 * torch.randn(d, device=device)).to(dtype)
    nbytes = (n * tokens * d + k * n * tokens + k * d + 2 * d + 2 * k * n * tokens * d) * _elt(dtype)

    def check():
        x64, z64 = expand_ln_ref(y, a, w, lw, lb, compute_dtype=torch.float64)
        x, z = expand_ln(y, a, w, lw, lb)
        return max((x.double() - x64).abs().max().item(), (z.double() - z64).abs().max().item())

    return (lambda: expand_ln(y, a, w, lw, lb)), (lambda: expand_ln_ref(y, a, w, lw, lb)), nbytes, check


def _cases(quick: bool):
    """(op, shape description, builder) at engine sizes (DeiT-S / DeiT-B, ImageNet classes)."""
    kl = [(32, 64, 1000), (64, 32, 1000)] if not quick else [(8, 32, 1000)]
    ln = [(8, 16, 197, 384), (8, 16, 197, 768)] if not quick else [(4, 8, 197, 384)]
    out = []
    for k, n, c in kl:
        out.append(("kl_div", f"K={k} n={n} C={c}", lambda dt, dev, a=(k, n, c): _case_kl(*a, dt, dev)))
    for k, n, t, d in ln:
        desc = f"K={k} n={n} T={t} D={d}"
        out.append(("masked_layernorm", desc, lambda dt, dev, a=(k, n, t, d): _case_masked_ln(*a, dt, dev)))
        out.append(("expand_ln", desc, lambda dt, dev, a=(k, n, t, d): _case_expand_ln(*a, dt, dev)))
    return out


# ------------------------------------------------------------------------------------------------ GPU


def _copy_bandwidth_gbs(warmup: int, rep: int) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the read and the write of a 1 GiB buffer."""
    nbytes = 1 << 30
    bufs = [torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(2)]
    ms = triton.testing.do_bench(lambda: bufs[1].copy_(bufs[0]), warmup=warmup, rep=rep, quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    bufs.clear()
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _bench_gpu(args) -> dict:
    copy_gbs = _copy_bandwidth_gbs(args.warmup, args.rep)
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s")
    rows = []
    for op, desc, build in _cases(args.quick):
        for dtype in (torch.bfloat16, torch.float32):
            kern, ref, nbytes, check = build(dtype, "cuda")
            err = check()
            res = {"op": op, "shape": desc, "dtype": str(dtype).removeprefix("torch."), "bytes": nbytes}
            res["max_abs_err_vs_fp64"] = err
            for name, fn in (("triton", kern), ("torch", ref)):
                p50, p20, p80 = triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, quantiles=[0.5, 0.2, 0.8])
                gbs = nbytes / (p50 * 1e-3) / 1e9
                res[name] = {"ms_p50": p50, "ms_p20": p20, "ms_p80": p80, "gbps": gbs, "frac_copy_bw": gbs / copy_gbs}
            res["speedup"] = res["torch"]["ms_p50"] / res["triton"]["ms_p50"]
            rows.append(res)
            print(
                f"{op:17s} {desc:28s} {res['dtype']:9s} triton {res['triton']['ms_p50']:8.4f} ms "
                f"({res['triton']['gbps']:6.0f} GB/s, {100 * res['triton']['frac_copy_bw']:3.0f}% copy)  "
                f"torch {res['torch']['ms_p50']:8.4f} ms ({res['torch']['gbps']:6.0f} GB/s)  "
                f"x{res['speedup']:.2f}  err {err:.1e}"
            )
            del kern, ref, check
            torch.cuda.empty_cache()
    return {"copy_bandwidth_gbps": copy_gbs, "results": rows}


# ------------------------------------------------------------------------------------------------ CPU


def _time_cpu(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _bench_cpu(args) -> dict:
    print("GPU timing needs CUDA: timing the torch references on CPU only, plus an interpreter smoke test.")
    rows = []
    for op, desc, build in _cases(quick=True):
        for dtype in (torch.bfloat16, torch.float32):
            _, ref, nbytes, _ = build(dtype, "cpu")
            ms = _time_cpu(ref)
            rows.append(
                {
                    "op": op,
                    "shape": desc,
                    "dtype": str(dtype).removeprefix("torch."),
                    "bytes": nbytes,
                    "torch": {"ms_p50": ms, "gbps": nbytes / (ms * 1e-3) / 1e9},
                }
            )
            print(f"{op:17s} {desc:28s} {rows[-1]['dtype']:9s} torch {ms:9.3f} ms")
    smoke = []
    tiny = [
        ("kl_div", lambda dt: _case_kl(3, 2, 1001, dt, "cpu")),
        ("masked_layernorm", lambda dt: _case_masked_ln(2, 2, 7, 100, dt, "cpu")),
        ("expand_ln", lambda dt: _case_expand_ln(2, 2, 7, 100, dt, "cpu")),
    ]
    for op, build in tiny:
        for dtype in (torch.float32, torch.float64):
            err = build(dtype)[3]()
            ok = err < (1e-4 if dtype == torch.float32 else 1e-10)
            smoke.append({"op": op, "dtype": str(dtype).removeprefix("torch."), "max_abs_err_vs_fp64": err, "ok": ok})
            print(f"interpreter smoke {op:17s} {smoke[-1]['dtype']:8s} err {err:.2e} {'ok' if ok else 'FAIL'}")
    return {"results": rows, "interpreter_smoke": smoke, "all_ok": all(s["ok"] for s in smoke)}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape per op")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    args = parser.parse_args()
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if cuda else _cpu_name()
    meta = {
        "device": device_name,
        "backend": "cuda" if cuda else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "quick": args.quick,
    }
    meta.update(_bench_gpu(args) if cuda else _bench_cpu(args))
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") if cuda else "cpu"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"kernels-{slug}.json"
    path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {path}")
    return 0 if meta.get("all_ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
