"""Run every ``gpu``-marked test on this machine's GPU and record the outcome in bench/results.

Run: ``python bench/gpu_tests.py [--quick]`` (``--quick`` stops at the first failure).

Writes ``bench/results/gpu_tests-<device>.json``: pytest's exit code, passed / failed / skipped counts, the ids
of failing tests with their messages, and the slowest tests. Without CUDA there is nothing to run (the tests
skip there by design): the script says so and writes no file.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import default_device, write_json  # noqa: E402


def summarize(junit_xml: str) -> dict:
    """Counts, failures and the ten slowest tests from a pytest JUnit XML report."""
    cases = list(ET.parse(junit_xml).getroot().iter("testcase"))
    failed, skipped = [], 0
    for c in cases:
        bad = c.find("failure") if c.find("failure") is not None else c.find("error")
        if bad is not None:
            failed.append({"test": f"{c.get('classname')}::{c.get('name')}",
                           "message": (bad.get("message") or "")[:500]})
        elif c.find("skipped") is not None:
            skipped += 1
    slowest = sorted(cases, key=lambda c: float(c.get("time") or 0), reverse=True)[:10]
    return {"collected": len(cases), "passed": len(cases) - len(failed) - skipped, "failed": len(failed),
            "skipped": skipped, "failures": failed,
            "slowest": [{"test": f"{c.get('classname')}::{c.get('name')}", "seconds": float(c.get("time") or 0)}
                        for c in slowest]}


def run(quick: bool, pytest_args: list[str] | None = None) -> dict:
    with tempfile.TemporaryDirectory() as d:
        xml = f"{d}/gpu.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", f"--junitxml={xml}", "-p", "no:cacheprovider",
               *(["-x"] if quick else []), *(pytest_args or [])]
        print("$", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=HERE.parent)
        out = summarize(xml) if Path(xml).exists() else {"collected": 0}
    return {"pytest_exit_code": rc, "command": " ".join(cmd[1:]), **out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="stop at the first failure")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA: the gpu-marked tests skip on this machine; nothing recorded")
        return 0
    device = default_device()
    res = run(args.quick)
    print(f"gpu tests: {res.get('passed', 0)} passed, {res.get('failed', 0)} failed, {res.get('skipped', 0)} skipped")
    print("wrote", write_json("gpu_tests", device, res, quick=args.quick))
    return res["pytest_exit_code"]


if __name__ == "__main__":
    sys.exit(main())
