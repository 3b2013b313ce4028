#!/usr/bin/env python
"""Adversarial probe of spectral_ext's public API (issue 27).

Generates a few hundred cases (functions of spectral_ext.__all__ x bad-argument
kinds: wrong dtypes and types, empty / one-element / non-finite / extreme /
non-contiguous / expanded / meta tensors, out-of-range numbers, small models of
many layer kinds), runs them in 2 long-lived spawn workers with a per-case
timeout, and classifies each one:

  ok                  a valid input answered (checked against an independent
                      reference where cheap; inputs and models unchanged)
  clear error         TypeError / ValueError / KeyError / NotImplementedError /
                      FileNotFoundError naming the argument or what was expected
  unclear error       any other exception, or a message naming neither
  silent wrong answer NaN/inf from finite inputs without a warning, a result
                      that disagrees with the reference, a changed input, an
                      invalid argument accepted
  hang                no answer within the case's timeout (the worker is killed)
  crash               the worker died

    python scripts/probe.py [--out /tmp/probe.json] [--workers 2] [--timeout 60]
                            [--only SUBSTRING] [--list]

Prints the counts per class and writes every non-ok, non-clear-error case to --out.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import os
import sys
import time
import traceback
import warnings
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CLASSES = ("ok", "clear error", "unclear error", "silent wrong answer", "hang", "crash")
CLEAR_TYPES = ("TypeError", "ValueError", "KeyError", "NotImplementedError", "FileNotFoundError")
# words that say what was expected (besides the argument's own name)
EXPECT_WORDS = ("expected", "expects", "must", "should", "supported", "requires", "required", "needs",
                "accepts", "takes", "only")

# --------------------------------------------------------------------------------------------------
# cases


class Case:
    """make() -> (callable, args, kwargs), run in the worker. expect: "valid" (a good input),
    "invalid" (must be refused), "any" (refusing or answering are both fine). check(result, args,
    kwargs) -> None or a discrepancy. names: words a clear message may use for the argument."""

    __slots__ = ("fn", "desc", "make", "expect", "check", "names", "timeout")

    def __init__(self, fn, desc, make, expect="any", check=None, names=(), timeout=None):
        self.fn, self.desc, self.make, self.expect = fn, desc, make, expect
        self.check, self.names, self.timeout = check, tuple(names), timeout


# --------------------------------------------------------------------------------------------------
# snapshot of inputs, finiteness, comparisons (worker side)


def _walk(obj, depth=0):
    """Tensors, numpy arrays and modules reachable from obj (containers only)."""
    import numpy as np
    import torch

    if depth > 4:
        return
    if isinstance(obj, (torch.Tensor, np.ndarray, torch.nn.Module)):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v, depth + 1)


def _clone(obj):
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        if obj.device.type == "meta":
            return ("meta", tuple(obj.shape), obj.dtype, obj.stride())
        return ("t", obj.detach().clone(), obj.requires_grad, obj.stride())
    if isinstance(obj, np.ndarray):
        return ("n", obj.copy())
    mods = {name: (m.training, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for name, m in obj.named_modules()}
    state = {k: v.detach().clone() for k, v in obj.state_dict(keep_vars=True).items()}
    grads = {k: p.requires_grad for k, p in obj.named_parameters()}
    return ("m", mods, state, grads)


def _same_tensor(a, b):
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0))
                    and torch.equal(a.isnan(), b.isnan()))
    return bool(torch.equal(a, b))


def _changed(obj, snap):
    """A description of how obj differs from its snapshot, or None."""
    import numpy as np

    kind = snap[0]
    if kind == "meta":
        return None if (tuple(obj.shape), obj.dtype) == snap[1:3] else "meta tensor's shape/dtype changed"
    if kind == "t":
        if not _same_tensor(obj.detach(), snap[1]):
            return f"tensor {tuple(snap[1].shape)} {snap[1].dtype} changed in place"
        if obj.requires_grad != snap[2]:
            return "tensor's requires_grad changed"
        return None
    if kind == "n":
        same = obj.shape == snap[1].shape and np.array_equal(obj, snap[1], equal_nan=obj.dtype.kind in "fc")
        return None if same else "numpy array changed in place"
    mods, state, grads = snap[1:]
    now = {name: (m.training, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
           for name, m in obj.named_modules()}
    if now != mods:
        diff = [n for n in set(now) | set(mods) if now.get(n) != mods.get(n)]
        return f"model's modules changed (training flag or hooks) at {sorted(diff)[:4]}: " \
               f"{[(mods.get(n), now.get(n)) for n in sorted(diff)[:2]]}"
    cur = obj.state_dict(keep_vars=True)
    if set(cur) != set(state):
        return f"model's state_dict keys changed: {sorted(set(cur) ^ set(state))[:4]}"
    bad = [k for k in state if not _same_tensor(cur[k].detach(), state[k])]
    if bad:
        return f"model's state changed: {bad[:4]}"
    if {k: p.requires_grad for k, p in obj.named_parameters()} != grads:
        return "model's requires_grad flags changed"
    return None


def _nonfinite(obj, depth=0, seen=None):
    """A description of a NaN/inf reachable from a result, or None (a row whose note/status says
    why is excused)."""
    import numpy as np
    import torch

    seen = set() if seen is None else seen
    if depth > 3 or id(obj) in seen:
        return None
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "meta" or not (obj.is_floating_point() or obj.is_complex()):
            return None
        bad = ~torch.isfinite(obj.detach())
        return f"{int(bad.sum())} non-finite of {obj.numel()} in a tensor {tuple(obj.shape)}" if bad.any() else None
    if isinstance(obj, (float, np.floating)):
        return None if math.isfinite(obj) else f"float {obj}"
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "fc" and not np.isfinite(obj).all():
            return f"non-finite in a numpy array {obj.shape}"
        return None
    if isinstance(obj, torch.nn.Module) or isinstance(obj, (str, bytes, int, bool)) or obj is None:
        return None
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover
        pd = None
    if pd is not None and isinstance(obj, pd.DataFrame):
        num = obj.select_dtypes(include=[np.number])
        if num.empty:
            return None
        bad_rows = ~np.isfinite(num.to_numpy(dtype=float)).all(axis=1)
        if not bad_rows.any():
            return None
        words = [c for c in obj.columns if c in ("note", "status", "reason", "error")]
        for i in np.flatnonzero(bad_rows):
            row = obj.iloc[i]
            if not any(isinstance(row[c], str) and row[c].strip() and row[c] not in ("ok", "success")
                       for c in words):
                cols = [c for c in num.columns if not np.isfinite(float(row[c]))]
                return f"DataFrame row {i} non-finite in {cols} without a note"
        return None
    if isinstance(obj, dict):
        for v in obj.values():
            d = _nonfinite(v, depth + 1, seen)
            if d:
                return d
        return None
    if isinstance(obj, (list, tuple)):
        for v in obj[:50]:
            d = _nonfinite(v, depth + 1, seen)
            if d:
                return d
        return None
    status = getattr(obj, "status", None)
    if isinstance(status, str) and status not in ("ok", "success"):
        return None
    if type(obj).__module__.startswith("spectral_ext") and hasattr(obj, "__dict__"):
        for k, v in vars(obj).items():
            if k.startswith("_"):
                continue
            d = _nonfinite(v, depth + 1, seen)
            if d:
                return f"{k}: {d}"
    elif type(obj).__module__.startswith("spectral_ext") and hasattr(obj, "__slots__"):
        for k in obj.__slots__:
            d = _nonfinite(getattr(obj, k, None), depth + 1, seen)
            if d:
                return f"{k}: {d}"
    return None


def _all_finite(args):
    import numpy as np
    import torch

    def fin(v, depth=0):
        if depth > 4:
            return True
        if isinstance(v, torch.Tensor):
            if v.device.type == "meta" or not (v.is_floating_point() or v.is_complex()):
                return True
            return bool(torch.isfinite(v).all())
        if isinstance(v, np.ndarray):
            return v.dtype.kind not in "fc" or bool(np.isfinite(v).all())
        if isinstance(v, float):
            return math.isfinite(v)
        if isinstance(v, torch.nn.Module):
            return all(bool(torch.isfinite(p).all()) for p in v.state_dict().values() if p.is_floating_point())
        if isinstance(v, (list, tuple)):
            return all(fin(x, depth + 1) for x in v)
        if isinstance(v, dict):
            return all(fin(x, depth + 1) for x in v.values())
        return True

    return fin(args)


def _global_state():
    import torch

    import spectral_ext as se
    return (se.current_backend(), torch.get_default_dtype(), torch.is_grad_enabled(),
            torch.are_deterministic_algorithms_enabled())


def _restore_global_state(state):
    import torch

    import spectral_ext as se
    se._ops._backend.set(state[0])
    torch.set_default_dtype(state[1])
    torch.set_grad_enabled(state[2])
    torch.use_deterministic_algorithms(state[3])


def _message_names(msg, names):
    """Whether msg names one of the argument's names or words (at a word start) or says what was expected."""
    import re

    low = msg.lower()
    for n in tuple(names) + EXPECT_WORDS:
        if n and re.search(r"(?<![a-z0-9_])" + re.escape(n.lower()), low):
            return True
    return False


def run_case(case):
    import torch

    t0 = time.time()
    out = {"fn": case.fn, "desc": case.desc, "expect": case.expect}
    torch.manual_seed(zlib.crc32(f"{case.fn}|{case.desc}".encode()))
    try:
        fn, args, kwargs = case.make()
    except Exception as error:  # the probe's own fault
        out.update(cls="probe error", exc=type(error).__name__, msg=str(error)[:300],
                   tb=traceback.format_exc()[-800:])
        return out
    inputs = list(_walk((args, kwargs)))
    snaps = [_clone(x) for x in inputs]
    finite = _all_finite((args, kwargs))
    state = _global_state()
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn(*args, **kwargs)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - classified below
            error = e
    out["warnings"] = [str(w.message)[:160] for w in caught][:3]
    changes = [c for c in (_changed(x, s) for x, s in zip(inputs, snaps)) if c]
    if _global_state() != state:
        changes.append(f"global state changed: {state} -> {_global_state()}")
        _restore_global_state(state)
    out["seconds"] = round(time.time() - t0, 3)
    if error is not None:
        name = type(error).__name__
        msg = str(error)
        clear = (any(t.__name__ in CLEAR_TYPES for t in type(error).__mro__)
                 and _message_names(msg, case.names))
        out.update(cls="clear error" if clear else "unclear error", exc=name, msg=msg[:400])
        if not clear:
            out["tb"] = "".join(traceback.format_exception(type(error), error, error.__traceback__)[-3:])[-600:]
        if case.expect == "valid":
            out["refused_valid"] = True
        if changes:
            out.update(cls="silent wrong answer", discrepancy="; ".join(changes) + f" (and raised {name})")
        return out
    if changes:
        out.update(cls="silent wrong answer", discrepancy="; ".join(changes))
        return out
    if case.expect == "invalid":
        out.update(cls="silent wrong answer", discrepancy=f"invalid input accepted, returned {_short(result)}")
        return out
    if case.check is not None:
        try:
            problem = case.check(result, args, kwargs)
        except Exception as e:  # noqa: BLE001
            problem = None
            out["unverified"] = f"check raised {type(e).__name__}: {str(e)[:200]}"
        if problem:
            out.update(cls="silent wrong answer", discrepancy=str(problem)[:600])
            return out
    bad = _nonfinite(result)
    if bad and finite and not out["warnings"]:
        out.update(cls="silent wrong answer", discrepancy=f"non-finite result from finite inputs: {bad}")
        return out
    out["cls"] = "ok"
    return out


def _short(result):
    import torch

    if isinstance(result, torch.Tensor):
        if result.device.type == "meta" or result.numel() > 6:
            return f"tensor{tuple(result.shape)} {result.dtype} on {result.device.type}"
        return repr(result)[:160]
    return repr(result)[:160]


# --------------------------------------------------------------------------------------------------
# workers (spawn) and the dispatcher


def worker_main(conn, log_path):
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.setdefault("MPLBACKEND", "Agg")
    import torch

    torch.set_num_threads(1)
    import spectral_ext  # noqa: F401

    cases = build_cases()
    conn.send("ready")
    while True:
        if not conn.poll(900):  # the parent went away
            return
        index = conn.recv()
        if index is None:
            return
        try:
            result = run_case(cases[index])
        except BaseException as e:  # noqa: BLE001
            result = {"fn": cases[index].fn, "desc": cases[index].desc, "cls": "probe error",
                      "exc": type(e).__name__, "msg": str(e)[:300]}
        print(f"[{index}] {result.get('cls')} {result.get('seconds')}s {cases[index].fn}: {cases[index].desc}",
              flush=True)
        try:
            conn.send(result)
        except Exception as e:  # noqa: BLE001 - an unpicklable detail
            conn.send({"fn": cases[index].fn, "desc": cases[index].desc, "cls": result.get("cls"),
                       "msg": f"(result not sendable: {e})"})


