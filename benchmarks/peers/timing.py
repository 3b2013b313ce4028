"""Interleaved timing shared by the peer benchmarks: A, B, A, B, ... on one thread
per side (the machine is shared, so the ratio of medians is the figure to read)."""
import statistics
import time


def interleaved(fns: dict, repeats: int = 5) -> dict:
    """Median seconds of each callable, run in turn `repeats` times after one warm-up."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def report(title: str, medians: dict, base: str) -> str:
    line = f"{title}: " + ", ".join(f"{k} {v:.4g} s" for k, v in medians.items())
    line += " | " + ", ".join(f"{base}/{k} {medians[base] / v:.2f}x" for k, v in medians.items() if k != base)
    print("\n" + line)
    return line
