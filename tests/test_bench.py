"""The benchmark scripts' measuring code, run on CPU at tiny sizes, and the README report built from it.

GPU sessions are short and rare, so the code paths a GPU run takes (every Triton kernel timed next to its
reference, the KL engine's FLOP/s and whole-model rows, DIMAP's Triton column, ...) are exercised here on CPU,
with the kernels in the Triton interpreter. Timings are never asserted; the results' content and consistency are.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import dap as bench_dap  # noqa: E402
import dimap as bench_dimap  # noqa: E402
import fidelity  # noqa: E402
import finetune_scale  # noqa: E402
import gpu_tests  # noqa: E402
import kl_engine  # noqa: E402
import latency_budget  # noqa: E402
import pruned_speed  # noqa: E402
import reconstruct as bench_reconstruct  # noqa: E402
import report  # noqa: E402
import slicing  # noqa: E402
import zoo  # noqa: E402

import bench.kernels as bench_kernels  # noqa: E402  (a top-level `kernels` would be the Triton package dir)

CPU = torch.device("cpu")
TINY_VIT = dict(img_size=32, patch_size=16, depth=2, embed_dim=16, num_heads=2)
TINY_SWIN = dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                 num_classes=10)
KL_PARTIALS = []  # what kl_engine.run hands to on_config after each config


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """Every benchmark's payload at tiny sizes, written the way the scripts write them."""
    out = tmp_path_factory.mktemp("results")
    old, common.RESULTS = common.RESULTS, out
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        payloads = {
            "kernels": {"results": bench_kernels.measure(bench_kernels.cases("tiny"), CPU, 10.0, repeats=1),
                        "copy_bandwidth_gbps": 10.0, "target_frac_copy_bw": 0.7,
                        "min_frac_copy_bw_memory_bound": 0.1, "all_within_tolerance": True},
            "kl_engine": kl_engine.run(True, CPU, full_model=True,
                                       configs=[("deit_tiny_patch16_224", dict(TINY_VIT, num_classes=10), None, 2)],
                                       on_config=KL_PARTIALS.append),
            "dimap": bench_dimap.run(CPU, [("swin_tiny_patch4_window7_224", TINY_SWIN)], ["loop", "torch", "triton"],
                                     1, 0.55, [1]),
            "pruned_speed": pruned_speed.run(
                True, CPU, cases=[("deit_small_patch16_224", dict(img_size=32, patch_size=16, depth=2, num_classes=10),
                                   [("deit_tiny_patch16_224", 0.5, 3)])], batches=(1, 2), repeats=1, onnx=False),
            "slicing": slicing.bench_device("cpu", ["vit_tiny_patch16_224"], 1, ["inplace", "copy"]),
            "finetune_scale": finetune_scale.run(True, steps=1, img=32, gpu=False),
            "dap": {"batch": 2, "rounds": 1, "amp": None, "target_x_plain": 1.5,
                    "results": bench_dap._bench_model("deit", ("deit_tiny_patch16_224", dict(TINY_VIT, embed_dim=64)),
                                                      CPU, 2, 1, 2)},
        }
        payloads["reconstruct"] = {"rows": bench_reconstruct.run(bench_reconstruct.CONFIGS["quick"], CPU),
                                   "target_share": 0.10}
        payloads["latency_budget"] = {"rows": latency_budget.run(latency_budget.CONFIGS["quick"], (1, 2), CPU,
                                                                 target=0.9, repeats=2),
                                      "target_predicted_within": 0.10}
        # --screened writes the same layout (stock models there); the tiny run above has its screened rows
        payloads["kl_engine_screened"] = payloads["kl_engine"]
        payloads["pruned_speed_families"] = payloads["pruned_speed"]  # --families: the same layout, other models
        payloads["pruned_speed_libraries"] = pruned_speed.run_libraries(CPU, TINY_LIBRARIES, batches=(1, 2), repeats=1)
        payloads["zoo"] = zoo.run(False, 1e8, None, only=["deit_tiny_patch16_224", "vit_small_patch16_rope_mixed_224"])
        for name, payload in payloads.items():
            common.write_json(name, CPU, payload)
    finally:
        common.RESULTS = old
        torch.set_num_threads(n_threads)
    return out, payloads


