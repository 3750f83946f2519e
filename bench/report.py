"""Regenerate README.md's "Performance" section from the newest results in bench/results/.

    python bench/report.py
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
START, END = "<!-- performance:start -->", "<!-- performance:end -->"


def _newest_per_device(paths, keep=lambda p, d: True) -> list[dict]:
    """The newest (by mtime) of ``paths`` per device, among the documents ``keep(path, doc)`` accepts."""
    by_device = {}
    for p in sorted(paths, key=lambda p: p.stat().st_mtime):
        d = json.loads(p.read_text())
        if keep(p, d):
            by_device[d.get("device", p.stem)] = d
    return list(by_device.values())


def _latest(prefix: str, results: Path) -> list[dict]:
    """Newest result file per device for a benchmark (files named <prefix>-<device>.json; quick runs skipped)."""
    return _newest_per_device(results.glob(f"{prefix}-*.json"),
                              lambda p, d: "quick" not in p.name and not d.get("dry_run"))


def _slicing(d: dict) -> list[str]:
    out = ["| model | method | seconds | peak extra (% of params) |", "|---|---|---|---|"]
    out += [f"| {r['model']} | {r['method']} | {r['seconds']:.2f} | {r['peak_extra_pct']:.1f} |" for r in d["results"]]
    return out


def _kl(d: dict) -> list[str]:
    out = ["| model | candidates × images | method | cand·img/s | vs published | identical selection |",
           "|---|---|---|---|---|---|"]
    notes = []
    for c in d["configs"]:
        for r in c["rows"]:
            vs = f"{r['speedup_vs_published']:.1f}×" if r.get("speedup_vs_published") is not None else "–"
            out.append(f"| {c['model']} | {c['candidates']} × {c['images']} | {r['method']} | "
                       f"{r['cand_img_per_s']:.0f} | {vs} | {c.get('identical_selection', '–')} |")
        if "fraction_of_peak" in c and "max_rel_diff_fast_vs_loop" in c:
            dt = c.get("matmul_peak_dtype", "bf16")
            peak = c.get("matmul_peak_tflops", c.get("bf16_matmul_peak_tflops"))
            notes.append(f"{c['model']} ({c['dtype']}): fast engine {c['fast_engine_tflops']:.3g} TFLOP/s = "
                         f"{100 * c['fraction_of_peak']:.0f}% of the measured {dt} matmul peak ({peak:.3g} TFLOP/s); "
                         f"max relative difference vs the loop {c['max_rel_diff_fast_vs_loop']:.1e}.")
        if "full_model" in c and _published_estimate(c) is not None:
            f = c["full_model"]
            est = f["published_loop_seconds_extrapolated"]
            est = f"{est / 3600:.2f} h" if est >= 3600 else f"{est:.0f} s"
            fast = "~" if f.get("fast_engine_extrapolated") else ""
            notes.append(f"{c['model']}, all {f['candidates']} candidates: fast engine "
                         f"{fast}{f['fast_engine_seconds']:.1f} s{' (extrapolated)' if fast else ''} vs the "
                         f"published loop's ~{est} (extrapolated from its rate above), "
                         f"{f['speedup_vs_published']:.0f}×.")
            if "screened" in f:
                notes.append(_screened_note(c, f["screened"]))
    return out + ([""] + [f"- {n}" for n in notes] if notes else [])


def _published_estimate(c: dict) -> float | None:
    """The published loop's extrapolated whole-model seconds (None: the loops were not run)."""
    return c["full_model"].get("published_loop_seconds_extrapolated")


def _screened_note(c: dict, r: dict) -> str:
    st = r["stage_seconds"]
    stages = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in st.items() if k != "total")
    return (f"{c['model']} screened engine (keep {r['keep']}): {r['seconds']:.1f} s = "
            f"×{r['speedup_vs_fast_engine']:.1f} faster than the fast engine on every candidate, "
            f"{100 * r['share_scored_exactly']:.1f} % of the {r['candidates']} candidates scored exactly, "
            f"identical selection: {r['identical_selection']} ({stages})"
            + (f"; 2,000 images extrapolated: ~{r['seconds_2000_images_extrapolated'] / 60:.1f} min"
               if c.get("dtype", "").startswith("fp32 weights") else "") + ".")


