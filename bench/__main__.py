"""``python -m bench [--quick] [--only a,b]``: run every benchmark that fits this machine, then write
``bench/results/<device>-<date>.json`` (all results of this run) and a markdown table next to it.

GPU rows run only where CUDA is present (each script decides). The README's "Performance" section is then
regenerated from the latest results by ``python bench/report.py``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, device_name, slug  # noqa: E402

SCRIPTS = ("kernels", "slicing", "kl_engine", "dimap", "dap", "pruned_speed")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--only", default=",".join(SCRIPTS), help="comma list of benchmarks")
    args = ap.parse_args()
    import torch

    dev = device_name("cuda" if torch.cuda.is_available() else "cpu")
    start = time.time()
    status = {}
    for name in args.only.split(","):
        script = HERE / f"{name}.py"
        if not script.exists():
            status[name] = "missing"
            continue
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd)
        status[name] = {"rc": rc, "seconds": round(time.time() - t0, 1)}
    fresh = {p.name: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))
             if p.stat().st_mtime >= start and not p.name.startswith(slug(dev))}
    stamp = time.strftime("%Y-%m-%d")
    out = RESULTS / f"{slug(dev)}-{stamp}.json"
    out.write_text(json.dumps({"device": dev, "date": stamp, "quick": args.quick, "status": status,
                               "results": fresh}, indent=1))
    lines = [f"# Benchmarks on {dev} ({stamp}{', quick' if args.quick else ''})", "",
             "| benchmark | exit | seconds | result file |", "|---|---|---|---|"]
    for name, st in status.items():
        files = ", ".join(k for k in fresh if k.startswith(name)) or "-"
        rc, secs = (st["rc"], st["seconds"]) if isinstance(st, dict) else (st, "-")
        lines.append(f"| {name} | {rc} | {secs} | {files} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0 if all(isinstance(s, dict) and s["rc"] == 0 for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