TINY_LIBRARIES = {  # bench/pruned_speed.py --libraries at CI size: one ViT shape in each library, keep 0.5
    "timm": ("vit_base_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=4,
                                          num_classes=10)),
    "transformers": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         image_size=32, patch_size=8, num_labels=10),
    "torchvision": dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=128,
                        num_classes=10),
    "keep": 0.5}


def test_kernel_rows_check_against_fp64_and_time_both(docs):
    rows = docs[1]["kernels"]["results"]
    assert {r["op"] for r in rows} == {"kl_div", "masked_layernorm", "expand_ln", "dimap_metric"}
    for r in rows:
        assert r["within_tolerance"], r
        assert r["triton"]["ms"] > 0 and r["torch"]["ms"] > 0
        assert r["triton"]["gbps"] == pytest.approx(r["bytes"] / (r["triton"]["ms"] * 1e-3) / 1e9)
        assert r["triton"]["frac_copy_bw"] == pytest.approx(r["triton"]["gbps"] / 10.0)


def test_kernel_check_catches_a_wrong_kernel():
    def broken(dtype, device):
        kern, ref, ref64, nbytes = bench_kernels.case_kl(3, 2, 101, dtype, device)
        return (lambda: kern() * 1.01), ref, ref64, nbytes

    (row,) = bench_kernels.measure([("kl_div", "broken", (torch.float64,), broken)], CPU, None,
                                   time_kernels=False, time_refs=False)
    assert not row["within_tolerance"]


def test_kl_engine_rows(docs):
    (c,) = docs[1]["kl_engine"]["configs"]
    assert c["identical_selection"] and c["max_rel_diff_fast_vs_loop"] < 1e-10
    assert [r["method"] for r in c["rows"]][-1] == "fast engine"
    assert c["rows"][0]["speedup_vs_published"] == 1.0
    assert c["fast_engine_tflops"] > 0 and c["fraction_of_peak"] == pytest.approx(
        c["fast_engine_tflops"] / c["matmul_peak_tflops"])
    full = c["full_model"]
    assert full["candidates"] == c["candidates"]  # quick = every candidate already
    assert full["published_loop_seconds_extrapolated"] == pytest.approx(c["rows"][0]["seconds"])
    assert KL_PARTIALS == [docs[1]["kl_engine"]]  # written after every config: a stopped run keeps what finished
    scr = full["screened"]  # the screened engine next to the fast engine on every candidate
    assert scr["identical_selection"] and not scr["differences"]
    assert 0 < scr["scored_exactly"] <= scr["candidates"] == full["candidates"]
    assert scr["speedup_vs_fast_engine"] == pytest.approx(full["fast_engine_seconds"] / scr["seconds"])
    assert set(scr["stage_seconds"]) >= {"exact_residual", "screen", "calibration", "band", "audit", "total"}


def test_kl_engine_screened_without_loops():
    """The GPU check's screened row (DeiT-B there): no loop rows, the fast engine on every candidate, the screened
    engine next to it, its 2,000-image extrapolation, and the README renderer."""
    import report

    res = kl_engine.run(True, CPU, full_model=True, screened=True, loops=False,
                        configs=[("deit_tiny_patch16_224", dict(TINY_VIT, num_classes=10), None, 2)])
    (c,) = res["configs"]
    assert [r["method"] for r in c["rows"]] == ["fast engine"] and "identical_selection" not in c
    scr = c["full_model"]["screened"]
    assert scr["identical_selection"] and c["full_model"]["published_loop_seconds_extrapolated"] is None
    assert scr["seconds_2000_images_extrapolated"] == pytest.approx(scr["seconds"] * 1000)
    text = "\n".join(report._kl_screened(res))
    assert "deit_tiny_patch16_224" in text and "| True |" in text
    assert "\n".join(report._kl(res))  # renders without the loop rows