class Slot:
    def __init__(self, ctx, number, log_dir):
        import multiprocessing as mp  # noqa: F401

        self.ctx, self.number, self.log_dir = ctx, number, log_dir
        self.starts = 0
        self.start()

    def start(self):
        parent, child = self.ctx.Pipe()
        self.starts += 1
        log = os.path.join(self.log_dir, f"probe_worker{self.number}.log")
        self.proc = self.ctx.Process(target=worker_main, args=(child, log), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        self.case = None
        self.since = None
        if not self.conn.poll(180):
            raise RuntimeError(f"worker {self.number} did not start within 180 s (see {log})")
        if self.conn.recv() != "ready":
            raise RuntimeError(f"worker {self.number} sent no ready message")

    def kill(self):
        try:
            self.proc.kill()
        except Exception:  # noqa: BLE001
            pass
        self.proc.join(10)
        self.conn.close()

    def stop(self):
        try:
            self.conn.send(None)
        except Exception:  # noqa: BLE001
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.kill()


def run_all(cases, indices, n_workers, timeout, deadline, log_dir, verbose=False):
    import multiprocessing as mp
    from multiprocessing.connection import wait as mp_wait

    ctx = mp.get_context("spawn")
    pending = collections.deque(indices)
    results = {}
    slots = [Slot(ctx, i, log_dir) for i in range(min(n_workers, len(indices)) or 1)]
    t_start = time.time()
    while pending or any(s.case is not None for s in slots):
        for s in slots:
            if s.case is None and pending and time.time() - t_start < deadline:
                s.case = pending.popleft()
                s.since = time.time()
                try:
                    s.conn.send(s.case)
                except (BrokenPipeError, OSError):
                    results[s.case] = _dead(cases[s.case], s, "worker gone before the case was sent")
                    s.case = None
                    s.start()
        busy = [s for s in slots if s.case is not None]
        if not busy:
            break
        ready = mp_wait([s.conn for s in busy] + [s.proc.sentinel for s in busy], timeout=1.0)
        for s in busy:
            got = None
            if s.conn in ready or s.proc.sentinel in ready:
                try:
                    if s.conn.poll(0.5):
                        got = s.conn.recv()
                except (EOFError, OSError):
                    got = None
                if got is None and not s.proc.is_alive():
                    results[s.case] = _dead(cases[s.case], s, f"worker died (exit code {s.proc.exitcode})")
                    s.kill()
                    s.start()
                    continue
            if got is not None:
                results[s.case] = got
                if verbose:
                    print(f"  [{s.case}] {got.get('cls')}: {got['fn']}: {got['desc']}", flush=True)
                s.case = None
                continue
            limit = cases[s.case].timeout or timeout
            if time.time() - s.since > limit:
                results[s.case] = {"fn": cases[s.case].fn, "desc": cases[s.case].desc, "cls": "hang",
                                   "msg": f"no answer within {limit} s; worker killed",
                                   "expect": cases[s.case].expect}
                s.kill()
                s.start()
        if time.time() - t_start > deadline and pending:
            for i in pending:
                results[i] = {"fn": cases[i].fn, "desc": cases[i].desc, "cls": "not run",
                              "msg": "the probe's deadline passed"}
            pending.clear()
    for s in slots:
        s.stop()
    return results


def _dead(case, slot, why):
    return {"fn": case.fn, "desc": case.desc, "cls": "crash", "msg": why, "expect": case.expect}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/probe.json")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    parser.add_argument("--deadline", type=float, default=450.0, help="no new case after this many seconds")
    parser.add_argument("--only", default=None, help="run the cases whose function or description has this")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--selftest", action="store_true", help="add a hanging and a crashing case")
    args = parser.parse_args(argv)
    if args.selftest:
        os.environ["PROBE_SELFTEST"] = "1"  # the spawned workers build the same list
    cases = build_cases()
    indices = [i for i, c in enumerate(cases)
               if args.only is None or args.only in c.fn or args.only in c.desc]
    if args.list:
        for i in indices:
            print(i, cases[i].fn, "|", cases[i].desc, "|", cases[i].expect)
        print(len(indices), "cases")
        return 0
    t0 = time.time()
    log_dir = os.path.dirname(os.path.abspath(args.out)) or "."
    results = run_all(cases, indices, args.workers, args.timeout, args.deadline, log_dir, args.verbose)
    rows = [results[i] for i in indices]
    counts = collections.Counter(r["cls"] for r in rows)
    print(f"{len(rows)} cases in {time.time() - t0:.0f} s over {args.workers} workers")
    for cls in CLASSES + tuple(sorted(set(counts) - set(CLASSES))):
        print(f"  {cls:20s} {counts.get(cls, 0)}")
    refused = [r for r in rows if r.get("refused_valid") and r["cls"] == "clear error"]
    unverified = [r for r in rows if r.get("unverified") and r["cls"] == "ok"]
    print(f"  (valid inputs refused with a clear error: {len(refused)}; answers not verified: {len(unverified)})")
    keep = ("fn", "desc", "cls", "expect", "exc", "msg", "discrepancy", "warnings", "tb")
    bad = [{k: r[k] for k in keep if r.get(k) not in (None, [], "")}
           for r in rows if r["cls"] not in ("ok", "clear error")]
    with open(args.out, "w") as f:
        json.dump(bad, f, indent=1, default=str)
    side = os.path.splitext(args.out)[0] + "_notes.json"
    with open(side, "w") as f:
        json.dump({"refused_valid": refused, "unverified": unverified}, f, indent=1, default=str)
    print(f"wrote {len(bad)} cases to {args.out} (refused valid inputs and unverified answers: {side})")
    return 0



# --------------------------------------------------------------------------------------------------
# helpers for the cases (run in the workers; torch and spectral_ext imported lazily)

import torch  # noqa: E402  (the models below subclass nn.Module)

nn = torch.nn


def _se():
    import spectral_ext
    return spectral_ext


def _as64(v):
    """A float64 (complex128) CPU tensor of an argument's values."""
    import numpy as np

    if isinstance(v, torch.Tensor):
        if v.device.type == "meta":
            raise TypeError("meta")
        return v.detach().cpu().to(torch.complex128 if v.is_complex() else torch.float64)
    a = np.asarray(v)
    return torch.from_numpy(a.astype(np.complex128 if a.dtype.kind == "c" else np.float64))


def _unit(t):
    """t / c, c: a power of two bringing t's largest finite magnitude near 1."""
    fin = t.abs()[torch.isfinite(t.abs())] if t.numel() else t.abs()
    m = float(fin.max()) if fin.numel() else 0.0
    if m == 0.0:
        return t, 1.0
    c = 2.0 ** round(math.log2(m))
    return t / c, c


def _rtol_of(values):
    rt = 1e-9
    for v in values:
        if isinstance(v, torch.Tensor):
            dt = v.dtype
        else:
            import numpy as np
            dt = {np.dtype("float64"): torch.float64}.get(getattr(v, "dtype", None), torch.float32)
        if dt in (torch.float16, torch.bfloat16):
            return 3e-2
        if dt != torch.float64:
            rt = 2e-4
    return rt


def _to_np(v):
    import numpy as np

    if isinstance(v, torch.Tensor):
        return v.detach().cpu().to(torch.complex128 if v.is_complex() else torch.float64).numpy()
    return np.asarray(v, dtype=float)


def _close(res, exp, rtol, what="result"):
    """None when res matches exp (same shape; the same non-finite entries; within rtol of exp's
    largest finite magnitude), else a description."""
    import numpy as np

    r, e = _to_np(res), _to_np(exp)
    if r.shape != e.shape:
        return f"{what} has shape {r.shape}, reference {e.shape}"
    if r.size == 0:
        return None
    fr, fe = np.isfinite(r), np.isfinite(e)
    if not np.array_equal(fr, fe) or not np.array_equal(r[~fr], e[~fe], equal_nan=True):
        return f"{what}: non-finite entries differ ({int((~fr).sum())} vs reference {int((~fe).sum())}); " \
               f"got {r.ravel()[:4]}, reference {e.ravel()[:4]}"
    scale = float(np.abs(e[fe]).max()) if fe.any() else 0.0
    err = float(np.abs(r[fr] - e[fe]).max()) if fr.any() else 0.0
    if err > rtol * scale + 1e-300 * (scale == 0):
        i = int(np.argmax(np.abs(r - e) * fr))
        return f"{what} differs from the reference by {err:.3g} (scale {scale:.3g}, rtol {rtol:g}): " \
               f"got {r.ravel()[i]!r}, expected {e.ravel()[i]!r}"
    return None


def _tensors(obj, depth=0):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth < 3 and isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v, depth + 1)]
    if depth < 3 and isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v, depth + 1)]
    return []


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# references of the tensor functions: (values {arg: float64 tensor}, kwargs) -> expected

def _ref_conv_adjacency(v, kw):
    from spectral_ext import reference as R
    U, V = v["U"], v["V"]
    return R.conv_adjacency(U[None], V[None])[0] if U.dim() == 2 else R.conv_adjacency(U, V)


def _ref_sinkhorn(v, kw):
    from spectral_ext import reference as R
    if set(kw) - {"iters"} or kw.get("iters", 16) is True:
        raise NotImplementedError("reference only for the paper's form")
    P, it = v["P"], kw.get("iters", 16)
    return R.sinkhorn(_unit(P)[0] if it > 0 else P, it)


def _ref_max_kernel_gram(v, kw):
    from spectral_ext import reference as R
    return R.max_kernel_gram(v["X"], v.get("Y"))


def _ref_signal_projection(v, kw):
    from spectral_ext import reference as R
    x = v["x"]
    out = R.signal_projection(x[None] if x.dim() == 3 else x, v["V"], v["s"],
                              stride=_pair(kw.get("stride", 1)), padding=_pair(kw.get("padding", 0)),
                              dilation=_pair(kw.get("dilation", 1)), reduce=kw.get("reduce"),
                              kernel_size=kw.get("kernel_size"))
    return out[0] if x.dim() == 3 else out


def _svdvals64(W):
    import numpy as np
    W = W.numpy()
    if W.shape[-1] == 0 or W.shape[-2] == 0:
        return np.zeros(W.shape[:-2] + (0,))
    return np.linalg.svd(W, compute_uv=False)


def _ref_numerical_rank(v, kw):
    import numpy as np
    W, _ = _unit(v["W"])
    s = _svdvals64(W)
    k = s.shape[-1]
    if k == 0:
        return torch.zeros(W.shape[:-2], dtype=torch.float64)
    eps = kw.get("eps")
    eps = float(np.finfo(np.float32).eps) * k if eps is None else eps
    return torch.from_numpy(np.asarray((s > eps * s[..., :1]).sum(-1), dtype=np.float64))


def _ref_stable_rank(v, kw):
    import numpy as np
    W, _ = _unit(v["W"])
    s = _svdvals64(W)
    if s.shape[-1] == 0:
        return torch.zeros(W.shape[:-2], dtype=torch.float64)
    top = s[..., :1]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(top[..., 0] > 0, ((s / np.where(top > 0, top, 1)) ** 2).sum(-1), 0.0)
    return torch.from_numpy(np.asarray(r, dtype=np.float64))


def _hsic(K, L, unbiased):
    import numpy as np
    n = K.shape[0]
    if not unbiased:
        H = np.eye(n) - 1.0 / n
        return np.trace(K @ H @ L @ H) / (n - 1) ** 2
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    one = np.ones(n)
    return (np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ K @ L @ one)) / (n * (n - 3))


def _ref_cka(v, kw):
    import numpy as np
    if kw.get("kernel", "linear") != "linear" or kw.get("batch_size") or kw.get("feature_axis") is not None:
        raise NotImplementedError("reference only for the plain linear kernel")
    X, Y = _unit(v["X"])[0].numpy(), _unit(v["Y"])[0].numpy()
    X, Y = X.reshape(X.shape[0], -1), Y.reshape(Y.shape[0], -1)
    ub = kw.get("unbiased", True)
    K, L = X @ X.T, Y @ Y.T
    return torch.tensor(_hsic(K, L, ub) / math.sqrt(_hsic(K, K, ub) * _hsic(L, L, ub)), dtype=torch.float64)


def _procrustes_delta(X, Y, group, centered):
    import numpy as np
    X, Y = X.reshape(X.shape[0], -1), Y.reshape(Y.shape[0], -1)
    if centered:
        X, Y = X - X.mean(0), Y - Y.mean(0)
    if group == "orthogonal":
        X, Y = X / np.linalg.norm(X), Y / np.linalg.norm(Y)
        nuc = np.linalg.svd(X.T @ Y, compute_uv=False).sum()
        return math.sqrt(max(2.0 - 2.0 * nuc, 0.0)), 2.0
    from scipy.optimize import linear_sum_assignment
    X, Y = X / np.linalg.norm(X, axis=0), Y / np.linalg.norm(Y, axis=0)
    C = X.T @ Y
    r, c = linear_sum_assignment(C, maximize=True)
    d = X.shape[1]
    return math.sqrt(max(2.0 * d - 2.0 * C[r, c].sum(), 0.0)), 2.0 * math.sqrt(d)


