"""Benchmark: in-place pruning (``vpf.prune_``) vs copy-based slicing, wall time and peak extra memory.

Run: ``python bench/slicing.py [--quick] [--devices cpu,cuda] [--repeats N]`` (default device: CUDA where present).

Both methods apply the same plan (keep 0.5 of the residual width, of every attention's dims and of every MLP's
hidden units, from random scores) to a randomly initialised timm model (``vit_large_patch16_224``,
``vit_huge_patch14_224``; ``--quick``: ``vit_tiny_patch16_224``, ``vit_small_patch16_224``):

* ``inplace``        ``vpf.prune_(model, plan, optimizer=opt)``: same Parameter objects, the C++ extension
                     compacts every tensor in place (one batched call) and shrinks its storage.
* ``inplace-torch``  the same with ``VITPRUNE_FAST_NO_EXT=1`` (plain-torch in-place fallback), for reference.
* ``copy``           the Torch-Pruning way: every touched tensor becomes a new ``nn.Parameter`` built with
                     ``index_select`` (one per pruned dim) and is assigned to its module, while the optimizer
                     still holds the old Parameters, so they stay alive (module attributes are then synced;
                     the q-scale fold that prune_ also does is left out: it touches 1/12 of the q rows only).

The optimizer is a plain SGD (no state): it only holds references, so the comparison is about slicing.
Every measurement runs in a fresh subprocess (model creation, then one pruning call):

* CPU memory: peak RSS of the process (``VmHWM``) minus RSS just before the call; the peak is reset first
  through ``/proc/self/clear_refs`` and free malloc memory is returned with ``malloc_trim`` so that reused
  heap pages cannot hide allocations. ``retained`` is RSS after minus RSS before (negative: memory released).
* CUDA memory: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the call.

Memory is reported as % of the model's parameter bytes (target: in-place <= 10 %). Times are medians over
``--repeats`` fresh processes. Results: a table on stdout and ``bench/results/slicing-<device>.json``
(``slicing-<device>-quick.json`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

MODELS = ["vit_large_patch16_224", "vit_huge_patch14_224"]
QUICK_MODELS = ["vit_tiny_patch16_224", "vit_small_patch16_224"]
METHODS = ["inplace", "inplace-torch", "copy"]
KEEP = {"residual": 0.5, "attn": 0.5, "mlp": 0.5}


# ------------------------------------------------------------------------------------------ worker process


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0]) * 1024
    return out


def _reset_cpu_peak() -> int:
    """Give free heap memory back to the OS, reset the peak RSS; returns the RSS now."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return _proc_status()["VmRSS"]


def _copy_slice(model, plan, space) -> None:
    """Copy-based pruning: new Parameters from index_select for every touched tensor (old ones stay alive)."""
    import torch
    from torch import nn

    from vitprune_fast.arch import adapter_for

    ops = defaultdict(list)  # tensor name -> [(dim, index)] in the same order prune_ applies them
    for name, g in space.groups.items():
        if name in plan.keep and len(plan.keep[name]) < g.size:
            for sl in g.slices:
                ops[sl.name].append((sl.dim, sl.indices(plan.keep[name])))
    with torch.no_grad():
        for name, steps in ops.items():
            path, _, leaf = name.rpartition(".")
            mod = model.get_submodule(path) if path else model
            orig = getattr(mod, leaf)
            new = orig.detach()
            for dim, idx in steps:  # Torch-Pruning slices one dim at a time, each into a new tensor
                new = new.index_select(dim, idx.to(new.device))
            if isinstance(orig, nn.Parameter):
                new = nn.Parameter(new, requires_grad=orig.requires_grad)
            setattr(mod, leaf, new)
    for ch_name, heads in plan.heads.items():
        model.get_submodule(space.groups[ch_name].module).num_heads = heads
    adapter_for(model).sync_attributes()