def test_dimap_triton_column_agrees_with_loop(docs):
    rows = docs[1]["dimap"]["results"]
    assert [r["method"] for r in rows] == ["loop", "torch", "triton"]
    assert all(r["mask_disagreements_vs_loop"] == 0 for r in rows)
    assert len({r["removed"] for r in rows}) == 1


def test_pruned_speed_matches_stock_shape(docs):
    rows = {r["kind"]: r for r in docs[1]["pruned_speed"]["rows"]}
    assert rows["pruned"]["same_shape_as_stock"]
    assert rows["pruned"]["params"] == rows["stock"]["params"] and rows["pruned"]["flops"] == rows["stock"]["flops"]
    assert rows["pruned"]["flops_ratio_vs_dense"] == pytest.approx(rows["dense"]["flops"] / rows["pruned"]["flops"])
    assert set(rows["pruned"]["vs_stock_same_shape"]) == {"bs1", "bs2"}


def test_slicing_in_place_keeps_parameters_and_beats_copy_on_memory(docs):
    d = docs[1]["slicing"]
    rows = {r["method"]: r for r in d["results"]}
    assert rows["inplace"]["same_parameter_objects"] and not rows["copy"]["same_parameter_objects"]
    assert rows["inplace"]["pruned_param_bytes"] == rows["copy"]["pruned_param_bytes"]
    assert d["ratios"]["vit_tiny_patch16_224"]["copy_over_inplace_peak"] > 1


def test_finetune_scale_times_one_and_two_processes(docs):
    d = docs[1]["finetune_scale"]
    assert [r["processes"] for r in d["cpu"]] == [1, 2] and all(r["seconds_per_step"] > 0 for r in d["cpu"])
    one, two = (r["seconds_per_step"] for r in d["cpu"])
    assert d["speedup_2_vs_1_process"] == pytest.approx(one / two)


def test_dap_rows(docs):
    rows = docs[1]["dap"]["results"]
    assert [r["config"] for r in rows] == ["plain", "dap-looped", "dap-batched", "dap-every-2"]
    assert rows[0]["x_plain"] == 1.0 and all(r["median_step_s"] > 0 for r in rows)


def test_report_renders_every_section_from_the_results(docs):
    results, _ = docs
    text = report.render(results)
    for title, prefix, _ in report.SECTIONS:
        if prefix not in ("gpu_tests", "gpu_check"):  # recorded on CUDA machines only
            assert f"### {title} — {common.cpu_name()}" in text
    assert "```json" not in text  # no section fell back to the raw-JSON renderer
    assert text.startswith(report.START) and text.endswith(report.END)


def test_report_renders_the_gpu_layout(docs, tmp_path):
    """CUDA results: other device name and backend, every kernel timed, a failed ONNX export, gpu_tests with a
    failure, and a day's summary with a benchmark stopped by --timeout and one skipped."""
    gpu = "NVIDIA H100 80GB HBM3"
    payloads = json.loads(json.dumps(docs[1]))
    payloads["kernels"]["interpreter_smoke"] = []
    for r in payloads["pruned_speed"]["rows"]:
        if r["kind"] == "pruned":
            r.update(onnxruntime_cpu_bs1_seconds=None, onnx_error="ModuleNotFoundError: No module named 'onnxscript'")
    payloads["gpu_tests"] = {"pytest_exit_code": 1, "command": "-m pytest -q -m gpu", "collected": 3, "passed": 2,
                             "failed": 1, "skipped": 0, "failures": [{"test": "tests.t::a", "message": "boom"}],
                             "slowest": []}
    payloads["gpu_check"] = {"dry_run": False, "deadline_s": 480, "seconds": 470.0, "env": {"gpu": gpu},
                             "steps": {"env": {"status": "ok", "seconds": 2.0}}, "preflight": {"ok": True}}
    for name, payload in payloads.items():
        d = dict(common.document(name, CPU, payload), device=gpu, backend="cuda")
        (tmp_path / f"{name}-{common.slug(gpu)}.json").write_text(json.dumps(d))
    summary = {"device": gpu, "date": "2026-01-01", "quick": False, "results": {},
               "status": {"kernels": {"rc": 0, "seconds": 40.0}, "kl_engine": {"rc": "timeout", "seconds": 500.0},
                          "slicing": "skipped (no time left)"}}
    (tmp_path / f"{common.slug(gpu)}-2026-01-01.json").write_text(json.dumps(summary))
    text = report.render(tmp_path)
    for title, _, _ in report.SECTIONS:
        assert f"### {title} — {gpu}" in text
    assert "```json" not in text
    assert "| kl_engine | timeout | 500.0 |" in text and "ONNX export failed (ModuleNotFoundError" in text