def _ref_procrustes(v, kw):
    if kw.get("feature_axis") is not None:
        raise NotImplementedError("feature_axis")
    d, top = _procrustes_delta(_unit(v["X"])[0].numpy(), _unit(v["Y"])[0].numpy(), kw.get("group", "orthogonal"),
                               kw.get("centered", False))
    return torch.tensor(1.0 - d / top, dtype=torch.float64)


def _ref_procrustes_distance(v, kw):
    d, _ = _procrustes_delta(_unit(v["X"])[0].numpy(), _unit(v["Y"])[0].numpy(), kw.get("group", "orthogonal"),
                             kw.get("centered", False))
    return torch.tensor(d, dtype=torch.float64)


def _ref_weight_singular_values(v, kw):
    import numpy as np
    if kw.get("convention", "seed001") != "seed001":
        raise NotImplementedError("convention")
    W, c = _unit(v["weights"])
    W1 = W.reshape(W.shape[0], W.shape[1], -1)
    s = _svdvals64(W1) * c
    return torch.from_numpy(np.ascontiguousarray(s[:, None, :]))


def _check_align(res, args, kwargs):
    import numpy as np
    names = ("cross_cov", "cov_a", "cov_b")
    v = {k: _as64(x) for k, x in zip(names, args) if x is not None}
    if any(t.is_complex() for t in v.values()):
        return f"complex input answered: {_short(res)}"
    C, c = _unit(v["cross_cov"])
    C = C.numpy()
    A, r2 = res if isinstance(res, tuple) else (res, None)
    A = _to_np(A)
    if A.shape != C.shape:
        return f"A has shape {A.shape}, cross_cov {C.shape}"
    k = min(C.shape)
    S = np.linalg.svd(C, compute_uv=False)
    small = A if A.shape[0] >= A.shape[1] else A.T
    rt = max(_rtol_of(args), 1e-9)
    if np.abs(small.T @ small - np.eye(small.shape[1])).max() > 1e3 * rt:
        return f"A is not orthogonal: |A^T A - I| = {np.abs(small.T @ small - np.eye(small.shape[1])).max():.3g}"
    if abs(np.trace(A.T @ C) - S.sum()) > 1e3 * rt * S.sum() + 1e-300:
        return f"A is not optimal: tr(A^T C) = {np.trace(A.T @ C)!r}, the nuclear norm is {S.sum()!r} (k={k})"
    if "cov_a" in v and r2 is not None:
        want = S.sum() * c / (math.sqrt(float(v["cov_a"].trace())) * math.sqrt(float(v["cov_b"].trace())))
        return _close(np.array(r2, dtype=float), np.array(want), 1e3 * rt, "r2")
    return None


def _check_lsa(res, args, kwargs, v=None):
    import numpy as np
    from scipy.optimize import linear_sum_assignment
    cost = _to_np(args[0] if v is None else v["cost"])
    maximize = kwargs.get("maximize", False)
    rows, cols = (_to_np(x).astype(np.int64) for x in res)
    if cost.ndim == 2:
        cost, rows, cols = cost[None], rows[None], cols[None]
    for b in range(cost.shape[0]):
        r0, c0 = linear_sum_assignment(cost[b], maximize=maximize)
        want, k = cost[b][r0, c0].sum(), min(cost[b].shape)
        if rows[b].shape != (k,) or len(set(rows[b])) != k or len(set(cols[b])) != k:
            return f"problem {b}: not an assignment of size {k}: rows {rows[b]}, cols {cols[b]}"
        if not (np.diff(rows[b]) > 0).all():
            return f"problem {b}: rows not sorted: {rows[b]}"
        got = cost[b][rows[b], cols[b]].sum()
        if not (got == want or abs(got - want) <= 1e-9 * abs(want)):
            return f"problem {b}: total cost {got!r}, scipy's optimum {want!r}"
    return None


def _fit_field(fit, k):
    return getattr(fit, k) if hasattr(fit, k) else fit[k]


def _check_fit_consistent(fit, x, given_xmin=None, what="fit"):
    import numpy as np
    status = _fit_field(fit, "status")
    alpha, xmin, n_tail = _fit_field(fit, "alpha"), _fit_field(fit, "xmin"), _fit_field(fit, "n_tail")
    if not (isinstance(alpha, float) and math.isfinite(alpha)):
        return None if status not in ("success", "ok") else f"{what}: alpha {alpha} with status {status!r}"
    x = x[np.isfinite(x)]
    if given_xmin is not None and xmin != given_xmin:
        return f"{what}: xmin {xmin!r}, given {given_xmin!r}"
    tail = x[x >= xmin]
    want = 1.0 + tail.size / np.log(tail / xmin).sum()
    if tail.size != n_tail:
        return f"{what}: n_tail {n_tail}, but {tail.size} values >= xmin {xmin!r}"
    if not abs(alpha - want) <= 1e-6 * abs(want):
        return f"{what}: alpha {alpha!r}, the MLE at its own xmin {xmin!r} is {want!r}"
    return None


def _check_fit_power_law(res, args, kwargs):
    x = _to_np(args[0]).ravel()
    if x.dtype.kind == "c":
        return "complex eigenvalues answered (imaginary parts dropped?)"
    bad = _check_fit_consistent(res, x, kwargs.get("xmin"))
    if bad or kwargs.get("xmin") is not None:
        return bad
    xs, c = _unit(torch.from_numpy(x.copy()))
    if c != 1.0 and xs.numel():
        base = _se().fit_power_law(xs, **kwargs)
        a0, a1 = _fit_field(base, "alpha"), _fit_field(res, "alpha")
        if not (a0 == a1 or (math.isnan(a0) and math.isnan(a1)) or abs(a0 - a1) <= 1e-9 * abs(a0)):
            return f"not scale invariant: alpha {a1!r} at this scale, {a0!r} for the values / {c:g}"
    return None


def _check_fit_power_laws(res, args, kwargs):
    import numpy as np
    res = res.to_frame()  # a PowerLawFits
    x = _to_np(args[0])
    if x.dtype.kind == "c":
        return "complex eigenvalues answered (imaginary parts dropped?)"
    x = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    if len(res) != x.shape[0]:
        return f"{len(res)} rows for {x.shape[0]} spectra"
    for i in range(x.shape[0]):
        one = _se().fit_power_law(torch.from_numpy(x[i].copy()), **kwargs)
        a0, a1 = _fit_field(one, "alpha"), float(res["alpha"].iloc[i])
        if not (a0 == a1 or (math.isnan(a0) and math.isnan(a1)) or abs(a0 - a1) <= 1e-9 * abs(a0)):
            return f"row {i}: alpha {a1!r}, fit_power_law of that row gives {a0!r}"
    return None


def _check_sobel(res, args, kwargs):
    import numpy as np
    r = _to_np(res)
    fin = r[np.isfinite(r)]
    if fin.size and (np.abs(fin) > 1 + 1e-5).any():
        return f"a cosine similarity outside [-1, 1]: {r.ravel()[:6]}"
    return None


def _check_stitching_penalty(res, args, kwargs):
    want = (float(args[0]) + float(args[1])) / 2 - float(args[2])
    return None if abs(float(res) - want) <= 1e-12 else f"{res!r}, expected {want!r}"


# --------------------------------------------------------------------------------------------------
# the tensor functions: valid base inputs, references, and the bad-argument kinds


def _spd(n):
    A = torch.randn(n, n, dtype=torch.float64)
    return A @ A.T + n * torch.eye(n, dtype=torch.float64)


def _lowrank_int():
    A = torch.randint(-3, 4, (6, 3)).float()
    B = torch.randint(-3, 4, (3, 5)).float()
    return A @ B  # integer entries, rank 3 (exact in float32)


def _pareto(n=60, rows=None):
    shape = (n,) if rows is None else (rows, n)
    return (1 - torch.rand(shape, dtype=torch.float64)) ** (-1 / 1.5)


def _cka_pair():
    X = torch.randn(10, 4)
    return X, X @ torch.randn(4, 3) + 0.5 * torch.randn(10, 3)


def _specs():
    """name -> (callable getter, ordered tensor args {name: maker}, kwargs maker, reference or check,
    primary args, names for messages)."""
    se = _se
    specs = {
        "conv_adjacency": dict(fn=lambda: se().conv_adjacency,
                               args=lambda: {"U": torch.randn(4, 3), "V": torch.randn(4, 2, 5)},
                               ref=_ref_conv_adjacency, primary=("U", "V")),
        "sinkhorn": dict(fn=lambda: se().sinkhorn, args=lambda: {"P": torch.rand(5, 4) + 0.1},
                         ref=_ref_sinkhorn, primary=("P",)),
        "max_kernel_gram": dict(fn=lambda: se().max_kernel_gram,
                                args=lambda: {"X": torch.randn(4, 3, 2), "Y": torch.randn(5, 3, 2)},
                                ref=_ref_max_kernel_gram, primary=("X",)),
        "signal_projection": dict(fn=lambda: se().signal_projection,
                                  args=lambda: {"x": torch.randn(2, 3, 6, 6), "V": torch.randn(27, 4),
                                                "s": torch.rand(4) + 0.5},
                                  ref=_ref_signal_projection, primary=("x",)),
        "linear_sum_assignment": dict(fn=lambda: se().linear_sum_assignment, args=lambda: {"cost": torch.rand(5, 5)},
                                      check=_check_lsa, primary=("cost",)),
        "numerical_rank": dict(fn=lambda: se().numerical_rank, args=lambda: {"W": _lowrank_int()},
                               ref=_ref_numerical_rank, primary=("W",), complex_ok=True, exact=True),
        "stable_rank": dict(fn=lambda: se().rank.stable_rank, args=lambda: {"W": _lowrank_int()},
                            ref=_ref_stable_rank, primary=("W",), complex_ok=True),
        "cka": dict(fn=lambda: se().cka, args=lambda: dict(zip("XY", _cka_pair())), ref=_ref_cka, primary=("X",),
                    words=("representation",)),
        "procrustes": dict(fn=lambda: se().procrustes,
                           args=lambda: {"X": torch.randn(10, 4), "Y": torch.randn(10, 4)},
                           ref=_ref_procrustes, primary=("X",), words=("representation",)),
        "procrustes_distance": dict(fn=lambda: se().procrustes_distance,
                                    args=lambda: {"X": torch.randn(10, 4), "Y": torch.randn(10, 4)},
                                    ref=_ref_procrustes_distance, primary=("X",), words=("representation",)),
        "fit_power_law": dict(fn=lambda: se().spectra.fit_power_law, args=lambda: {"eigenvalues": _pareto()},
                              check=_check_fit_power_law, primary=("eigenvalues",)),
        "fit_power_laws": dict(fn=lambda: se().fit_power_laws, args=lambda: {"eigenvalues": _pareto(40, 3)},
                               check=_check_fit_power_laws, primary=("eigenvalues",)),
        "weight_singular_values": dict(fn=lambda: se().weight_singular_values,
                                       args=lambda: {"weights": torch.randn(2, 4, 3, 2, 2)},
                                       ref=_ref_weight_singular_values, primary=("weights",)),
        "align": dict(fn=lambda: se().align,
                      args=lambda: {"cross_cov": torch.randn(4, 3, dtype=torch.float64), "cov_a": _spd(4),
                                    "cov_b": _spd(3)},
                      check=_check_align, primary=("cross_cov",)),
        "hypergraph": dict(fn=lambda: se().hypergraph,
                           args=lambda: {"vectors": torch.randn(12, 5), "labels": torch.arange(12) % 3},
                           primary=("vectors",)),
        "sobel_similarity": dict(fn=lambda: se().sobel_similarity,
                                 args=lambda: {"spectral_images": torch.randn(2, 3, 4, 4),
                                               "images": torch.rand(2, 3, 8, 8)},
                                 check=_check_sobel, primary=("spectral_images",)),
    }
    return specs


MUTATIONS = ("int64", "bool", "complex", "float16", "list", "str", "None", "numpy", "empty", "one-element",
             "NaN", "inf", "1e300", "1e-300", "transposed", "expanded", "meta")
REDUCED = ("int64", "complex", "list", "str", "numpy", "empty", "NaN", "1e300", "meta")
SECONDARY = ("str", "meta")
FULL_ARGS = {"conv_adjacency": ("U",), "sinkhorn": ("P",), "signal_projection": ("x",),
             "linear_sum_assignment": ("cost",), "numerical_rank": ("W",), "cka": ("X",),
             "fit_power_law": ("eigenvalues",)}
FLOAT_ONLY = ("NaN", "inf", "1e300", "1e-300", "complex", "float16")
EXPECT = {"str": "invalid", "None": "invalid", "1e300": "valid", "1e-300": "valid", "transposed": "valid"}


