#!/usr/bin/env python3
"""The GPU check of issue 15, in one call on the lent GPU machine (`make gpu-check`):

1. builds spectral_ext against this machine's own torch with every core
   (pip install --no-build-isolation --no-deps -e ., MAX_JOBS=nproc,
   TORCH_CUDA_ARCH_LIST=9.0, FORCE_CUDA=1 when a GPU is visible);
2. runs the CUDA tests (python_tests/test_cuda.py and the cuda cases of test_ops.py);
3. times each operator at the benchmark shapes with CUDA events, native and the
   plain-PyTorch reference on the same GPU, and sets each time against its
   roofline floor (bytes over bandwidth or flops over rate, whichever is larger,
   from the device's datasheet figures), then runs benchmarks/test_bench_ops.py's
   cuda cases;
4. prints one summary table and writes it as Markdown and JSON, with the logs,
   under --out (default $OUT when set, else gpu-check-out/).

Without a GPU it builds, says "no GPU" and exits 0. It downloads nothing.
`--device cpu --skip-build --skip-tests` times the same cases on the CPU kernels
(a dry run of step 3 and its cost). Budget: under 6 minutes on an H200.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Datasheet peaks (dense, without tensor cores: the kernels use FFMA/DFMA): bandwidth in
# bytes/s, rates in flop/s. Matched by substring of torch.cuda.get_device_name(), first match.
PEAKS = [
    ("H200", dict(bandwidth=4.8e12, float32=67e12, float64=34e12)),
    ("H100 NVL", dict(bandwidth=3.9e12, float32=60e12, float64=30e12)),
    ("H100 PCIe", dict(bandwidth=2.0e12, float32=51e12, float64=26e12)),
    ("H100", dict(bandwidth=3.35e12, float32=67e12, float64=34e12)),  # SXM
]


def peaks_for(name: str):
    for key, peak in PEAKS:
        if key in name:
            return key, peak
    return None, None


def log(message: str) -> None:
    print(message, flush=True)


def run_logged(args, log_path: pathlib.Path, env=None, timeout=None) -> tuple[int, float, str]:
    """(return code, seconds, tail of the output); the whole output goes to log_path."""
    start = time.perf_counter()
    with open(log_path, "w") as handle:
        try:
            code = subprocess.run(args, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
            handle.write(f"\n[gpu_check] stopped after {timeout} s\n")
    seconds = time.perf_counter() - start
    tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
    return code, seconds, tail


# ---------------------------------------------------------------- step 1: build

def build(out: pathlib.Path, has_gpu: bool, timeout: float) -> dict:
    env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 1))
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    if has_gpu:
        env["FORCE_CUDA"] = "1"  # a missing toolkit must fail here, not build CPU-only
    log(f"[build] pip install --no-build-isolation --no-deps -e . (MAX_JOBS={env['MAX_JOBS']}, "
        f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}, FORCE_CUDA={env.get('FORCE_CUDA', 'auto')})")
    code, seconds, tail = run_logged([sys.executable, "-m", "pip", "install", "--no-index", "--no-build-isolation",
                                      "--no-deps", "-v", "-e", "."], out / "build.log", env=env, timeout=timeout)
    log(f"[build] exit {code} in {seconds:.0f} s (log: {out / 'build.log'})")
    if code != 0:
        log(tail)
    return {"exit_code": code, "seconds": round(seconds, 1)}


# ---------------------------------------------------------------- step 2: tests

def tests(out: pathlib.Path, timeout: float) -> dict:
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=--durations=10",
            "python_tests/test_cuda.py", "python_tests/test_ops.py", "-k", "cuda",
            f"--junitxml={out / 'tests.xml'}"]
    log("[tests] " + " ".join(args[1:]))
    code, seconds, tail = run_logged(args, out / "tests.log", timeout=timeout)
    summary = next((line for line in reversed(tail.splitlines()) if " in " in line and
                    any(w in line for w in ("passed", "failed", "error", "skipped"))), tail.strip()[-200:])
    log(f"[tests] exit {code} in {seconds:.0f} s: {summary}")
    if code != 0:
        log(tail)
    return {"exit_code": code, "seconds": round(seconds, 1), "summary": summary.strip("= ")}


# ---------------------------------------------------------------- step 3: roofline table

def cases(torch, device):
    """(kernel, shape, dtype, native, reference or None, bytes, flops) at the benchmark shapes
    (benchmarks/test_bench_ops.py, issue 2) plus the cases issue 15 names: float64, sinkhorn
    with B = 1 (stitching), and the G_ReLU-CKA Gram at N = 10,000, C = 256, 8x8."""
    import spectral_ext as se
    from spectral_ext import reference

    g = torch.Generator(device=device).manual_seed(0)
    out = []

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    for dtype in (torch.float32, torch.float64):
        e = torch.tensor([], dtype=dtype).element_size()
        name = str(dtype).replace("torch.", "")

        X = randn(1024, 128, 9, dtype=dtype)
        Y = randn(1024, 128, 9, dtype=dtype)
        pairs = 1024 * 1025 // 2  # the symmetric half is all a self Gram needs
        out.append(("max_kernel_gram self", "N=1024 C=128 S=9", name, lambda X=X: se.max_kernel_gram(X),
                    lambda X=X: reference.max_kernel_gram(X), e * (X.numel() + 1024 * 1024), 2 * pairs * 128 * 9))
        out.append(("max_kernel_gram cross", "N=N'=1024 C=128 S=9", name, lambda X=X, Y=Y: se.max_kernel_gram(X, Y),
                    lambda X=X, Y=Y: reference.max_kernel_gram(X, Y), e * (2 * X.numel() + 1024 * 1024),
                    2 * 1024 * 1024 * 128 * 9))

        for B in (256, 1):
            P = torch.rand(B, 128, 128, generator=g, device=device, dtype=dtype) + 0.01
            out.append(("sinkhorn", f"B={B} 128x128 16 rounds", name, lambda P=P: se.sinkhorn(P, 16),
                        lambda P=P: reference.sinkhorn(P, 16), e * 2 * P.numel(), P.numel() * (4 * 16 + 2)))

        x = randn(64, 64, 32, 32, dtype=dtype)
        V = torch.linalg.qr(randn(576, 64, dtype=dtype))[0]
        s = torch.rand(64, generator=g, device=device, dtype=dtype)
        spatial = (1, 1), (1, 1), (1, 1)
        out.append(("signal_projection", "64x64x32x32 3x3 r=64", name,
                    lambda x=x, V=V, s=s: se.signal_projection(x, V, s, padding=1),
                    lambda x=x, V=V, s=s: reference.signal_projection(x, V, s, *spatial, None, (3, 3)),
                    e * (x.numel() + V.numel() + 64 * 64 * 32 * 32), 2 * 64 * 64 * 32 * 32 * 576))
        out.append(("signal_projection mean", "64x64x32x32 3x3 r=64", name,
                    lambda x=x, V=V, s=s: se.signal_projection(x, V, s, padding=1, reduce="mean"),
                    lambda x=x, V=V, s=s: reference.signal_projection(x, V, s, *spatial, "mean", (3, 3)),
                    e * (x.numel() + V.numel() + 64 * 64), x.numel() * 3 + 2 * 64 * 576 * 64))

        U = randn(32, 128, 128, dtype=dtype)
        W = randn(32, 128, 9, 128, dtype=dtype)
        out.append(("conv_adjacency", "B=32 c=128 3x3 128x128", name, lambda U=U, W=W: se.conv_adjacency(U, W),
                    lambda U=U, W=W: reference.conv_adjacency(U, W), e * (U.numel() + W.numel() + 32 * 128 * 128),
                    32 * 9 * 128 * 128 * (2 * 128 + 2)))

    if device != "cpu":  # end to end (issue 15): goal under 1 s; the reference's (N, N, C) would be 100 GB
        X = randn(10000, 256, 64, dtype=torch.float32)
        pairs = 10000 * 10001 // 2
        out.append(("max_kernel_gram self (G_ReLU-CKA)", "N=10000 C=256 S=64", "float32",
                    lambda X=X: se.max_kernel_gram(X), None, 4 * (X.numel() + 10000 ** 2), 2 * pairs * 256 * 64))
    return out


def timed_median(torch, fn, device, budget_s=0.5, min_reps=3, max_reps=50):
    """Median seconds of fn() after a warm-up: CUDA events on a GPU, perf_counter on the CPU."""
    fn()
    if device != "cpu":
        torch.cuda.synchronize()
    times = []
    spent = 0.0
    while len(times) < max_reps and (len(times) < min_reps or spent < budget_s):
        if device != "cpu":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t0
        times.append(seconds)
        spent += seconds
    return statistics.median(times), len(times)


def measured_copy_bandwidth(torch):
    """Device-to-device copy, bytes read plus written per second (KINDS.md: about 4.3 TB/s on an H200)."""
    a = torch.empty(2 ** 30 // 4, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    seconds, _ = timed_median(torch, lambda: b.copy_(a), "cuda", budget_s=0.05, min_reps=5)
    return 2 * a.numel() * 4 / seconds


def roofline(out: pathlib.Path, device: str, time_left=lambda: float("inf")) -> dict:
    import torch

    if device == "cpu":
        torch.set_num_threads(1)
        device_name = "cpu (1 thread)"
    else:
        device_name = torch.cuda.get_device_name()
    matched, peak = peaks_for(device_name)
    info = {"device": device_name, "peaks": peak, "peaks_from": matched and f"datasheet, {matched}"}
    if device != "cpu":
        info["measured_copy_bandwidth"] = measured_copy_bandwidth(torch)
        log(f"[bench] {device_name}: measured device copy {info['measured_copy_bandwidth'] / 1e12:.2f} TB/s")
    rows = []
    for kernel, shape, dtype, native, ref, nbytes, flops in cases(torch, device):
        if time_left() < 20:
            log(f"[bench] out of time: {kernel} {shape} {dtype} and the cases after it are left out")
            info["truncated"] = True
            break
        t0 = time.perf_counter()
        seconds, reps = timed_median(torch, native, device)
        row = {"kernel": kernel, "shape": shape, "dtype": dtype, "time_ms": seconds * 1e3, "reps": reps,
               "bytes": nbytes, "flops": flops}
        if ref is not None:
            ref_seconds, _ = timed_median(torch, ref, device, budget_s=0.3, min_reps=2, max_reps=10)
            row["reference_ms"] = ref_seconds * 1e3
            row["speedup_vs_reference"] = ref_seconds / seconds
        if peak is not None:
            floor = max(nbytes / peak["bandwidth"], flops / peak[dtype])
            row["floor_ms"] = floor * 1e3
            row["bound"] = "memory" if nbytes / peak["bandwidth"] >= flops / peak[dtype] else "compute"
            row["ratio_to_floor"] = seconds / floor
        row["wall_s"] = round(time.perf_counter() - t0, 2)  # this case's cost in this script
        rows.append(row)
        log(f"[bench] {kernel:<34} {shape:<24} {dtype:<8} {seconds * 1e3:10.3f} ms"
            + (f"  floor {row['floor_ms']:.3f} ms  x{row['ratio_to_floor']:.1f}" if "floor_ms" in row else "")
            + (f"  reference {row['reference_ms']:.3f} ms" if "reference_ms" in row else "")
            + f"  [{row['wall_s']} s]")
        if device != "cpu":
            torch.cuda.empty_cache()
    info["rows"] = rows
    return info


def bench_suite(out: pathlib.Path, timeout: float) -> dict:
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "benchmarks/test_bench_ops.py",
            "-k", "cuda", f"--benchmark-json={out / 'bench_ops.json'}"]
    log("[bench] " + " ".join(args[1:]))
    code, seconds, tail = run_logged(args, out / "bench.log", timeout=timeout)
    log(f"[bench] exit {code} in {seconds:.0f} s")
    if code != 0:
        log(tail)
    return {"exit_code": code, "seconds": round(seconds, 1)}


# ---------------------------------------------------------------- step 4: report

def markdown(report: dict) -> str:
    bench = report.get("roofline") or {}
    lines = [f"# GPU check: {bench.get('device', report.get('device', '?'))}", ""]
    lines += [f"- torch {report['torch']}, build: {report.get('build_info', {}).get('build_reason', '?')}"]
    for step in ("build", "tests", "bench_suite"):
        if step in report:
            detail = report[step].get("summary", "")
            lines.append(f"- {step}: exit {report[step]['exit_code']} in {report[step]['seconds']} s {detail}".rstrip())
    if bench.get("peaks"):
        p = bench["peaks"]
        lines.append(f"- floors from {bench['peaks_from']}: {p['bandwidth'] / 1e12:.2f} TB/s, "
                     f"FP32 {p['float32'] / 1e12:.0f} TFLOP/s, FP64 {p['float64'] / 1e12:.0f} TFLOP/s (no tensor cores)")
    if "measured_copy_bandwidth" in bench:
        lines.append(f"- measured device copy: {bench['measured_copy_bandwidth'] / 1e12:.2f} TB/s")
    if bench.get("truncated"):
        lines.append("- the time budget ran out: the table below lacks the last cases")
    lines.append(f"- total {report['seconds']:.0f} s")
    if bench.get("rows"):
        lines += ["", "| kernel | shape | dtype | time ms | MB moved | GFLOP | floor ms | bound | time / floor "
                  "| reference ms | speed-up |", "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
        for r in bench["rows"]:
            def f(key, fmt):
                return format(r[key], fmt) if key in r else "-"
            lines.append(f"| {r['kernel']} | {r['shape']} | {r['dtype']} | {r['time_ms']:.3f} | "
                         f"{r['bytes'] / 1e6:.1f} | {r['flops'] / 1e9:.2f} | {f('floor_ms', '.3f')} | "
                         f"{r.get('bound', '-')} | {f('ratio_to_floor', '.1f')} | {f('reference_ms', '.3f')} | "
                         f"{f('speedup_vs_reference', '.2f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "gpu-check-out"))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: time the cases on the CPU kernels (a dry run)")
    parser.add_argument("--skip-build", action="store_true", help="use the extension already built")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench-suite", action="store_true", help="only this script's roofline table")
    parser.add_argument("--tests-timeout", type=float, default=180)
    parser.add_argument("--bench-timeout", type=float, default=120)
    parser.add_argument("--budget", type=float, default=540,
                        help="seconds for the whole script (inside the device's 600 s a command): each step "
                             "gets at most what is left, so the report is always written")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    def left(reserve: float = 0.0) -> float:
        return max(10.0, args.budget - (time.perf_counter() - start) - reserve)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    has_gpu = torch.cuda.is_available()
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if has_gpu else "no GPU"}
    code = 0
    if not args.skip_build:
        report["build"] = build(out, has_gpu, timeout=left(reserve=120))
        if report["build"]["exit_code"] != 0:
            code = 1
    if code == 0:
        info = subprocess.run([sys.executable, "-c", "import json, spectral_ext; print(json.dumps(spectral_ext.build_info()))"],
                              cwd=ROOT, capture_output=True, text=True)
        if info.returncode == 0:
            report["build_info"] = json.loads(info.stdout.strip().splitlines()[-1])
            log(f"[build] {report['build_info']['build_reason']}")
        else:
            log(f"[build] spectral_ext does not import:\n{info.stderr[-3000:]}")
            code = 1
    if code == 0 and not has_gpu and args.device == "cuda":
        log("no GPU: the build is done; the CUDA tests and the GPU benchmarks need one (exit 0)")
    elif code == 0:
        if has_gpu and not args.skip_tests:
            report["tests"] = tests(out, min(args.tests_timeout, left(reserve=90)))
            code |= report["tests"]["exit_code"] != 0
        sys.path.insert(0, str(ROOT))  # this checkout's spectral_ext, as built above
        report["roofline"] = roofline(out, args.device, time_left=lambda: left() - 10)
        if has_gpu and args.device == "cuda" and not args.skip_bench_suite and left() > 30:
            report["bench_suite"] = bench_suite(out, min(args.bench_timeout, left(reserve=10)))
            code |= report["bench_suite"]["exit_code"] != 0
    report["seconds"] = time.perf_counter() - start
    text = markdown(report)
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    log("\n" + text)
    log(f"[gpu_check] {'ok' if code == 0 else 'FAILED'} in {report['seconds']:.0f} s; {out}/gpu_check.md and .json")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