def _kl_screened(d: dict) -> list[str]:
    out = ["| model | candidates × images | fast engine s | screened s | speedup | scored exactly | band (±) | "
           "identical selection |", "|---|---|---|---|---|---|---|---|"]
    notes = []
    for c in d["configs"]:
        f = c.get("full_model", {})
        r = f.get("screened")
        if r is None:
            continue
        kw = ", ".join(f"{k}={v}" for k, v in c["kwargs"].items())
        out.append(f"| {c['model']} ({kw}) | {f['candidates']} × {c['images']} | {f['fast_engine_seconds']:.1f} | "
                   f"{r['seconds']:.1f} | ×{r['speedup_vs_fast_engine']:.1f} | "
                   f"{100 * r['share_scored_exactly']:.1f} % | {100 * math.expm1(r['band_half_width_min']):.0f}–"
                   f"{100 * math.expm1(r['band_half_width_max']):.0f} % | "
                   f"{r['identical_selection']} |")
        notes.append(_screened_note(c, r) + (f" Note: {c['note']}." if c.get("note") else ""))
    return out + [""] + [f"- {n}" for n in notes]


def _pruned(d: dict) -> list[str]:
    bs = [f"bs{b}" for b in d["batches"]]
    out = ["| model | params | GFLOPs | " + " | ".join(f"{b} ms" for b in bs) + " | notes |",
           "|---|---|---|" + "---|" * len(bs) + "---|"]
    for r in d["rows"]:
        notes = []
        if "flops_ratio_vs_dense" in r:
            notes.append(f"FLOPs ÷{r['flops_ratio_vs_dense']:.2f}; speedup "
                         + ", ".join(f"{k} ×{v:.2f}" for k, v in r["speedup_vs_dense"].items()))
        if "vs_stock_same_shape" in r:
            ok = {True: " (within 5 %)", False: " (NOT within 5 %)"}.get(r.get("within_5pct_of_stock"), "")
            notes.append("time / stock same shape " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                                  r["vs_stock_same_shape"].items()) + ok)
        if r.get("onnxruntime_cpu_bs1_seconds"):
            notes.append(f"ONNX Runtime CPU bs1 {1e3 * r['onnxruntime_cpu_bs1_seconds']:.0f} ms")
        elif r.get("onnx_error"):
            notes.append(f"ONNX export failed ({r['onnx_error'][:80]})")
        out.append(f"| {r['model']} | {r['params']:,} | {r['flops'] / 1e9:.2f} | "
                   + " | ".join(f"{1e3 * r[b]['seconds']:.1f}" for b in bs) + f" | {'; '.join(notes)} |")
    return out


def _dimap(d: dict) -> list[str]:
    out = ["| model | method | scoring s | thresholds s | total s |", "|---|---|---|---|---|"]
    out += [f"| {r['model']} | {r['method']} (threads {r.get('threads', '?')}) | {r['score_s']:.2f} | "
            f"{r['threshold_s']:.2f} | {r['total_s']:.2f} |" for r in d["results"]]
    return out