def _mutate(kind, values, name):
    v = dict(values)
    t = v[name]
    if kind == "int64":
        v[name] = t.long() if torch.equal(t, t.round()) else (t * 4).round().long()
    elif kind == "bool":
        v[name] = t > t.median()
    elif kind == "complex":
        tf = t.float() if t.dtype != torch.float64 else t
        v[name] = torch.complex(tf, 0.25 * torch.randn_like(tf))
    elif kind == "float16":
        v[name] = t.half()
    elif kind == "list":
        v[name] = t.tolist()
    elif kind == "str":
        v[name] = "abc"
    elif kind == "None":
        v[name] = None
    elif kind == "numpy":
        v[name] = t.numpy()
    elif kind == "empty":
        v[name] = t.narrow(0, 0, 0)
    elif kind == "one-element":
        v[name] = t.reshape(-1)[:1].reshape([1] * t.dim()).clone()
    elif kind in ("NaN", "inf"):
        c = t.clone()
        c.view(-1)[0] = float("nan") if kind == "NaN" else float("inf")
        v[name] = c
    elif kind in ("1e300", "1e-300"):
        v = {k: x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for k, x in v.items()}
        v[name] = v[name] * float(kind)
    elif kind == "transposed":
        v[name] = (t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2
                   else torch.stack([t, t], -1)[..., 0])
        assert not v[name].is_contiguous()
    elif kind == "expanded":
        v[name] = t.narrow(0, 0, 1).expand_as(t)
    elif kind == "meta":
        v[name] = t.to("meta")
    return v


def _spec_check(spec, fname, kind, base_values, kwargs_maker):
    """The check of an answered case: the reference on the values actually passed (meta: the
    shapes of the real answer)."""
    ref, check = spec.get("ref"), spec.get("check")

    def check_fn(result, args, kwargs):
        names = list(base_values_keys(spec))
        values = dict(zip(names, args))
        if kind == "meta":
            real_args = [base_values[n] for n in names]
            real = spec["fn"]()(*real_args, **kwargs)
            got, want = _tensors(result), _tensors(real)
            if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in want] or \
                    [t.dtype for t in got] != [t.dtype for t in want] or not got:
                return f"meta input gave {_short(result)}; the real input gives {_short(real)}"
            return None
        if any(isinstance(x, torch.Tensor) and x.is_complex() for x in args) and not spec.get("complex_ok"):
            return f"complex input answered: {_short(result)} (imaginary parts dropped?)"
        if check is not None:
            return check(result, args, kwargs)
        if ref is None:
            return None
        v64 = {k: _as64(x) for k, x in values.items() if x is not None}
        want = ref(v64, kwargs)
        rt = 0 if spec.get("exact") else _rtol_of([x for x in args if x is not None])
        if isinstance(want, tuple):
            got = result if isinstance(result, tuple) else (result,)
            for i, (g, w) in enumerate(zip(got, want)):
                if g is None:
                    return f"output {i} is None"
                bad = _close(g, w, rt, f"output {i}")
                if bad:
                    return bad
            return None
        return _close(result, want, rt)

    return check_fn


def base_values_keys(spec):
    return spec["_keys"]


def _tensor_cases(cases):
    specs = _specs()
    for fname, spec in specs.items():
        torch.manual_seed(0)
        spec["_keys"] = tuple(spec["args"]().keys())
        names_all = spec["_keys"]

        def make_valid(spec=spec):
            v = spec["args"]()
            return spec["fn"](), tuple(v.values()), {}
        cases.append(Case(fname, "valid base input", make_valid, "valid",
                          _spec_check(spec, fname, "valid", None, None)))
        for arg in names_all:
            kinds = (MUTATIONS if arg in FULL_ARGS.get(fname, ()) else REDUCED if arg in spec["primary"]
                     else SECONDARY)
            for kind in kinds:
                if kind in FLOAT_ONLY and not spec["args"]()[arg].is_floating_point():
                    continue
                def make(spec=spec, arg=arg, kind=kind):
                    base = spec["args"]()
                    v = _mutate(kind, base, arg)
                    fn = spec["fn"]()
                    case_check_base[0] = base
                    return fn, tuple(v[k] for k in spec["_keys"]), {}
                expect = EXPECT.get(kind, "any")
                cases.append(Case(fname, f"{arg}: {kind}", make, expect,
                                  _lazy_check(spec, fname, kind),
                                  names=(arg, "dtype", "tensor", "shape") + spec.get("words", ())))


case_check_base = [None]  # the base values of the case being run (for the meta check)


def _lazy_check(spec, fname, kind):
    def check(result, args, kwargs):
        return _spec_check(spec, fname, kind, case_check_base[0], None)(result, args, kwargs)
    return check


# --------------------------------------------------------------------------------------------------
# out-of-range numbers and option strings of the tensor functions


def _with(fname, **over):
    """make() for the spec's valid base input with keyword overrides (over: name -> value or a
    callable of the base values)."""
    def make():
        spec = _specs()[fname]
        v = spec["args"]()
        kw = {}
        for k, x in over.items():
            x = x(v) if callable(x) and not isinstance(x, type) and getattr(x, "__name__", "") == "<lambda>" else x
            if k in v:
                v[k] = x
            else:
                kw[k] = x
        return spec["fn"](), tuple(v.values()), kw
    return make


def _with_check(fname):
    spec = _specs()[fname]
    spec["_keys"] = tuple(spec["args"]().keys())
    return _spec_check(spec, fname, "numeric", None, None)


NAN, INF = float("nan"), float("inf")

# (function, argument, [(value, expect)])
NUMERIC = [
    ("sinkhorn", "iters", [(-1, "invalid"), (0, "any"), (NAN, "invalid"), (INF, "invalid"), (2.5, "invalid"),
                           (10 ** 13, "invalid"), ("16", "invalid")]),
    ("sinkhorn", "reg", [(-1.0, "invalid"), (NAN, "invalid"), (1e-300, "invalid")]),
    ("sinkhorn", "stop_threshold", [(-1.0, "unchecked"), (NAN, "invalid")]),
    ("sinkhorn", "check_every", [(0, "invalid")]),
    ("sinkhorn", "a", [(lambda v: -torch.ones(5), "invalid"), (lambda v: torch.ones(4), "invalid"),
                       (lambda v: torch.tensor([1.0, NAN, 1, 1, 1]), "invalid")]),
    ("cka", "kernel", [("bogus", "invalid"), (None, "invalid")]),
    ("cka", "bandwidth", [(-1.0, "invalid"), (0.0, "invalid"), (NAN, "invalid")]),
    ("cka", "gamma", [(-1.0, "invalid"), (NAN, "invalid"), (INF, "any")]),
    ("cka", "batch_size", [(0, "invalid"), (2.5, "invalid")]),
    ("cka", "feature_axis", [(5, "invalid"), ("1", "invalid")]),
    ("cka", "Y", [(lambda v: torch.randn(9, 3), "invalid"), (lambda v: v["X"], "valid")]),
    ("cka", "X", [(lambda v: torch.randn(3, 4), "invalid")]),  # with Y (10, 3): N differ
    ("procrustes", "group", [("bogus", "invalid")]),
    ("procrustes", "return_distance", [(True, "invalid")]),
    ("procrustes", "feature_axis", [(5, "invalid")]),
    ("procrustes", "Y", [(lambda v: torch.randn(9, 4), "invalid"), (lambda v: v["X"].clone(), "valid"),
                         (lambda v: torch.zeros(10, 4), "invalid")]),
    ("procrustes_distance", "group", [("bogus", "invalid")]),
    ("numerical_rank", "eps", [(-1.0, "invalid"), (NAN, "invalid"), (INF, "any"), (0.0, "unchecked"), (2.0, "any"),
                               ("1e-3", "invalid")]),
    ("numerical_rank", "W", [(lambda v: torch.randn(5), "invalid"), (lambda v: torch.tensor(3.0), "invalid")]),
    ("stable_rank", "W", [(lambda v: torch.randn(5), "invalid"), (lambda v: torch.zeros(4, 3), "valid")]),
    ("fit_power_law", "xmin", [(-1.0, "invalid"), (0.0, "invalid"), (NAN, "invalid"), (INF, "invalid"),
                               (1e300, "any")]),
    ("fit_power_law", "min_tail", [(-1, "invalid"), (0, "invalid"), (NAN, "invalid"), (2.5, "invalid"),
                                   (10 ** 6, "any")]),
    ("fit_power_law", "convention", [("bogus", "invalid"), (None, "invalid")]),
    ("fit_power_laws", "xmin", [(-1.0, "invalid"), (NAN, "invalid")]),
    ("fit_power_laws", "min_tail", [(0, "invalid"), (-5, "invalid")]),
    ("weight_singular_values", "convention", [("bogus", "invalid"), ("weightwatcher", "valid")]),
    ("weight_singular_values", "weights", [(lambda v: torch.randn(5), "invalid"),
                                           (lambda v: torch.randn(4, 3), "unchecked")]),
    ("signal_projection", "stride", [(0, "invalid"), (-1, "invalid"), ((1, 2), "valid")]),
    ("signal_projection", "padding", [(-1, "invalid")]),
    ("signal_projection", "dilation", [(0, "invalid"), (2, "valid")]),
    ("signal_projection", "reduce", [("bogus", "invalid"), ("mean", "valid")]),
    ("signal_projection", "kernel_size", [(4, "invalid")]),
    ("signal_projection", "V", [(lambda v: torch.randn(26, 4), "invalid")]),
    ("signal_projection", "s", [(lambda v: torch.rand(3), "invalid")]),
    ("conv_adjacency", "V", [(lambda v: torch.randn(3, 2, 5), "invalid"), (lambda v: torch.randn(4, 5), "invalid")]),
    ("conv_adjacency", "U", [(lambda v: torch.randn(2, 4, 3), "invalid")]),
    ("max_kernel_gram", "Y", [(lambda v: torch.randn(5, 2, 2), "invalid"), (None, "valid")]),
    ("max_kernel_gram", "X", [(lambda v: torch.randn(4, 6), "invalid")]),
    ("linear_sum_assignment", "cost", [(lambda v: torch.randn(5), "invalid"),
                                       (lambda v: torch.full((3, 3), INF), "invalid"),
                                       (lambda v: torch.tensor([[1.0, -INF], [2.0, 3.0]]), "invalid"),
                                       (lambda v: torch.tensor([[1.0, INF], [2.0, 3.0]]), "valid"),
                                       (lambda v: torch.rand(3, 4, 6), "valid"),
                                       (lambda v: torch.rand(4, 6).T, "valid"),
                                       (lambda v: torch.zeros(0, 0), "any")]),
    ("linear_sum_assignment", "maximize", [("yes", "invalid"), (True, "valid")]),
    ("align", "cov_a", [(lambda v: -_spd(4), "invalid"), (lambda v: _spd(3), "invalid"),
                        (lambda v: torch.full((4, 4), NAN, dtype=torch.float64), "invalid")]),
    ("align", "cross_cov", [(lambda v: torch.zeros(4, 3, dtype=torch.float64), "any")]),
    ("hypergraph", "q", [(1.5, "invalid"), (NAN, "invalid")]),
    ("hypergraph", "p", [(101.0, "invalid"), (NAN, "invalid"), (75.0, "valid")]),
    ("hypergraph", "threshold", [(NAN, "invalid")]),
    ("hypergraph", "labels", [(lambda v: torch.arange(11) % 3, "invalid"), (lambda v: torch.rand(12), "invalid"),
                              (lambda v: -torch.ones(12, dtype=torch.long), "any")]),
    ("sobel_similarity", "images", [(lambda v: torch.rand(3, 3, 8, 8), "invalid"),
                                    (lambda v: torch.rand(2, 1, 8, 8), "valid"),
                                    (lambda v: torch.zeros(2, 3, 8, 8), "any")]),
]


def _lambda_body(fn):
    """The source text of a one-line lambda's body (its code positions), or 'a tensor'."""
    import inspect
    try:
        lines, _ = inspect.findsource(fn)
        pos = [p for p in fn.__code__.co_positions() if p[0] is not None and p[0] == p[1] and p[2] is not None]
        line = pos[-1][0]
        pos = [p for p in pos if p[0] == line and p[3] > p[2] and "lambda" not in lines[line - 1][p[2]:p[3]]]
        return lines[line - 1][min(p[2] for p in pos):max(p[3] for p in pos)].strip()[:70]
    except Exception:  # noqa: BLE001
        return "a tensor"


def _numeric_cases(cases):
    for fname, arg, values in NUMERIC:
        for value, expect in values:
            label = _lambda_body(value) if callable(value) else repr(value)
            extra = ({"kernel": "rbf" if arg == "bandwidth" else "laplace"}
                     if fname == "cka" and arg in ("bandwidth", "gamma") else {})
            cases.append(Case(fname, f"{arg}={label}" + (f" (kernel={extra['kernel']!r})" if extra else ""),
                              _with(fname, **{arg: value}, **extra), expect,
                              _with_check(fname) if expect not in ("invalid", "unchecked") else None,
                              names=(arg, "dtype", "shape")))


# --------------------------------------------------------------------------------------------------
# scale invariance and other property cases