def worker(model_name: str, method: str, device: str, seed: int) -> dict:
    """One measurement in this (fresh) process."""
    if method == "inplace-torch":
        os.environ["VITPRUNE_FAST_NO_EXT"] = "1"
    import timm
    import torch

    import vitprune_fast as vpf
    from vitprune_fast import compact
    from vitprune_fast._ext import get_ext

    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False).to(device)
    params = list(model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    opt = torch.optim.SGD(params, lr=0.1)  # holds references to the Parameters, no state
    space = vpf.describe(model)
    gen = torch.Generator().manual_seed(seed)
    scores = {name: torch.rand(g.size, generator=gen) for name, g in space.groups.items()}
    plan = vpf.make_plan(space, scores, keep=KEEP)
    ext = get_ext()  # load (or JIT-build) the extension outside the timed region

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _reset_cpu_peak()
    t0 = time.perf_counter()
    if method == "copy":
        _copy_slice(model, plan, space)
    else:
        vpf.prune_(model, plan, optimizer=opt)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if cuda:
        peak, after = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    else:
        st = _proc_status()
        peak, after = st["VmHWM"], st["VmRSS"]

    new_params = list(model.parameters())
    return {
        "model": model_name,
        "method": method,
        "seconds": seconds,
        "param_bytes": param_bytes,
        "pruned_param_bytes": sum(p.numel() * p.element_size() for p in new_params),
        "peak_extra_bytes": peak - before,
        "retained_bytes": after - before,
        "same_parameter_objects": [id(p) for p in new_params] == [id(p) for p in params],
        "backend": compact.last_backend() if method != "copy" else "index_select",
        "ext_loaded": ext is not None,
    }


# ------------------------------------------------------------------------------------------ driver


def run_one(model_name: str, method: str, device: str, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", model_name, method, device, str(seed)]
    env = {k: v for k, v in os.environ.items() if k != "VITPRUNE_FAST_NO_EXT"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"worker {model_name}/{method}/{device} failed:\n{res.stdout}\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_device(device: str, models: list[str], repeats: int, methods: list[str]) -> dict:
    import torch

    rows = []
    load_before = os.getloadavg()  # timings are only comparable on an otherwise idle machine
    for model_name in models:
        for method in methods:
            runs = [run_one(model_name, method, device, seed) for seed in range(repeats)]
            r = dict(runs[0])
            r.pop("seconds")
            r["seconds_all"] = [x["seconds"] for x in runs]
            r["seconds"] = statistics.median(r["seconds_all"])
            r["peak_extra_bytes"] = max(x["peak_extra_bytes"] for x in runs)  # worst case over repeats
            r["retained_bytes"] = statistics.median(x["retained_bytes"] for x in runs)
            r["peak_extra_pct"] = 100.0 * r["peak_extra_bytes"] / r["param_bytes"]
            r["retained_pct"] = 100.0 * r["retained_bytes"] / r["param_bytes"]
            rows.append(r)
            print(f"  {model_name:24s} {method:14s} {r['seconds']:8.3f} s  peak extra {r['peak_extra_pct']:6.1f} %",
                  flush=True)
    by = {(r["model"], r["method"]): r for r in rows}
    ratios = {
        m: {
            "copy_over_inplace_time": by[m, "copy"]["seconds"] / by[m, "inplace"]["seconds"],
            "copy_over_inplace_peak": by[m, "copy"]["peak_extra_bytes"] / max(1, by[m, "inplace"]["peak_extra_bytes"]),
        }
        for m in models
        if (m, "copy") in by and (m, "inplace") in by
    }
    return {
        "device_kind": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "keep": KEEP,
        "repeats": repeats,
        "loadavg_1min": [load_before[0], os.getloadavg()[0]],  # before / after the runs
        "results": rows,
        "ratios": ratios,
    }


def print_table(report: dict) -> None:
    print(f"\n{report['device_kind']} ({report['device']}), torch {report['torch']}, {report['threads']} threads, "
          f"keep {report['keep']}, median of {report['repeats']}, load avg {report['loadavg_1min']}")
    head = f"| {'model':24s} | {'params MB':>9s} | {'method':14s} | {'time s':>8s} | {'peak extra MB':>13s} | " \
           f"{'% of params':>11s} | {'retained MB':>11s} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in report["results"]:
        print(f"| {r['model']:24s} | {r['param_bytes'] / 2**20:9.0f} | {r['method']:14s} | {r['seconds']:8.3f} | "
              f"{r['peak_extra_bytes'] / 2**20:13.1f} | {r['peak_extra_pct']:11.1f} | "
              f"{r['retained_bytes'] / 2**20:11.1f} |")
    for m, q in report["ratios"].items():
        print(f"{m}: copy/in-place time x{q['copy_over_inplace_time']:.2f}, "
              f"peak extra memory x{q['copy_over_inplace_peak']:.1f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small models, one repeat")
    ap.add_argument("--devices", default=None, help="comma list (default: cuda where available, else cpu)")
    ap.add_argument("--repeats", type=int, default=None, help="fresh processes per measurement (default 3; quick 1)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--worker", nargs=4, metavar=("MODEL", "METHOD", "DEVICE", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        model_name, method, device, seed = args.worker
        print(json.dumps(worker(model_name, method, device, int(seed))))
        return

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import device_name, write_json

    devices = args.devices.split(",") if args.devices else ["cuda" if torch.cuda.is_available() else "cpu"]
    models = QUICK_MODELS if args.quick else MODELS
    repeats = args.repeats or (1 if args.quick else 3)
    methods = args.methods.split(",")
    for device in devices:
        print(f"[{device}] {', '.join(models)}: {', '.join(methods)}", flush=True)
        report = bench_device(device, models, repeats, methods)
        report["device"] = device_name(device)
        print_table(report)
        print("wrote", write_json("slicing", device, report, quick=args.quick))


if __name__ == "__main__":
    main()