def _kernels(d: dict) -> list[str]:
    out = [f"Measured copy bandwidth (read + write): {d['copy_bandwidth_gbps']:.0f} GB/s.", "",
           "| op | shape | dtype | Triton ms | Triton GB/s (% of copy) | torch ms | torch GB/s | speedup | "
           "err vs fp64 (torch) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        tri, tor = r.get("triton"), r.get("torch")
        tri_cols = (f"{tri['ms']:.4f} | {tri['gbps']:.0f} ({100 * tri.get('frac_copy_bw', 0):.0f}%)"
                    if tri else "– | – (interpreter only)")
        tor_cols = f"{tor['ms']:.4f} | {tor['gbps']:.1f}" if tor else "– | –"
        ok = "" if r["within_tolerance"] else " **out of tolerance**"
        speedup = f"{r['speedup']:.2f}×" if "speedup" in r else "–"
        out.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {tri_cols} | {tor_cols} | {speedup} | "
                   f"{r['max_abs_err_vs_fp64']:.1e} ({r['torch_max_abs_err_vs_fp64']:.1e}){ok} |")
    if d.get("interpreter_smoke"):
        bad = [r for r in d["interpreter_smoke"] if not r["within_tolerance"]]
        out += ["", f"Triton interpreter check at tiny shapes: {len(d['interpreter_smoke']) - len(bad)}/"
                    f"{len(d['interpreter_smoke'])} within tolerance (kernel error ≤ 2 × torch error + atol)."]
    if d.get("min_frac_copy_bw_memory_bound") is not None:
        out += ["", f"Slowest memory-bound kernel: {100 * d['min_frac_copy_bw_memory_bound']:.0f}% of copy bandwidth "
                    f"(target ≥ {100 * d['target_frac_copy_bw']:.0f}%)."]
    return out