def _scale_cases(cases):
    se = _se

    def inv(fname, call, scales, rtol=1e-9, dtype=torch.float64, expect="valid"):
        """call(scale) -> value; the value at each scale must match scale 1."""
        for s in scales:
            def make(call=call, s=s):
                torch.manual_seed(1)
                ref = call(1.0)

                def run():
                    torch.manual_seed(1)
                    return call(s), ref
                return run, (), {}

            def check(res, args, kwargs, s=s):
                got, ref = res
                g, r = _to_np(got), _to_np(ref)
                import numpy as np
                if g.shape != r.shape or not np.allclose(g, r, rtol=rtol, atol=0, equal_nan=False):
                    return f"not scale invariant: at scale {s:g} {g.ravel()[:4]}, at scale 1 {r.ravel()[:4]}"
                return None
            cases.append(Case(fname, f"scale invariance x{s:g} ({dtype})", make, expect, check,
                              names=("scale", "overflow", "underflow")))

    def data(shape, dtype, seed=3):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    X, Y = (lambda: data((12, 4), torch.float64, 3)), (lambda: data((12, 3), torch.float64, 4))
    big = (1e300, 1e-300)
    for kernel in ("linear", "max", "ortho"):
        inv("cka", lambda s, k=kernel: se().cka(X() * s, Y(), kernel=k), big, 1e-6)
    inv("cka", lambda s: se().cka(X() * s, Y() * s, unbiased=False), big, 1e-6)
    for group in ("orthogonal", "grelu"):
        inv("procrustes", lambda s, g=group: se().procrustes(X() * s, data((12, 4), torch.float64, 5), group=g),
            big, 1e-6)
        inv("procrustes_distance", lambda s, g=group: se().procrustes_distance(
            X() * s, data((12, 4), torch.float64, 5) * s, group=g), big, 1e-6)
    W = lambda: _lowrank_int().double()  # noqa: E731
    inv("numerical_rank", lambda s: se().numerical_rank(W() * s), big, 0)
    inv("stable_rank", lambda s: se().rank.stable_rank(W() * s), big, 1e-9)
    inv("numerical_rank", lambda s: se().numerical_rank(_lowrank_int() * s), (1e30, 1e-30), 0,
        torch.float32)
    inv("stable_rank", lambda s: se().rank.stable_rank(_lowrank_int() * s), (1e30, 1e-30), 1e-5,
        torch.float32)
    P = lambda: data((5, 4), torch.float64, 6).abs() + 0.1  # noqa: E731
    inv("sinkhorn", lambda s: se().sinkhorn(P() * s), big, 1e-9)
    inv("sinkhorn", lambda s: se().sinkhorn(P().float() * s), (1e30, 1e-30), 1e-5, torch.float32)
    inv("sinkhorn", lambda s: se().sinkhorn(P() * s, a=torch.full((5,), 0.8, dtype=torch.float64),
                                            b=torch.ones(4, dtype=torch.float64)), big, 1e-9)
    inv("fit_power_law", lambda s: torch.tensor(se().fit_power_law(_pareto() * s).alpha, dtype=torch.float64), big, 1e-9)
    inv("fit_power_laws", lambda s: torch.tensor(se().fit_power_laws(_pareto(40, 2) * s).alpha),
        big, 1e-9)
    inv("weight_singular_values", lambda s: se().weight_singular_values(data((2, 4, 3, 2, 2), torch.float64) * s) / s,
        big, 1e-9)
    inv("align", lambda s: se().align(data((4, 3), torch.float64) * s)[0], big, 1e-9)
    inv("linear_sum_assignment", lambda s: torch.stack(se().linear_sum_assignment(P() * s)), big, 0)
    inv("weight_singular_values", lambda s: se().weight_singular_values(
        data((2, 4, 3, 2, 2), torch.float32) * s) / s, (1e30, 1e-30), 1e-6, torch.float32)

    # sinkhorn with an entropic cost against a float64 log-domain reference
    for reg, dtype in ((1.0, torch.float32), (0.01, torch.float32), (1e-3, torch.float64), (0.05, torch.float64)):
        def make(reg=reg, dtype=dtype):
            M = data((5, 4), torch.float64, 7).abs().to(dtype)
            a, b = torch.full((5,), 0.2, dtype=dtype), torch.full((4,), 0.25, dtype=dtype)
            return se().sinkhorn, (M, 50, a, b), {"reg": reg}

        def check(res, args, kwargs, reg=reg, dtype=dtype):
            from spectral_ext import reference as R
            M, it, a, b = (_as64(x) if isinstance(x, torch.Tensor) else x for x in args)
            plan = R.sinkhorn_scaling((-M / reg)[None], a[None], b[None], it, log_domain=True)[0][0]
            return _close(res, plan, 2e-4 if dtype == torch.float32 else 1e-7)
        cases.append(Case("sinkhorn", f"marginals and reg={reg} ({dtype})", make, "valid", check, names=("reg",)))
    # reduce="mean" and batched problems against the references
    for fname, make, ref in (
            ("conv_adjacency", lambda: (se().conv_adjacency, (torch.randn(3, 4, 3), torch.randn(3, 4, 2, 5)), {}),
             lambda a: _ref_conv_adjacency({"U": _as64(a[0]), "V": _as64(a[1])}, {})),
            ("conv_adjacency", lambda: (se().conv_adjacency, (torch.randn(4, 3)[None].expand(3, 4, 3),
                                                             torch.randn(4, 2, 5)[None].expand(3, 4, 2, 5)), {}),
             lambda a: _ref_conv_adjacency({"U": _as64(a[0]), "V": _as64(a[1])}, {})),
            ("sinkhorn", lambda: (se().sinkhorn, ((torch.rand(5, 4) + 0.1)[None].expand(3, 5, 4),), {}),
             lambda a: _ref_sinkhorn({"P": _as64(a[0])}, {})),
            ("max_kernel_gram", lambda: (se().max_kernel_gram, (torch.randn(4, 3, 2),), {}),
             lambda a: _ref_max_kernel_gram({"X": _as64(a[0])}, {})),
            ("signal_projection", lambda: (se().signal_projection, (torch.randn(3, 6, 6), torch.randn(27, 4),
                                                                   torch.rand(4)), {"reduce": "mean"}),
             lambda a: _ref_signal_projection({"x": _as64(a[0]), "V": _as64(a[1]), "s": _as64(a[2])},
                                              {"reduce": "mean"})),
            ("signal_projection", lambda: (se().signal_projection, (torch.randn(2, 3, 7, 7), torch.randn(27, 4),
                                                                   torch.rand(4)), {"stride": 2, "padding": 1}),
             lambda a: _ref_signal_projection({"x": _as64(a[0]), "V": _as64(a[1]), "s": _as64(a[2])},
                                              {"stride": 2, "padding": 1})),
            ("numerical_rank", lambda: (se().numerical_rank, (torch.stack([_lowrank_int(), torch.randn(6, 5)]),),
                                        {}),
             lambda a: _ref_numerical_rank({"W": _as64(a[0])}, {})),
            ("stable_rank", lambda: (se().rank.stable_rank, (torch.randn(2, 3, 6, 5),), {}),
             lambda a: _ref_stable_rank({"W": _as64(a[0])}, {})),
            ("cka", lambda: (se().cka, _cka_pair(), {"unbiased": False}),
             lambda a: _ref_cka({"X": _as64(a[0]), "Y": _as64(a[1])}, {"unbiased": False})),
            ("procrustes", lambda: (se().procrustes, (torch.randn(10, 4), torch.randn(10, 4)), {"group": "grelu"}),
             lambda a: _ref_procrustes({"X": _as64(a[0]), "Y": _as64(a[1])}, {"group": "grelu"})),
            ("procrustes", lambda: (se().procrustes, (torch.randn(10, 4), torch.randn(10, 4)), {"centered": True}),
             lambda a: _ref_procrustes({"X": _as64(a[0]), "Y": _as64(a[1])}, {"centered": True})),
    ):
        def check(res, args, kwargs, ref=ref):
            return _close(res, ref(args), _rtol_of(args))
        cases.append(Case(fname, f"property: {fname} variant {len([c for c in cases if c.fn == fname])}", make,
                          "valid", check))
    # gradients through the operators against autograd through the references (float64)
    from spectral_ext import reference as R  # noqa: F401 (imported in the workers too)

    def grad_case(fname, call, ref_call, makers, documented, mask=None, desc=None):
        def make():
            torch.manual_seed(4)
            inputs = [m() for m in makers]

            def run():
                outs = []
                for f in (call, ref_call):
                    xs = [x.detach().clone().requires_grad_(x.is_floating_point() and (mask is None or mask[i]))
                          for i, x in enumerate(inputs)]
                    y = f(*xs)
                    if not y.requires_grad:
                        outs.append((y, None))
                        continue
                    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
                    grads = torch.autograd.grad((y * w).sum(), [x for x in xs if x.requires_grad],
                                                allow_unused=True)
                    outs.append((y, grads))
                return outs
            return run, (), {}

        def check(res, args, kwargs):
            (y, g), (y0, g0) = res
            bad = _close(y.detach(), y0.detach(), 1e-9, "value")
            if bad:
                return bad
            if g is None:
                return "the result does not require grad although the inputs do (silently detached)" \
                    if documented else None
            for i, (a, b) in enumerate(zip(g, g0)):
                if (a is None) != (b is None):
                    return f"gradient {i}: {a is None and 'None' or 'a tensor'}, reference " \
                           f"{b is None and 'None' or 'a tensor'}"
                if a is not None:
                    bad = _close(a, b, 1e-8, f"gradient {i}")
                    if bad:
                        return bad
            return None
        cases.append(Case(fname, desc or "requires_grad inputs: value and gradient against the reference", make,
                          "valid" if documented else "any", check, names=("grad", "detach", "differentia")))

    d64 = dict(dtype=torch.float64)
    grad_case("conv_adjacency", lambda U, V: se().conv_adjacency(U, V),
              lambda U, V: R.conv_adjacency(U[None], V[None])[0],
              [lambda: torch.randn(4, 3, **d64), lambda: torch.randn(4, 2, 5, **d64)], True)
    grad_case("sinkhorn", lambda P: se().sinkhorn(P, 8), lambda P: R.sinkhorn(P, 8),
              [lambda: torch.rand(5, 4, **d64) + 0.1], True)
    grad_case("signal_projection", lambda x, V, s: se().signal_projection(x, V, s),
              lambda x, V, s: R.signal_projection(x, V, s),
              [lambda: torch.randn(2, 3, 6, 6, **d64), lambda: torch.randn(27, 4, **d64),
               lambda: torch.rand(4, **d64) + 0.5], True, (True, False, False), "x requires grad: value and "
              "gradient against the reference")
    grad_case("signal_projection", lambda x, V, s: se().signal_projection(x, V, s),
              lambda x, V, s: R.signal_projection(x, V, s),
              [lambda: torch.randn(2, 3, 6, 6, **d64), lambda: torch.randn(27, 4, **d64),
               lambda: torch.rand(4, **d64) + 0.5], False, (False, True, False), "V requires grad (documented: x only)")
    grad_case("max_kernel_gram", lambda X, Y: se().max_kernel_gram(X, Y), lambda X, Y: R.max_kernel_gram(X, Y),
              [lambda: torch.randn(4, 3, 2, **d64), lambda: torch.randn(5, 3, 2, **d64)], False)
    grad_case("sinkhorn", lambda P, a, b: se().sinkhorn(P, 8, a, b), lambda P, a, b: R.sinkhorn_scaling(
        P[None], a[None], b[None], 8)[0][0],
        [lambda: torch.rand(5, 4, **d64) + 0.1, lambda: torch.full((5,), 0.8, **d64), lambda: torch.ones(4, **d64)],
        True)

    cases.append(Case("linear_sum_assignment", "batched (3, 4, 6) against scipy",
                      lambda: (se().linear_sum_assignment, (torch.rand(3, 4, 6, dtype=torch.float64),), {}),
                      "valid", _check_lsa))
    cases.append(Case("linear_sum_assignment", "maximize=True against scipy",
                      lambda: (se().linear_sum_assignment, (torch.rand(5, 5, dtype=torch.float64),),
                               {"maximize": True}), "valid", _check_lsa))
    cases.append(Case("linear_sum_assignment", "numpy in, numpy out",
                      lambda: (se().linear_sum_assignment, (torch.rand(4, 4, dtype=torch.float64).numpy(),), {}),
                      "valid", lambda r, a, k: None if type(r[0]).__module__ == "numpy" and not _check_lsa(r, a, k)
                      else f"numpy input gave {type(r[0])} / {_check_lsa(r, a, k)}"))


# --------------------------------------------------------------------------------------------------
# small models of many layer kinds


