"""Benchmark: every Triton kernel vs its plain-torch reference, in GB/s against a measured copy bandwidth.

Run: ``python bench/kernels.py [--quick]``.

Ops (engine-sized shapes; bf16 and fp32):

* ``kl_div``            ``kl_per_candidate`` vs ``kl_div_ref`` (log_softmax twice, product, sums) at the input dtype.
* ``masked_layernorm``  ``masked_layer_norm`` vs ``masked_layer_norm_ref`` (C1 candidates, one mask per candidate).
* ``expand_ln``         ``expand_ln`` vs ``expand_ln_ref`` (broadcast rank-1 delta, then ``F.layer_norm``).
* ``dimap_metric``      ``dimap_metric(backend="triton")`` (torch sort + fused scan/divide/scatter) vs
                        ``dimap_metric_ref``; fp32 only (the scorer's dtype). Sort-bound: its GB/s is effective.

GB/s counts the minimum bytes an op must move (inputs read once, outputs written once). The ceiling is a
measured copy of a buffer far larger than the caches (read + write counted). Every kernel result is first
checked against a float64 reference with FlashAttention's rule: kernel error <= 2 x the same-dtype torch error
+ atol (``within_tolerance``).

On CUDA: ``triton.testing.do_bench`` medians at sizes of hundreds of MB (beyond L2). On CPU: Triton runs only in
its interpreter, which is a correctness tool, so the torch references are timed (medians of repeated runs) at
the quick shapes and every kernel is checked at tiny shapes in the interpreter.

Results: a table on stdout and ``bench/results/kernels-<device>.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must be set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth_gbs, default_device, device_name, seconds, write_json  # noqa: E402
from vitprune_fast.kernels.dimap_metric import dimap_metric, dimap_metric_ref  # noqa: E402
from vitprune_fast.kernels.expand_ln import expand_ln, expand_ln_ref  # noqa: E402
from vitprune_fast.kernels.kl_div import kl_div_ref, kl_per_candidate  # noqa: E402
from vitprune_fast.kernels.masked_layernorm import masked_layer_norm, masked_layer_norm_ref  # noqa: E402

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-2}


def _max_err(out, ref64) -> float:
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref64 if isinstance(ref64, tuple) else (ref64,)
    return max((o.double() - r).abs().max().item() for o, r in zip(outs, refs, strict=True))


# ----------------------------------------------------------------------------------------------- cases
# A case builds its inputs on `device` and returns (kernel_fn, torch_fn, fp64_fn, bytes_moved): the kernel, the
# plain-torch reference at the input dtype, and the same reference computed in float64.


def case_kl(k, n, c, dtype, device):
    t = (torch.randn(n, c, device=device) * 3).to(dtype)
    s = (t.float().repeat(k, 1) + 0.5 * torch.randn(k * n, c, device=device)).to(dtype)
    nbytes = (k * n * c + n * c) * dtype.itemsize + k * 4
    return (lambda: kl_per_candidate(t, s, k)), (lambda: kl_div_ref(t, s, k)), \
        (lambda: kl_div_ref(t, s, k, compute_dtype=torch.float64)), nbytes


def case_masked_ln(k, n, tokens, d, dtype, device):
    rows = k * n * tokens
    x = (torch.randn(rows, d, device=device) * 2 + 0.3).to(dtype)
    mask = torch.rand(k, d, device=device) < 0.9
    w = (1 + 0.1 * torch.randn(d, device=device)).to(dtype)
    b = (0.1 * torch.randn(d, device=device)).to(dtype)
    nbytes = 2 * rows * d * dtype.itemsize + k * d + 2 * d * dtype.itemsize
    return (lambda: masked_layer_norm(x, mask, w, b)), (lambda: masked_layer_norm_ref(x, mask, w, b)), \
        (lambda: masked_layer_norm_ref(x, mask, w, b, compute_dtype=torch.float64)), nbytes


def case_expand_ln(k, n, tokens, d, dtype, device):
    y = (torch.randn(n, tokens, d, device=device) * 2 + 0.3).to(dtype)
    a = torch.nn.functional.gelu(torch.randn(k, n, tokens, device=device)).to(dtype)
    w = (0.3 * torch.randn(k, d, device=device)).to(dtype)
    lw = (1 + 0.1 * torch.randn(d, device=device)).to(dtype)
    lb = (0.1 * torch.randn(d, device=device)).to(dtype)
    nbytes = (n * tokens * d + k * n * tokens + k * d + 2 * d + 2 * k * n * tokens * d) * dtype.itemsize
    return (lambda: expand_ln(y, a, w, lw, lb)), (lambda: expand_ln_ref(y, a, w, lw, lb)), \
        (lambda: expand_ln_ref(y, a, w, lw, lb, compute_dtype=torch.float64)), nbytes


def case_dimap(layers, numel, dtype, device):
    x = (torch.randn(layers, numel, device=device) * 0.02).to(dtype)
    nbytes = layers * numel * (dtype.itemsize + 4)
    return (lambda: dimap_metric(x, backend="triton")), (lambda: dimap_metric_ref(x)), \
        (lambda: dimap_metric_ref(x.double())), nbytes


def cases(size: str, dtypes: tuple | None = None) -> list[tuple[str, str, tuple, object]]:
    """``(op, shape, dtypes, builder(dtype, device))`` at ``size`` "gpu" (beyond L2), "quick" or "tiny".

    ``dtypes`` replaces the default dtypes of every op (dimap_metric keeps only the float ones it scores in).
    """
    kl = {"gpu": [(256, 64, 1000), (1024, 64, 1000), (32, 32, 21843)], "quick": [(8, 32, 1000)],
          "tiny": [(3, 2, 1001)]}[size]
    ln = {"gpu": [(16, 64, 197, 384), (8, 64, 197, 768)], "quick": [(4, 8, 197, 384)],
          "tiny": [(2, 2, 7, 100)]}[size]
    dm = {"gpu": [(24, 768 * 3072), (8, 1024 * 4096)], "quick": [(4, 384 * 1536)], "tiny": [(3, 999)]}[size]
    mixed = dtypes or ((torch.bfloat16, torch.float32) if size != "tiny" else (torch.float32, torch.float64))
    single = tuple(d for d in mixed if d in (torch.float32, torch.float64)) if dtypes else \
        ((torch.float32,) if size != "tiny" else (torch.float32, torch.float64))
    out = []
    for k, n, c in kl:
        out.append(("kl_div", f"K={k} n={n} C={c}", mixed, lambda dt, dev, a=(k, n, c): case_kl(*a, dt, dev)))
    for k, n, t, d in ln:
        desc = f"K={k} n={n} T={t} D={d}"
        out.append(("masked_layernorm", desc, mixed, lambda dt, dev, a=(k, n, t, d): case_masked_ln(*a, dt, dev)))
        out.append(("expand_ln", desc, mixed, lambda dt, dev, a=(k, n, t, d): case_expand_ln(*a, dt, dev)))
    for layers, numel in dm:
        out.append(("dimap_metric", f"L={layers} N={numel}", single,
                    lambda dt, dev, a=(layers, numel): case_dimap(*a, dt, dev)))
    return out


# -------------------------------------------------------------------------------------------- measuring


def measure(case_list, device, copy_gbs: float | None, time_kernels: bool = True, time_refs: bool = True,
            repeats: int = 5) -> list[dict]:
    """Check every kernel against fp64 (FlashAttention rule), then time kernel and torch reference."""
    rows = []
    for op, desc, dtypes, build in case_list:
        for dtype in dtypes:
            kern, ref, ref64, nbytes = build(dtype, device)
            exact = ref64()
            err_k, err_t = _max_err(kern(), exact), _max_err(ref(), exact)
            res = {"op": op, "shape": desc, "dtype": str(dtype).removeprefix("torch."), "bytes": nbytes,
                   "max_abs_err_vs_fp64": err_k, "torch_max_abs_err_vs_fp64": err_t,
                   "within_tolerance": err_k <= 2 * err_t + ATOL[dtype]}
            del exact
            for name, fn, on in (("triton", kern, time_kernels), ("torch", ref, time_refs)):
                if on:
                    t = seconds(fn, device, repeats=repeats)
                    gbs = nbytes / t / 1e9
                    res[name] = {"ms": 1e3 * t, "gbps": gbs}
                    if copy_gbs:
                        res[name]["frac_copy_bw"] = gbs / copy_gbs
            if "triton" in res and "torch" in res:
                res["speedup"] = res["torch"]["ms"] / res["triton"]["ms"]
            rows.append(res)
            _print_row(res)
            del kern, ref, ref64
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _print_row(r: dict) -> None:
    cols = [f"{r['op']:17s} {r['shape']:26s} {r['dtype']:9s}"]
    for name in ("triton", "torch"):
        if name in r:
            frac = f", {100 * r[name]['frac_copy_bw']:3.0f}% copy" if "frac_copy_bw" in r[name] else ""
            cols.append(f"{name} {r[name]['ms']:9.4f} ms ({r[name]['gbps']:6.1f} GB/s{frac})")
    if "speedup" in r:
        cols.append(f"x{r['speedup']:.2f}")
    cols.append(f"err {r['max_abs_err_vs_fp64']:.1e} (torch {r['torch_max_abs_err_vs_fp64']:.1e})"
                f"{'' if r['within_tolerance'] else ' OUT OF TOLERANCE'}")
    print("  ".join(cols), flush=True)


def run(quick: bool, device: torch.device | None = None) -> dict:
    """GPU: every kernel and reference timed. CPU: references timed, kernels checked in the interpreter."""
    device = device or default_device()
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"{device_name(device)}: copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    if device.type == "cuda":
        rows = measure(cases("quick" if quick else "gpu"), device, copy_gbs)
        smoke = []
    else:
        print("no CUDA: timing the torch references; kernels are checked in the Triton interpreter", flush=True)
        rows = measure(cases("quick"), device, copy_gbs, time_kernels=False)
        smoke = measure(cases("tiny"), device, None, time_kernels=False, time_refs=False)
    memory_bound = [r for r in rows if "triton" in r and r["op"] != "dimap_metric"]
    return {"copy_bandwidth_gbps": copy_gbs, "results": rows, "interpreter_smoke": smoke,
            "target_frac_copy_bw": 0.7,
            "min_frac_copy_bw_memory_bound": min((r["triton"]["frac_copy_bw"] for r in memory_bound), default=None),
            "all_within_tolerance": all(r["within_tolerance"] for r in rows + smoke)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape per op")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads (default 1: OpenMP spin-waits dominate on a shared box)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = default_device()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    res = run(args.quick, device)
    print("wrote", write_json("kernels", device, res, quick=args.quick))
    return 0 if res["all_within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