def _dap(d: dict) -> list[str]:
    out = [f"Batch {d['batch']}, {d['rounds']} round-robin rounds, "
           f"AMP {d.get('amp') or 'off'}; target ≤ {d['target_x_plain']}× a plain step.", "",
           "| model | config | step ms | × plain | probes ms | mask update ms | device default |",
           "|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        probes = f"{1e3 * r['median_probes_s']:.1f}" if "median_probes_s" in r else ""
        update = f"{1e3 * r['median_update_s']:.2f}" if "median_update_s" in r else ""
        out.append(f"| {r['model']} | {r['config']} | {1e3 * r['median_step_s']:.1f} | {r['x_plain']:.2f} | "
                   f"{probes} | {update} | {'yes' if r.get('device_default') else ''} |")
    return out


def _gpu_check(d: dict) -> list[str]:
    env = d.get("env", {})
    out = [f"GPU {env.get('gpu', '?')} ({env.get('gpu_memory_gib', '?')} GiB, capability {env.get('capability', '?')}"
           f", driver {env.get('driver', '?')}); CUDA {env.get('torch_cuda')}, triton {env.get('triton')}, timm "
           f"{env.get('timm')}, Python {env.get('python')}; install: {env.get('install')}; C++ extension "
           f"{'loaded' if env.get('cpp_extension') else 'not loaded: ' + str(env.get('cpp_extension_error'))}.", "",
           f"Deadline {d['deadline_s']:.0f} s, whole check {d.get('seconds', float('nan')):.0f} s.", "",
           "| step | status | seconds | notes |", "|---|---|---|---|"]
    for name, r in d["steps"].items():
        out.append(f"| {name} | {r['status']} | {r.get('seconds', '–')} | {r.get('reason', '')} |")
    pre = d.get("preflight")
    if pre:
        out += ["", "Kernel preflight: " + ("every kernel within tolerance of its float64 reference."
                                           if pre["ok"] else f"**failed at {pre['failed']}**.")]
    return out


def _gpu_tests(d: dict) -> list[str]:
    out = [f"`{d['command']}`: {d.get('passed', 0)} passed, {d.get('failed', 0)} failed, "
           f"{d.get('skipped', 0)} skipped (pytest exit code {d['pytest_exit_code']})"
           + ("; stopped by its time limit, the tests not listed did not run." if d.get("stopped_by_timeout")
              else ".")]
    out += [f"- FAILED {f['test']}: {f['message'][:200]}" for f in d.get("failures", [])]
    return out


def _finetune_scale(d: dict) -> list[str]:
    out = [f"`{d['model']}` at {d['img_size']} px, soft distillation, {d['steps']} timed steps; "
           f"{d['cpu_count']} CPU cores.", "", "| setting | ms / step | images/s |", "|---|---|---|"]
    for r in d["cpu"]:
        out.append(f"| CPU, {r['processes']} process(es) × {r['threads_per_process']} thread, global batch "
                   f"{r['global_batch']} | {1e3 * r['seconds_per_step']:.0f} | {r['images_per_s']:.0f} |")
    for r in d.get("gpu", []):
        out.append(f"| GPU {r['precision']}, batch {r['batch']} | {1e3 * r['seconds_per_step']:.1f} | "
                   f"{r['batch'] / r['seconds_per_step']:.0f} |")
    out += ["", f"2 processes vs 1 (same global batch): ×{d['speedup_2_vs_1_process']:.2f} the steps/s."]
    if "bf16_speedup_vs_fp32" in d:
        out.append(f"bf16 autocast vs fp32: ×{d['bf16_speedup_vs_fp32']:.2f}.")
    return out


def _zoo(d: dict) -> list[str]:
    out = ["| timm module | names | pruned exactly | described, not run (size) | refused | crashed |",
           "|---|---|---|---|---|---|"]
    for m, c in d["by_module"].items():
        out.append(f"| {m} | {sum(c.values())} | {c.get('exact', 0)} | {c.get('not_run', 0)} | {c.get('refused', 0)} "
                   f"| {c.get('crashed', 0) + c.get('wrong', 0)} |")
    c = d["counts"]
    run = d["names"] - c.get("not_run", 0)
    out += ["", f"{d['names']} names (timm {d['timm']}): {c.get('exact', 0)} pruned exactly = "
                f"{100 * c.get('exact', 0) / d['names']:.1f} % of all, {100 * c.get('exact', 0) / max(run, 1):.1f} % "
                f"of the {run} built and run; {c.get('wrong', 0)} wrong, {c.get('crashed', 0)} crashed, "
                f"{c.get('refused', 0)} refused with the reason."]
    return out


def _reconstruct(d: dict) -> list[str]:
    out = ["| model | images | FLOPs % | exact UP-ViTs scoring (s, extrapolated) | reconstruction (s) | share | "
           "Linears refit | median rel. output error before → after |", "|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['model']} {r['kwargs']} | {r['images']} | {100 * r['flops_frac']:.1f} | "
            f"{r['upvits_exact_seconds_extrapolated']:.0f} | {r['reconstruct_seconds']:.1f} | "
            f"{100 * r['reconstruct_share_of_scoring']:.2f} % | {r['layers_refit']} | "
            f"{r['median_rel_error_before']:.3f} → {r['median_rel_error_after']:.3f} |" for r in d["rows"]]
    return out + ["", f"Target: reconstruction ≤ {100 * d['target_share']:.0f} % of the scoring time."]


def _latency_budget(d: dict) -> list[str]:
    out = ["| model | batch | dense at the table's build / now (ms) | budget | predicted (ms) | measured (ms) | "
           "predicted / measured | FLOPs % | uniform plan, same FLOPs (ms) | global / uniform |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['model']} {r['kwargs']} | {r['batch']} | {1e3 * r['dense_predicted_s']:.2f} / "
            f"{1e3 * r['dense_measured_s']:.2f} | "
            f"{100 * r['target']:.0f} % | {1e3 * r['predicted_s']:.2f} | {1e3 * r['measured_s']:.2f} | "
            f"{r['predicted_over_measured']:.2f} | {100 * r['flops_frac']:.1f} | "
            f"{1e3 * r['uniform_same_flops_measured_s']:.2f} | {r['global_over_uniform_latency']:.2f} |"
            for r in d["rows"]]
    return out + ["", f"Target: predicted within {100 * d['target_predicted_within']:.0f} % of measured."]


def _libraries(d: dict) -> list[str]:
    bs = [f"bs{b}" for b in d["batches"]]
    out = ["| model | params | GFLOPs | " + " | ".join(f"{b} ms" for b in bs) + " | speedup vs its dense |",
           "|---|---|---|" + "---|" * len(bs) + "---|"]
    for r in d["rows"]:
        sp = ", ".join(f"{k} ×{v:.2f}" for k, v in r.get("speedup_vs_dense", {}).items()) or "—"
        out.append(f"| {r['model']} | {r['params']:,} | {r['flops'] / 1e9:.2f} | "
                   + " | ".join(f"{1e3 * r[b]['seconds']:.1f}" for b in bs) + f" | {sp} |")
    notes = []
    for lib, sm in d["summary"].items():
        ratio = ", ".join(f"{k} {v:.3f}" for k, v in sm["speedup_over_timm_speedup"].items())
        notes.append(f"{lib} speedup / timm speedup: {ratio} (within 5 %: {'met' if sm['within_5pct'] else 'not met'};"
                     f" same shape as timm's: {sm['same_shape_as_timm']})")
    if d.get("not_installed"):
        notes.append(f"not installed on this machine (no rows): {', '.join(d['not_installed'])}")
    return out + [""] + [f"{n}." if i == len(notes) - 1 else f"{n};" for i, n in enumerate(notes)]


def _generic(d: dict) -> list[str]:
    return ["```json", json.dumps({k: v for k, v in d.items() if k not in ("results",)}, indent=1)[:1500], "```"]


SECTIONS = [("GPU check (bench/gpu_check.sh)", "gpu_check", _gpu_check),
            ("GPU tests (pytest -m gpu)", "gpu_tests", _gpu_tests),
            ("Slicing: in-place `prune_` vs copy-based", "slicing", _slicing),
            ("UP-ViTs KL engine vs the published loop", "kl_engine", _kl),
            ("Screened UP-ViTs selection vs the exact fast engine (stock architectures)", "kl_engine_screened",
             _kl_screened),
            ("Pruned-model speed", "pruned_speed", _pruned),
            ("Pruned-model speed: SigLIP-style and EVA-02-style ViT-B", "pruned_speed_families", _pruned),
            ("Pruned-model speed: timm vs transformers vs torchvision ViT-B at keep 0.7", "pruned_speed_libraries",
             _libraries),
            ("Zoo census (bench/zoo.py)", "zoo", _zoo),
            ("DIMAP scoring + thresholds", "dimap", _dimap),
            ("DAP training step", "dap", _dap),
            ("Triton kernels", "kernels", _kernels),
            ("Fine-tuning throughput (DDP)", "finetune_scale", _finetune_scale),
            ("Reconstruction vs exact UP-ViTs scoring", "reconstruct", _reconstruct),
            ("Latency budgets: predicted vs measured", "latency_budget", _latency_budget)]


def _runs(results: Path) -> list[dict]:
    """Newest full ``python -m bench`` run summary (``<device>-<date>.json``) per device."""
    return _newest_per_device(results.glob("*.json"),
                              lambda p, d: "status" in d and "benchmark" not in d and not d.get("quick"))


def _run_table(d: dict) -> list[str]:
    out = [f"`python -m bench` on {d['device']} ({d['date']}):", "", "| benchmark | exit code | seconds |",
           "|---|---|---|"]
    for name, st in d["status"].items():
        rc, secs = (st["rc"], st["seconds"]) if isinstance(st, dict) else (st, "–")
        out.append(f"| {name} | {rc} | {secs} |")
    return out + [""]


def render(results: Path | None = None) -> str:
    """The README block for the newest results in ``results`` (default bench/results)."""
    results = results or HERE / "results"
    lines = [START, "", "Generated by `python bench/report.py` from `bench/results/` (newest file per device).", ""]
    for d in _runs(results):
        lines += _run_table(d)
    for title, prefix, fn in SECTIONS:
        for d in _latest(prefix, results):
            lines += [f"### {title} — {d.get('device', '?')}", "",
                      f"{d.get('date', '?')}, torch {d.get('torch', '?')}, CPU threads {d.get('threads', '?')}; "
                      f"load average at the end {d.get('loadavg_1min_at_end', float('nan')):.1f}.", ""]
            try:
                lines += fn(d)
            except (KeyError, TypeError):  # results written by an older version of the script
                lines += _generic(d)
            if d.get("note"):
                lines += ["", f"Note: {d['note']}"]
            lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    text = README.read_text()
    block = render()
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n## Performance\n\n" + block + "\n"
    README.write_text(text)
    print(f"updated {README}")


if __name__ == "__main__":
    main()