class ReluFirst(nn.Module):
    """forward starts with torch.relu_(x): the caller's input is changed in place."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu_(x)
        return self.fc2(torch.relu(self.fc1(x)))


class AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.fc = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.attn(x, x, x)
        return self.fc(y.mean(1))


class EmbNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.emb(x).mean(1))


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.fc = nn.LSTM(6, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.fc(y[:, -1])


def _bn_model():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                      nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    for bn in (m[1], m[4]):
        bn.running_mean.copy_(torch.randn(4) * 0.1)
        bn.running_var.copy_(torch.rand(4) + 0.5)
        bn.weight.data.copy_(torch.rand(4) + 0.5)
    return m


# kind -> (model maker, input maker, a layer's name, supported for the SVR family)
MODELS = {
    "Linear": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)), lambda: torch.randn(8, 6), "0",
               True),
    "Conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(),
                                     nn.Flatten(), nn.Linear(80, 3)), lambda: torch.randn(8, 3, 6, 6), "0", True),
    "grouped conv": (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.ReLU(),
                                           nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                           nn.Flatten(), nn.Linear(6, 3)), lambda: torch.randn(8, 4, 6, 6), "0", False),
    "ConvTranspose2d": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 3, 3), nn.ReLU(),
                                              nn.Flatten(), nn.Linear(108, 2)), lambda: torch.randn(8, 3, 6, 6), "0",
                        False),
    "BatchNorm": (_bn_model, lambda: torch.randn(8, 3, 6, 6), "0", True),
    "LayerNorm": (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 4)),
                  lambda: torch.randn(8, 6), "0", False),
    "MultiheadAttention": (AttnNet, lambda: torch.randn(8, 5, 8), "fc", False),
    "Embedding": (EmbNet, lambda: torch.randint(0, 10, (8, 5)), "fc", False),
    "LSTM": (LSTMNet, lambda: torch.randn(8, 5, 6), "fc", False),
    "spectral_norm Linear": (lambda: nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(6, 8)),
                                                   nn.ReLU(), nn.Linear(8, 4)), lambda: torch.randn(8, 6), "0", False),
    "relu_ first": (ReluFirst, lambda: torch.randn(8, 6), "fc1", False),
}
MODEL_WORDS = ("model", "module", "layer", "LSTM", "MultiheadAttention", "attention", "Embedding", "ConvTranspose",
               "transpose", "LayerNorm", "norm", "parametriz", "in-place", "inplace", "relu_", "group", "trace",
               "example_input", "input", "data")


def _check_layer_spectra(res, args, kwargs):
    import numpy as np
    res = res.to_frame()  # a LayerSpectra
    model = args[0]
    mods = dict(model.named_modules())
    for _, row in res.iterrows():
        m = mods.get(row["layer"])
        if m is None or not isinstance(m, (nn.Linear, nn.Conv2d)) or row["kind"] not in ("linear", "conv", "conv2d"):
            continue
        was = m.training
        m.eval()
        with torch.no_grad():
            W = m.weight.detach().double()
        m.train(was)
        g = getattr(m, "groups", 1)
        s = np.sort(np.concatenate([np.linalg.svd(B.reshape(B.shape[0], -1).numpy(), compute_uv=False)
                                    for B in W.chunk(g, 0)]))[::-1]
        if not abs(float(row["spectral_norm"]) - s[0]) <= 1e-4 * s[0]:
            return f"layer {row['layer']}: spectral_norm {row['spectral_norm']!r}, the module's weight has {s[0]!r}"
        r = (s ** 2).sum() / s[0] ** 2
        if not abs(float(row["stable_rank"]) - r) <= 1e-4 * r:
            return f"layer {row['layer']}: stable_rank {row['stable_rank']!r}, the module's weight has {r!r}"
    return None


def _check_every_weight(res, args, kwargs):
    """layer_spectra's contract: every weight (a parameter of 2 or more dimensions) has a row."""
    res = res.to_frame()  # a LayerSpectra
    layers = [str(x) for x in res["layer"]]
    missing = []
    for name, p in args[0].named_parameters():
        if p.dim() < 2:
            continue
        module = name.rsplit(".", 1)[0] if "." in name else ""
        module = module.split(".parametrizations.")[0]
        if not any(x == module or x.startswith(module + ".") or x.startswith(module + "[") or x == name
                   or x.startswith(name) for x in layers):
            missing.append(f"{name} {tuple(p.shape)}")
    return f"weights without a row: {missing} (rows: {layers})" if missing else None


def _check_layer_spectra_all(res, args, kwargs):
    return _check_layer_spectra(res, args, kwargs) or _check_every_weight(res, args, kwargs)


def _cov_check(layer):
    """activation_covariance's cov_a of `layer` against the inputs captured by a hook (eval mode)."""
    def check(res, args, kwargs):
        m = copy.deepcopy(args[0]).eval()
        seen = []
        h = dict(m.named_modules())[layer].register_forward_pre_hook(
            lambda mod, inp: seen.append(inp[0].detach().double().clone()))
        with torch.no_grad():
            m(kwargs["data"].clone())
        h.remove()
        a = seen[0].movedim(1, -1) if seen[0].dim() > 2 else seen[0]  # channels over samples and positions
        a = a.reshape(-1, a.shape[-1])
        return _close(res[layer].cov_a(), a.T @ a / a.shape[0], 1e-5, f"cov_a of {layer}")
    return check


def _rank_rows_check(rows):
    """{layer: expected rank} of jacobian_partial_rank / perturbed_pca_dimension frames."""
    def check(res, args, kwargs):
        res = res.to_frame()
        col = "rank" if "rank" in res.columns else "pca_dimension"
        for layer, want in rows.items():
            got = res.loc[res["layer"] == layer, col].tolist()
            if not got or any(int(g) != want for g in got):
                return f"{col} of {layer!r}: {got}, expected {want}"
        return None
    return check


def _check_symmetry(res, args, kwargs):
    new, _ = res
    old = copy.deepcopy(args[0]).eval()
    new = copy.deepcopy(new).eval()
    x = kwargs["example_input"].clone()
    with torch.no_grad():
        a, b = old(x.clone()), new(x.clone())
    return _close(b, a, 1e-4, "new model's output")


def _check_similarity_diag(res, args, kwargs):
    res = res.to_frame()
    same = res[res["layer_a"] == res["layer_b"]]
    vals = same["value"].to_numpy(dtype=float)
    import numpy as np
    fin = vals[np.isfinite(vals)]
    if fin.size and (np.abs(fin - 1) > 1e-4).any():
        return f"a layer's similarity with itself is not 1: {vals}"
    return None


def _model_funcs():
    se = _se
    return {
        "discover": (lambda m, x, L: (se().discover, (m, x), {}), None),
        "svr": (lambda m, x, L: (se().svr, (m, x), {"progress": False}), None),
        "layer_spectra": (lambda m, x, L: (se().spectra.layer_spectra, (m,), {}), _check_layer_spectra_all),
        "alpha_hat": (lambda m, x, L: (se().alpha_hat, (m,), {"min_tail": 3}), None),
        "apply_symmetry": (lambda m, x, L: (se().apply_symmetry, (m,), {"example_input": x, "progress": False,
                                                                         "generator": 0}), _check_symmetry),
        "activation_covariance": (lambda m, x, L: (se().activation_covariance, (m,),
                                                   {"layers": [L], "data": x, "progress": False}), None),
        "signals": (lambda m, x, L: (se().signals, (m, L, x), {"progress": False}), None),
        "similarity_matrix": (lambda m, x, L: (se().similarity_matrix, (m, m), {"layers": [L], "data": x,
                                                                                 "progress": False}),
                              _check_similarity_diag),
        "jacobian_partial_rank": (lambda m, x, L: (se().jacobian_partial_rank, (m, None, x[:1]), {"progress": False}),
                                  None),
        "perturbed_pca_dimension": (lambda m, x, L: (se().perturbed_pca_dimension, (m, None, x[:2]),
                                                     {"n_perturbations": 16, "progress": False, "generator": 0}),
                                    None),
    }


def _graph_signature(fname, result):
    if fname == "discover":
        return sorted(result.maps), [(c.previous, c.next, c.kind) for c in result.connections]
    if fname == "svr":
        return repr(result)
    return sorted(result[1])  # apply_symmetry: the transformed producers


def _same_graph_check(fname, mk, xk, layer, then=None):
    """The answer for a doubtful example_input must describe the same graph as for a good one."""
    def check(res, args, kwargs):
        torch.manual_seed(2)
        fn, a, kw = _model_funcs()[fname][0](mk(), xk(), layer)
        good = fn(*a, **kw)
        g0, g1 = _graph_signature(fname, good), _graph_signature(fname, res)
        if g0 != g1:
            return f"a different graph than for a good example_input: {g1} vs {g0}"
        return then(res, args, kwargs) if then else None
    return check


def _model_cases(cases):
    funcs = _model_funcs()
    for kind, (mk, xk, layer, supported) in MODELS.items():
        for fname, (call, check) in funcs.items():
            if fname in ("alpha_hat", "signals") and kind not in ("Linear", "Conv2d", "spectral_norm Linear"):
                continue
            def make(mk=mk, xk=xk, layer=layer, call=call):
                torch.manual_seed(2)
                return call(mk(), xk(), layer)
            expect = "valid" if supported or kind in ("LayerNorm",) and fname in (
                "layer_spectra", "alpha_hat") else "any"
            ck = check
            flat = kind in ("Linear", "LayerNorm", "spectral_norm Linear")
            if fname == "activation_covariance" and kind not in ("BatchNorm",):
                ck = _cov_check(layer)
            elif fname == "jacobian_partial_rank" and flat:
                ck = _rank_rows_check({"0": 6})
            elif fname == "perturbed_pca_dimension" and (flat or kind == "relu_ first"):
                ck = _rank_rows_check({"input": 6} if kind == "relu_ first" else {"input": 6, "0": 6})
            cases.append(Case(fname, f"model: {kind}", make, expect, ck, names=MODEL_WORDS))
    # bad models, inputs and data, on the Linear model
    mk, xk, layer, _ = MODELS["Linear"]
    bad_models = {"model=None": lambda: None, "model='abc'": lambda: "abc", "model=[Linear model]": lambda: [mk()],
                  "model=a function": lambda: (lambda x: x)}
    for fname in ("svr", "layer_spectra", "apply_symmetry", "jacobian_partial_rank"):
        call, _ = funcs[fname]
        for desc, bm in bad_models.items():
            if fname in ("layer_spectra", "alpha_hat") and desc == "model='abc'":
                desc, bm = "model='/nonexistent/ckpt.pt'", (lambda: "/nonexistent/ckpt.pt")
            cases.append(Case(fname, desc, lambda call=call, bm=bm: call(bm(), xk(), layer), "invalid",
                              names=("model", "module", "path", "file", "No such file")))
    bad_inputs = {"None": lambda x: None, "'abc'": lambda x: "abc", "empty (0, 6)": lambda x: x[:0],
                  "with NaN": lambda x: x.index_fill(0, torch.tensor([0]), NAN), "int64": lambda x: x.long(),
                  "meta": lambda x: x.to("meta"),
                  "wrong width (8, 7)": lambda x: torch.randn(8, 7), "transposed": lambda x: x.T.contiguous().T}
    expect_input = {"None": "any", "'abc'": "invalid", "empty (0, 6)": "invalid", "with NaN": "invalid",
                    "wrong width (8, 7)": "invalid", "transposed": "valid", "float64": "any", "expanded": "any"}
    for fname in ("discover", "svr", "activation_covariance", "jacobian_partial_rank"):
        call, check = funcs[fname]
        role = "example_input" if fname in ("discover", "svr", "apply_symmetry") else "data"
        for desc, bi in bad_inputs.items():
            if role == "example_input" and desc in ("list", "float16", "expanded", "int64"):
                continue
            if role == "data" and desc in ("None",) and fname in ("discover", "svr"):
                continue
            ex = expect_input.get(desc, "any")
            if role == "example_input" and desc == "None" and fname != "apply_symmetry":
                ex = "valid"  # a made-up input
            if role == "example_input" and desc in ("empty (0, 6)", "with NaN"):
                ex = "any"  # only traced: the graph must be the right one

            def make(call=call, bi=bi, fname=fname):
                torch.manual_seed(2)
                x = xk()
                if fname in ("jacobian_partial_rank", "perturbed_pca_dimension"):
                    bad = bi(x)
                    fn, args, kw = call(mk(), x, layer)
                    return fn, (args[0], None, bad), kw
                if fname == "apply_symmetry":
                    fn, args, kw = call(mk(), x, layer)
                    return fn, args, dict(kw, example_input=bi(x))
                if fname == "activation_covariance" or fname == "similarity_matrix":
                    fn, args, kw = call(mk(), x, layer)
                    return fn, args, dict(kw, data=bi(x))
                return call(mk(), bi(x), layer)
            if role == "example_input":
                ck = _same_graph_check(fname, mk, xk, layer, check if desc in ("transposed", "float64") else None)
            else:
                ck = check
            cases.append(Case(fname, f"{role}: {desc}", make, ex, ck,
                              names=(role, "x", "input", "data", "shape", "dtype", "tensor", "NaN", "finite",
                                     "empty", "sample")))


# --------------------------------------------------------------------------------------------------
# the rest of the API


