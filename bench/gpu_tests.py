"""Run every ``gpu``-marked test on this machine's GPU and record the outcome in bench/results.

Run: ``python bench/gpu_tests.py [--quick] [--timeout S]`` (``--quick`` stops at the first failure).

Writes ``bench/results/gpu_tests-<device>.json``: pytest's exit code, passed / failed / skipped counts, the ids
of failing tests with their messages, and the slowest tests. Outcomes are recorded test by test as they happen
(``VITPRUNE_FAST_TEST_LOG``, see tests/conftest.py), so a run stopped by ``--timeout`` still reports every test
that finished. Without CUDA there is nothing to run (the tests skip there by design): the script says so and
writes no file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import default_device, run_process, write_json  # noqa: E402


def summarize(report_log: str | Path) -> dict:
    """Counts, failures and the ten slowest tests from the JSON-lines test log (one record per test phase)."""
    by_test: dict[str, dict] = {}
    for line in Path(report_log).read_text().splitlines():
        r = json.loads(line)
        prev = by_test.get(r["test"])
        if prev is None or prev["outcome"] == "passed" or r["outcome"] == "failed":  # a failed phase decides
            by_test[r["test"]] = {**r, "seconds": r["seconds"] + (prev["seconds"] if prev else 0.0)}
        else:
            prev["seconds"] += r["seconds"]
    tests = list(by_test.values())
    failed = [{"test": t["test"], "message": t["message"]} for t in tests if t["outcome"] == "failed"]
    skipped = sum(t["outcome"] == "skipped" for t in tests)
    slowest = sorted(tests, key=lambda t: t["seconds"], reverse=True)[:10]
    return {"collected": len(tests), "passed": len(tests) - len(failed) - skipped, "failed": len(failed),
            "skipped": skipped, "failures": failed,
            "slowest": [{"test": t["test"], "seconds": round(t["seconds"], 3)} for t in slowest]}


def run(quick: bool, pytest_args: list[str] | None = None, timeout: float | None = None) -> dict:
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "tests.jsonl"
        # -P: the checkout's root must not shadow an installed copy (gpu_check.sh's fallback puts one on PYTHONPATH)
        cmd = [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), "-m", "pytest", "-q", "-m", "gpu",
               "-p", "no:cacheprovider",
               *(["-x"] if quick else []), *(pytest_args or [])]
        print("$", " ".join(cmd), flush=True)
        rc = run_process(cmd, timeout, env={**os.environ, "VITPRUNE_FAST_TEST_LOG": str(log)}, cwd=HERE.parent)
        out = summarize(log) if log.exists() else {"collected": 0}
    return {"pytest_exit_code": rc, "stopped_by_timeout": rc == "timeout", "command": " ".join(cmd[1:]), **out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="stop at the first failure")
    ap.add_argument("--timeout", type=float, default=None, help="stop pytest after this many seconds")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA: the gpu-marked tests skip on this machine; nothing recorded")
        return 0
    device = default_device()
    res = run(args.quick, timeout=args.timeout)
    print(f"gpu tests: {res.get('passed', 0)} passed, {res.get('failed', 0)} failed, {res.get('skipped', 0)} skipped"
          + (" (stopped by the timeout)" if res["stopped_by_timeout"] else ""))
    print("wrote", write_json("gpu_tests", device, res, quick=args.quick))
    return 0 if res["pytest_exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
