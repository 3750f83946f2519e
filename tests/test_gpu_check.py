"""The one-command GPU check (bench/gpu_check.sh + bench/gpu_check.py), dry-run on CPU.

A GPU lease is rare and short, so everything but the CUDA work is exercised here: the install fallback, the
environment report, the kernel preflight (in the Triton interpreter), the deadline (steps skipped when too little
time is left, a running step stopped when it runs out), the result files and the copy to ``$OUT``, and the report.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
import gpu_check  # noqa: E402
import report  # noqa: E402

CUDA_STEPS = [s.name for s in gpu_check.STEPS if s.needs_cuda]


def _check_sh(tmp_path, *args, **env):
    results, out = tmp_path / "results", tmp_path / "out"
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path,
                       env={**os.environ, "PYTHON": sys.executable, "VITPRUNE_FAST_BENCH_RESULTS": str(results),
                            "OUT": str(out), **env})
    files = list(results.glob("gpu_check-*.json"))
    assert len(files) == 1, r.stdout[-3000:] + r.stderr[-3000:]
    return r, json.loads(files[0].read_text()), out


def test_dry_run_with_the_install_fallback_end_to_end(tmp_path):
    r, summary, out = _check_sh(tmp_path, "--dry-run", "--deadline", "200", GPU_CHECK_FALLBACK="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    env = summary["env"]
    assert env["install"].startswith("fallback") and "vitprune_fast-copy" in env["package_path"]
    assert env["python_headers"] in (True, False) and env["torch"] and env["triton_importable"]
    steps = summary["steps"]
    assert list(steps) == ["env"] + [s.name for s in gpu_check.STEPS]
    assert steps["env"]["status"] == steps["preflight"]["status"] == "ok"
    assert all(steps[s] == {"status": "skipped", "reason": "dry run"} for s in CUDA_STEPS)
    pre = summary["preflight"]
    assert pre["ok"] and {r["op"] for r in pre["results"]} == {"kl_div", "masked_layernorm", "expand_ln",
                                                               "dimap_metric"}
    assert all(r["within_tolerance"] for r in pre["results"])
    assert summary["dry_run"] and summary["ok"]
    # everything also lands in $OUT: the result file and a log that ends with the summary line
    assert (out / "results" / f"gpu_check-{common.slug(summary['device'])}.json").exists()
    log = (out / "gpu_check.log").read_text()
    assert "== preflight: ok" in log and log.rstrip().splitlines()[-1].startswith("gpu check done")


def test_tiny_deadline_skips_what_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path)
    summary = gpu_check.run(deadline=gpu_check.RESERVE + 5, dry_run=True, out=tmp_path / "out")
    pre = summary["steps"]["preflight"]
    assert pre["status"] == "skipped" and pre["reason"].startswith("deadline")
    assert summary["ok"]  # skipping for lack of time is reported, not a failure
    assert json.loads((tmp_path / "out" / "results" / next(p.name for p in tmp_path.glob("gpu_check-*.json"))
                       ).read_text())["steps"]["preflight"]["status"] == "skipped"


def test_a_running_step_is_stopped_at_the_deadline_and_its_output_kept(tmp_path):
    check = gpu_check.Check(time.monotonic() + gpu_check.RESERVE + 3, None, tmp_path)
    step = gpu_check.Step("sleeper", ("-c", "import time; print('started', flush=True); time.sleep(60)"), 1, 60,
                          needs_cuda=False)
    t0 = time.monotonic()
    rec = gpu_check.run_step(step, check, cuda=False)
    assert rec["status"] == "timeout" and time.monotonic() - t0 < 30
    assert "started" in check.log_lines
    assert gpu_check.run_step(step, check, cuda=False)["status"] == "skipped"  # no time left for another


def test_cuda_steps_have_a_time_budget_that_fits_a_lease():
    """The minimum times of the steps in priority order fit the default deadline, so the top ones always run."""
    assert sum(s.min_s for s in gpu_check.STEPS[:4]) + gpu_check.RESERVE < gpu_check.DEFAULT_DEADLINE <= 540
    assert all(s.cap_s >= s.min_s for s in gpu_check.STEPS)
    for s in gpu_check.STEPS:  # every step runs a script that exists
        assert (ROOT / s.cmd[0]).exists(), s


@pytest.fixture
def gpu_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path)
    summary = gpu_check.run(deadline=60, dry_run=True, steps=())
    path = next(tmp_path.glob("gpu_check-*.json"))
    return path, summary


def test_report_renders_a_gpu_run_and_leaves_dry_runs_out(gpu_summary):
    path, summary = gpu_summary
    assert "### GPU check" not in report.render(path.parent)  # a dry run is not a GPU result
    summary.update(dry_run=False, env={**summary["env"], "gpu": "NVIDIA H200", "gpu_memory_gib": 139.8},
                   preflight={"ok": False, "failed": "expand_ln K=2 n=2 T=7 D=100 bfloat16"})
    summary["steps"]["kernels"] = {"status": "timeout", "seconds": 120.0}
    path.write_text(json.dumps(summary))
    text = report.render(path.parent)
    assert "### GPU check (bench/gpu_check.sh)" in text and "NVIDIA H200 (139.8 GiB" in text
    assert "| kernels | timeout | 120.0 |" in text and "failed at expand_ln" in text