def test_bench_timeout_stops_the_benchmark_and_its_children():
    marker = f"vitprune-bench-child-{time.time_ns()}"
    child = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', " \
            f"'{marker}']); time.sleep(60)"
    t0 = time.time()
    assert common.run_process([sys.executable, "-c", child], 1.5) == "timeout"
    assert time.time() - t0 < 30
    time.sleep(0.2)
    cmdlines = []
    for f in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmdlines.append(f.read_bytes().decode(errors="replace"))
        except OSError:  # the process ended meanwhile
            pass
    assert not any(marker in c for c in cmdlines)
    assert common.run_process([sys.executable, "-c", "raise SystemExit(3)"], None) == 3


def test_onnx_failure_is_recorded_not_raised(monkeypatch):
    def broken_export(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'onnxscript'")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    monkeypatch.setattr(pruned_speed, "input_size", lambda m: (3, 8, 8))
    seconds, err = pruned_speed._onnx_latency(model, 1)
    assert seconds is None and err  # "onnxruntime not installed" without onnxruntime


def test_result_files_carry_device_and_versions(docs):
    results, _ = docs
    for p in results.glob("*.json"):
        d = json.loads(p.read_text())
        assert d["device"] == common.cpu_name() and d["backend"] == "cpu"
        assert d["torch"] == torch.__version__ and d["threads"] == 1
        assert p.name == f"{d['benchmark']}-{common.slug(d['device'])}.json"


def test_gpu_test_summary_counts(tmp_path):
    log = tmp_path / "r.jsonl"  # what tests/conftest.py appends with VITPRUNE_FAST_TEST_LOG, one phase per line
    records = [("tests.a::ok", "call", "passed", 0.5, ""), ("tests.a::bad", "setup", "passed", 0.25, ""),
               ("tests.a::bad", "call", "failed", 1.75, "boom"), ("tests.b::err", "setup", "failed", 0.1, "setup"),
               ("tests.b::skip", "setup", "skipped", 0.0, "no")]
    keys = ("test", "when", "outcome", "seconds", "message")
    log.write_text("".join(json.dumps(dict(zip(keys, r, strict=True))) + "\n" for r in records))
    s = gpu_tests.summarize(log)
    assert (s["collected"], s["passed"], s["failed"], s["skipped"]) == (4, 1, 2, 1)
    assert [f["test"] for f in s["failures"]] == ["tests.a::bad", "tests.b::err"]
    assert s["slowest"][0] == {"test": "tests.a::bad", "seconds": 2.0}


def test_test_log_records_outcomes_as_they_happen(tmp_path):
    """The conftest hook behind gpu_tests' partial results: one line per finished test, failures with a message."""
    (tmp_path / "test_x.py").write_text("import pytest\n\ndef test_ok():\n    pass\n\ndef test_bad():\n"
                                        "    assert 1 == 2\n\n@pytest.mark.skip(reason='no')\ndef test_skip():\n"
                                        "    pass\n")
    (tmp_path / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    log = tmp_path / "log.jsonl"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_x.py")],
                   cwd=tmp_path, env={**os.environ, "VITPRUNE_FAST_TEST_LOG": str(log)}, capture_output=True)
    s = gpu_tests.summarize(log)
    assert (s["passed"], s["failed"], s["skipped"]) == (1, 1, 1)
    assert "assert 1 == 2" in s["failures"][0]["message"] or "AssertionError" in s["failures"][0]["message"]


def test_seconds_statistics():
    calls = []
    assert common.seconds(lambda: calls.append(1), CPU, repeats=3) >= 0
    assert len(calls) == 4  # one warm-up + three timed
    with pytest.raises(KeyError):
        common.seconds(lambda: None, CPU, repeats=1, stat="p99")


def test_fidelity_study_summary_comes_from_its_runs(tmp_path):
    """The fidelity study at CI size (DeiT, 1 seed, 2 draws, a few steps): every run made, the summary computed from
    them (changing one run's number changes its cell and its wins), the README table and plot rendered."""
    runs = fidelity.run(fidelity.TINY, None, jobs=1)
    study = fidelity.TINY
    drawn = [m for m in study.methods if m in fidelity.DRAWN]
    rows = {m: 1 + (study.reconstruct and m != "dap") for m in study.methods}  # a "+rec" row beside each
    per_model_target = sum(rows[m] * (len(study.draws) if m in drawn else 1) for m in study.methods)
    assert len(runs) == len(study.models) * len(study.seeds) * len(study.targets) * per_model_target
    for r in runs:
        fine_tuned = not r["method"].endswith("+rec") or r["method"][:-4] in study.rec_finetune
        assert (r["acc_finetuned"] is not None) == fine_tuned and 0 < r["flops_frac"] < 1
        assert r["acc_finetuned"] is None or 0 <= r["acc_finetuned"] <= 100
        assert (r["acc_pruned"] is None) == (r["method"] == "dap")
        assert r["method"] == "dap" or r["kl_pruned"] >= 0 and 0 <= r["agree_pruned"] <= 100
        if r["method"] != "dap":  # every plan made at the shared ratio / DIMAP's own FLOPs search: near the target
            assert abs(r["flops_frac"] - r["target"]) < 0.05, r
    summary = fidelity.summarize(runs)
    cell = next(s for s in summary if s["model"] == "deit" and s["method"] == "upvits")
    mine = [r for r in runs if r["model"] == "deit" and r["method"] == "upvits"]
    assert cell["runs"] == len(study.draws) and cell["acc_pruned"][0] == pytest.approx(
        sum(r["acc_pruned"] for r in mine) / len(mine))
    mag = next(r for r in runs if r["model"] == "deit" and r["method"] == "magnitude")
    wtl = cell["acc_pruned_vs_magnitude"]
    assert wtl["wins"] == sum(r["acc_pruned"] > mag["acc_pruned"] for r in mine)
    assert wtl["wins"] + wtl["ties"] + wtl["losses"] == len(mine)

    changed = [dict(r) for r in runs]
    target = next(r for r in changed if r["model"] == "deit" and r["method"] == "upvits")
    target["acc_pruned"] = mag["acc_pruned"] - 10  # one run now loses clearly
    cell2 = next(s for s in fidelity.summarize(changed) if s["model"] == "deit" and s["method"] == "upvits")
    shift = (target["acc_pruned"] - mine[0]["acc_pruned"]) / len(mine)
    assert cell2["acc_pruned"][0] == pytest.approx(cell["acc_pruned"][0] + shift) and shift != 0
    now = [r["acc_pruned"] for r in changed if r["model"] == "deit" and r["method"] == "upvits"]
    assert cell2["acc_pruned_vs_magnitude"]["losses"] == sum(a < mag["acc_pruned"] for a in now) >= 1

    doc = {"study": dataclasses.asdict(study), "summary": summary, "file": "x.json", "device": "cpu", "date": "d"}
    text = fidelity.render(doc)
    assert text.startswith(fidelity.START) and text.endswith(fidelity.END)
    assert all(f"| {k} | {m} |" in text for k in study.models for m in study.methods)
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{fidelity.START}\nold\n{fidelity.END}\nb\n")
    fidelity.update_readme(doc, readme)
    assert readme.read_text() == f"a\n{text}\nb\n"
    assert fidelity.plot(summary, tmp_path / "f.png") is None or (tmp_path / "f.png").is_file()


def test_zoo_census_rows():
    """The census builds, prunes and compares what it describes; what it refuses carries the reason."""
    mixed = "vit_small_patch16_rope_mixed_224"
    res = zoo.run(False, 1e8, None, only=["deit_tiny_patch16_224", "xcit_nano_12_p16_224", "test_vit3", mixed])
    by = {r["name"]: r for r in res["rows"]}
    assert by["deit_tiny_patch16_224"]["status"] == "exact" and by["deit_tiny_patch16_224"]["rel_err"] < 1e-9
    assert by["test_vit3"]["status"] == "exact"  # attention-pool head
    assert by["xcit_nano_12_p16_224"]["status"] == "exact"  # conv embedding, LPI BatchNorms, whole XCA heads
    assert by[mixed]["status"] == "refused" and "rope_type='mixed'" in by[mixed]["why"]
    assert res["counts"] == {"exact": 3, "refused": 1}
    assert by["deit_tiny_patch16_224"]["kept_params"] < by["deit_tiny_patch16_224"]["params_built"]


def test_pruned_speed_family_rows():
    """The SigLIP-style and EVA-02-style rows: pruned to fewer FLOPs and parameters, timed against dense."""
    tiny = dict(img_size=32, depth=2, num_classes=10)
    cases = [("vit_base_patch16_siglip_224", dict(tiny, patch_size=16, embed_dim=64, num_heads=4), [(None, 0.7, None)]),
             ("eva02_base_patch14_224.mim_in22k", dict(tiny, img_size=28, patch_size=14, embed_dim=128, num_heads=2),
              [(None, 0.7, None)])]
    res = pruned_speed.run(True, CPU, cases=cases, batches=(1,), repeats=1, onnx=False)
    pruned = [r for r in res["rows"] if r["kind"] == "pruned"]
    assert len(pruned) == 2
    for r in pruned:
        assert r["flops_ratio_vs_dense"] > 1.2 and r["speedup_vs_dense"]["bs1"] > 0


def test_pruned_speed_libraries_leave_out_a_library_that_is_not_installed(monkeypatch):
    """The GPU image has no transformers: its rows are left out and the result says so (the report too)."""
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else find(name, *a))
    builders, missing = pruned_speed._library_builders(TINY_LIBRARIES)
    assert set(builders) == {"timm", "torchvision"} and missing == ["transformers"]
    lines = report._libraries({"batches": [1], "rows": [], "summary": {}, "not_installed": missing})
    assert lines[-1] == "not installed on this machine (no rows): transformers."


def test_pruned_speed_library_rows(docs):
    """timm, transformers and torchvision rows: the first two libraries' models of one shape prune to the same
    parameter and FLOP counts, each is timed against its own dense model, and the summary's ratios are theirs."""
    res = docs[1]["pruned_speed_libraries"]
    rows = {(r["library"], r["kind"]): r for r in res["rows"]}
    libs = ("timm", "transformers", "torchvision")
    assert set(rows) == {(lib, k) for lib in libs for k in ("dense", "pruned")}
    assert res["summary"]["transformers"]["same_shape_as_timm"]
    for lib in libs:
        assert rows[lib, "pruned"]["flops_ratio_vs_dense"] > 2 and rows[lib, "pruned"]["speedup_vs_dense"]["bs1"] > 0
    for lib in libs[1:]:
        assert res["summary"][lib]["speedup_over_timm_speedup"]["bs2"] == pytest.approx(
            rows[lib, "pruned"]["speedup_vs_dense"]["bs2"] / rows["timm", "pruned"]["speedup_vs_dense"]["bs2"])