def _labelled(n=24, d=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    centers = torch.randn(c, d, generator=g) * 3
    return centers[y] + torch.randn(n, d, generator=g), y


def _classifier():
    torch.manual_seed(5)
    X, y = _labelled()
    clf = nn.Linear(4, 3)
    opt = torch.optim.SGD(clf.parameters(), lr=0.1)
    for _ in range(50):
        opt.zero_grad()
        nn.functional.cross_entropy(clf(X), y).backward()
        opt.step()
    return clf


def _trained_mlp(seed=0):
    torch.manual_seed(seed)
    X, y = _labelled(48, 6, 3, seed)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(m(X), y).backward()
        opt.step()
    return m, X, y


def _misc_cases(cases):
    se = _se
    add = lambda fn, desc, make, expect="any", check=None, names=(), timeout=None: cases.append(  # noqa: E731
        Case(fn, desc, make, expect, check, names, timeout))

    # stitching_penalty
    for vals, ex in (((0.9, 0.8, 0.7), "valid"), ((-0.1, 0.8, 0.7), "invalid"), ((1.5, 0.8, 0.7), "invalid"),
                     ((NAN, 0.8, 0.7), "invalid"), ((0.9, 0.8, INF), "invalid"), (("0.9", 0.8, 0.7), "invalid"),
                     ((None, 0.8, 0.7), "invalid"), ((95, 80, 70), "invalid"),
                     ((torch.tensor(0.9), 0.8, 0.7), "any")):
        add("stitching_penalty", f"accuracies {vals!r}", lambda vals=vals: (se().stitching_penalty, vals, {}), ex,
            _check_stitching_penalty if ex != "invalid" else None, ("accuracy", "fraction"))
    # intertwiner_group
    for act, kw, ex in (("relu", {}, "valid"), ("leaky_relu", {"negative_slope": NAN}, "invalid"),
                        ("polynomial", {}, "invalid"), ("polynomial", {"degree": 1}, "invalid"),
                        ("polynomial", {"degree": 2.5}, "invalid"), ("polynomial", {"degree": NAN}, "invalid"),
                        ("polynomial", {"degree": 3}, "valid"), ("bogus", {}, "invalid"), (None, {}, "invalid"),
                        ("relu", {"n_probe": 0}, "invalid"), ("gelu", {}, "valid")):
        add("intertwiner_group", f"activation={act!r} {kw}", lambda act=act, kw=kw: (se().intertwiner_group, (act,), kw),
            ex, None, ("activation", "degree", "negative_slope", "n_probe"))
    for desc, mk, ex in (("torch.nn.ReLU()", lambda: nn.ReLU(), "valid"), ("torch.tanh", lambda: torch.tanh, "valid"),
                         ("lambda x: x ** 3", lambda: (lambda x: x ** 3), "any"),
                         ("a callable returning NaN", lambda: (lambda x: x * NAN), "invalid"),
                         ("nn.Linear(3, 3)", lambda: nn.Linear(3, 3), "invalid")):
        add("intertwiner_group", f"activation={desc}", lambda mk=mk: (se().intertwiner_group, (mk(),), {}), ex, None,
            ("activation", "elementwise", "callable"))

    # independence_deficit and classification_dimension
    def logits(n=30, c=3):
        X, y = _labelled(n, c, c, 1)
        return X, y
    for desc, mk, ex in (
            ("valid (logits, labels)", lambda: ((logits(),), {}), "valid"),
            ("eta=-1", lambda: ((logits(),), {"eta": -1.0}), "invalid"),
            ("eta=NaN", lambda: ((logits(),), {"eta": NAN}), "invalid"),
            ("max_iter=0", lambda: ((logits(),), {"max_iter": 0}), "invalid"),
            ("tol=NaN", lambda: ((logits(),), {"tol": NAN}), "invalid"),
            ("labels out of range (5 with 3 classes)", lambda: (((logits()[0], torch.full((30,), 5)),), {}),
             "invalid"),
            ("float labels", lambda: (((logits()[0], torch.rand(30)),), {}), "invalid"),
            ("labels of another length", lambda: (((logits()[0], torch.arange(20) % 3),), {}), "invalid"),
            ("logits with NaN", lambda: (((logits()[0].index_fill(0, torch.tensor([0]), NAN), logits()[1]),), {}),
             "invalid"),
            ("int logits", lambda: (((logits()[0].round().long(), logits()[1]),), {}), "any"),
            ("empty logits", lambda: (((torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)),), {}), "invalid"),
            ("one class", lambda: (((torch.randn(10, 1), torch.zeros(10, dtype=torch.long)),), {}), "any"),
            ("data=None", lambda: ((None,), {}), "invalid"),
            ("logits 1-D", lambda: (((torch.randn(30), logits()[1]),), {}), "invalid"),
            ("class_names too short", lambda: ((logits(),), {"class_names": ["a"]}), "invalid"),
            ("1e300 logits", lambda: (((logits()[0].double() * 1e300, logits()[1]),), {}), "any")):
        add("independence_deficit", desc, lambda mk=mk: (se().independence_deficit,) + mk(), ex, None,
            ("data", "logits", "labels", "eta", "max_iter", "tol", "class", "class_names", "finite"))
    for desc, mk, ex in (
            ("valid", lambda: ((_classifier(), _labelled()), {}), "valid"),
            ("ratio=1.5", lambda: ((_classifier(), _labelled()), {"ratio": 1.5}), "invalid"),
            ("ratio=NaN", lambda: ((_classifier(), _labelled()), {"ratio": NAN}), "invalid"),
            ("ratio=0", lambda: ((_classifier(), _labelled()), {"ratio": 0.0}), "any"),
            ("classifier=None", lambda: ((None, _labelled()), {}), "invalid"),
            ("classifier of the wrong width", lambda: ((nn.Linear(5, 3), _labelled()), {}), "invalid"),
            ("labels out of range", lambda: ((_classifier(), (_labelled()[0], torch.full((24,), 7))), {}),
             "invalid"),
            ("features with NaN", lambda: ((_classifier(), (_labelled()[0].index_fill(0, torch.tensor([1]), NAN),
                                                            _labelled()[1])), {}), "invalid"),
            ("empty features", lambda: ((_classifier(), (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))), {}),
             "invalid"),
            ("features float64", lambda: ((_classifier(), (_labelled()[0].double(), _labelled()[1])), {}), "any"),
            ("data=None", lambda: ((_classifier(), None), {}), "invalid"),
            ("classifier in train mode with dropout",
             lambda: ((nn.Sequential(nn.Dropout(0.5), _classifier()), _labelled()), {}), "valid")):
        add("classification_dimension", desc, lambda mk=mk: (se().classification_dimension,) + mk(), ex, None,
            ("classifier", "data", "features", "labels", "ratio", "center", "finite", "callable"))

    # hypergraph -> semantic_hierarchy
    def hg():
        return se().hypergraph(torch.randn(12, 5), torch.arange(12) % 3)
    for desc, mk, ex in (("valid", lambda: (hg(),), "valid"), ("h=None", lambda: (None,), "invalid"),
                         ("h='abc'", lambda: ("abc",), "invalid"), ("h={}", lambda: ({},), "invalid"),
                         ("h=a tensor", lambda: (torch.randn(3, 3),), "invalid")):
        add("semantic_hierarchy", desc, lambda mk=mk: (se().semantic_hierarchy, mk(), {}), ex, None,
            ("h", "hypergraph", "Hypergraph"))

    # backends and build_info
    def in_backend(name):
        def run():
            with se().use_backend(name):
                return se().current_backend()
        return run, (), {}
    for name, ex in (("native", "valid"), ("reference", "valid"), ("bogus", "invalid"), (None, "invalid")):
        add("use_backend", f"name={name!r}", lambda name=name: in_backend(name), ex,
            (lambda r, a, k, name=name: None if r == name else f"inside use_backend({name!r}): {r!r}")
            if ex == "valid" else None, ("name", "backend"))
    add("use_backend", "reference backend: conv_adjacency matches native",
        lambda: ((lambda U, V: (se().conv_adjacency(U, V), _run_in("reference", se().conv_adjacency, U, V))),
                 (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, 5, dtype=torch.float64)), {}),
        "valid", lambda r, a, k: _close(r[1], r[0], 1e-10))
    add("build_info", "no arguments", lambda: (se().build_info, (), {}), "valid",
        lambda r, a, k: None if {"cuda_compiled", "operators", "torch_version"} <= set(r) else f"keys {sorted(r)}")
    add("build_info", "an unexpected argument", lambda: (se().build_info, (1,), {}), "invalid", None, ("argument",))
    add("current_backend", "no arguments", lambda: (se().current_backend, (), {}), "valid",
        lambda r, a, k: None if r == "native" else f"{r!r}")

    # svr_many, spectral_activations, pairwise_similarity
    L = MODELS["Linear"]
    C = MODELS["Conv2d"]
    for desc, mk, ex in (("two Linear models", lambda: ([L[0](), L[0]()], L[1]()), "valid"),
                         ("no models", lambda: ([], L[1]()), "invalid"),
                         ("models=None", lambda: (None, L[1]()), "invalid"),
                         ("two architectures", lambda: ([L[0](), C[0]()], L[1]()), "invalid"),
                         ("a generator of models", lambda: ((L[0]() for _ in range(2)), L[1]()), "any")):
        add("svr_many", desc, lambda mk=mk: (se().svr_many, mk(), {"progress": False}), ex, None,
            ("models", "model", "architecture", "shape"))

    def sa(which):
        torch.manual_seed(3)
        m, x = L[0](), L[1]()
        sv = se().svr(m, x, progress=False)
        if which == "valid":
            return se().spectral_activations, (m, sv, None, x), {"progress": False}
        if which == "svr=None":
            return se().spectral_activations, (m, None, None, x), {"progress": False}
        if which == "svr of another architecture":
            return se().spectral_activations, (m, se().svr(C[0](), C[1](), progress=False), None, x), {"progress": False}
        if which == "layers=['nope']":
            return se().spectral_activations, (m, sv, ["nope"], x), {"progress": False}
        if which == "data with NaN":
            return se().spectral_activations, (m, sv, None, x.index_fill(0, torch.tensor([0]), NAN)), {"progress": False}
        if which == "batch_size=0":
            return se().spectral_activations, (m, sv, None, x), {"progress": False, "batch_size": 0}
    for which, ex in (("valid", "valid"), ("svr=None", "invalid"), ("svr of another architecture", "invalid"),
                      ("layers=['nope']", "invalid"), ("data with NaN", "invalid"), ("batch_size=0", "invalid")):
        add("spectral_activations", which, lambda which=which: sa(which), ex, None,
            ("svr", "SVR", "layer", "layers", "data", "batch_size", "architecture", "finite"))

    def feats(**over):
        X, Y = _cka_pair()
        f = {"a": X, "b": Y}
        f.update(over)
        return f

    def pw_check(r, a, k):
        f = a[0]
        row = r[(r["model_a"] == "a") & (r["model_b"] == "b")]
        if row.empty:
            return None
        want = _se().cka(f["a"], f["b"])
        return _close(row["value"].to_numpy(dtype=float), [want], 1e-4, "pairwise cka")
    for desc, mk, ex in (("valid", lambda: ((feats(),), {}), "valid"),
                         ("features={}", lambda: (({},), {}), "invalid"),
                         ("one model", lambda: (({"a": torch.randn(10, 3)},), {}), "any"),
                         ("samples differ", lambda: ((feats(b=torch.randn(9, 3)),), {}), "invalid"),
                         ("measure='bogus'", lambda: ((feats(),), {"measure": "bogus"}), "invalid"),
                         ("chunk=0", lambda: ((feats(),), {"chunk": 0}), "invalid"),
                         ("max_memory=-1", lambda: ((feats(),), {"max_memory": -1}), "invalid"),
                         ("features with NaN", lambda: ((feats(a=torch.full((10, 4), NAN)),), {}), "invalid"),
                         ("int features", lambda: ((feats(a=torch.randint(0, 5, (10, 4))),), {}), "any"),
                         ("meta features", lambda: ((feats(a=torch.randn(10, 4, device="meta")),), {}), "any"),
                         ("pairs=[('a', 'zz')]", lambda: ((feats(),), {"pairs": [("a", "zz")]}), "invalid"),
                         ("measure='procrustes'", lambda: ((feats(b=torch.randn(10, 4)),),
                                                           {"measure": "procrustes"}), "valid"),
                         ):
        add("pairwise_similarity", desc, lambda mk=mk: (se().pairwise_similarity,) + mk(), ex,
            pw_check if ex != "invalid" and "procrustes" not in desc else None,
            ("features", "pairs", "measure", "chunk", "max_memory", "sample", "finite", "zz", "memory"))

    # stitch, rainbow, clip (trained MLPs)
    def st(**kw):
        m1, X, y = _trained_mlp(0)
        m2, _, _ = _trained_mlp(1)
        base = dict(data=(X, y), epochs=1, progress=False, generator=0)
        base.update(kw)
        layer = base.pop("layer", "1")
        return se().stitch, (m1, m2, layer), base
    for desc, kw, ex in (("valid affine", {}, "valid"), ("kind='grelu'", {"kind": "grelu"}, "valid"),
                         ("kind='bogus'", {"kind": "bogus"}, "invalid"), ("layer='nope'", {"layer": "nope"}, "invalid"),
                         ("epochs=-1", {"epochs": -1}, "invalid"), ("lr=NaN", {"lr": NAN}, "invalid"),
                         ("batch_size=0", {"batch_size": 0}, "invalid"),
                         ("kind='lowrank', rank=0", {"kind": "lowrank", "rank": 0}, "invalid"),
                         ("data=None", {"data": None}, "invalid"), ("tau=-1 (softsort)", {"kind": "softsort", "tau": -1.0},
                                                                      "invalid"),
                         ("data with NaN", {"data": (torch.full((8, 6), NAN), torch.zeros(8, dtype=torch.long))},
                          "invalid")):
        add("stitch", desc, lambda kw=kw: st(**kw), ex, None,
            ("kind", "layer", "epochs", "lr", "batch_size", "rank", "data", "tau", "finite", "nope"))

    def rb(**kw):
        m, X, y = _trained_mlp(0)
        base = dict(progress=False, generator=0)
        base.update(kw)
        data = base.pop("data", (X, y))
        return se().rainbow, (m, data), base
    for desc, kw, ex in (("valid", {}, "valid"), ("data=None", {"data": None}, "invalid"),
                         ("batch_size=0", {"batch_size": 0}, "invalid"), ("generator='x'", {"generator": "x"}, "invalid"),
                         ("data with NaN", {"data": (torch.full((8, 6), NAN), torch.zeros(8, dtype=torch.long))},
                          "invalid")):
        add("rainbow", desc, lambda kw=kw: rb(**kw), ex, None, ("data", "batch_size", "generator", "finite"))

    def cl(**kw):
        m, X, y = _trained_mlp(0)
        base = dict(progress=False)
        base.update(kw)
        layer = base.pop("layer", "2")
        ks = base.pop("ks", [1, 2, 8])
        return se().clip, (m, layer, (X, y), ks), base
    for desc, kw, ex in (("valid", {}, "valid"), ("ks=[-1]", {"ks": [-1]}, "invalid"), ("ks=[0]", {"ks": [0]}, "any"),
                         ("ks=[100]", {"ks": [100]}, "any"), ("ks=[]", {"ks": []}, "any"),
                         ("ks=[NaN]", {"ks": [NAN]}, "invalid"),
                         ("basis='bogus'", {"basis": "bogus"}, "invalid"), ("basis='weight'", {"basis": "weight", "ks": [1, 2]}, "valid"),
                         ("max_copies=0", {"max_copies": 0}, "invalid"), ("layer='nope'", {"layer": "nope"}, "invalid"),
                         ("covariance of the wrong size", {"covariance": torch.eye(3)}, "invalid")):
        add("clip", desc, lambda kw=kw: cl(**kw), ex, None,
            ("ks", "k", "basis", "max_copies", "layer", "covariance", "nope"))

    # model-function numbers on the Linear model
    mk, xk = L[0], L[1]
    for fname, make_kw, values in (
            ("svr", lambda v: ((mk(), xk()), {"progress": False, "p": v}), (-1.0, NAN, 0.0)),
            ("svr", lambda v: ((mk(), xk()), {"progress": False, "top": v}), (0, -1)),
            ("svr", lambda v: ((mk(), xk()), {"progress": False, "dtype": v}), ("float64", torch.int64)),
            ("jacobian_partial_rank", lambda v: ((mk(),), {"data": xk()[:1], "progress": False, "eps": v}), (-1.0, NAN)),
            ("jacobian_partial_rank", lambda v: ((mk(),), {"data": xk()[:1], "progress": False, "chunk_size": v}), (0,)),
            ("jacobian_partial_rank", lambda v: ((mk(),), {"data": xk()[:1], "progress": False, "mode": v}), ("bogus",)),
            ("jacobian_partial_rank", lambda v: ((mk(),), {"data": xk()[:1], "progress": False, "at": v}), ("bogus",)),
            ("jacobian_partial_rank", lambda v: ((mk(),), {"data": xk()[:1], "progress": False, "rank_of": v}), ("bogus",)),
            ("jacobian_partial_rank", lambda v: ((mk(),), {"data": xk()[:1], "progress": False, "layers": v}), (["nope"],)),
            ("perturbed_pca_dimension", lambda v: ((mk(),), {"data": xk()[:2], "progress": False, "n_perturbations": v}),
             (0, 1)),
            ("perturbed_pca_dimension", lambda v: ((mk(),), {"data": xk()[:2], "progress": False, "n_perturbations": 8,
                                                                       "scale": v}), (NAN, 0.0)),
            ("perturbed_pca_dimension", lambda v: ((mk(),), {"data": xk()[:2], "progress": False, "n_perturbations": 8,
                                                                       "batch_size": v}), (0,)),
            ("activation_covariance", lambda v: ((mk(),), {"layers": ["0"], "data": xk(), "progress": False, "batch_size": v}),
             (0, NAN)),
            ("activation_covariance", lambda v: ((mk(),), {"data": xk(), "progress": False, "layers": v}),
             (["nope"],)),
            ("signals", lambda v: ((mk(), "0", xk()), {"progress": False, "reduce": v}), ("bogus",)),
            ("signals", lambda v: ((mk(), v, xk()), {"progress": False}), ("nope", None)),
            ("signals", lambda v: ((mk(), "0", xk()), {"progress": False, "batch_size": v}), (0,)),
            ("apply_symmetry", lambda v: ((mk(),), {"progress": False, "example_input": xk(), "group": v}), ("bogus",)),
            ("apply_symmetry", lambda v: ((mk(),), {"progress": False, "example_input": xk(), "elements": v}),
             ({"nope": (torch.arange(8), torch.ones(8))}, {"0": (torch.zeros(8, dtype=torch.long), torch.ones(8))},
              {"0": (torch.arange(8), -torch.ones(8))}, {"0": (torch.arange(8), torch.zeros(8))},
              {"0": (torch.arange(5), torch.ones(5))})),
            ("layer_spectra", lambda v: ((C[0](),), {"toeplitz_m": v}), (0, -1, NAN)),
            ("layer_spectra", lambda v: ((mk(),), {"min_tail": v}), (-1,)),
            ("layer_spectra", lambda v: ((mk(),), {"convention": v}), ("bogus",)),
            ("layer_spectra", lambda v: ((v,), {}), ({}, {"w": torch.randn(4, 3)}, {"w": torch.full((4, 3), NAN)},
                                                      {"w": torch.randint(0, 3, (4, 3))})),
            ("alpha_hat", lambda v: ((mk(),), {"convention": v}), ("bogus",)),
            ("alpha_hat", lambda v: ((mk(),), {"min_tail": v}), (-1, 0)),
            ("similarity_matrix", lambda v: ((mk(), mk()), {"layers": ["0"], "data": xk(), "progress": False, "measure": v}),
             ("bogus",)),
            ("similarity_matrix", lambda v: ((mk(), mk()), {"data": xk(), "progress": False, "layers": v}),
             (["nope"],)),
            ("discover", lambda v: ((mk(), v), {}), ((torch.randn(8, 6), torch.randn(8, 6)),)),
    ):
        for v in values:
            desc = f"{list(make_kw(v)[1].items())[-1][0] if make_kw(v)[1] else 'arg'}={v!r}"[:90]
            ex = "invalid"
            if fname == "perturbed_pca_dimension" and v in (1, -1.0, 0.0):
                ex = "any"
            if fname == "layer_spectra" and isinstance(v, dict):
                desc, ex = f"model=state_dict {dict((k, tuple(t.shape)) for k, t in v.items())} " \
                           f"{[t.dtype for t in v.values()]}", ("any" if v else "invalid")
                if v and torch.isnan(next(iter(v.values())).float()).any():
                    desc += " NaN"
            if fname == "discover":
                desc, ex = "example_input=a tuple of two inputs for a one-input model", "invalid"
            if fname == "signals" and v is None:
                ex = "invalid"
            if fname == "svr" and v == 0.0:
                ex = "any"
            add(fname, desc, lambda fname=fname, make_kw=make_kw, v=v: (_model_funcs()[fname][0](
                mk(), xk(), "0")[0],) + make_kw(v), ex, None,
                ("p", "top", "dtype", "eps", "chunk_size", "mode", "at", "rank_of", "layers", "layer", "n_perturbations",
                 "scale", "batch_size", "reduce", "group", "elements", "toeplitz_m", "min_tail", "convention",
                 "measure", "example_input", "nope", "perm", "scale", "state_dict", "weight"))

    # make_digits_zoo (bad arguments are refused before training; one tiny valid run)
    def zoo(**kw):
        base = dict(n=1, epochs=1, checkpoints=(0, 1), group_size=1, progress=False, threads=1)
        base.update(kw)
        if "out" in kw:
            return se().make_digits_zoo, (base.pop("out"),), base
        return _in_tmp(se().make_digits_zoo, **base)
    for desc, kw, ex in (("tiny valid run", {}, "valid"), ("n=0", {"n": 0}, "invalid"), ("n=-1", {"n": -1}, "invalid"),
                         ("checkpoints beyond epochs", {"checkpoints": (0, 5)}, "invalid"),
                         ("batch_size=0", {"batch_size": 0}, "invalid"), ("threads=0", {"threads": 0}, "invalid"),
                         ("seed='a'", {"seed": "a"}, "invalid"), ("out=None", {"out": 0}, "invalid"),
                         ("out under a file", {"out": "/etc/hostname/zoo"}, "invalid")):
        if desc == "out=None":
            add("make_digits_zoo", desc, lambda: (se().make_digits_zoo, (None,), {"n": 1, "epochs": 1,
                                                                                  "checkpoints": (0, 1),
                                                                                  "progress": False}),
                ex, None, ("out",))
            continue
        add("make_digits_zoo", desc, lambda kw=kw: zoo(**kw), ex, None,
            ("n", "epochs", "checkpoints", "group_size", "batch_size", "threads", "seed", "out", "directory"),
            timeout=90)

    # ModelGraph / SVR constructors, zoo, zoo.report, plot, reference
    add("ModelGraph", "maps=None, connections=None", lambda: (se().ModelGraph, (None, None), {}), "any", None,
        ("maps", "connections"))
    add("ModelGraph", "maps='abc', connections=[]", lambda: (se().ModelGraph, ("abc", []), {}), "any", None,
        ("maps", "connections"))
    add("SVR", "every argument None", lambda: (se().SVR, (None,) * 8, {}), "invalid", None,
        ("model", "graph", "layers", "adjacencies", "p", "flattening"))
    add("zoo.analyze", "a missing folder", lambda: (se().zoo.analyze, ("/nonexistent/zoo",), {"progress": False}),
        "invalid", None, ("source", "nonexistent", "No such", "not found", "exist"))
    add("zoo.analyze", "source=None", lambda: (se().zoo.analyze, (None,), {"progress": False}), "invalid", None,
        ("source",))
    def zoo_report():  # a submodule the zoo package loads on first use
        import spectral_ext.zoo.report

        return spectral_ext.zoo.report.report

    add("zoo.report.report", "no tables, a new folder", lambda: _in_tmp(zoo_report(), {}, progress=False), "any",
        None, ("out", "tables"))
    add("zoo.report.report", "tables=None", lambda: _in_tmp(zoo_report(), None, progress=False),
        "invalid", None, ("tables",))
    add("plot.esd", "eigenvalues=None", lambda: (se().plot.esd, (None,), {}), "invalid", None, ("eigenvalues",))
    add("plot.esd", "eigenvalues='abc'", lambda: (se().plot.esd, ("abc",), {}), "invalid", None, ("eigenvalues",))
    add("plot.esd", "empty eigenvalues", lambda: (se().plot.esd, (torch.zeros(0),), {}), "any", None, ("eigenvalues",))
    add("plot.esd", "valid", lambda: (se().plot.esd, (_pareto(),), {}), "valid")
    add("reference.sinkhorn", "iters=-1", lambda: (se().reference.sinkhorn, (torch.rand(3, 3), -1), {}), "any", None,
        ("iters",))
    add("reference.conv_adjacency", "valid 3-D", lambda: (se().reference.conv_adjacency,
                                                          (torch.randn(2, 4, 3), torch.randn(2, 4, 2, 5)), {}), "valid")
    add("signals", "callable module: layer of a Conv2d, reduce=None",
        lambda: (se().signals, (C[0](), "0", C[1]()), {"progress": False, "reduce": None}), "valid")


def _in_tmp(fn, *args, **kwargs):
    """(run, (), {}) calling fn(a new temporary folder, *args, **kwargs), the folder removed after."""
    import shutil
    import tempfile

    def run():
        out = tempfile.mkdtemp(prefix="probe_")
        try:
            return fn(os.path.join(out, "sub"), *args, **kwargs)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return run, (), {}


def _run_in(backend, fn, *args):
    with _se().use_backend(backend):
        return fn(*args)


_CASES = None


def build_cases():
    global _CASES
    if _CASES is None:
        cases = []
        _tensor_cases(cases)
        _numeric_cases(cases)
        _scale_cases(cases)
        _model_cases(cases)
        _misc_cases(cases)
        if os.environ.get("PROBE_SELFTEST"):  # the machinery itself: a hang and a crash
            import signal
            cases.append(Case("selftest", "sleeps past its timeout", lambda: (time.sleep, (30,), {}), "valid",
                              timeout=3))
            cases.append(Case("selftest", "kills its worker", lambda: (os.kill, (os.getpid(), signal.SIGSEGV), {}),
                              "valid"))
        _CASES = cases
    return _CASES


if __name__ == "__main__":
    sys.exit(main())
