"""Benchmark: a DAP training step vs a plain fine-tuning step; batched vs one-at-a-time probes.

Run: ``python bench/dap.py [--quick] [--batch N] [--repeats N] [--probe-every K] [--threads N]``.

Models (random init): ``deit_tiny_patch16_224`` and a small Swin (``swin_tiny_patch4_window7_224`` with
embed_dim 48, depths 2-2-6-2, heads 2-4-8-16), at 224 px; ``--quick``: the same at 64 px (Swin with window 4),
3 rounds, batch 4 on CPU. Each configuration builds a fresh model, AdamW optimizer and (for DAP) pruner, runs two
untimed steps, then times full training steps (forward, loss, backward, optimizer step, ``dap.step()``).
Configurations are timed round-robin (one step of each per round, ``--repeats`` rounds) so that the load of
a shared machine hits all of them alike; we report median seconds and the median of the per-round ratios to
``plain``. DAP is timed in its sparsify phase (probes, ΔΨ, gates and Taylor scores all on):

* ``plain``          cross-entropy fine-tuning step, no DAP.
* ``dap-looped``     DAP with ``batched=False``: one probe module at a time (the reference layout; the default
                     on CPU).
* ``dap-batched``    DAP with ``batched=True``: every stage's probes as one grouped conv + batched matmuls (the
                     default on CUDA).
* ``dap-every-K``    the device's default probes with ``probe_every=K`` (a documented deviation, off by
                     default); amortised per step over K consecutive steps (against K plain steps). K defaults
                     to the smallest value whose predicted cost ``1 + (r - 1) / K`` is within 1.45x (the target
                     less a margin), r being the measured ratio of the device's default DAP step.

Also reported: the probes alone (forward + backward on captured features, batched vs looped) and one mask
update (κ allocation, rounding, per-block soft masks). On CUDA all configurations run under bf16 autocast.
Results: a table on stdout and ``bench/results/dap-<device>.json`` (``dap-quick-<device>.json`` with --quick).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, median_ratio, round_robin, timed, write_json  # noqa: E402

from vitprune_fast.dap import DAP, Schedule  # noqa: E402

SWIN_SMALL = dict(embed_dim=48, depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16))
MODELS = {
    "deit_tiny": ("deit_tiny_patch16_224", dict(img_size=224)),
    "swin_small48": ("swin_tiny_patch4_window7_224", dict(SWIN_SMALL, img_size=224)),
}
QUICK = {
    "deit_tiny": ("deit_tiny_patch16_224", dict(img_size=64)),
    "swin_small48": ("swin_tiny_patch4_window7_224", dict(SWIN_SMALL, img_size=64, window_size=4)),
}
NUM_CLASSES = 100
TARGET = 1.5


def _setup(spec, device, batch, dap_kw=None, seed=0):
    name, kw = spec
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kw).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size = kw["img_size"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    dap = None
    if dap_kw is not None:  # sparsify phase from step 0; no mask update inside the timed steps
        dap = DAP(model, 0.5, Schedule(0, 10**6, 2 * 10**6, update_every=10**6), **dap_kw)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x).float(), y)
            if dap is not None:
                loss = loss + dap.loss(y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dap is not None:
            dap.step()

    return model, dap, step, (x, y)


def _stepper(spec, device, batch, dap_kw=None, chunk=1):
    """A function running ``chunk`` training steps, after two untimed warm-up steps."""
    model, dap, step, _ = _setup(spec, device, batch, dap_kw)
    for _ in range(2):
        step()

    def run():
        for _ in range(chunk):
            step()

    return run, model, dap


def _probe_only(spec, device, batch, batched):
    """Probes alone: forward + backward of the probe losses on the features of one (no-grad) forward pass."""
    model, dap, _, (x, y) = _setup(spec, device, batch, dict(batched=batched))
    with torch.no_grad():
        model(x)
    feats = [list(f) for f in dap._feats]

    def run():
        dap._feats = [list(f) for f in feats]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = dap.loss(y)
        loss.backward()
        dap.optimizer.zero_grad(set_to_none=True)
        dap._probe_pending = False

    run()
    return run


def _update_time(dap, repeats):
    """One mask update (κ allocation + rounding + per-block masks) on the accumulated scores."""
    saved = (dap._dcls.clone(), dap._dpatch.clone(), dap._taylor.clone(), dap._bpi_n, dap._taylor_n)

    def run():
        dap._dcls, dap._dpatch, dap._taylor = saved[0].clone(), saved[1].clone(), saved[2].clone()
        dap._bpi_n, dap._taylor_n = max(saved[3], 1), max(saved[4], 1)
        dap._update(dap.t)

    return timed(run, repeats, dap.gate.device)[0]


def _bench_model(key, spec, device, batch, repeats, probe_every):
    """All configurations of one model; returns JSON rows."""
    plain, model, _ = _stepper(spec, device, batch)
    params = sum(p.numel() for p in model.parameters())
    looped, _, _ = _stepper(spec, device, batch, dict(batched=False))
    batched, _, dap = _stepper(spec, device, batch, dict(batched=True))
    wall, cpu = round_robin({"plain": plain, "dap-looped": looped, "dap-batched": batched,
                              "probes-looped": _probe_only(spec, device, batch, False),
                              "probes-batched": _probe_only(spec, device, batch, True)}, repeats, device)
    default = "dap-batched" if device.type == "cuda" else "dap-looped"  # DAP(batched=None) on this device
    ratio = median_ratio(wall[default], wall["plain"])
    k = probe_every or max(1, math.ceil((ratio - 1) / (0.9 * (TARGET - 1))))  # 10 % margin for the overheads
    plain_k, _, _ = _stepper(spec, device, batch, chunk=k)
    every_k, _, _ = _stepper(spec, device, batch, dict(probe_every=k), chunk=k)
    wk, ck = round_robin({"plain": plain_k, "every": every_k}, max(1, repeats - 1), device)
    wk, ck = ({n: [v / k for v in x] for n, x in d.items()} for d in (wk, ck))  # per step
    per = {  # config: (timing key, probes-only key, wall, cpu); the baseline is "plain" of the same timings
        "plain": ("plain", None, wall, cpu),
        "dap-looped": ("dap-looped", "probes-looped", wall, cpu),
        "dap-batched": ("dap-batched", "probes-batched", wall, cpu),
        f"dap-every-{k}": ("every", None, wk, ck),
    }
    rows = []
    for cfg, (name, probes, w, c) in per.items():
        r = dict(model=key, timm_name=spec[0], config=cfg, params=params, batch=batch,
                 kwargs={n: list(v) if isinstance(v, tuple) else v for n, v in spec[1].items()},
                 step_s=w[name], cpu_s=c[name], plain_step_s=w["plain"], plain_cpu_s=c["plain"],
                 median_step_s=statistics.median(w[name]), x_plain=median_ratio(w[name], w["plain"]),
                 x_plain_cpu=median_ratio(c[name], c["plain"]))
        if probes:
            r.update(probes_s=wall[probes], median_probes_s=statistics.median(wall[probes]))
        r["device_default"] = cfg in (default, f"dap-every-{k}")
        if cfg == "dap-batched":
            r["median_update_s"] = statistics.median(_update_time(dap, 1) for _ in range(repeats))
            r["probes_x_faster_than_looped"] = median_ratio(wall["probes-looped"], wall["probes-batched"])
        if cfg.startswith("dap-every"):
            r["probe_every"] = k
        rows.append(r)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small images (64 px), 3 rounds")
    ap.add_argument("--batch", type=int, default=None,
                    help="images per step (default 128 on CUDA; on CPU 8, --quick 4)")
    ap.add_argument("--repeats", type=int, default=None, help="round-robin rounds (default 5, --quick 3)")
    ap.add_argument("--probe-every", type=int, default=None, help="K of the dap-every-K row (default: auto)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: stable numbers on a shared machine; 0: torch's default)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.batch = args.batch or (128 if device.type == "cuda" else 4 if args.quick else 8)
    args.repeats = args.repeats or (3 if args.quick else 5)
    specs = QUICK if args.quick else MODELS
    load0 = os.getloadavg()[0]
    print(f"device: {device_name(device)}   batch {args.batch}   rounds {args.repeats}   load {load0:.1f}")
    print(f"{'model':<14}{'config':<16}{'step ms':>10}{'x plain':>9}{'x (cpu s)':>11}{'probes ms':>11}"
          f"{'update ms':>11}")
    rows = []
    for key in args.models.split(","):
        out = _bench_model(key, specs[key], device, args.batch, args.repeats, args.probe_every)
        for r in out:
            probes = f"{r['median_probes_s'] * 1e3:>11.1f}" if "median_probes_s" in r else f"{'':>11}"
            update = f"{r['median_update_s'] * 1e3:>11.2f}" if "median_update_s" in r else f"{'':>11}"
            print(f"{key:<14}{r['config']:<16}{r['median_step_s'] * 1e3:>10.1f}{r['x_plain']:>9.2f}"
                  f"{r['x_plain_cpu']:>11.2f}{probes}{update}")
        b = next(r for r in out if r["config"] == "dap-batched")
        d = next(r for r in out if r["device_default"])
        e = out[-1]
        print(f"{key:<14}probes alone: batched x{b['probes_x_faster_than_looped']:.2f} the speed of looped; "
              f"target <= {TARGET}x plain: defaults ({d['config']}) {d['x_plain']:.2f}x, "
              f"probe_every={e['probe_every']} {e['x_plain']:.2f}x")
        sys.stdout.flush()
        rows += out
    path = write_json("dap", device, quick=args.quick, payload=dict(
        quick=args.quick, batch=args.batch, rounds=args.repeats, threads=torch.get_num_threads(),
        loadavg_1min=[load0, os.getloadavg()[0]], amp="bf16" if device.type == "cuda" else None,
        target_x_plain=TARGET, results=rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
